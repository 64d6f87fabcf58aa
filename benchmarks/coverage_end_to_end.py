"""Coverage of the verdict table's Δ error interval, measured end to end through ``analyze()``.

Run::

    PYTHONPATH=src .venv/bin/python benchmarks/coverage_end_to_end.py             # 400 test sets per row, ~2 min
    PYTHONPATH=src .venv/bin/python benchmarks/coverage_end_to_end.py --reps 100  # quicker, ±0.04

A lookup model (:class:`Lookup`) answers example i with the logits stored in row i of its ``table`` parameter, so
the trained model's and the re-initialized model's predictions are set example by example. Per row of issue 24's
table, each replication draws a test set of n examples from a population where an example is, independently,
"b" (final right, reset wrong) with probability p_b, "c" (final wrong, reset right) with p_c, else right (or,
with probability 0.1, wrong) for both; ``analyze(..., ops=["reinit"])`` runs on it and the ``table`` group's
``delta_error_low/high`` either contains the true Δ = p_b − p_c or not. Prints a Markdown table: n, p_b, p_c,
the share of test sets covered, its two-standard-error band. ``docs/statistics.md`` holds the result.
``tests/test_coverage.py`` runs the same replication at a few test sets per row and checks the intervals are
the documented function's.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
from torch import nn

import criticality

ROWS = ((100, 0.02, 0.002), (400, 0.01, 0.0), (100, 0.05, 0.0), (2000, 0.012, 0.002), (400, 0.06, 0.04),
        (2000, 0.002, 0.0))  # issue 24's n, p_b, p_c, and the score interval's weakest row
BOTH_WRONG = 0.1  # share of concordant examples both models get wrong


class Lookup(nn.Module):
    """Logits of example i are ``table[i]`` (input: the example's index as a float, shape (N, 1))."""

    def __init__(self, n: int, classes: int = 2):
        super().__init__()
        self.table = nn.Parameter(torch.zeros(n, classes))  # (N, classes)
        self.bias = nn.Parameter(torch.zeros(classes))  # a second group, the same at every checkpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[x[:, 0].long()] + self.bias  # (B, classes)

    def layer_groups(self) -> dict[str, list[str]]:
        return {"table": ["table"], "bias": ["bias"]}


def test_set(n: int, pb: float, pc: float, rng: np.random.Generator):
    """``(model, checkpoints, data, b, c)``: one replication; b, c the discordant counts it holds."""
    u = rng.random(n)
    kind = np.where(u < pb, 1, np.where(u < pb + pc, 2, 0))  # 1: b, 2: c, 0: concordant
    both_wrong = (kind == 0) & (rng.random(n) < BOTH_WRONG)
    final_right = (kind == 1) | ((kind == 0) & ~both_wrong)
    reset_right = (kind == 2) | ((kind == 0) & ~both_wrong)
    y = torch.as_tensor(rng.integers(0, 2, n))
    model = Lookup(n)

    def logits(right: np.ndarray) -> torch.Tensor:
        label = torch.where(torch.as_tensor(right), y, 1 - y)  # the class this model predicts
        return nn.functional.one_hot(label, 2).float() * 4.0  # (N, 2)

    start = {"table": logits(reset_right), "bias": torch.zeros(2)}
    end = {"table": logits(final_right), "bias": torch.zeros(2)}
    x = torch.arange(n, dtype=torch.float32)[:, None]  # (N, 1)
    return model, {0: start, 1: end}, (x, y), int((kind == 1).sum()), int((kind == 2).sum())


def replicate(n: int, pb: float, pc: float, reps: int, seed: int = 0) -> list[tuple[float, float, int, int]]:
    """``reps`` end-to-end intervals of the ``table`` group: (low, high, b, c) each."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(reps):
        model, checkpoints, data, b, c = test_set(n, pb, pc, rng)
        result = criticality.analyze(model, checkpoints, data, ops=["reinit"], metrics=["error"], progress=False,
                                     init="shuffle", batch_size=n)
        row = result.verdicts.set_index("group").loc["table"]
        out.append((float(row.delta_error_low), float(row.delta_error_high), b, c))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=400, help="test sets per row")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| n | p_b | p_c | coverage, end to end | ±2 se |\n|---|---|---|---|---|")
    for n, pb, pc in ROWS:
        t0 = time.time()
        got = replicate(n, pb, pc, args.reps)
        cov = np.mean([lo - 1e-12 <= pb - pc <= hi + 1e-12 for lo, hi, _, _ in got])
        band = 2 * math.sqrt(max(cov * (1 - cov), 1e-12) / args.reps)
        print(f"| {n:,} | {pb} | {pc} | {cov:.3f} | {band:.3f} |  <!-- {time.time() - t0:.0f} s -->", flush=True)


if __name__ == "__main__":
    main()
