"""The journal's Transformer LM experiment (``journal-lm/tiny-llama/lm1b``): sub-layer groups, the epoch
columns, the findings check, and one end-to-end run of `criticality run` at toy size (sub-layer grid, per-layer
skip and Block Influence, figures, report, resume).

Run: ``pytest tests/test_lm_experiment.py -q`` (about 30 s on 2 cores).
"""

from __future__ import annotations

import json

import pandas as pd
import pytest

from criticality.cli import main
from criticality.errors import CriticalityError
from criticality.paper import experiments, lm_config
from criticality.pipelines import lm_experiment as lm

transformers = pytest.importorskip("transformers")
from criticality.paper.tiny_lm import tiny_config  # noqa: E402
from criticality.pipelines.run_experiment import run_experiment  # noqa: E402

# A toy run: 2 blocks of width 16, an "epoch" of 2 steps, 8 held-out sequences of 32 bytes per cell.
TOY = dict(steps_per_epoch=2, layers=2, hidden=16, seq_len=32, batch_size=8, eval_sequences=8, device="cpu")
WORDS = "all layers are not created equal some are robust and some are critical when reset".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A 6 kB text: a fixed walk over a small vocabulary, so a toy model learns something in 40 steps."""
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text(" ".join(WORDS[(i * 7 + i // 5) % len(WORDS)] for i in range(1200)) + "\n")
    return path


def test_sublayer_groups_cover_every_tensor_once():
    model = transformers.LlamaForCausalLM(tiny_config(seq_len=32, layers=3, hidden=16))
    groups = lm.sublayer_groups(model)
    assert len(groups) == 3 + 5 * 3
    assert list(groups)[:7] == ["embed", "block0.attn_norm", "block0.attn", "block0.mlp_norm", "block0.mlp_wi",
                                "block0.mlp_wo", "block1.attn_norm"]
    from criticality.core.groups import resolve

    resolved = resolve(model, groups)
    assert not resolved.unassigned
    assert resolved.members["block0.mlp_wi"] == ("model.layers.0.mlp.gate_proj.weight",
                                                  "model.layers.0.mlp.up_proj.weight")
    keys = [k for ks in resolved.members.values() for k in ks]
    assert sorted(keys) == sorted(model.state_dict()) and len(set(keys)) == len(keys)


def test_registry_entry_and_columns():
    exp = experiments.get("journal-lm")
    assert exp.key == "journal-lm/tiny-llama/lm1b" and exp.figure == "journal" and exp.sweep == "lm"
    quick = experiments.run_configs(exp, "quick", None)["run"]
    assert quick.columns() == [0, 1, 2, 5, 10, 15, 20] and quick.epoch_steps() == 30
    assert experiments.run_configs(exp, "paper", None)["run"].layers == 12
    assert lm_config.config({}, {"epochs": 3}).columns() == [0, 1, 2, 3]
    with pytest.raises(CriticalityError, match="text corpus"):
        exp.configs("quick", "digits")
    with pytest.raises(CriticalityError, match="does not take max_train"):
        exp.configs("quick", max_train=10)


def _table(at0: dict[str, float], rand: dict[str, float], at1: dict[str, float]) -> pd.DataFrame:
    """A cells table holding only what findings() reads: Δ token error per group at 0, 1 and re-randomized."""
    cols = [("reinit", 0, at0), ("reinit", 1, at1), ("rerandomize", None, rand)]
    return pd.DataFrame([{"group": g, "op": op, "checkpoint": c, "delta_token_error": d, "joint": False}
                         for op, c, deltas in cols for g, d in deltas.items()])


def test_findings_hold_on_the_papers_pattern_and_not_on_its_opposite():
    paper = {"embed": 0.3, "block0.attn_norm": 0.2, "block0.attn": 0.2, "block0.mlp_norm": 0.2, "block0.mlp_wi": 0.3,
             "block0.mlp_wo": 0.2, "block1.attn_norm": 0.1, "block1.attn": 0.0, "block1.mlp_norm": 0.1,
             "block1.mlp_wi": 0.1, "block1.mlp_wo": 0.01, "final_norm": 0.1, "head": 0.2}
    rand = {**paper, "embed": 0.7, "head": 0.8}
    found = lm.findings(_table(paper, rand, {g: 0.0 for g in paper}))
    assert found.holds.all(), found
    flat = {g: 0.0 for g in paper}
    found = lm.findings(_table(flat, flat, flat))
    assert not found.holds.any(), found


@pytest.mark.slow
def test_cli_run_end_to_end(corpus, tmp_path, monkeypatch):
    """`criticality run journal-lm` trains with checkpoints at the epoch columns, analyses every sub-layer
    and writes the tables (token accuracy), findings, heatmaps and report; a rerun resumes every cell."""
    toy = {**lm_config.LMConfig().__dict__, **TOY, "corpus": str(corpus)}
    exp = experiments.get("journal-lm")
    monkeypatch.setitem(experiments.REGISTRY, exp.key, experiments.dataclasses.replace(exp, quick=toy))
    assert main(["--no-progress", "run", "journal-lm", "--out", str(tmp_path), "--seed", "1"]) == 0
    assert sorted(int(p.name.split("-")[1]) for p in tmp_path.glob("checkpoint-*")) == [0, 2, 4, 10, 20, 30, 40]
    cells = pd.read_csv(tmp_path / "analysis" / "cells.csv")
    assert set(cells.op) == {"final", "reinit", "rerandomize"}
    assert sorted(cells[cells.op == "reinit"].checkpoint.unique()) == [0, 1, 2, 5, 10, 15]
    assert cells.group.nunique() == 3 + 5 * 2 and (cells.token_accuracy == 1 - cells.token_error).all()
    summary = json.loads((tmp_path / "analysis" / "summary.json").read_text())
    assert summary["steps_per_epoch"] == 2 and summary["data"]["stands_in_for"] == "lm1b"
    assert len(summary["findings"]) == 5 and (tmp_path / "analysis" / "findings.csv").is_file()
    assert (tmp_path / "figures" / "robustness_token_accuracy.png").stat().st_size > 10_000
    layers = pd.read_csv(tmp_path / "analysis_layers" / "cells.csv")  # per decoder layer: skip, reset to 0
    assert sorted(layers[layers.op != "final"].groupby("op").group.nunique().items()) == [("reinit", 2), ("skip", 2)]
    proxies = pd.read_csv(tmp_path / "analysis_layers" / "proxies.csv")
    assert list(proxies.group) == ["block0", "block1"] and proxies.bi.notna().all()
    assert all((tmp_path / "figures" / f"layers_{f}.png").is_file() for f in ("skip", "proxies"))
    page = (tmp_path / "report.html").read_text()
    assert "Per decoder layer: skip and Block Influence" in page
    assert "The paper&#x27;s LM findings" in page or "The paper's LM findings" in page
    assert "T5-Base decoder" in page
    stores = [tmp_path / d / "cells.jsonl" for d in ("analysis", "analysis_layers")]
    before = [p.read_text() for p in stores]
    assert run_experiment(experiments.get("journal-lm"), out=tmp_path, progress=False, seed=1)
    assert [p.read_text() for p in stores] == before  # resumed: nothing re-evaluated
