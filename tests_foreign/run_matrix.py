"""Run the architecture matrix outside pytest, in parallel worker processes, and write its table.

    PYTHONPATH=src .venv-foreign/bin/python tests_foreign/run_matrix.py --jobs 3 [--only timm/] [--out FILE]
    PYTHONPATH=src .venv-foreign/bin/python tests_foreign/run_matrix.py --table-from build/architectures.jsonl

Same cases (cases.py), checks (matrix.run_case) and table (matrix.table) as ``make test-foreign``; each worker
uses one torch thread. Writes the markdown to ``--out`` (default build/architectures.md) and one JSON line per
case to the same path with ``.jsonl`` (problems and refusals verbatim, CPU seconds). Exit status 1 when a case
outside known.KNOWN fails or a known one passes, as the pytest run would.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))


def _one(key: str):
    import torch

    torch.set_num_threads(1)
    from cases import CASES
    from matrix import run_case

    return run_case(key, CASES[key])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--only", default="", help="run only the cases whose key starts with this (e.g. hf/)")
    parser.add_argument("--out", type=Path, default=HERE.parent / "build" / "architectures.md")
    parser.add_argument("--table-from", type=Path, help="run nothing: rebuild the table from a run's .jsonl "
                        "(after editing known.py)")
    args = parser.parse_args()
    import torch
    from cases import CASES
    from known import KNOWN
    from matrix import Outcome, table

    torch.set_num_threads(1)  # as in each worker: the table's footer says so
    keys = [k for k in CASES if k.startswith(args.only)]
    if args.table_from:
        outcomes = [Outcome(**json.loads(line)) for line in args.table_from.read_text().splitlines()]
    else:
        with multiprocessing.get_context("spawn").Pool(args.jobs, maxtasksperchild=8) as pool:
            outcomes = pool.map(_one, keys, chunksize=1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table(outcomes, KNOWN))
    args.out.with_suffix(".jsonl").write_text("".join(json.dumps(dataclasses.asdict(o)) + "\n" for o in outcomes))
    wrong = [o.key for o in outcomes if bool(o.problems) != (o.key in KNOWN)]
    print(f"{len(outcomes)} cases, {sum(not o.problems for o in outcomes)} pass; table in {args.out}", file=sys.stderr)
    if wrong:
        print(f"unexpected outcome (fails outside KNOWN, or passes inside it): {', '.join(wrong)}", file=sys.stderr)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
