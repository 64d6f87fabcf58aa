"""Training throughput and accuracy: FCN 3×256 on Fashion-MNIST, `criticality.train` vs a plain loop.

Run: ``.venv/bin/python benchmarks/bench_train.py [--epochs 20] [--out runs/bench-train]``
Prints images/s of our training loop (median over epochs after the first), the same for a plain
PyTorch loop (DataLoader over a TensorDataset, same model, optimizer and batch size) measured in this
process, their ratio, and the final test error (issue target: ≤ 0.12 after 20 epochs, ≥ 25k images/s).
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

from criticality import data, models
from criticality.train import TrainConfig, train


def plain_loop_images_per_s(batch_size: int = 128, epochs: int = 4) -> float:
    """Median images/s over ``epochs`` epochs of a textbook loop (the first epoch, warm-up, not counted)."""
    ds = data.load("fashion-mnist")
    model = models.build("fcn-3x256", ds.input_shape, ds.num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*ds.train), batch_size=batch_size,
                                         shuffle=True)
    rates = []
    for _ in range(epochs):
        start = time.perf_counter()
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        rates.append(len(ds.train[1]) / (time.perf_counter() - start))
    return statistics.median(rates[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--out", default="runs/bench-train")
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    train(TrainConfig(model="fcn-3x256", data="fashion-mnist", epochs=args.epochs, device="cpu"), args.out)
    log = [json.loads(line) for line in Path(args.out, "log.jsonl").read_text().splitlines()]
    ours = statistics.median(r["images_per_s"] for r in log[2:] or log[1:])
    plain = plain_loop_images_per_s()
    print(f"machine: {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    print(f"criticality.train: {ours:,.0f} images/s (median of epochs 2..{args.epochs})")
    print(f"plain DataLoader loop: {plain:,.0f} images/s (median of 3 epochs after a warm-up)  "
          f"ratio {ours / plain:.2f}x")
    print(f"final test error after {args.epochs} epochs: {log[-1]['test_error']:.4f} (target <= 0.12)")


if __name__ == "__main__":
    main()
