"""The checks of the architecture matrix, one case at a time, and the table of their outcomes.

:func:`run_case` builds a case's model, gives it a tiny trajectory (checkpoints 0, 1, 2), and checks what a
user relies on: ``analyze`` with defaults succeeds; the fast engine equals ``engine="naive"`` on every cell and
metric; ``ops=("reinit", "skip")`` and ``block_proxies`` succeed or refuse with a ``CriticalityError``; the
caller's model comes back bit for bit; groups are listed in the order the forward pass first calls them. It
returns an :class:`Outcome` (what was measured and the problems found); :func:`table` renders the outcomes
as the markdown of ``docs/architectures.md``.
"""

from __future__ import annotations

import copy
import math
import os
import platform
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import timm
import torch
import transformers
from cases import N
from torch import nn

import criticality
from criticality.core.stacks import find_stack
from criticality.interventions.proxies import block_proxies

TOLERANCE = 1e-6  # fast vs naive, per cell and metric, absolute
STEP = 0.1  # length of each trajectory step, relative to the parameter's scale (see trajectory)
CONSTANT_SCALE = 0.5  # the scale of a parameter initialized to a constant (its std is 0)
SEQUENCE_METRICS = ("token_error", "nll")
CLASSIFIERS = ("image", "pixel_values", "classify")  # the data kinds whose loss is plain cross-entropy
REFERENCE_TOLERANCE = 1e-5  # analyze vs a freshly built model, absolute and relative: kernels sum in other orders
DATA_BLAMED = "cannot be evaluated on the data"  # the library's refusal that blames the user's data
KEYS = ["op", "group", "joint", "checkpoint", "seed", "alpha", "sigma"]  # what names a cell in result.table


@dataclass
class Outcome:
    key: str
    package: str
    family: str
    groups: int | None = None
    blocks: int | None = None
    spec: str = ""
    fast_s: float | None = None
    naive_s: float | None = None
    refused: list[str] = field(default_factory=list)  # CriticalityErrors of skip / proxies, and notes
    problems: list[str] = field(default_factory=list)  # anything that makes the case fail

    @property
    def speedup(self) -> float | None:
        return self.naive_s / self.fast_s if self.fast_s and self.naive_s else None


def trajectory(model: nn.Module, seed: int = 0) -> dict[int, dict[str, torch.Tensor]]:
    """Checkpoints 0, 1, 2: the model's init, moved twice along one seeded random direction.

    Each parameter moves by ``STEP · scale · N(0, 1)`` per step, ``scale`` its std, or ``CONSTANT_SCALE`` for a
    tensor initialized to a constant (zeroed norm weights, layer scales: they must move too, or what they gate
    never shows); tied parameters once, through ``named_parameters``; buffers stay. The model is left at
    checkpoint 2, the final one."""
    g = torch.Generator().manual_seed(seed)
    params = [p for _, p in model.named_parameters() if p.dtype.is_floating_point]
    moves = [torch.randn(p.shape, generator=g) * STEP * _scale(p) for p in params]
    checkpoints = {0: _copy(model)}
    with torch.no_grad():
        for epoch in (1, 2):
            for p, move in zip(params, moves, strict=True):
                p.add_(move.to(p.dtype))
            checkpoints[epoch] = _copy(model)
    return checkpoints


def _scale(p: torch.Tensor) -> float:
    std = p.detach().float().std().item() if p.numel() > 1 else 0.0
    return std if std > 1e-8 else CONSTANT_SCALE


def _copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def call(model: nn.Module, data: Any) -> Any:
    """One forward pass over the whole data (labels included for HF models: encoder-decoders need them)."""
    return model(data[0]) if isinstance(data, tuple) else model(**data)


def first_calls(model: nn.Module, data: Any) -> dict[str, int]:
    """Module path → the position of its first call in one eval-mode forward pass (forward pre-hooks)."""
    order: dict[str, int] = {}

    def seen(path: str) -> Any:
        def hook(module: nn.Module, args: Any) -> None:  # returns None: the input goes on unchanged
            order.setdefault(path, len(order))
        return hook
    handles = [m.register_forward_pre_hook(seen(path)) for path, m in model.named_modules()]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            call(model, data)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return order


def order_problems(members: dict[str, tuple[str, ...]], order: dict[str, int]) -> list[str]:
    """Groups out of forward order: each group sits at the first call of any module owning one of its keys."""
    first = {}
    for name, keys in members.items():
        calls = [order[m] for m in (_owner(k, order) for k in keys) if m is not None]
        if calls:
            first[name] = min(calls)
    names = list(first)
    return [f"group {b!r} is listed after {a!r} but the forward pass reaches it first"
            for a, b in zip(names, names[1:], strict=False) if first[b] < first[a]]


def _owner(key: str, order: dict[str, int]) -> str | None:
    """The closest module owning ``key`` that the forward pass called (a raw parameter's module, or its parent)."""
    path = key.rsplit(".", 1)[0] if "." in key else ""
    while True:
        if path in order:
            return path
        if not path:
            return None
        path = path.rsplit(".", 1)[0] if "." in path else ""


def compare(fast: pd.DataFrame, naive: pd.DataFrame) -> list[str]:
    """Every cell and metric of the fast table equals the naive one within TOLERANCE."""
    keys = [k for k in KEYS if k in fast.columns]
    if len(fast) != len(naive):
        return [f"fast has {len(fast)} cells, naive {len(naive)}"]
    a = fast.sort_values(keys, kind="stable").reset_index(drop=True)
    b = naive.sort_values(keys, kind="stable").reset_index(drop=True)
    if not a[keys].astype(str).equals(b[keys].astype(str)):
        return ["fast and naive evaluate different cells"]
    problems = []
    for column in a.columns:
        if column in keys or not pd.api.types.is_numeric_dtype(a[column]):
            continue
        x, y = a[column].astype(float).to_numpy(), b[column].astype(float).to_numpy()
        for i, (u, v) in enumerate(zip(x, y, strict=True)):
            if not (math.isnan(u) and math.isnan(v)) and not abs(u - v) <= TOLERANCE:
                cell = " ".join(str(a.at[i, k]) for k in ("op", "group", "checkpoint", "seed") if k in a)
                problems.append(f"fast != naive: {column} of {cell}: {float(u)!r} vs {float(v)!r}")
                break
    return problems


def reference_problems(case: Any, table: pd.DataFrame, checkpoints: dict, members: dict[str, tuple[str, ...]],
                       data: Any) -> list[str]:
    """Each ``reinit`` cell at epoch 0 against a model built afresh (never run before, so nothing it caches from
    its weights can be stale), loaded with that cell's state and evaluated plainly: error and loss of a classifier
    (image and sequence-classification cases; other kinds are left to the naive engine)."""
    if case.data not in CLASSIFIERS:
        return []
    pristine, _ = case.build()
    final = checkpoints[max(checkpoints)]
    labels = data[1] if isinstance(data, tuple) else data["labels"]
    problems = []
    for group, keys in members.items():
        row = table[(table["op"] == "reinit") & (table["group"] == group) & (table["checkpoint"] == 0)]
        if len(row) != 1:
            continue
        model = copy.deepcopy(pristine)
        model.load_state_dict({**final, **{k: checkpoints[0][k] for k in keys}})
        model.eval()
        with torch.no_grad():
            output = call(model, data if isinstance(data, tuple) else {k: v for k, v in data.items() if k != "labels"})
        logits = output if isinstance(output, torch.Tensor) else output.logits
        loss = torch.nn.functional.cross_entropy(logits.float(), labels).item()
        error = (logits.argmax(-1) != labels).float().mean().item()
        got = row.iloc[0]
        if not (math.isclose(got["loss"], loss, rel_tol=REFERENCE_TOLERANCE, abs_tol=REFERENCE_TOLERANCE)
                and math.isclose(got["error"], error, abs_tol=REFERENCE_TOLERANCE)):
            problems.append(f"reinit {group}@0: analyze gives loss {got['loss']:.6f}, error {got['error']:.4f}; "
                            f"a fresh model loaded with that state gives {loss:.6f}, {error:.4f}")
    return problems


def _unchanged(model: nn.Module, before: dict[str, torch.Tensor], training: bool, what: str) -> list[str]:
    after = model.state_dict()
    changed = [k for k in before if k not in after or not torch.equal(before[k], after[k])]
    problems = [f"{what} changed the caller's model: {', '.join(changed[:3])}"] if changed else []
    if model.training != training:
        problems.append(f"{what} left the model in {'train' if model.training else 'eval'} mode")
    return problems


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


def _short(note: str, limit: int = 300) -> str:
    return note if len(note) <= limit else note[:limit - 1] + "…"


def _timed(fn: Any) -> tuple[Any, float, list[str]]:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        start = time.process_time()  # CPU seconds of this process: steady on a shared machine (one torch thread)
        value = fn()
        seconds = time.process_time() - start
    notes = sorted({" ".join(str(w.message).split()) for w in seen if issubclass(w.category, UserWarning)
                    and "records no init_scheme" not in str(w.message)})
    return value, seconds, notes


def run_case(key: str, case: Any) -> Outcome:
    """All the checks of one case; never raises for the library's failures (they become ``problems``)."""
    out = Outcome(key, case.package, case.family)
    model, data = case.build()
    checkpoints = trajectory(model)
    before, training = _copy(model), model.training
    out.blocks = len(find_stack(model))
    order = first_calls(model, data)
    run: dict[str, Any] = dict(seeds=1, progress=False)
    evaluated = _grid(case, model, checkpoints, data, run, out, order, "analyze with defaults")
    if not evaluated and "for a sequence model use" in out.problems[-1]:
        # issue 22 item 2: the defaults refuse sequence logits; the other checks still run, metrics spelled out
        run["metrics"] = SEQUENCE_METRICS
        evaluated = _grid(case, model, checkpoints, data, run, out, order, f"analyze with metrics={SEQUENCE_METRICS}")
        out.refused.append(f"the checks after the defaults ran with metrics={SEQUENCE_METRICS}")
    out.problems += _unchanged(model, before, training, "analyze")
    skip = dict(ops=("reinit", "skip"), reinit_to=(0,))  # one reinit per group is enough beside the skips
    for what, fn in [("skip", lambda: criticality.analyze(model, checkpoints, data, **skip, **run)),
                     ("proxies", lambda: block_proxies(model, data))]:
        try:
            fn()
        except criticality.CriticalityError as error:
            note = f"{what} refused: {' '.join(str(error).split())}"
            if evaluated and DATA_BLAMED in note:  # the same data evaluated fine above: a wrong reason
                out.problems.append(f"{note} (but analyze evaluated this data)")
            else:
                out.refused.append(note)
        except Exception as error:
            out.problems.append(f"{what}: {_describe(error)}")
        out.problems += _unchanged(model, before, training, what)
    out.problems = list(dict.fromkeys(out.problems))
    return out


def _grid(case: Any, model: nn.Module, checkpoints: dict, data: Any, run: dict[str, Any], out: Outcome,
          order: dict[str, int], what: str) -> bool:
    """analyze fast, then naive: groups, forward order, speed, fast == naive, model untouched. False if it failed."""
    before, training = _copy(model), model.training
    try:
        fast, out.fast_s, notes = _timed(lambda: criticality.analyze(model, checkpoints, data, **run))
        out.refused += [f"fast engine warns: {n}" for n in notes]
        out.groups, out.spec = len(fast.groups.members), str(fast.summary.get("groups_spec", ""))
        out.problems += order_problems(dict(fast.groups.members), order)
        out.problems += _unchanged(model, before, training, "analyze")
        naive, out.naive_s, _ = _timed(lambda: criticality.analyze(model, checkpoints, data, engine="naive", **run))
        out.problems += compare(fast.table, naive.table)
        out.problems += reference_problems(case, fast.table, checkpoints, dict(fast.groups.members), data)
        return True
    except Exception as error:  # the library's failure is the finding: recorded, then the case fails
        out.problems.append(f"{what}: {_describe(error)}")
        return False


HEADER = """# Architecture matrix

Real `timm` and `transformers` models, each at a tiny random config (no downloads), given a three-checkpoint
trajectory (the init, then two steps along a seeded random direction) and {n} examples of their kind of data
(images and labels; token ids and labels; encoder-decoder inputs and labels; Whisper's `input_features`),
then `criticality.analyze(model, checkpoints, data, seeds=1)` with defaults. Checked per case: it succeeds;
the fast engine equals `engine="naive"` within {tolerance:g} on every cell and metric; `ops=("reinit", "skip")`
and `block_proxies` succeed or refuse with a `CriticalityError`; the caller's model comes back bit for bit
(state and train/eval flag); groups are listed in the order the forward pass first reaches them.

Written by `make test-foreign` (`tests_foreign/`, to `build/architectures.md`); this file is a copy of one
run's table. Fast s = CPU seconds of `analyze` with defaults (one torch thread); speed-up = naive CPU seconds /
fast CPU seconds of the same call (one run each, tiny models: noisy). A failing case listed in `KNOWN`
(`tests_foreign/known.py`) is expected to fail today and names the item of issue 22 whose fix makes it pass.
"""


def table(outcomes: list[Outcome], known: dict[str, str]) -> str:
    """The markdown of docs/architectures.md: one row per case, then the machine and versions it ran on."""
    ok = [o for o in outcomes if not o.problems]
    lines = [
        HEADER.format(tolerance=TOLERANCE, n=N),
        f"**{len(ok)} of {len(outcomes)} pass** ({sum(o.package == 'timm' for o in ok)} timm, "
        f"{sum(o.package == 'transformers' for o in ok)} transformers).",
        "",
        "| case | architecture | groups (spec) | blocks | fast s | speed-up | status | refused, warned, failed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        status = "passes" if not o.problems else ("**fails** (known: " + known[o.key] + ")" if o.key in known
                                                  else "**fails**")
        what = "; ".join(_short(n) for n in o.problems + o.refused).replace("|", "\\|")
        groups = f"{o.groups} ({o.spec})" if o.groups is not None else "–"
        fast = f"{o.fast_s:.2f}" if o.fast_s else "–"
        speed = f"{o.speedup:.2f}×" if o.speedup else "–"
        lines.append(f"| `{o.key}` | {o.family} | {groups} | {o.blocks} | {fast} | {speed} | {status} | {what} |")
    versions = (f"Python {platform.python_version()}, torch {torch.__version__}, timm {timm.__version__}, "
                f"transformers {transformers.__version__}, criticality {criticality.__version__}")
    lines += ["", f"Ran on: {platform.platform()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch thread(s); "
              f"{versions}."]
    return "\n".join(lines) + "\n"
