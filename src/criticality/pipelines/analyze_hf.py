"""Hugging Face checkpoint trajectories analysed on a local file: ``criticality analyze-hf CHECKPOINTS --data FILE``.

CHECKPOINTS is an HF Trainer output folder, a folder of ``step_N.safetensors``, or a hub repository id read
from the local hub cache (``ORG/NAME --revisions 'step*'``, or ``--repos 'ORG/NAME-step_*'`` for one
repository per checkpoint; :mod:`criticality.adapters.hub`). Checkpoint files are read through the key
mapping transformers applies on load, and the trajectory's integrity is checked before the grid
(:mod:`criticality.core.integrity`: identical checkpoints collapsed, off-trend ones flagged, missing keys
one error); ``summary.json`` and the report carry an ``integrity`` section.

The model class comes from the checkpoints' own ``config.json`` (``architectures``, built with random
weights by transformers — ``pip install 'criticality[hf]'``); the checkpoints are read lazily
(:mod:`criticality.trajectory`); the data is a local file, never a download:

- ``.safetensors`` with ``input_ids`` (N, T) (and optionally ``attention_mask``, ``labels``);
- ``.npy`` of token ids, (N, T), or (L,) cut into sequences of ``seq_len``;
- ``.txt`` / ``.jsonl`` (the ``text`` field of each line), tokenized by the checkpoint folder's own tokenizer
  files when it has them, else byte-level (token = byte, 0..255), and cut into sequences of ``seq_len``.

A causal LM is scored per token: ``token_error`` (next token wrong), ``nll`` (nats per token) and
``perplexity`` = exp(nll), token-weighted over the whole file. Outputs, in ``OUT`` (default
``CHECKPOINTS/analysis``)::

    OUT/cells.csv, distances.csv, summary.json, cells.jsonl   the same tables as `criticality analyze`
    OUT/figures/robustness_token_error.png, …                 heatmaps (output.figures.draw_run)
    OUT/report.html
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from criticality.adapters import hub
from criticality.core import integrity
from criticality.core.analysis import DEFAULT_THRESHOLD, Result
from criticality.core.metrics import SEQUENCE_METRICS
from criticality.core.plan import PlanSpec, make_plan
from criticality.core.trajectory import Trajectory, alias_tied, checkpoint_at, trajectory
from criticality.errors import CriticalityError
from criticality.infra import distributed
from criticality.infra.files import write_json, write_text
from criticality.output import figures as plots
from criticality.output import report
from criticality.output.tables import read_summary
from criticality.pipelines.grid import analyse_plan, one_process

# The metric names analyze-hf measures (names in core.metrics.METRICS); perplexity = exp(nll) is added to the
# table by run_cells; agreement (per token, with the final model's top-1) and kl (nats per token) are
# label-free, as in `criticality analyze`
DEFAULT_METRIC_NAMES = SEQUENCE_METRICS
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
DEFAULT_SEQ_LEN = 128  # tokens per sequence, capped by the model's max_position_embeddings
log = logging.getLogger(__name__)


def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise CriticalityError("analyze-hf needs transformers: pip install 'criticality[hf]'") from e
    return transformers


def config_folder(found: Trajectory) -> Path:
    """The folder whose ``config.json`` describes the model: the final checkpoint's, else the trajectory's."""
    final = found[max(found)]
    for folder in (final.files[0].path.parent, found.path):
        if (folder / "config.json").is_file():
            return folder
    raise CriticalityError(f"no config.json next to the final checkpoint or in {found.path}: the model class "
                           "is built from it (save_pretrained writes one)")


def build_model(folder: Path) -> nn.Module:
    """The model class named by ``folder/config.json`` (``architectures[0]``), with fresh weights (the same
    on every call), in eval mode."""
    transformers = _transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise CriticalityError(f"{folder / 'config.json'} is not a config transformers can read: {e}") from e
    names = getattr(config, "architectures", None) or []
    cls = getattr(transformers, names[0], None) if names else None
    if cls is None:
        raise CriticalityError(f"{folder / 'config.json'}: architectures {names} names no class of transformers "
                               f"{transformers.__version__}")
    config.use_cache = False
    # The weights are replaced by the checkpoints, but the cell store fingerprints the model's state: draw
    # them from a fixed seed (without touching the caller's generator) so that a rerun resumes.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return cls(config).eval()


def tokenizer(folder: Path):
    """The folder's own tokenizer (local files only), or None for byte-level tokens."""
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return None
    try:
        return _transformers().AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise CriticalityError(f"cannot load the tokenizer files in {folder}: {e}") from e


def read_tokens(path: Path, seq_len: int, *, tok=None, vocab_size: int | None = None,
                text_key: str = "text") -> dict[str, torch.Tensor]:
    """``{"input_ids": (N, T) int64, …}`` from a data file (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise CriticalityError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        tensors = _read_safetensors(path)
    elif suffix == ".npy":
        try:
            ids = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise CriticalityError(f"{path} is not a readable .npy array of token ids: {e}") from e
        tensors = {"input_ids": torch.from_numpy(np.ascontiguousarray(ids))}
    elif suffix in (".txt", ".jsonl"):
        text = path.read_text(encoding="utf-8", errors="replace")
        if suffix == ".jsonl":
            text = "\n".join(_jsonl_texts(path, text, text_key))
        stream = tok(text)["input_ids"] if tok is not None else list(text.encode("utf-8"))
        tensors = {"input_ids": torch.tensor(stream, dtype=torch.int64)}
    else:
        raise CriticalityError(f"data file {path}: use .safetensors, .npy (token ids), .txt or .jsonl")
    ids = tensors["input_ids"]
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise CriticalityError(f"{path}: input_ids must be integers, got {ids.dtype}")
    if ids.ndim == 1:  # a token stream: whole sequences of seq_len, the remainder dropped
        n = len(ids) // seq_len
        if n == 0:
            raise CriticalityError(f"{path}: {len(ids)} tokens, fewer than one sequence of {seq_len}")
        tensors = {"input_ids": ids[: n * seq_len].reshape(n, seq_len)}
    elif ids.ndim != 2:
        raise CriticalityError(f"{path}: input_ids must be (N, T) or a 1-D stream, got shape {tuple(ids.shape)}")
    tensors = {k: v.to(torch.int64) for k, v in tensors.items()}
    top = int(tensors["input_ids"].max())
    if vocab_size is not None and top >= vocab_size:
        raise CriticalityError(f"{path}: token id {top} is outside the model's vocabulary ({vocab_size}); "
                               "byte-level text needs vocab_size ≥ 256, or ship the tokenizer files with the "
                               "checkpoints")
    return tensors


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CriticalityError(f"{path} is not a readable safetensors file: {e}") from e
    if "input_ids" not in tensors:
        raise CriticalityError(f"{path} holds no 'input_ids' (has {', '.join(sorted(tensors)) or 'nothing'})")
    return {k: tensors[k] for k in ("input_ids", "attention_mask", "labels") if k in tensors}


def _jsonl_texts(path: Path, text: str, key: str) -> list[str]:
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            out.append(record[key])
        except (ValueError, KeyError, TypeError) as e:
            raise CriticalityError(f"{path}:{i}: expected a JSON object with a {key!r} string ({e})") from e
    return out


def lm_data(tensors: Mapping[str, torch.Tensor], batch_size: int):
    """Batches for the engine: ``(input_ids, labels)`` tensors when nothing is padded, else dict batches
    (``attention_mask`` passed to the model; padded positions labelled -100, so never scored)."""
    ids = tensors["input_ids"]
    labels = tensors.get("labels", ids)
    mask = tensors.get("attention_mask")
    if mask is None or bool(mask.all()):
        return ids, labels
    labels = labels.masked_fill(mask == 0, -100)
    return [{"input_ids": ids[i:i + batch_size], "attention_mask": mask[i:i + batch_size],
             "labels": labels[i:i + batch_size]} for i in range(0, len(ids), batch_size)]


def find_trajectory(checkpoints: str | Path | None, *, revisions: str | Sequence[str] | None = None,
                    repos: str | None = None, init_checkpoint: str | Path | None = None,
                    cache_dir: str | Path | None = None, offline: bool | None = None) -> Trajectory:
    """The checkpoints: a local folder, a hub repository's revisions, or one repository per checkpoint;
    ``init_checkpoint`` (a folder, a file or a cached repository id) adds step 0 where they lack it."""
    if repos:
        if checkpoints:
            raise CriticalityError("give either CHECKPOINTS or --repos, not both")
        found = hub.repos_trajectory(repos, cache_dir, offline)
    elif checkpoints is None:
        raise CriticalityError("name the checkpoints: a folder, a hub repository id (ORG/NAME --revisions 'step*') "
                               "or --repos 'ORG/NAME-step_*'")
    elif revisions or hub.is_repo_id(checkpoints):
        if not hub.is_repo_id(checkpoints):
            raise CriticalityError(f"--revisions needs a hub repository id (ORG/NAME), got {checkpoints}")
        found = hub.hub_trajectory(str(checkpoints), revisions or "*", cache_dir, offline)
    else:
        init = hub.local_folder(init_checkpoint, cache_dir, offline) if init_checkpoint is not None else None
        return trajectory(checkpoints, init)
    if init_checkpoint is not None:
        if 0 in found:
            raise CriticalityError(f"{found.path} already holds step 0 ({found.labels[0]}); drop --init-checkpoint")
        init = checkpoint_at(hub.local_folder(init_checkpoint, cache_dir, offline))
        found = Trajectory({0: init, **found}, found.axis, found.layout, found.path,
                           {**found.labels, 0: str(init_checkpoint)}, found.extra)
    if 0 not in found:
        raise CriticalityError(f"{found.path}: no step 0 among {', '.join(found.labels.values())}; include the "
                               "initialization's revision (e.g. step0) or pass --init-checkpoint")
    return found


def default_out(checkpoints: str | Path | None, repos: str | None) -> Path:
    """CHECKPOINTS/analysis for a local folder; analysis/ORG--NAME here for a hub trajectory."""
    if repos or hub.is_repo_id(checkpoints):
        name = (repos or str(checkpoints)).replace("/", "--").replace("*", "").strip("-_")
        return Path("analysis") / name
    return Path(checkpoints) / "analysis"


def checked_states(found: Trajectory, model: nn.Module, check: bool = True):
    """The trajectory under the model's keys (transformers' mapping, tied keys aliased), its integrity
    checked (see :mod:`criticality.core.integrity`); the Integrity, or None when ``check`` is off."""
    states = {n: alias_tied(hub.to_model_keys(c, model, found.labels[n]), model) for n, c in found.items()}
    if not check:
        return states, None
    found_integrity = integrity.check(states, model.state_dict().keys(), found.labels)
    for line in found_integrity.warnings():
        log.warning("integrity: %s", line)
    return found_integrity.kept, found_integrity


def hold_final(model: nn.Module, final: Mapping[str, torch.Tensor]) -> None:
    """Copy the final checkpoint into ``model``, one tensor at a time: the engine then finds nothing to save
    and restore (it keeps a copy of every tensor of the caller's model that differs from the final state,
    which for the random weights of :func:`build_model` is one whole model size of memory)."""
    own = model.state_dict()
    if set(own) - set(final):
        return  # a misfit: make_plan's check names it
    with torch.no_grad():
        for key, tensor in own.items():
            if tuple(final[key].shape) != tuple(tensor.shape):
                return  # likewise
            tensor.copy_(final[key])


def analyze_hf(checkpoints: str | Path | None, data: str | Path, *, init_checkpoint: str | Path | None = None,
               revisions: str | Sequence[str] | None = None, repos: str | None = None,
               cache_dir: str | Path | None = None, offline: bool | None = None, check_integrity: bool = True,
               groups: str | dict = "blocks", seeds: int = 2, seq_len: int | None = None, batch_size: int = 16,
               max_examples: int | None = None, threshold: float = DEFAULT_THRESHOLD, device: str = "auto",
               engine: str = "fast", text_key: str = "text", out: str | Path | None = None,
               progress: bool = True) -> Path:
    """Analyse an HF checkpoint trajectory on a local data file; writes ``out`` and returns it."""
    device = distributed.auto_device(device)
    found = find_trajectory(checkpoints, revisions=revisions, repos=repos, init_checkpoint=init_checkpoint,
                            cache_dir=cache_dir, offline=offline)
    folder = config_folder(found)
    model = build_model(folder)
    states, checked = checked_states(found, model, check_integrity)
    hold_final(model, states[max(states)])
    limit = getattr(model.config, "max_position_embeddings", None) or DEFAULT_SEQ_LEN
    seq_len = seq_len or min(DEFAULT_SEQ_LEN, limit)
    if seq_len > limit:
        raise CriticalityError(f"--seq-len {seq_len} exceeds the model's max_position_embeddings ({limit})")
    tok = tokenizer(folder)
    tensors = read_tokens(Path(data), seq_len, tok=tok, vocab_size=model.config.vocab_size, text_key=text_key)
    out = Path(out) if out else default_out(checkpoints, repos)
    spec = PlanSpec(groups, seeds, metrics=DEFAULT_METRIC_NAMES, engine=engine, batch_size=batch_size,
                    max_examples=max_examples)
    plan = make_plan(model, states, spec)
    ids = tensors["input_ids"]

    def describe(result: Result) -> dict[str, Any]:
        return dict(
            chance_error=1 - 1 / model.config.vocab_size,
            data={"name": Path(data).name, "split": "test", "n_test": int(result.table.n.iloc[0]),
                  "max_examples": max_examples, "sequences": int(ids.shape[0]), "seq_len": int(ids.shape[1]),
                  "tokenizer": "own" if tok is not None else "bytes", "source": str(Path(data).resolve())},
            checkpoints={"path": str(found.path), "layout": found.layout, "axis": found.axis, "numbers": list(states),
                         "labels": {str(n): found.labels[n] for n in states}, **found.extra},
            **({"integrity": checked.summary()} if checked is not None else {}))

    result = analyse_plan(plan, lm_data(tensors, batch_size), out, one_process(device), threshold=threshold,
                          verdict_metric="token_error", describe=describe, progress=progress)
    config = {"model": {"name": type(model).__name__, "config": str(folder / "config.json")},
              "data": {"name": Path(data).name}, "checkpoints": str(found.path)}
    if revisions or repos:
        config["hub"] = {"revisions": revisions, "repos": repos, "cache_dir": str(cache_dir) if cache_dir else None}
    write_json(out / "config.json", config)
    plots.draw_run(out, analysis=out)
    write_text(out / "report.html", report.render(config, result.summary, out / "figures"))
    return out


def summary_line(out: Path) -> dict[str, Any]:
    """The verdicts in ``out/summary.json``, for the CLI's closing line."""
    summary = read_summary(out)
    return {v["group"]: v["verdict"] for v in summary.get("verdicts", [])}
