"""Depth pruning on the example LM: the greedy curve with intervals, the one-shot BI / angular curves, the
exported model reloaded and evaluated, and how the proxies rank the blocks against measured removal.

Run (a few minutes on 2 CPU cores; trains the tiny LM first when OUT holds none, 2 to 4 minutes more):

    PYTHONPATH=src python examples/prune_example_lm.py --out runs/tiny-lm --remove 3

Writes runs/tiny-lm/pruning/{skip,bi,angular}/ (pruning.csv, pruning.json, figures/pruning.png; skip also
pruning_scores.csv) and runs/tiny-lm/pruned/ (the greedy curve's model, loadable by from_pretrained), and
prints each curve, the reloaded model's nll beside the curve's last step, and Spearman's ρ of each proxy with
the Δ nll of removing each block alone.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from pathlib import Path

import torch
import transformers

from criticality.core.evaluate import evaluate
from criticality.interventions.proxies import spearman
from criticality.paper.tiny_lm import train_tiny_lm
from criticality.pipelines.analyze_hf import lm_data, read_tokens
from criticality.pipelines.prune import PruneConfig, prune_folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/tiny-lm", help="the example LM's folder (trained if absent)")
    parser.add_argument("--remove", type=int, default=3, help="blocks to remove (the LM has 4)")
    parser.add_argument("--threshold", type=float, default=0.1, help="tolerated Δ nll (nats per token)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if not any(out.glob("checkpoint-*")):
        train_tiny_lm(out)
    data = out / "eval.txt"
    base = PruneConfig(remove=args.remove, metric="nll", threshold=args.threshold, batch_size=64)
    curves = {}
    for by in ("skip", "bi", "angular"):
        config = replace(base, by=by, out=str(out / "pruning" / by),
                         save=str(out / "pruned") if by == "skip" else None)
        _, curves[by] = prune_folder(out, data, config, progress=False)
        print(f"\n--by {by}:\n" + "\n".join(curves[by].lines()) + f"\n{curves[by].statement}")

    greedy = curves["skip"]
    pruned = transformers.AutoModelForCausalLM.from_pretrained(out / "pruned").eval()
    tokens = read_tokens(data, 64, vocab_size=256)
    nll = evaluate(pruned, lm_data(tokens, 64), metrics=("nll",), batch_size=64)["nll"]
    print(f"\nreloaded {out / 'pruned'} ({pruned.config.num_hidden_layers} layers): nll {nll:.4f}; "
          f"the curve's step {args.remove}: {greedy.table.nll.iloc[-1]:.4f}")

    alone = greedy.scores[greedy.scores.step == 1].set_index("block").delta  # each block removed alone
    proxies = {row["block"]: row for row in greedy.summary["proxies"]}
    print("\nblock            Δ nll alone     BI   angular")
    for block, delta in alone.items():
        print(f"{block:16s} {delta:+10.4f} {proxies[block]['bi']:8.4f} {proxies[block]['angular']:8.4f}")
    for proxy in ("bi", "angular"):
        rho = spearman([proxies[b][proxy] for b in alone.index], alone.to_numpy())
        print(f"Spearman ρ({proxy}, Δ nll alone) = {rho:+.2f} over {len(alone)} blocks")


if __name__ == "__main__":
    main()
