"""The journal's Transformer LM run as data: what the tiny LM trains on and how long (the registry's ``lm`` runs)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from criticality.errors import CriticalityError
from criticality.paper.tiny_lm import corpus_files, split_corpus

COLUMNS = (0, 1, 2, 5, 10, 15, 20)  # the paper's checkpoint columns (epochs); the last is the trained model


@dataclass(frozen=True)
class LMConfig:
    """One LM run: what :func:`criticality.paper.tiny_lm.train_tiny_lm` trains and how the analysis scores it."""

    steps_per_epoch: int | None = 30  # None = one pass over the training bytes (batch_size × seq_len per step)
    epochs: int = 20
    seed: int = 0
    seq_len: int = 64  # bytes per sequence
    batch_size: int = 32  # sequences per step
    lr: float = 3e-3  # AdamW peak lr (5 % warm-up, cosine to 10 %)
    layers: int = 4
    hidden: int = 64
    corpus: str | None = None  # text file or folder; None = /usr/share/common-licenses
    eval_sequences: int | None = 128  # held-out sequences scored per cell (None = all)
    device: str = "auto"

    def epoch_steps(self) -> int:
        if self.steps_per_epoch:
            return self.steps_per_epoch
        train_bytes, _ = split_corpus(corpus_files(self.corpus))
        return max(1, len(train_bytes) // (self.batch_size * self.seq_len))

    def columns(self) -> list[int]:
        """The paper's columns up to ``epochs``, and ``epochs`` itself (the trained model)."""
        return sorted({c for c in COLUMNS if c < self.epochs} | {self.epochs})


# CLI options of `criticality run` (TrainConfig names) that the LM run takes, and what they set.
_OPTION_NAMES = {"seed": "seed", "lr": "lr", "batch_size": "batch_size", "epochs": "epochs", "device": "device",
                 "data_root": "corpus"}


def config(fields: dict[str, Any], overrides: dict[str, Any]) -> LMConfig:
    """The registry's fields with the user's overrides (``data_root`` = the corpus)."""
    unknown = sorted(set(overrides) - set(_OPTION_NAMES) - {f.name for f in dataclasses.fields(LMConfig)})
    if unknown:
        raise CriticalityError(f"the LM experiment does not take {', '.join(unknown)}; it takes "
                               f"{', '.join(k.replace('_', '-') for k in _OPTION_NAMES)} (--data-root = the text "
                               "corpus, a file or folder)")
    given = {_OPTION_NAMES.get(k, k): v for k, v in overrides.items()}
    cfg = LMConfig(**{**fields, **given})
    if cfg.epochs < 1:
        raise CriticalityError(f"epochs must be at least 1, got {cfg.epochs}")
    return cfg
