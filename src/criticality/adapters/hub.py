"""Public training suites from the Hugging Face hub cache, and checkpoints as transformers writes them.

Two ways a suite publishes its trajectory, both read through ``huggingface_hub``'s own cache API (never by
guessing paths), offline when ``HF_HUB_OFFLINE=1``::

    EleutherAI/pythia-70m  --revisions 'step*'     one repository, a branch per checkpoint (Pythia step0 …
                                                   step143000, OLMo step1000-tokens4B, CRFM checkpoint-N)
    --repos 'google/multiberts-seed_0-step_*'      one repository per checkpoint (MultiBERTs, TinyLlama)

The hub cache (``~/.cache/huggingface/hub`` or ``--cache-dir``) holds ``models--ORG--NAME/refs/<branch>``
(a file with the commit sha), ``snapshots/<sha>/<file>`` (links to ``blobs/<sha256>``). Revisions are sorted
naturally and put on the step axis by the number in their name (``step1000`` → 1000, ``step_20k`` → 20000,
``ckpt_007`` → 7); tokens (``tokens4B``) are recorded beside the step. Where the hub is reachable the
same command lists the branches and downloads only the weight and config files.

:func:`to_model_keys` reads checkpoint files through the key mapping transformers ≥ 5 applies when it
loads them (GPT-NeoX's ``embed_out`` → ``lm_head``, MoE experts stored one per expert and fused in memory),
using transformers' own conversion rules, lazily: a fused tensor is built from its parts when it is read.
"""

from __future__ import annotations

import copy
import fnmatch
import hashlib
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from criticality.core.trajectory import Derived, LazyCheckpoint, TensorFile, Trajectory, checkpoint_at
from criticality.errors import CriticalityError

# What a revision's analysis needs from the hub: weights (one file or shards with their index) and config
WEIGHT_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json",
                   "tokenizer*", "vocab.json", "merges.txt", "special_tokens_map.json"]
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_STEP = re.compile(r"(?:^|[^a-z])(?:step|checkpoint|ckpt|iter)[_-]?(\d+)([km]?)(?![a-z0-9])", re.I)
_TOKENS = re.compile(r"tokens?[_-]?(\d+(?:\.\d+)?)([kmbt]?)", re.I)
_SCALE = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "t": 10**12}


def _hub():
    try:
        import huggingface_hub
    except ImportError as e:
        raise CriticalityError("reading the hub cache needs huggingface_hub: pip install 'criticality[hf]'") from e
    return huggingface_hub


def offline_mode(offline: bool | None = None) -> bool:
    """``offline`` when given, else ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` as huggingface_hub reads them."""
    if offline is not None:
        return offline
    return any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE") for v in ("HF_HUB_OFFLINE",
                                                                                     "TRANSFORMERS_OFFLINE"))


def is_repo_id(text: str | Path) -> bool:
    """``ORG/NAME`` (optionally ``@REVISION``) that is not an existing local path."""
    text = str(text)
    return not Path(text).exists() and bool(_REPO_ID.match(text.split("@", 1)[0]))


def natural_key(name: str) -> list:
    """Sort key that orders ``step2`` before ``step10``."""
    return [int(p) if p.isdigit() else p.lower() for p in re.split(r"(\d+)", name)]


def position(name: str) -> tuple[int | None, float | None]:
    """(step, tokens) read from a revision or repository name; None where the name does not say."""
    m = _STEP.search(name)
    step = int(m.group(1)) * _SCALE[m.group(2).lower()] if m else None
    if step is None:  # ckpt_000, 0100: the last number in the name
        numbers = re.findall(r"\d+", name.rsplit("/", 1)[-1])
        step = int(numbers[-1]) if numbers else None
    t = _TOKENS.search(name)
    tokens = float(t.group(1)) * _SCALE[t.group(2).lower()] if t else None
    return step, tokens


def select(names: Sequence[str], patterns: str | Sequence[str]) -> list[str]:
    """The names matching any glob or exact name in ``patterns`` (a comma-separated string or a list), in
    natural order."""
    if isinstance(patterns, str):
        patterns = [p.strip() for p in patterns.split(",") if p.strip()]
    chosen = {n for n in names for p in patterns if fnmatch.fnmatchcase(n, p)}
    return sorted(chosen, key=natural_key)


def _cache_repo(repo_id: str, cache_dir: str | Path | None):
    hub = _hub()
    try:
        info = hub.scan_cache_dir(cache_dir)
    except hub.errors.CacheNotFound as e:
        raise CriticalityError(f"no Hugging Face cache at {cache_dir or hub.constants.HF_HUB_CACHE}: {e}") from e
    return info, next((r for r in info.repos if r.repo_id == repo_id and r.repo_type == "model"), None)


def list_revisions(repo_id: str, cache_dir: str | Path | None = None, offline: bool | None = None) -> list[str]:
    """The repository's branches: from the hub when reachable, else the refs the local cache holds."""
    hub = _hub()
    if not offline_mode(offline):
        try:
            return [b.name for b in hub.HfApi().list_repo_refs(repo_id).branches]
        except Exception:  # noqa: BLE001 - no network, no such repo online: fall back to the cache
            pass
    _, repo = _cache_repo(repo_id, cache_dir)
    if repo is None:
        raise CriticalityError(f"{repo_id} is neither a local folder nor a repository in the Hugging Face cache at "
                               f"{cache_dir or 'the default place'} (and the hub is not reachable); check the path, "
                               "download the repository first or pass --cache-dir")
    return [ref for ref in repo.refs if not ref.startswith("refs/")]  # refs/pr/1 are not checkpoints


def list_repos(pattern: str, cache_dir: str | Path | None = None, offline: bool | None = None) -> list[str]:
    """Repository ids matching a glob (``ORG/NAME-step_*``): from the hub when reachable, else the cache."""
    hub = _hub()
    org = pattern.split("/", 1)[0]
    names: list[str] = []
    if not offline_mode(offline):
        try:
            stem = pattern.split("/", 1)[-1].split("*", 1)[0]
            names = [m.id for m in hub.HfApi().list_models(author=org, search=stem)]
        except Exception:  # noqa: BLE001 - no network: the cache answers
            names = []
    if not names:
        info, _ = _cache_repo(pattern, cache_dir)
        names = [r.repo_id for r in info.repos if r.repo_type == "model"]
    found = select(names, [pattern])
    if not found:
        raise CriticalityError(f"no repository matches {pattern!r} (in the cache: "
                               f"{', '.join(sorted(names)[:8]) or 'none'})")
    return found


def snapshot(repo_id: str, revision: str | None = None, cache_dir: str | Path | None = None,
             offline: bool | None = None) -> Path:
    """The local folder of ``repo_id`` at ``revision`` (downloading the weight files when online)."""
    hub = _hub()
    try:
        return Path(hub.snapshot_download(repo_id, revision=revision, cache_dir=cache_dir,
                                          local_files_only=offline_mode(offline), allow_patterns=WEIGHT_PATTERNS))
    except Exception as e:  # noqa: BLE001 - LocalEntryNotFoundError, RepositoryNotFoundError, HTTP errors
        raise CriticalityError(f"{repo_id}@{revision or 'main'}: not available "
                               f"{'in the cache (offline)' if offline_mode(offline) else 'from the hub or the cache'}"
                               f": {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e


def _revision_checkpoint(folder: Path, label: str) -> LazyCheckpoint:
    try:
        return checkpoint_at(folder)
    except CriticalityError as e:
        raise CriticalityError(f"revision {label}: {e}") from e


def _placed(labels: Sequence[str], kind: str) -> tuple[dict[int, str], dict[str, float]]:
    """Number on the step axis → label, and label → tokens where the names carry them; duplicates refused."""
    numbers: dict[int, str] = {}
    tokens: dict[str, float] = {}
    for label in labels:
        step, tok = position(label)
        if step is None:
            raise CriticalityError(f"{kind} {label!r} carries no step number; choose revisions named by step "
                                   "(e.g. --revisions 'step*')")
        if step in numbers:
            raise CriticalityError(f"{kind}s {numbers[step]!r} and {label!r} are both step {step}")
        numbers[step] = label
        if tok is not None:
            tokens[label] = tok
    return numbers, tokens


def hub_trajectory(repo_id: str, revisions: str | Sequence[str] = "*", cache_dir: str | Path | None = None,
                   offline: bool | None = None) -> Trajectory:
    """One repository's branches as a trajectory (step → checkpoint, labels = branch names)."""
    available = list_revisions(repo_id, cache_dir, offline)
    chosen = select(available, revisions)
    if not chosen:
        raise CriticalityError(f"{repo_id}: no revision matches {revisions!r} (has "
                               f"{', '.join(sorted(available, key=natural_key)[:10]) or 'none'})")
    numbers, tokens = _placed(chosen, "revision")
    checkpoints = {n: _revision_checkpoint(snapshot(repo_id, label, cache_dir, offline), f"{repo_id}@{label}")
                   for n, label in numbers.items()}
    return Trajectory(checkpoints, "step", "hub revisions", Path(repo_id), labels=numbers,
                      extra={"repo": repo_id, "tokens": tokens} if tokens else {"repo": repo_id})


def repos_trajectory(pattern: str, cache_dir: str | Path | None = None, offline: bool | None = None) -> Trajectory:
    """One repository per checkpoint (``ORG/NAME-step_*``) as a trajectory."""
    numbers, tokens = _placed(list_repos(pattern, cache_dir, offline), "repository")
    checkpoints = {n: _revision_checkpoint(snapshot(repo, None, cache_dir, offline), repo)
                   for n, repo in numbers.items()}
    return Trajectory(checkpoints, "step", "hub repositories", Path(pattern.split("/", 1)[0]), labels=numbers,
                      extra={"repos": pattern, **({"tokens": tokens} if tokens else {})})


def local_folder(spec: str | Path, cache_dir: str | Path | None = None, offline: bool | None = None) -> Path:
    """A local path as it is, or a repository id (``ORG/NAME`` or ``ORG/NAME@REVISION``) resolved to its
    snapshot folder: what ``--init-checkpoint`` accepts."""
    if not is_repo_id(spec):
        return Path(spec)
    repo, _, revision = str(spec).partition("@")
    return snapshot(repo, revision or None, cache_dir, offline)


def add_to_cache(cache_dir: str | Path, repo_id: str, revision: str, files: Mapping[str, str | Path],
                 move: bool = False) -> Path:
    """Lay ``files`` (name in the repository → local file) out as ``revision`` of ``repo_id`` in a hub cache,
    the way ``huggingface_hub`` does (blobs named by content sha256, snapshots linking to them, the branch in
    ``refs``); ``move`` moves the files instead of copying them. For offline copies of a suite, tests and
    benchmarks; returns the snapshot folder."""
    repo_dir = Path(cache_dir) / f"models--{repo_id.replace('/', '--')}"
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    digests = {}
    for name, src in sorted(files.items()):
        h = hashlib.sha256()
        with open(src, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        digests[name] = h.hexdigest()
        blob = repo_dir / "blobs" / digests[name]
        if not blob.exists():
            (shutil.move if move else shutil.copyfile)(src, blob)
    commit = hashlib.sha1(f"{revision}\n{sorted(digests.items())}".encode()).hexdigest()
    snap = repo_dir / "snapshots" / commit
    for name, digest in digests.items():
        link = snap / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            link.symlink_to(os.path.relpath(repo_dir / "blobs" / digest, link.parent))
    ref = repo_dir / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(commit)
    return snap


def _conversions(model: nn.Module):
    """transformers' conversion rules for ``model`` (renamings, converters), or None when it has none."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter
    except ImportError:  # transformers < 5: checkpoints are stored under the model's own keys
        return None
    try:
        transforms = get_model_conversion_mapping(model)
    except (AttributeError, TypeError):  # not a PreTrainedModel
        return None
    return ([t for t in transforms if not isinstance(t, WeightConverter)],
            {p: t for t in transforms if isinstance(t, WeightConverter) for p in t.source_patterns})


def _convert(converter, target: str, patterns: list[str], tensors: list[torch.Tensor], model: nn.Module) -> dict:
    """The parts (in order, with their source patterns) through a fresh copy of transformers' converter."""
    fresh = copy.deepcopy(converter)
    for tensor, pattern in zip(tensors, patterns, strict=True):
        fresh.add_tensor(target, target, pattern, (lambda t=tensor: t))
    return fresh.convert(target, model=model, config=getattr(model, "config", None))


def _fuse(converter, target: str, patterns: list[str], pick: str, model: nn.Module):
    """A combine function for :class:`Derived`: the model key ``pick`` of what the converter makes."""
    return lambda tensors: _convert(converter, target, patterns, tensors, model)[pick]


def to_model_keys(checkpoint: LazyCheckpoint, model: nn.Module, label: str | None = None) -> LazyCheckpoint:
    """``checkpoint`` under the model's keys, as ``from_pretrained`` would map it (see the module docstring).

    A checkpoint already under the model's keys comes back unchanged; keys the mapping leaves unplaced stay
    as they are (the model's key check then names them)."""
    from transformers.core_model_loading import rename_source_key

    own = model.state_dict()
    if set(checkpoint) <= set(own):
        return checkpoint
    rules = _conversions(model)
    if rules is None:
        return checkpoint
    renamings, by_pattern = rules
    sources = checkpoint.sources()
    where: dict[str, TensorFile | Derived] = {}
    groups: dict[str, list[tuple[str, str]]] = {}  # model key → [(file key, source pattern)]
    prefix = getattr(model, "base_model_prefix", None)
    converters = list({id(c): c for c in by_pattern.values()}.values())
    for key in sorted(sources, key=natural_key):
        renamed, pattern = rename_source_key(key, renamings, converters, prefix, own)
        if renamed not in own and key in own:
            renamed, pattern = key, None
        if pattern is None:
            where[renamed] = sources[key] if renamed == key else Derived([_part(checkpoint, key)])
        else:
            groups.setdefault(renamed, []).append((key, pattern))
    for target, members in groups.items():
        converter = by_pattern[members[0][1]]
        parts = [_part(checkpoint, k) for k, _ in members]
        patterns = [p for _, p in members]
        try:  # what the converter makes, on meta tensors: reads nothing
            meta = [torch.empty(f.shape(k), device="meta") for f, k in parts]
            made = _convert(converter, target, patterns, meta, model)
        except Exception as e:  # noqa: BLE001 - transformers' own ops; name the revision and the keys
            raise CriticalityError(f"{label or checkpoint.name}: cannot fuse {', '.join(k for k, _ in members[:4])} "
                                   f"into {target} as transformers does: {e}") from e
        for model_key in made:
            where[model_key] = Derived(parts, _fuse(converter, target, patterns, model_key, model))
    return checkpoint.mapped(where)


def _part(checkpoint: LazyCheckpoint, key: str) -> tuple[TensorFile, str]:
    held = checkpoint.file_key(key)
    if held is None:
        raise CriticalityError(f"{checkpoint.name}: {key} is itself derived; cannot map it twice")
    return held
