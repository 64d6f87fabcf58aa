"""Public training suites from a local Hugging Face hub cache, and checkpoints as transformers 5 writes them.

Run: ``PYTHONPATH=src .venv/bin/pytest tests/test_hub.py -q`` (about 40 s on 2 cores).

The tests lay tiny GPT-NeoX revisions out in the hub cache's own layout (``refs/<branch>`` holding the
commit, ``snapshots/<sha>/<file>`` linking to ``blobs/<sha256>``), check that huggingface_hub's
``scan_cache_dir`` and ``snapshot_download(local_files_only=True)`` resolve them, then analyse them end to
end through the CLI with ``HF_HUB_OFFLINE=1`` (Pythia's defect injected: ``step1`` is ``step0``). Folders
written by a real ``transformers.Trainer`` (GPT-NeoX, Llama, Mixtral, Qwen2-MoE, T5) read back through the
key mapping equal to what ``from_pretrained`` loads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from criticality.adapters import hub
from criticality.core.trajectory import alias_tied, checkpoint_at
from criticality.errors import CriticalityError
from criticality.pipelines import analyze_hf as hf

transformers = pytest.importorskip("transformers")
huggingface_hub = pytest.importorskip("huggingface_hub")

ROOT = Path(__file__).resolve().parents[1]
TEXT = "Are all layers created equal? Some are robust, some are critical, a few matter a lot.\n" * 20
REPO = "tiny-org/neox-suite"


def neox_config():
    return transformers.GPTNeoXConfig(vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=64, max_position_embeddings=64)


def save_revision(model: torch.nn.Module, folder: Path) -> dict[str, Path]:
    model.save_pretrained(folder)
    return {p.name: p for p in folder.iterdir() if p.is_file()}


def build_suite(tmp_path: Path, steps=(0, 1, 10, 100), same_as_init=(1,)) -> Path:
    """A hub cache holding REPO with one branch per step; ``same_as_init`` branches serve step0's files."""
    cache = tmp_path / "hub"
    torch.manual_seed(0)
    model = transformers.GPTNeoXForCausalLM(neox_config())
    init = {k: v.clone() for k, v in model.state_dict().items()}
    direction = {k: torch.randn_like(v) for k, v in init.items()}
    for step in steps:
        scale = 0.0 if step in same_as_init else 0.002 * step ** 0.5
        with torch.no_grad():
            for k, p in model.state_dict().items():
                if p.is_floating_point():
                    p.copy_(init[k] + scale * direction[k])
        files = save_revision(model, tmp_path / "saved" / f"step{step}")
        hub.add_to_cache(cache, REPO, f"step{step}", files)
    return cache


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    return build_suite(tmp_path_factory.mktemp("suite"))


def test_huggingface_hub_resolves_the_cache_layout(suite):
    info = huggingface_hub.scan_cache_dir(suite)
    (repo,) = info.repos
    assert repo.repo_id == REPO and set(repo.refs) == {"step0", "step1", "step10", "step100"}
    folder = Path(huggingface_hub.snapshot_download(REPO, revision="step10", cache_dir=suite, local_files_only=True))
    assert (folder / "model.safetensors").is_symlink() and (folder / "config.json").is_file()
    assert (folder / "model.safetensors").resolve().parent.name == "blobs"
    # step1 serves step0's bytes: the same blob, as on the hub
    one = hub.snapshot(REPO, "step1", suite, offline=True) / "model.safetensors"
    zero = hub.snapshot(REPO, "step0", suite, offline=True) / "model.safetensors"
    assert one.resolve() == zero.resolve()


def test_revision_names_sort_naturally_and_carry_step_and_tokens():
    names = ["step10", "step2", "step1000", "step0", "main", "step143000", "step1"]
    assert hub.select(names, "step*") == ["step0", "step1", "step2", "step10", "step1000", "step143000"]
    assert hub.select(names, "step0, step1000,main") == ["main", "step0", "step1000"]
    assert hub.position("step1000-tokens4B") == (1000, 4e9)
    assert hub.position("stage1-step928646-tokens3896B") == (928646, 3896e9)
    assert hub.position("checkpoint-500") == (500, None)
    assert hub.position("ckpt_007") == (7, None)
    assert hub.position("google/multiberts-seed_0-step_20k") == (20000, None)
    assert hub.position("main") == (None, None)
    assert hub.is_repo_id("EleutherAI/pythia-70m") and not hub.is_repo_id("a/b/c")


def test_hub_trajectory_reads_revisions_on_the_step_axis(suite):
    found = hf.find_trajectory(REPO, revisions="step*", cache_dir=suite, offline=True)
    assert list(found) == [0, 1, 10, 100] and found.labels[10] == "step10" and found.axis == "step"
    found = hf.find_trajectory(REPO, revisions="step0,step100", cache_dir=suite, offline=True)
    assert list(found) == [0, 100]
    with pytest.raises(CriticalityError, match="no revision matches 'ckpt\\*'.*step0"):
        hf.find_trajectory(REPO, revisions="ckpt*", cache_dir=suite, offline=True)
    with pytest.raises(CriticalityError, match="no step 0 among step10, step100"):
        hf.find_trajectory(REPO, revisions="step1?*", cache_dir=suite, offline=True)
    with pytest.raises(CriticalityError, match="neither a local folder nor a repository in the Hugging Face cache"):
        hf.find_trajectory("tiny-org/absent", revisions="step*", cache_dir=suite, offline=True)


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, "-m", "criticality", *args, "--no-progress"], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=300)


@pytest.mark.slow
def test_cli_analyses_a_cached_suite_and_reports_the_duplicate(suite, tmp_path):
    (tmp_path / "eval.txt").write_text(TEXT)
    done = run_cli("analyze-hf", REPO, "--revisions", "step*", "--cache-dir", str(suite), "--data", "eval.txt",
                   "--seq-len", "32", "--seeds", "1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "step0 is byte-identical to step1 (same files)" in done.stderr
    out = tmp_path / "analysis" / "tiny-org--neox-suite"
    summary = json.loads((out / "summary.json").read_text())
    integ = summary["integrity"]
    assert integ["duplicates"] == [{"kept": "step0", "same": ["step1"], "by": "same files"}]
    assert integ["kept"] == ["step0", "step10", "step100"] and integ["flagged"] == []
    assert summary["checkpoints"]["numbers"] == [0, 10, 100]
    assert summary["checkpoints"]["labels"] == {"0": "step0", "10": "step10", "100": "step100"}
    cells = pd.read_csv(out / "cells.csv")
    assert set(cells.checkpoint.dropna()) == {0, 10, 100}
    report = (out / "report.html").read_text()
    assert "Integrity of the checkpoints" in report and "<code>step1</code>" in report


def test_init_checkpoint_from_a_cached_repository(suite, tmp_path):
    trainer_out = tmp_path / "run"
    for step in (10, 100):
        folder = hub.snapshot(REPO, f"step{step}", suite, offline=True)
        (trainer_out / f"checkpoint-{step}").mkdir(parents=True)
        for f in folder.iterdir():
            (trainer_out / f"checkpoint-{step}" / f.name).write_bytes(f.read_bytes())
    hub.add_to_cache(suite, "tiny-org/pretrained", "main",
                     {f.name: f for f in hub.snapshot(REPO, "step0", suite, offline=True).iterdir()})
    found = hf.find_trajectory(trainer_out, init_checkpoint="tiny-org/pretrained", cache_dir=suite, offline=True)
    assert list(found) == [0, 10, 100]
    assert torch.equal(found[0]["gpt_neox.embed_in.weight"],
                       checkpoint_at(hub.snapshot(REPO, "step0", suite, offline=True))["gpt_neox.embed_in.weight"])
    with pytest.raises(CriticalityError, match="tiny-org/nothing@main: not available in the cache"):
        hf.find_trajectory(trainer_out, init_checkpoint="tiny-org/nothing", cache_dir=suite, offline=True)


def test_one_repository_per_checkpoint(suite):
    for step in ("0", "1k", "20k"):
        files = {f.name: f for f in hub.snapshot(REPO, "step0" if step == "0" else "step100", suite,
                                                 offline=True).iterdir()}
        hub.add_to_cache(suite, f"tiny-org/bert-seed_0-step_{step}", "main", files)
    found = hf.find_trajectory(None, repos="tiny-org/bert-seed_0-step_*", cache_dir=suite, offline=True)
    assert list(found) == [0, 1000, 20000]
    assert found.labels[1000] == "tiny-org/bert-seed_0-step_1k"
    model = hf.build_model(hf.config_folder(found))
    states, checked = hf.checked_states(found, model)
    assert list(states) == [0, 20000]  # 1k and 20k serve the same files here
    assert checked.duplicates == [{"kept": "tiny-org/bert-seed_0-step_20k", "same": ["tiny-org/bert-seed_0-step_1k"],
                                   "by": "same files"}]


def test_a_missing_shard_or_key_is_one_error_naming_the_revision(suite, tmp_path):
    found = hf.find_trajectory(REPO, revisions="step0,step10", cache_dir=suite, offline=True)
    model = hf.build_model(hf.config_folder(found))
    cut = {k: v for k, v in found[10].items() if "layers.1." not in k}
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in cut.items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_bytes((hub.snapshot(REPO, "step10", suite, offline=True) / "config.json")
                                           .read_bytes())
    hub.add_to_cache(suite, "tiny-org/broken", "step0", {"model.safetensors": hub.snapshot(
        REPO, "step0", suite, offline=True) / "model.safetensors", "config.json": tmp_path / "config.json"})
    hub.add_to_cache(suite, "tiny-org/broken", "step5", {"model.safetensors": tmp_path / "model.safetensors",
                                                         "config.json": tmp_path / "config.json"})
    broken = hf.find_trajectory("tiny-org/broken", revisions="step*", cache_dir=suite, offline=True)
    with pytest.raises(CriticalityError, match=r"1 of 2 checkpoints do not fit.*step5 misses \d+ key\(s\) "
                                               r"\(gpt_neox.layers.1"):
        hf.checked_states(broken, model)
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    hub.add_to_cache(suite, "tiny-org/broken", "step9", {
        "model.safetensors.index.json": tmp_path / "model.safetensors.index.json",
        "model-00001-of-00002.safetensors": tmp_path / "model.safetensors", "config.json": tmp_path / "config.json"})
    with pytest.raises(CriticalityError, match="revision tiny-org/broken@step9: .*missing: model-00002-of-00002"):
        hf.find_trajectory("tiny-org/broken", revisions="step9", cache_dir=suite, offline=True)


def test_sharded_revision_reads_tensor_by_tensor(suite, tmp_path):
    torch.manual_seed(1)
    model = transformers.GPTNeoXForCausalLM(neox_config())
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    files = {p.name: p for p in (tmp_path / "sharded").iterdir()}
    assert "model.safetensors.index.json" in files and len(files) > 3
    hub.add_to_cache(suite, "tiny-org/sharded", "step0", files)
    found = hf.find_trajectory("tiny-org/sharded", revisions="step0", cache_dir=suite, offline=True)
    checkpoint = alias_tied(hub.to_model_keys(found[0], model), model)
    assert len(checkpoint.files) > 2
    for k, v in model.state_dict().items():
        assert torch.equal(checkpoint[k], v), k
