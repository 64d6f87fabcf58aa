"""A ``transformers.Trainer`` callback that makes a plain training run analysable.

A Trainer never saves the initialization, so ``criticality analyze-hf OUTPUT`` has nothing to reset to.
With the callback::

    trainer = Trainer(model, args, train_dataset=..., callbacks=[CriticalityCallback(early="paper")])
    trainer.train()        # OUTPUT/checkpoint-0/ (the initialization), checkpoint-1, -2, -3, -8 … as saved
    # criticality analyze-hf OUTPUT --data eval.txt

- ``on_train_begin``: ``save_pretrained`` of the model to ``OUTPUT/checkpoint-0`` (main process only; kept
  when it exists, e.g. on resume). For a fine-tuning run this is the pretrained model: the table then
  says which layers' fine-tuning matters.
- ``early``: extra checkpoints on the paper's schedule (``"paper"`` = 1, 2, 3, 8, 40, 90, the columns of
  its heatmaps) or a list, in ``unit`` = ``"step"`` or ``"epoch"``; the Trainer saves them itself
  (``control.should_save``), beside its own ``save_steps``. Mind ``save_total_limit``: rotation deletes
  the oldest checkpoints, ``checkpoint-0`` included.
- ``eval_data``: token ids ``(N, T)`` (or ``(ids, labels)``) held out for an analysis at the end of
  training: the trajectory the run wrote, analysed per block (``criticality.analyze``); the Δ token error
  of resetting each group to step 0 and its verdict go to the Trainer's log (``trainer.log``, so its
  ``report_to`` integrations see them) when the callback knows the Trainer (:meth:`attach`), else to
  ``state.log_history``; the full summary is written to ``OUTPUT/criticality.json``.

transformers calls every ``on_*`` event of a callback; the ones not defined here do nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from criticality.adapters.hub import to_model_keys
from criticality.core import integrity
from criticality.core.analysis import analyze
from criticality.core.metrics import SEQUENCE_METRICS
from criticality.core.trajectory import alias_tied, trajectory
from criticality.errors import CriticalityError
from criticality.infra.files import write_json

log = logging.getLogger(__name__)
PAPER_EARLY = (1, 2, 3, 8, 40, 90)  # the paper's heatmap columns after 0 (paper/experiments.py FCN_COLUMNS)
UNITS = ("step", "epoch")


def _noop(*args, **kwargs) -> None:
    return None


class CriticalityCallback:
    """See the module docstring. ``analyze_options`` go to :func:`criticality.analyze` (``seeds``,
    ``groups``, ``batch_size``, …; defaults: one draw per group, blocks)."""

    def __init__(self, early: str | Sequence[int] | None = None, *, unit: str = "step",
                 eval_data: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
                 analyze_options: dict[str, Any] | None = None):
        if unit not in UNITS:
            raise CriticalityError(f"CriticalityCallback unit must be one of {UNITS}, got {unit!r}")
        if early == "paper":
            early = PAPER_EARLY
        elif isinstance(early, str) or (early is not None and not all(int(e) == e and e > 0 for e in early)):
            raise CriticalityError(f"early must be 'paper' or positive {unit}s, got {early!r}")
        self.early, self.unit = frozenset(int(e) for e in early or ()), unit
        self.eval_data, self.analyze_options = eval_data, dict(analyze_options or {})
        self.trainer = None
        self.result = None  # the analysis at the end, when eval_data was given

    def attach(self, trainer) -> CriticalityCallback:
        """Add this callback to ``trainer`` and log the end-of-training analysis through it."""
        self.trainer = trainer
        trainer.add_callback(self)
        return self

    def __getattr__(self, name: str):
        if name.startswith("on_"):
            return _noop
        raise AttributeError(name)

    def on_train_begin(self, args, state, control, model: nn.Module | None = None, **kwargs):
        init = Path(args.output_dir) / "checkpoint-0"
        if model is None or not state.is_world_process_zero or init.exists() or state.global_step > 0:
            return
        if getattr(args, "save_total_limit", None):
            log.warning("save_total_limit=%s: the Trainer's rotation may delete checkpoint-0, the initialization "
                        "criticality resets to", args.save_total_limit)
        model.save_pretrained(init)

    def on_step_end(self, args, state, control, **kwargs):
        if self.unit == "step" and state.global_step in self.early:
            control.should_save = True

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.unit == "epoch" and round(state.epoch or 0) in self.early:
            control.should_save = True

    def on_train_end(self, args, state, control, model: nn.Module | None = None, **kwargs):
        if self.eval_data is None or model is None or not state.is_world_process_zero:
            return
        self.result = analyse_output(Path(args.output_dir), model, self.eval_data, **self.analyze_options)
        summary = self.result.summary
        write_json(Path(args.output_dir) / "criticality.json", summary)
        delta = f"delta_{summary.get('verdict_metric')}"  # Δ token error of the reset to step 0
        scores = {f"criticality/{v['group']}/{delta}": float(v[delta]) for v in summary.get("verdicts", [])
                  if v.get(delta) is not None}
        verdicts = {v["group"]: v["verdict"] for v in summary.get("verdicts", [])}
        log.info("criticality verdicts (reset to step 0): %s", verdicts)
        if self.trainer is not None:
            self.trainer.log(scores)
        else:
            state.log_history.append({**scores, "step": state.global_step})
        state.log_history[-1]["criticality_verdicts"] = verdicts


def analyse_output(output_dir: Path, model: nn.Module, eval_data, **options):
    """The Trainer output's trajectory (read through transformers' key mapping, integrity checked)
    analysed on ``eval_data`` with the live ``model`` (which comes back unchanged)."""
    found = trajectory(output_dir)
    states = {n: alias_tied(to_model_keys(c, model, found.labels[n]), model) for n, c in found.items()}
    checked = integrity.check(states, model.state_dict().keys(), found.labels)
    for line in checked.warnings():
        log.warning("integrity: %s", line)
    ids, labels = eval_data if isinstance(eval_data, tuple) else (eval_data, eval_data)
    device = next(model.parameters()).device
    options = {"seeds": 1, "groups": "blocks", "progress": False, "metrics": SEQUENCE_METRICS,
               "verdict_metric": "token_error", "batch_size": 16, **options}
    was_training = model.training
    try:
        result = analyze(model, checked.kept, (ids, labels), device=device, **options)
    finally:
        model.train(was_training)
    result.summary["integrity"] = checked.summary()
    return result
