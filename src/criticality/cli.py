"""``criticality run | train | analyze | report | list``: parse, call the library, say where the output is.

Exit status: 0 done; 2 a user error (bad option, file, name; a run directory in use; a full or read-only
disk), one line on stderr (``--debug`` shows the traceback); 130 Ctrl-C and 143 SIGTERM (rerun the same
command to resume); 1 an internal error (a bug: one line, the traceback with ``--debug``). Under
``torchrun`` only rank 0 prints, and every rank exits with the status.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import fnmatch
import json
import logging
import math
import os
import signal
import sys
import types
import typing
from pathlib import Path

from criticality.core.analysis import DEFAULT_THRESHOLD, LABEL_FREE, VERDICT_RULES
from criticality.core.groups import SPECS, check_mapping
from criticality.core.metrics import DEFAULT_METRICS
from criticality.core.ops import choices as grid_ops
from criticality.core.plan import ENGINES
from criticality.core.state import BUFFER_MODES
from criticality.errors import CriticalityError
from criticality.infra import distributed
from criticality.infra.files import loads
from criticality.infra.log import to_stderr
from criticality.infra.memory import tune_malloc
from criticality.output import figures, report
from criticality.output.tables import read_summary
from criticality.output.text import format_verdicts
from criticality.paper import experiments, models
from criticality.paper.data import default_data
from criticality.paper.experiments import Sweep
from criticality.paper.train import train
from criticality.paper.training.config import TrainConfig
from criticality.pipelines.analyze_hf import analyze_hf, summary_line
from criticality.pipelines.analyze_run import analyze_run
from criticality.pipelines.extras import EXTRA_OPS
from criticality.pipelines.prune import PruneConfig, prune_folder
from criticality.pipelines.run_experiment import run_experiment

OPS = (*grid_ops(), *EXTRA_OPS)  # what --ops takes ("final" is always evaluated)
VERDICT_METRICS = (*DEFAULT_METRICS, *LABEL_FREE)  # the metrics `analyze` measures on a run directory
DEVICE_HELP = next(f.metadata["help"] for f in dataclasses.fields(TrainConfig) if f.name == "device")
SPLITS = ("test", "train")

log = logging.getLogger(__name__)

# Disk and permission failures are the user's environment, not a bug: one line, exit status 2.
ENVIRONMENT_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's or torchrun's stop), handled like Ctrl-C: clean-up runs, then exit 143."""


def _terminate(signum, frame) -> typing.NoReturn:
    raise Terminated()


def say_error(message: str) -> None:
    """One line on stderr, from rank 0 only under torchrun (every rank still exits non-zero)."""
    if os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr)


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


def _add_config_options(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = (),
                        default_note: str | None = None) -> None:
    """One ``--option`` per dataclass field, typed and documented from the field; ``default_note``
    replaces the field's default in the help (``run``: the experiment sets the defaults)."""
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
        parser.add_argument(flag, type=parse, default=None,
                            help=f"{help_} (default: {default_note or f.default})")


def _overrides(args: argparse.Namespace, cls: type) -> dict:
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
            if getattr(args, f.name, None) is not None}


def _analysis_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--groups", default="model",
                        help=f"{' | '.join(SPECS)} (model: the model's own layers) | a JSON file {{name: [patterns]}}")
    parser.add_argument("--seeds", type=NON_NEGATIVE, default=3, help="re-randomization draws per group")
    parser.add_argument("--joint", action="append", default=None, metavar="G1,G2,…",
                        help="a joint group: comma-separated group names or globs (repeat for several)")
    parser.add_argument("--split", choices=SPLITS, default="test", help="evaluate on this split")
    parser.add_argument("--engine", choices=ENGINES, default="fast",
                        help="fast (prefix caching) or naive (the plain reference loop)")
    parser.add_argument("--batch-size", type=POSITIVE, default=1000, help="evaluation batch (examples)")
    parser.add_argument("--max-examples", type=POSITIVE, default=None,
                        help="evaluate on the first N examples only (quick look; recorded in the output)")
    parser.add_argument("--threshold", type=NON_NEGATIVE_FLOAT, default=DEFAULT_THRESHOLD,
                        help="Δ test error at epoch 0 up to which a layer counts as robust")
    parser.add_argument("--verdict-metric", choices=VERDICT_METRICS, default=None,
                        help="the metric the verdicts judge, with --threshold in its units (default: error; "
                             "agreement is judged as disagreement = 1 - agreement)")
    parser.add_argument("--verdict", choices=VERDICT_RULES, default="interval",
                        help="interval: critical / robust only when the 95%% paired interval clears the "
                             "threshold, else inconclusive; point: the paper's rule on the Δ alone")
    parser.add_argument("--adaptive", action="store_true",
                        help="stop each cell once an anytime-valid confidence sequence of its Δ clears the "
                             "threshold (examples in a seeded random order; see docs/statistics.md)")
    parser.add_argument("--buffers", choices=BUFFER_MODES, default="reset",
                        help="norm-layer running statistics: move with the group (reset), stay as trained (keep), "
                             "or are re-estimated on 2048 training images (recalibrate)")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--ops", default="reinit,rerandomize", metavar="OP,OP,…",
                        help=f"{', '.join(OPS)} (comma-separated)")
    parser.add_argument("--alphas", type=_unit_list, default=None, metavar="A,A,…",
                        help="interpolation weights α in [0, 1] (interpolate, criticality)")
    parser.add_argument("--sigmas", type=_unit_list, default=None, metavar="S,S,…",
                        help="noise scales σ in [0, 1], relative to each group's movement RMS (noise, criticality)")
    parser.add_argument("--skip-runs", type=POSITIVE, default=None, metavar="K",
                        help="skip: also every run of K consecutive blocks of the model's stack, removed together")
    parser.add_argument("--eps", type=NON_NEGATIVE_FLOAT, default=None,
                        help="module criticality: tolerated rise of test error over the final model (default 0.02)")
    _wait_option(parser)


def _unit_list(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None
    if not values or not all(0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: give numbers in [0, 1]")
    return values


def _wait_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--wait", action="store_true",
                        help="when another process holds the run directory, wait for it instead of stopping")


def _hf_options(parser: argparse.ArgumentParser) -> None:
    """``analyze-hf``: the logic is criticality.pipelines.analyze_hf.analyze_hf."""
    parser.add_argument("checkpoints", metavar="CHECKPOINTS", nargs="?",
                        help="HF Trainer output (checkpoint-<step>/), a folder of step_N.safetensors files, or a hub "
                             "repository id ORG/NAME read from the hub cache (see --revisions)")
    parser.add_argument("--data", required=True, metavar="FILE",
                        help="token ids (.safetensors with input_ids, .npy) or text (.txt, .jsonl) to evaluate on")
    parser.add_argument("--init-checkpoint", metavar="PATH_OR_REPO",
                        help="the initialization, when CHECKPOINTS lacks step 0: a file, a save_pretrained folder or a "
                             "cached repository id ORG/NAME[@REVISION] (a fine-tuning run's pretrained model)")
    parser.add_argument("--revisions", metavar="GLOBS",
                        help="hub branches of CHECKPOINTS to analyse: globs or names, comma-separated ('step*', "
                             "'step0,step1000,step143000'); naturally sorted, the step read from each name")
    parser.add_argument("--repos", metavar="GLOB", help="one hub repository per checkpoint ('ORG/NAME-step_*'), "
                        "instead of CHECKPOINTS")
    parser.add_argument("--cache-dir", metavar="DIR", help="the Hugging Face hub cache (default: huggingface_hub's, "
                        "HF_HUB_CACHE); with HF_HUB_OFFLINE=1 nothing is downloaded")
    parser.add_argument("--no-integrity", action="store_true",
                        help="skip the integrity check (identical and off-trend checkpoints) before the grid")
    parser.add_argument("--groups", default="blocks",
                        help=f"{' | '.join(SPECS[1:])} | a JSON file {{name: [patterns]}}")
    parser.add_argument("--seeds", type=NON_NEGATIVE, default=2, help="re-randomization draws per group")
    parser.add_argument("--seq-len", type=POSITIVE, default=None, help="tokens per sequence for text and 1-D ids "
                        "(default: 128, at most the model's max_position_embeddings)")
    parser.add_argument("--batch-size", type=POSITIVE, default=16, help="evaluation batch (sequences)")
    parser.add_argument("--max-examples", type=POSITIVE, default=None, help="evaluate on the first N sequences only")
    parser.add_argument("--threshold", type=NON_NEGATIVE_FLOAT, default=DEFAULT_THRESHOLD,
                        help="Δ token error at step 0 up to which a group counts as robust")
    parser.add_argument("--engine", choices=ENGINES, default="fast")
    parser.add_argument("--text-key", default="text", help="the field holding the text in .jsonl lines")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--out", help="output directory (default CHECKPOINTS/analysis)")


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
    _wait_option(run)
    _add_config_options(run, TrainConfig, skip=("model",), default_note="the experiment's, at --scale")

    train = sub.add_parser("train", help="train a model, keeping the checkpoint trajectory")
    train.add_argument("model_name", metavar="MODEL", nargs="?", help="registry name (default fcn-3x256)")
    train.add_argument("--out", required=True, help="run directory to create or resume")
    _wait_option(train)
    _add_config_options(train, TrainConfig, skip=("model",))

    analyze = sub.add_parser("analyze", help="measure every layer's robustness in a run directory")
    analyze.add_argument("run_dir", metavar="RUN_DIR")
    _analysis_options(analyze)

    _hf_options(sub.add_parser("analyze-hf", help="measure every layer of a Hugging Face checkpoint trajectory "
                                                  "(HF Trainer folder or step_N.safetensors files) on a local file"))

    prune = sub.add_parser("prune", help="remove blocks one at a time (greedy or by a proxy): the curve with "
                                         "intervals, pruning.csv, and the pruned model with --save")
    prune.add_argument("model", metavar="MODEL_OR_RUN",
                       help="HF model folder (config.json + weights) or Trainer output, or a run directory")
    prune.add_argument("--data", metavar="FILE", help="HF models: token ids or text, as analyze-hf reads them")
    _add_config_options(prune, PruneConfig)

    rep = sub.add_parser("report", help="draw the figures and write RUN_DIR/report.html")
    rep.add_argument("run_dir", metavar="RUN_DIR")

    ls = sub.add_parser("list", help="list registered experiments (or models with --models)")
    ls.add_argument("pattern", nargs="?", help="glob or substring")
    ls.add_argument("--models", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tune_malloc()  # process-wide allocator setting: the command's to make, not the library's
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        with to_stderr():  # the library logs; the terminal shows INFO bare, warnings prefixed
            return _dispatch(args)
    except CriticalityError as e:
        if args.debug:
            raise
        say_error(f"criticality: error: {_one_line(e)}")
        return 2
    except Terminated:
        say_error("criticality: terminated (SIGTERM); finished work is saved: rerun the same command to resume")
        return 143
    except KeyboardInterrupt:
        say_error("criticality: interrupted; finished work is saved: rerun the same command to resume")
        return 130
    except OSError as e:
        if args.debug or e.errno not in ENVIRONMENT_ERRORS:
            if args.debug:
                raise
            say_error(f"criticality: internal error: {type(e).__name__}: {_one_line(e)} "
                      "(rerun with --debug for the traceback)")
            return 1
        where = f" ({e.filename})" if e.filename else ""
        say_error(f"criticality: error: {e.strerror or e}{where}; earlier outputs are intact (every file is "
                  "replaced atomically): free space or fix permissions and rerun the same command")
        return 2
    except Exception as e:  # noqa: BLE001 - one line for the user, the traceback on --debug
        if args.debug:
            raise
        say_error(f"criticality: internal error: {type(e).__name__}: {_one_line(e)} "
                  "(rerun with --debug for the traceback)")
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
        distributed.teardown()  # under torchrun: leave the process group so every process exits cleanly


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def _dispatch(args: argparse.Namespace) -> int:
    if args.command is None:  # bare `criticality`: the embedded default experiment
        args = build_parser().parse_args(["run", *(["--debug"] if args.debug else [])])
    return COMMANDS[args.command](args, not args.no_progress)


def _train(args: argparse.Namespace, progress: bool) -> int:
    config = TrainConfig(**{**_overrides(args, TrainConfig), "model": args.model_name or TrainConfig.model})
    train(config, args.out, progress=progress, wait=args.wait)
    if distributed.is_main():
        print(f"trained {config.model} on {config.data}: {Path(args.out) / 'checkpoints'}")
    return 0


def _analyze(args: argparse.Namespace, progress: bool) -> int:
    out = analyze_run(args.run_dir, groups=_groups(args.groups), seeds=args.seeds,
                      joint=[j.split(",") for j in args.joint] if args.joint else None, split=args.split,
                      engine=args.engine, batch_size=args.batch_size, device=args.device,
                      max_examples=args.max_examples, threshold=args.threshold, buffers=args.buffers,
                      verdict=args.verdict, verdict_metric=args.verdict_metric, progress=progress,
                      wait=args.wait, ops=args.ops, alphas=args.alphas, sigmas=args.sigmas, eps=args.eps,
                      skip_runs=args.skip_runs, adaptive=args.adaptive)
    if distributed.is_main():
        _print_verdicts(out)
        print(f"wrote {out / 'cells.csv'}, {out / 'distances.csv'}, {out / 'summary.json'}")
        _warn_non_finite(out)
    return 0


def _analyze_hf(args: argparse.Namespace, progress: bool) -> int:
    out = analyze_hf(args.checkpoints, args.data, init_checkpoint=args.init_checkpoint, revisions=args.revisions,
                     repos=args.repos, cache_dir=args.cache_dir, check_integrity=not args.no_integrity,
                     groups=_groups(args.groups), seeds=args.seeds, seq_len=args.seq_len,
                     batch_size=args.batch_size, max_examples=args.max_examples, threshold=args.threshold,
                     device=args.device, engine=args.engine, text_key=args.text_key, out=args.out,
                     progress=progress)
    _print_verdicts(out)  # the same table as after `analyze` (out is the analysis directory)
    print(f"wrote {out / 'cells.csv'}, {out / 'report.html'}; verdicts (Δ token error at step 0): "
          + ", ".join(f"{g} {v}" for g, v in summary_line(out).items()))
    return 0


def _prune(args: argparse.Namespace, progress: bool) -> int:
    out, curve = prune_folder(args.model, args.data, PruneConfig(**_overrides(args, PruneConfig)), progress=progress)
    print("\n".join([*curve.lines(), curve.statement]))
    print(f"wrote {out / 'pruning.csv'}, {out / 'figures' / 'pruning.png'}"
          + (f"; pruned model in {args.save} (what went: pruned.json)" if args.save else ""))
    return 0


def _report(args: argparse.Namespace, progress: bool) -> int:
    read_summary(Path(args.run_dir) / "analysis")  # a missing or corrupt analysis is one line, exit 2
    figures.draw_run(args.run_dir)
    print(f"report: {report.write_report(args.run_dir)}")
    return 0


def _list(args: argparse.Namespace, progress: bool) -> int:
    pattern = args.pattern or "*"
    names = [m for m in models.names() if pattern in m or fnmatch.fnmatchcase(m, pattern)] if args.models \
        else experiments.names(args.pattern)
    if not names:
        what, flag = ("model", " --models") if args.models else ("experiment", "")
        raise CriticalityError(f"no {what} matches {pattern!r}; `criticality list{flag}` shows them all")
    for name in names:
        note = "" if args.models else f"  {experiments.REGISTRY[name].description}"
        print(f"{name}{note}")
    return 0


def _run(args: argparse.Namespace, progress: bool) -> int:
    exp = experiments.get(args.experiment)
    overrides = _overrides(args, TrainConfig)
    data = overrides.pop("data", None)
    if data is None and args.scale == "quick" and exp.sweep != Sweep.LM:  # the LM reads a text corpus
        if overrides.get("data_root"):
            data = exp.data  # the user gave the experiment's own data: use it at this scale too
        else:
            data = default_data()  # Fashion-MNIST when installed, else the bundled digits
            if data != exp.data:
                log.info(f"quick scale: {data} stands in for {exp.data} (pass --data-root DIR holding {exp.data} "
                         "to use it, or --scale paper)")
    reports = run_experiment(exp, scale=args.scale, data=data, out=args.out, progress=progress, wait=args.wait,
                             **overrides)
    for path in reports:
        _print_verdicts(Path(path).parent / "analysis")
        print(f"report: {path}")
        _warn_non_finite(Path(path).parent / "analysis")
    return 0


COMMANDS = {"run": _run, "train": _train, "analyze": _analyze, "analyze-hf": _analyze_hf, "prune": _prune,
            "report": _report, "list": _list}


def _print_verdicts(analysis_dir: Path) -> None:
    print(format_verdicts(read_summary(analysis_dir)))


def _warn_non_finite(analysis_dir: Path) -> None:
    """One line on stderr when some cells evaluated to NaN/inf: they stay in the table, flagged."""
    try:
        bad = loads((analysis_dir / "summary.json").read_text()).get("non_finite_cells", 0)
    except (OSError, ValueError, AttributeError):
        return
    if bad:
        log.warning(f"{bad} cells have a non-finite error or loss (NaN/inf); they are the rows with finite=False "
                    f"in {analysis_dir / 'cells.csv'}")


def _groups(spec: str) -> str | dict:
    if spec in SPECS:
        return spec
    path = Path(spec)
    if not path.is_file():
        raise CriticalityError(f"--groups {spec!r}: use {', '.join(SPECS)} or a JSON file of {{name: [patterns]}}")
    try:
        mapping = json.loads(path.read_bytes().decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CriticalityError(f"--groups {spec}: not valid JSON ({_one_line(e)})") from e
    if not isinstance(mapping, dict):
        raise CriticalityError(f"--groups {spec}: expected a JSON object {{name: [patterns]}}, "
                               f"got {type(mapping).__name__}")
    return check_mapping(mapping, f"--groups {spec}")


def _no_duplicates(pairs: list[tuple[str, typing.Any]]) -> dict:
    names = [k for k, _ in pairs]
    twice = sorted({k for k in names if names.count(k) > 1})
    if twice:
        raise ValueError(f"group {twice[0]!r} is defined twice")
    return dict(pairs)


if __name__ == "__main__":
    sys.exit(main())
