"""A tiny Llama-style language model trained offline, saved as an HF Trainer-style checkpoint folder.

The model is a ``transformers.LlamaForCausalLM`` with a random config (4 blocks, width 64, grouped-query
attention, rotary positions), byte-level (token = byte, vocabulary 256, no tokenizer files). The corpus
is a folder of text files that a Debian package ships; by default ``/usr/share/common-licenses`` (the
``base-files`` package: GPL, LGPL, Apache, MPL, … license texts, about 260 kB of English; each text may be
copied verbatim). The last 10 % of every file is held out as the evaluation text. Writes::

    OUT/checkpoint-0/        model.safetensors, config.json, trainer_state.json  (the initialization)
    OUT/checkpoint-<step>/   the same after <step> optimizer steps
    OUT/eval.txt             the held-out text (what `criticality analyze-hf --data` reads)
    OUT/train_args.json      the arguments, the corpus, its files and their sha256

``train_tiny_lm`` is what ``examples/train_tiny_lm.py`` and the experiment registry call; it returns
``OUT`` and reuses a finished folder trained with the same arguments.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from criticality.errors import CriticalityError
from criticality.infra.files import write_json, write_text

log = logging.getLogger(__name__)

CORPUS = Path("/usr/share/common-licenses")  # Debian base-files; present on every Debian/Ubuntu system
SAVE_AT = (0, 10, 20, 50, 100, 200, 400, 600)  # steps with a checkpoint
HOLDOUT = 0.1  # fraction of every corpus file (its end) kept for evaluation
EVAL_SEQUENCES = 64  # held-out sequences scored at every checkpoint (trainer_state.json)


def corpus_files(corpus: str | Path | None = None) -> list[Path]:
    """The corpus's text files, sorted, symlinks skipped (common-licenses links GPL → GPL-3)."""
    root = Path(corpus) if corpus else CORPUS
    if root.is_file():
        return [root]
    files = sorted(f for f in root.rglob("*") if f.is_file() and not f.is_symlink()) if root.is_dir() else []
    if not files:
        raise CriticalityError(f"no text corpus at {root}: pass --corpus FILE_OR_FOLDER (any text, e.g. "
                               "/usr/share/common-licenses from Debian's base-files)")
    return files


def split_corpus(files: Sequence[Path], holdout: float = HOLDOUT) -> tuple[bytes, bytes]:
    """Training bytes and held-out bytes: the last ``holdout`` of every file is held out."""
    train, held = [], []
    for f in files:
        raw = f.read_bytes()
        cut = int(len(raw) * (1 - holdout))
        train.append(raw[:cut])
        held.append(raw[cut:])
    return b"\n".join(train), b"\n".join(held)


def tiny_config(seq_len: int = 64, layers: int = 4, hidden: int = 64, heads: int = 4, kv_heads: int = 2):
    import transformers

    return transformers.LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                                    num_hidden_layers=layers, num_attention_heads=heads,
                                    num_key_value_heads=kv_heads, max_position_embeddings=seq_len,
                                    tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
                                    pad_token_id=None, use_cache=False)


def train_tiny_lm(out_dir: str | Path, steps: int = 600, save_at: Sequence[int] = SAVE_AT, seed: int = 0, *,
                  corpus: str | Path | None = None, seq_len: int = 64, batch_size: int = 32, lr: float = 3e-3,
                  layers: int = 4, hidden: int = 64, progress: bool = True) -> Path:
    """Train the tiny LM for ``steps`` AdamW steps (batches of ``batch_size`` random windows of ``seq_len``
    bytes; lr warms up linearly over 5 % of the steps, then cosine to 10 %) and save ``checkpoint-<s>`` for
    every ``s`` in ``save_at`` (0 = before training). Returns ``out_dir``."""
    import transformers

    out = Path(out_dir)
    save_at = sorted({int(s) for s in save_at} | {0})
    if save_at[-1] > steps:
        raise CriticalityError(f"save_at {save_at} goes past steps={steps}")
    files = corpus_files(corpus)
    args = {"steps": steps, "save_at": save_at, "seed": seed, "seq_len": seq_len, "batch_size": batch_size,
            "lr": lr, "layers": layers, "hidden": hidden, "corpus": str(Path(corpus) if corpus else CORPUS),
            "files": {f.name: hashlib.sha256(f.read_bytes()).hexdigest()[:16] for f in files}}
    if (out / "train_args.json").is_file() and json.loads((out / "train_args.json").read_text()) == args \
            and all((out / f"checkpoint-{s}" / "model.safetensors").is_file() for s in save_at):
        return out
    train_bytes, held = split_corpus(files)
    write_text(out / "eval.txt", held.decode("utf-8", errors="replace"))
    data = torch.frombuffer(bytearray(train_bytes), dtype=torch.uint8).long()
    held_ids = torch.frombuffer(bytearray(held), dtype=torch.uint8).long()
    n_eval = min(EVAL_SEQUENCES, len(held_ids) // seq_len)
    eval_ids = held_ids[: n_eval * seq_len].reshape(n_eval, seq_len)
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # transformers draws the init from the global generator
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(tiny_config(seq_len, layers, hidden))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, 0.1 + 0.45 * (
        1 + math.cos(math.pi * min(1.0, s / max(1, steps))))))
    history, started = [], time.perf_counter()
    for step in range(steps + 1):
        if step in save_at:
            history.append({"step": step, **_evaluate(model, eval_ids), "seconds": time.perf_counter() - started})
            _save(model, out / f"checkpoint-{step}", step, steps, history)
            if progress:
                log.info(f"step {step:4d}  held-out token error {history[-1]['eval_token_error']:.3f}  "
                         f"nll {history[-1]['eval_nll']:.3f}  ({history[-1]['seconds']:.0f} s)")
        if step == steps:
            break
        starts = torch.randint(0, len(data) - seq_len, (batch_size,), generator=g)
        ids = torch.stack([data[s:s + seq_len] for s in starts.tolist()])  # (B, T) bytes
        model.train()
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    write_json(out / "train_args.json", args)
    return out


@torch.no_grad()
def _evaluate(model, ids: torch.Tensor) -> dict[str, float]:
    """Held-out next-byte error and nll (nats per token), token-weighted."""
    model.eval()
    logits = model(input_ids=ids).logits[:, :-1]  # (N, T-1, 256)
    target = ids[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1)).item()
    return {"eval_token_error": (logits.argmax(-1) != target).float().mean().item(), "eval_nll": nll}


def _save(model, folder: Path, step: int, steps: int, history: list[dict]) -> None:
    model.save_pretrained(folder)
    write_json(folder / "trainer_state.json", {"global_step": step, "max_steps": steps,
                                               "log_history": list(history)})
