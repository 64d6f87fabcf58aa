"""Training throughput and accuracy: FCN 3×256 on Fashion-MNIST, `criticality.paper.train` vs a plain loop;
on CUDA also a conv net at paper width with the GPU path (autocast, channels_last, data on the device).

Run: ``.venv/bin/python benchmarks/bench_train.py [--epochs 20] [--out runs/bench-train] [--cuda-only]``
Prints images/s of our training loop (median over epochs after the first), the same for a plain
PyTorch loop (DataLoader over a TensorDataset, same model, optimizer and batch size) measured in this
process, their ratio, and the final test error (issue target: ≤ 0.12 after 20 epochs, ≥ 25k images/s).
The CUDA case (skipped, saying so, without a GPU) trains VGG-11 (plain, width 64) on Fashion-MNIST with
``criticality.paper.train`` (amp auto = bf16 where supported, channels_last, in-memory data on the GPU) and a
float32 plain loop fed from CPU tensors, both in this process, and prints both rates and their ratio.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from criticality.paper import data, models
from criticality.paper.train import train
from criticality.paper.training.config import TrainConfig


def plain_loop_images_per_s(batch_size: int = 128, epochs: int = 4, model_name: str = "fcn-3x256",
                            device: str = "cpu", width: int | None = None, max_train: int | None = None) -> float:
    """Median images/s over ``epochs`` epochs of a textbook loop (the first epoch, warm-up, not counted)."""
    ds = data.load("fashion-mnist", max_train=max_train)
    model = models.build(model_name, ds.input_shape, ds.num_classes, width=width).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*ds.train), batch_size=batch_size,
                                         shuffle=True)
    rates = []
    for _ in range(epochs):
        start = time.perf_counter()
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        if device != "cpu":
            torch.cuda.synchronize()
        rates.append(len(ds.train[1]) / (time.perf_counter() - start))
    return statistics.median(rates[1:])


def cuda_case(out: str, epochs: int = 4, max_train: int = 20000) -> None:
    """VGG-11 (plain, width 64) on CUDA: the GPU training path against a float32 plain loop, same process."""
    if not torch.cuda.is_available():
        print("CUDA case: skipped (no CUDA device)")
        return
    shutil.rmtree(out, ignore_errors=True)
    cfg = TrainConfig(model="vgg11", data="fashion-mnist", width=64, epochs=epochs, max_train=max_train,
                      max_test=2000, lr=0.02, warmup=1, init="kaiming", augment=True, checkpoints="0",
                      device="cuda")
    train(cfg, out, progress=False)
    log = [json.loads(line) for line in Path(out, "log.jsonl").read_text().splitlines()]
    ours = statistics.median(r["images_per_s"] for r in log[2:] or log[1:])
    plain = plain_loop_images_per_s(model_name="vgg11", device="cuda", width=64, max_train=max_train, epochs=epochs)
    print(f"CUDA case on {torch.cuda.get_device_name()}: VGG-11 width 64, {max_train} Fashion-MNIST images")
    print(f"  criticality.paper.train (amp auto, channels_last, data on GPU, crop+flip): {ours:,.0f} images/s")
    print(f"  plain float32 loop (CPU tensors, no augmentation): {plain:,.0f} images/s  ratio {ours / plain:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--out", default="runs/bench-train")
    parser.add_argument("--cuda-only", action="store_true", help="run only the CUDA case")
    args = parser.parse_args()
    cuda_case(args.out + "-cuda")
    if args.cuda_only:
        return
    shutil.rmtree(args.out, ignore_errors=True)
    train(TrainConfig(model="fcn-3x256", data="fashion-mnist", epochs=args.epochs, device="cpu"), args.out)
    log = [json.loads(line) for line in Path(args.out, "log.jsonl").read_text().splitlines()]
    ours = statistics.median(r["images_per_s"] for r in log[2:] or log[1:])
    plain = plain_loop_images_per_s()
    print(f"machine: {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    print(f"criticality.paper.train: {ours:,.0f} images/s (median of epochs 2..{args.epochs})")
    print(f"plain DataLoader loop: {plain:,.0f} images/s (median of 3 epochs after a warm-up)  "
          f"ratio {ours / plain:.2f}x")
    print(f"final test error after {args.epochs} epochs: {log[-1]['test_error']:.4f} (target <= 0.12)")


if __name__ == "__main__":
    main()
