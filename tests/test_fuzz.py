"""Property-based fuzzing: whatever a user passes, the answer is a result or one CriticalityError.

Run: ``.venv/bin/pytest tests/test_fuzz.py -q`` (about 30 s on 2 cores; derandomized, bounded examples).

Properties, each with Hypothesis (``derandomize=True``: the same examples on every run, so CI is stable):

- ``criticality.analyze`` over its arguments — group specs (names, mappings of any JSON-like values),
  seeds (counts at and past their limits, lists), joint groups, final/reinit_to epochs, metrics, engine,
  batch size, max_examples, threshold, buffers, checkpoint sets (missing epochs, wrong keys and shapes,
  non-tensor values) and data (shapes, dtypes, label ranges, lengths): every call returns a Result or
  raises :class:`CriticalityError`, never another exception type;
- the CLI's options and files (``--groups`` files of arbitrary JSON, numbers at and past their limits,
  option values): exit status 0 or 2, and on 2 exactly one ``criticality: error:`` line.
"""

from __future__ import annotations

import json
import math
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from criticality import analyze, cli
from criticality.errors import CriticalityError
from criticality.paper.train import train
from criticality.paper.training.config import TrainConfig
from toy import fcn

FUZZ = settings(max_examples=60, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

names = st.sampled_from(["0", "1", "2", "3", "4", "5", "6", "7", "*", "", "fc", "model", "auto", "blocks", "x"])
json_values = st.recursive(st.none() | st.booleans() | st.integers(-3, 3) | st.floats() | names,
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(names, inner, max_size=3),
                           max_leaves=6)
group_specs = st.one_of(st.sampled_from(["model", "auto", "blocks", "nonsense", ""]),
                        st.dictionaries(names, json_values, max_size=4),
                        st.dictionaries(names, st.lists(names, min_size=1, max_size=3), min_size=1, max_size=3))
seeds = st.one_of(st.integers(-3, 3), st.integers(100_001, 10**15), st.lists(st.integers(-2, 4), max_size=3),
                  st.just(True))
epochs = st.integers(-2, 4)
small_ints = st.one_of(st.integers(-3, 4), st.integers(10**6, 10**18), st.none())
floats = st.floats(allow_nan=True, allow_infinity=True) | st.integers(-2, 2)


def _data(kind: str, n: int):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, 1, 6, 6, generator=g)
    y = torch.randint(0, 5, (n,), generator=g)
    return {
        "ok": (x, y),
        "x only": x,
        "no labels tuple": (x,),
        "float labels": (x, y.float()),
        "labels out of range": (x, y + 7),
        "negative labels": (x, y - 9),
        "2-d labels": (x, y[:, None]),
        "short labels": (x, y[: n // 2]),
        "wrong features": (torch.randn(n, 1, 5, 5, generator=g), y),
        "int inputs": (x.long(), y),
        "float64 inputs": (x.double(), y),
        "empty": (x[:0], y[:0]),
        "nan inputs": (torch.full_like(x, math.nan), y),
        "strings": ("abc", y),
        "none": None,
    }[kind]


DATA = ["ok", "x only", "no labels tuple", "float labels", "labels out of range", "negative labels", "2-d labels",
        "short labels", "wrong features", "int inputs", "float64 inputs", "empty", "nan inputs", "strings", "none"]


def _checkpoints(kind: str, model: torch.nn.Module):
    g = torch.Generator().manual_seed(1)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    end = {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in start.items()}
    first = next(iter(start))
    return {
        "ok": {0: start, 2: end},
        "three": {0: start, 1: end, 2: {k: v * 2 for k, v in end.items()}},
        "no zero": {1: start, 2: end},
        "only zero": {0: start},
        "empty": {},
        "missing key": {0: start, 2: {k: v for k, v in end.items() if k != first}},
        "extra key": {0: start, 2: {**end, "ghost.weight": torch.zeros(1)}},
        "wrong shape": {0: start, 2: {**end, first: torch.zeros(2, 2)}},
        "nan weights": {0: start, 2: {k: torch.full_like(v, math.nan) for k, v in end.items()}},
        "not tensors": {0: start, 2: {k: 1.0 for k in end}},
        "string epochs": {"0": start, "2": end},
    }[kind]


CHECKPOINTS = ["ok", "three", "no zero", "only zero", "empty", "missing key", "extra key", "wrong shape",
               "nan weights", "not tensors", "string epochs"]


# Each argument's fuzz; a test example changes 1 to 3 of them from a valid base call, so that the others
# being wrong does not mask the one under test.
ARGUMENTS = {
    "groups": group_specs,
    "seeds": seeds,
    "joint": st.none() | st.lists(st.lists(names, max_size=3), max_size=2),
    "final": st.none() | epochs,
    "reinit_to": st.none() | st.lists(epochs, max_size=3),
    "metrics": st.sampled_from([("error", "loss"), ("loss",), ("error",), (), ("bogus",), "error", ("error", "error")]),
    "engine": st.sampled_from(["fast", "naive", "turbo", ""]),
    "batch_size": st.integers(-3, 4) | st.integers(10**6, 10**18),
    "max_examples": small_ints,
    "threshold": floats,
    "buffers": st.sampled_from(["reset", "keep", "recalibrate", "nope"]),
    "data": st.sampled_from(DATA),
    "checkpoints": st.sampled_from(CHECKPOINTS),
}
BASE = dict(groups="auto", seeds=1, joint=None, final=None, reinit_to=None, metrics=("error", "loss"),
            engine="fast", batch_size=10, max_examples=None, threshold=0.02, buffers="reset", data="ok",
            checkpoints="ok")
changes = st.lists(st.sampled_from(sorted(ARGUMENTS)), min_size=1, max_size=3, unique=True).flatmap(
    lambda keys: st.fixed_dictionaries({k: ARGUMENTS[k] for k in keys}))


@settings(FUZZ, max_examples=150)
@given(change=changes)
def test_analyze_raises_only_criticality_errors(change):
    args = {**BASE, **change}
    model = fcn()
    data, checkpoints = _data(args.pop("data"), 24), _checkpoints(args.pop("checkpoints"), model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            result = analyze(model, checkpoints, data, progress=False, init="torch", **args)
        except CriticalityError as e:
            assert str(e) and "\n" not in str(e).strip(), repr(e)
            return
    assert len(result.table) >= 1 and set(result.verdicts.verdict) <= {"robust", "critical", "inconclusive"}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return train(TrainConfig(model="fcn-2x16", data="digits", epochs=1, batch_size=128, device="cpu"),
                 tmp_path_factory.mktemp("fuzz") / "run", progress=False)


def _cli(argv, capsys) -> tuple[int, str]:
    try:
        code = cli.main(["--no-progress", *map(str, argv)])
    except SystemExit as e:
        code = e.code
    _, err = capsys.readouterr()
    return code, err


def _assert_clean(code, err) -> None:
    assert code in (0, 2), (code, err)
    if code == 2:
        said = [line for line in err.strip().splitlines() if line.startswith("criticality:")]
        assert len(said) == 1 and said[0].startswith("criticality: error:") and "Traceback" not in err, err


@FUZZ
@given(spec=st.one_of(json_values, st.dictionaries(names, json_values, max_size=4)),
       raw=st.none() | st.binary(max_size=20))
def test_cli_group_files_are_results_or_one_line(run, tmp_path_factory, capsys, spec, raw):
    folder = tmp_path_factory.mktemp("g")
    path = folder / "groups.json"
    path.write_bytes(raw if raw is not None else json.dumps(spec).encode())
    r = folder / "run"
    shutil.copytree(run, r)
    _assert_clean(*_cli(["analyze", r, "--groups", path, "--seeds", "0", "--device", "cpu",
                         "--max-examples", "50"], capsys))
    shutil.rmtree(folder)


numbers = st.sampled_from(["0", "1", "-1", "1e3", "nan", "inf", "-inf", "1e400", "2.5", "abc", "", "99999999999999",
                           "0x10", "1_000"])


@FUZZ
@given(option=st.sampled_from(["--seeds", "--batch-size", "--max-examples", "--threshold", "--engine", "--buffers",
                               "--split", "--device", "--joint", "--groups"]), value=numbers | names)
def test_cli_analyze_options_are_results_or_one_line(run, tmp_path_factory, capsys, option, value):
    folder = tmp_path_factory.mktemp("o")
    r = folder / "run"
    shutil.copytree(run, r)
    argv = ["analyze", r, "--seeds", "0", "--device", "cpu", "--max-examples", "50", option, value]
    _assert_clean(*_cli(argv, capsys))
    shutil.rmtree(folder)


@FUZZ
@given(option=st.sampled_from(["--epochs", "--batch-size", "--lr", "--momentum", "--weight-decay", "--seed",
                               "--checkpoints", "--init", "--schedule", "--data", "--max-train", "--max-test",
                               "--width", "--device", "--workers"]), value=numbers | names)
def test_cli_train_options_are_results_or_one_line(tmp_path_factory, capsys, option, value):
    out = tmp_path_factory.mktemp("t") / "run"
    argv = ["train", "fcn-2x16", "--data", "digits", "--epochs", "1", "--max-train", "200", "--max-test", "50",
            "--device", "cpu", "--out", out]
    if option in ("--epochs", "--max-train") and value not in ("0", "1", "-1"):
        value = "1" if value in ("1e3", "99999999999999", "1_000") else value  # keep the fuzz fast
    _assert_clean(*_cli([*argv, option, value], capsys))
    shutil.rmtree(out.parent)
