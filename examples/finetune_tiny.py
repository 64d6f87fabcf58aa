"""Which layers' fine-tuning matters? A tiny GPT-NeoX pretrained on one text, fine-tuned on another, offline.

Run::

    python examples/finetune_tiny.py --out runs/finetune        # ~2 min on 2 CPU cores
    criticality analyze-hf runs/finetune/run --data runs/finetune/eval.txt --seq-len 64

Writes::

    runs/finetune/pretrained/       save_pretrained folder: byte-level GPT-NeoX (4 blocks, width 64) after
                                    --pretrain-steps on the GPL text of /usr/share/common-licenses
    runs/finetune/run/checkpoint-0/ the pretrained weights, saved by CriticalityCallback when fine-tuning begins
    runs/finetune/run/checkpoint-1/ … -3/, -8/, -40/, -90/ (the paper's early schedule), checkpoint-N/ (final)
    runs/finetune/run/criticality.json   the callback's analysis at the end (also in trainer_state's log)
    runs/finetune/eval.txt          held-out Apache-2.0 text (the fine-tuning domain)

Resetting a group then means undoing its fine-tuning (back to the pretrained weights). Without the
callback, a Trainer run has no checkpoint-0; pass the pretrained model instead:
``criticality analyze-hf RUN --data eval.txt --init-checkpoint runs/finetune/pretrained`` (a folder, or a
repository id in the hub cache such as ``EleutherAI/pythia-70m``). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from criticality.adapters.callback import CriticalityCallback

LICENSES = Path("/usr/share/common-licenses")


def byte_rows(text: str, seq_len: int) -> torch.Tensor:
    ids = torch.tensor(list(text.encode("utf-8")), dtype=torch.int64)
    n = len(ids) // seq_len
    return ids[: n * seq_len].reshape(n, seq_len)  # (N, seq_len) byte ids


def trainer(model, rows: torch.Tensor, out: Path, steps: int, callbacks=(), save_steps: int | None = None):
    import transformers

    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=16, learning_rate=3e-3,
        save_steps=save_steps or steps, logging_steps=max(steps // 5, 1), report_to="none", use_cpu=True,
        save_only_model=True, disable_tqdm=True, seed=0)
    data = [{"input_ids": r, "labels": r} for r in rows]
    t = transformers.Trainer(model=model, args=args, train_dataset=data)
    for cb in callbacks:
        cb.attach(t)
    return t


def main(argv: list[str] | None = None) -> int:
    import transformers

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/finetune"))
    parser.add_argument("--pretrain-steps", type=int, default=150)
    parser.add_argument("--finetune-steps", type=int, default=120)
    parser.add_argument("--seq-len", type=int, default=64, help="bytes per sequence")
    args = parser.parse_args(argv)
    pretrain_text = (LICENSES / "GPL-3").read_text()
    tune_text = (LICENSES / "Apache-2.0").read_text()
    cut = int(len(tune_text) * 0.9)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "eval.txt").write_text(tune_text[cut:])

    torch.manual_seed(0)
    config = transformers.GPTNeoXConfig(vocab_size=256, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                        intermediate_size=256, max_position_embeddings=args.seq_len)
    model = transformers.GPTNeoXForCausalLM(config)
    trainer(model, byte_rows(pretrain_text, args.seq_len), args.out / "pretraining", args.pretrain_steps).train()
    model.save_pretrained(args.out / "pretrained")

    tuned = transformers.GPTNeoXForCausalLM.from_pretrained(args.out / "pretrained")
    held_out = byte_rows(tune_text[cut:], args.seq_len)[:32]
    callback = CriticalityCallback(early="paper", eval_data=held_out)
    trainer(tuned, byte_rows(tune_text[:cut], args.seq_len), args.out / "run", args.finetune_steps,
            callbacks=[callback]).train()
    verdicts = {v["group"]: v["verdict"] for v in callback.result.summary["verdicts"]}
    print(f"wrote {args.out / 'run'}; verdicts of undoing each group's fine-tuning: {verdicts}")
    print(f"next: criticality analyze-hf {args.out / 'run'} --data {args.out / 'eval.txt'} --seq-len {args.seq_len}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
