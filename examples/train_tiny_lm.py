"""Train a tiny Llama-style byte-level LM offline and save an HF Trainer-style checkpoint folder.

Run (about 2 to 3 minutes on one CPU thread):

    python examples/train_tiny_lm.py --out runs/tiny-lm
    criticality analyze-hf runs/tiny-lm --data runs/tiny-lm/eval.txt --groups blocks
    criticality analyze-hf runs/tiny-lm --data runs/tiny-lm/eval.txt --groups sublayers --out runs/tiny-lm/sublayers

Writes runs/tiny-lm/checkpoint-<step>/ (model.safetensors, config.json, trainer_state.json) for every
--save-at step, 0 included, and runs/tiny-lm/eval.txt (held-out text). See examples/README.md.
"""

from __future__ import annotations

import argparse
import logging

import torch
import transformers

from criticality.paper.tiny_lm import CORPUS, SAVE_AT, train_tiny_lm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/tiny-lm", help="output folder (default runs/tiny-lm)")
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps (batches of 32 × 64 bytes)")
    parser.add_argument("--save-at", default=",".join(map(str, SAVE_AT)), help="steps with a checkpoint")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--corpus", default=None, help=f"text file or folder (default {CORPUS})")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the library logs a line per checkpoint
    transformers.utils.logging.disable_progress_bar()  # one "Writing model shards" bar per checkpoint
    torch.set_num_threads(args.threads)
    out = train_tiny_lm(args.out, steps=args.steps, save_at=[int(s) for s in args.save_at.split(",")],
                        seed=args.seed, corpus=args.corpus)
    print(f"saved {out}/checkpoint-*; analyse with:\n"
          f"  criticality analyze-hf {out} --data {out}/eval.txt --groups blocks")


if __name__ == "__main__":
    main()
