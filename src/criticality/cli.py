"""``criticality run | train | analyze | report | list``: parse, call the library, say where the output is.

Every user error is one line on stderr and exit status 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import math
import sys
import types
import typing
from pathlib import Path

from criticality import distributed, experiments, models
from criticality.analysis import DEFAULT_THRESHOLD
from criticality.errors import CriticalityError
from criticality.train import TrainConfig


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:  # one line, not usage + error
        self.exit(2, f"criticality: error: {message} (see `{self.prog} --help`)\n")


def _number(kind: type, low: float, what: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not low <= value < math.inf:  # nan and inf are floats too, but no option wants them
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value

    return parse


POSITIVE = _number(int, 1, "a positive integer")
NON_NEGATIVE = _number(int, 0, "a non-negative integer")
NON_NEGATIVE_FLOAT = _number(float, 0.0, "a non-negative number")


def _add_config_options(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One ``--option`` per dataclass field, typed and documented from the field."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag, kind, help_ = f"--{f.name.replace('_', '-')}", hints[f.name], f.metadata.get("help", "")
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_)
            continue
        base = next((a for a in typing.get_args(kind) if a is not type(None)), kind) \
            if isinstance(kind, types.UnionType) else kind
        parse = {int: POSITIVE if f.name in ("epochs", "batch_size", "width", "max_train", "max_test",
                                             "image_size") else NON_NEGATIVE,
                 float: NON_NEGATIVE_FLOAT}.get(base, base)
        parser.add_argument(flag, type=parse, default=None, help=f"{help_} (default: {f.default})")


def _overrides(args: argparse.Namespace, cls: type) -> dict:
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
            if getattr(args, f.name, None) is not None}


def _analysis_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--groups", default="model",
                        help="model (the model's own layers) | blocks | sublayers | auto | "
                             "a JSON file {name: [patterns]}")
    parser.add_argument("--seeds", type=NON_NEGATIVE, default=3, help="re-randomization draws per group")
    parser.add_argument("--joint", action="append", default=None, metavar="G1,G2,…",
                        help="a joint group: comma-separated group names or globs (repeat for several)")
    parser.add_argument("--split", choices=("test", "train"), default="test", help="evaluate on this split")
    parser.add_argument("--engine", choices=("fast", "naive"), default="fast",
                        help="fast (prefix caching) or the plain reference loop")
    parser.add_argument("--batch-size", type=POSITIVE, default=1000, help="evaluation batch (examples)")
    parser.add_argument("--max-examples", type=POSITIVE, default=None,
                        help="evaluate on the first N examples only (quick look; recorded in the output)")
    parser.add_argument("--threshold", type=NON_NEGATIVE_FLOAT, default=DEFAULT_THRESHOLD,
                        help="Δ test error at epoch 0 up to which a layer counts as robust")
    parser.add_argument("--buffers", choices=("reset", "keep", "recalibrate"), default="reset",
                        help="norm-layer running statistics: move with the group (reset), stay as trained (keep), "
                             "or are re-estimated on 2048 training images (recalibrate)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--ops", default="reinit,rerandomize", metavar="OP,OP,…",
                        help="reinit, rerandomize, interpolate, noise, skip, criticality, proxies (comma-separated)")
    parser.add_argument("--alphas", type=_unit_list, default=None, metavar="A,A,…",
                        help="interpolation weights α in [0, 1] (interpolate, criticality)")
    parser.add_argument("--sigmas", type=_unit_list, default=None, metavar="S,S,…",
                        help="noise scales σ in [0, 1], relative to each group's movement RMS (noise, criticality)")
    parser.add_argument("--eps", type=NON_NEGATIVE_FLOAT, default=None,
                        help="module criticality: tolerated rise of test error over the final model (default 0.02)")


def _unit_list(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None
    if not values or not all(0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: give numbers in [0, 1]")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="criticality", description="Which layers of a trained network matter?")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    common = argparse.ArgumentParser(add_help=False)  # the same two flags after the command name
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    common.add_argument("--no-progress", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    add = sub.add_parser

    def sub_parser(name: str, **kw) -> argparse.ArgumentParser:
        return add(name, parents=[common], **kw)

    sub.add_parser = sub_parser

    run = sub.add_parser("run", help="train, analyse, draw and report a registered experiment")
    run.add_argument("experiment", nargs="?", default=experiments.DEFAULT, help="key or unique part of a key")
    run.add_argument("--scale", choices=experiments.SCALES, default="quick")
    run.add_argument("--out", help="output directory (default runs/KEY/SCALE)")
    _add_config_options(run, TrainConfig, skip=("model",))

    train = sub.add_parser("train", help="train a model, keeping the checkpoint trajectory")
    train.add_argument("model_name", metavar="MODEL", nargs="?", help="registry name (default fcn-3x256)")
    train.add_argument("--out", required=True, help="run directory to create or resume")
    _add_config_options(train, TrainConfig, skip=("model",))

    analyze = sub.add_parser("analyze", help="measure every layer's robustness in a run directory")
    analyze.add_argument("run_dir", metavar="RUN_DIR")
    _analysis_options(analyze)

    rep = sub.add_parser("report", help="draw the figures and write RUN_DIR/report.html")
    rep.add_argument("run_dir", metavar="RUN_DIR")

    ls = sub.add_parser("list", help="list registered experiments (or models with --models)")
    ls.add_argument("pattern", nargs="?", help="glob or substring")
    ls.add_argument("--models", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except CriticalityError as e:
        if args.debug:
            raise
        print(f"criticality: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("criticality: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one line for the user, the traceback on --debug
        if args.debug:
            raise
        print(f"criticality: internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1
    finally:
        distributed.teardown()  # under torchrun: leave the process group so every process exits cleanly


def _dispatch(args: argparse.Namespace) -> int:
    progress = not args.no_progress
    if args.command in (None, "run"):
        if args.command is None:
            args = build_parser().parse_args(["run", *(["--debug"] if args.debug else [])])
        return _run(args, progress)
    if args.command == "train":
        from criticality.train import train

        fields = _overrides(args, TrainConfig)
        config = TrainConfig(**{**fields, "model": args.model_name or TrainConfig.model})
        train(config, args.out, progress=progress)
        if distributed.is_main():
            print(f"trained {config.model} on {config.data}: {Path(args.out) / 'checkpoints'}")
        return 0
    if args.command == "analyze":
        from criticality.runner import analyze_run

        out = analyze_run(args.run_dir, groups=_groups(args.groups), seeds=args.seeds,
                          joint=[j.split(",") for j in args.joint] if args.joint else None, split=args.split,
                          engine=args.engine, batch_size=args.batch_size, device=args.device,
                          max_examples=args.max_examples, threshold=args.threshold, buffers=args.buffers,
                          progress=progress, ops=args.ops, alphas=args.alphas, sigmas=args.sigmas, eps=args.eps)
        if distributed.is_main():
            print(f"wrote {out / 'cells.csv'}, {out / 'distances.csv'}, {out / 'summary.json'}")
            _warn_non_finite(out)
        return 0
    if args.command == "report":
        from criticality import plots, report

        plots.draw_run(args.run_dir)
        print(f"report: {report.write_report(args.run_dir)}")
        return 0
    if args.command == "list":
        pattern = args.pattern or "*"
        names = [m for m in models.names() if pattern in m or fnmatch.fnmatchcase(m, pattern)] if args.models \
            else experiments.names(args.pattern)
        for name in names:
            note = "" if args.models else f"  {experiments.REGISTRY[name].description}"
            print(f"{name}{note}")
        return 0
    raise CriticalityError(f"unknown command {args.command!r}")


def _run(args: argparse.Namespace, progress: bool) -> int:
    from criticality.data import default_data
    from criticality.runner import run_experiment

    exp = experiments.get(args.experiment)
    overrides = _overrides(args, TrainConfig)
    data = overrides.pop("data", None)
    if data is None and args.scale == "quick":
        data = default_data()  # Fashion-MNIST when installed, else the bundled digits
    reports = run_experiment(exp, scale=args.scale, data=data, out=args.out, progress=progress, **overrides)
    for path in reports:
        print(f"report: {path}")
        _warn_non_finite(Path(path).parent / "analysis")
    return 0


def _warn_non_finite(analysis_dir: Path) -> None:
    """One line on stderr when some cells evaluated to NaN/inf: they stay in the table, flagged."""
    try:
        bad = json.loads((analysis_dir / "summary.json").read_text()).get("non_finite_cells", 0)
    except (OSError, ValueError):
        return
    if bad:
        print(f"criticality: warning: {bad} cells have a non-finite error or loss (NaN/inf); they are the rows "
              f"with finite=False in {analysis_dir / 'cells.csv'}", file=sys.stderr)


def _groups(spec: str) -> str | dict:
    if spec in ("model", "blocks", "sublayers", "auto"):
        return spec
    path = Path(spec)
    if not path.is_file():
        raise CriticalityError(f"--groups {spec!r}: use model, blocks, sublayers, auto or a JSON file of "
                               "{name: [patterns]}")
    try:
        mapping = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CriticalityError(f"--groups {spec}: not valid JSON ({e})") from e
    if not isinstance(mapping, dict):
        raise CriticalityError(f"--groups {spec}: expected a JSON object {{name: [patterns]}}")
    return mapping


if __name__ == "__main__":
    sys.exit(main())
