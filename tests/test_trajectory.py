"""Lazy checkpoint trajectories against eager, in-memory state dicts.

Run: ``pytest tests/test_trajectory.py -q`` (about 10 s on 2 cores).

The same analysis on lazily read checkpoints and on the same checkpoints held in memory gives identical
tables, for the three layouts: this project's run directory, a plain folder of ``step_N.safetensors``
files, and an HF Trainer folder with sharded ``save_pretrained`` checkpoints (written here with a tiny
random Llama). Then the errors: no initialization, truncated and altered files, a pickle holding code.
"""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from criticality.core.analysis import analyze
from criticality.core.checkpoints import check_compatible, load_checkpoints, save_checkpoint
from criticality.core.plan import PlanSpec, make_plan
from criticality.core.trajectory import LazyCheckpoint, TensorFile, alias_tied, trajectory
from criticality.errors import CriticalityError
from criticality.infra.files import write_json
from toy import fcn


def toy_states(seed: int = 0, steps=(0, 1, 3)) -> tuple[nn.Module, dict[int, dict[str, torch.Tensor]]]:
    """An fcn and a made-up trajectory: each checkpoint moves every tensor a little further."""
    torch.manual_seed(seed)
    model = fcn()
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(seed + 1)
    drift = {k: torch.randn(v.shape, generator=g) for k, v in start.items()}
    states = {s: {k: start[k] + 0.3 * s * drift[k] for k in start} for s in steps}
    model.load_state_dict(states[max(steps)])
    return model, states


def toy_data(n: int = 120):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(n, 1, 6, 6, generator=g)
    return x, (x.flatten(1) @ torch.randn(36, 5, generator=g)).argmax(1)


def tables_equal(model, eager, lazy, data, **kw):
    a = analyze(model, eager, data, groups="auto", seeds=1, progress=False, batch_size=50, **kw)
    b = analyze(model, lazy, data, groups="auto", seeds=1, progress=False, batch_size=50, **kw)
    assert a.table.equals(b.table)
    assert a.distances.equals(b.distances)
    return b


def test_run_directory_lazy_equals_eager(tmp_path):
    model, states = toy_states()
    for e, sd in states.items():
        save_checkpoint(tmp_path, e, sd)
    write_json(tmp_path / "config.json", {})
    lazy = trajectory(tmp_path)
    assert lazy.layout == "run directory" and lazy.axis == "epoch" and list(lazy) == [0, 1, 3]
    assert all(isinstance(c, LazyCheckpoint) for c in load_checkpoints(tmp_path).values())
    tables_equal(model, states, lazy, toy_data())
    tables_equal(model, states, load_checkpoints(tmp_path), toy_data())


def test_safetensors_folder_lazy_equals_eager(tmp_path):
    model, states = toy_states(steps=(0, 10, 100))
    for s, sd in states.items():
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / f"step_{s}.safetensors"))
    lazy = trajectory(tmp_path)
    assert lazy.axis == "step" and list(lazy) == [0, 10, 100]
    tables_equal(model, states, lazy, toy_data())


def test_tensors_are_read_per_key_and_settings_read_nothing(tmp_path, monkeypatch):
    model, states = toy_states()
    for s, sd in states.items():
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / f"{s:04d}.safetensors"))
    lazy = trajectory(tmp_path)
    read = []
    original = TensorFile.tensor
    monkeypatch.setattr(TensorFile, "tensor", lambda self, key: read.append(key) or original(self, key))
    first = lazy[1]["1.weight"]
    assert read == ["1.weight"] and lazy[1]["1.weight"] is first  # one read; the same object while alive
    read.clear()
    check_compatible(model, lazy[3])  # shapes from the header
    plan = make_plan(model, lazy, PlanSpec("auto", 0, metrics=("error",), batch_size=50))
    plan.settings()
    assert read == []


def test_pickled_state_dicts_are_read_weights_only(tmp_path):
    model, states = toy_states()
    for s, sd in states.items():  # epoch 1 in the legacy (non-zip, not memory-mappable) format
        torch.save(sd, tmp_path / f"epoch_{s}.pt", _use_new_zipfile_serialization=s != 1)
    lazy = trajectory(tmp_path)
    assert lazy.axis == "epoch"
    tables_equal(model, states, lazy, toy_data())


class Shell:
    """Unpickling this runs code (it creates the marker file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_holding_code_is_refused(tmp_path):
    model, states = toy_states()
    torch.save(states[0], tmp_path / "step_0.bin")
    marker = tmp_path / "pwned"
    with open(tmp_path / "step_1.bin", "wb") as f:
        torch.save({"1.weight": Shell(marker)}, f)
    with pytest.raises(CriticalityError, match="step_1.bin holds pickled objects .* refusing to unpickle") as e:
        trajectory(tmp_path)  # the keys are listed when the trajectory is read
    assert "\n" not in str(e.value) and not marker.exists()
    (tmp_path / "step_1.bin").write_bytes(pickle.dumps({"1.weight": Shell(marker)}, protocol=2))  # a bare pickle
    with pytest.raises(CriticalityError, match="step_1.bin"):
        trajectory(tmp_path)
    assert not marker.exists()


def test_missing_initialization_is_one_clear_error(tmp_path):
    model, states = toy_states(steps=(0, 5, 9))
    for s in (5, 9):
        save_file(states[s], str(tmp_path / f"step_{s}.safetensors"))
    with pytest.raises(CriticalityError, match="no initialization among the checkpoints.*--init-checkpoint"):
        trajectory(tmp_path)
    save_file(states[0], str(tmp_path.parent / "init.safetensors"))
    lazy = trajectory(tmp_path, init_checkpoint=tmp_path.parent / "init.safetensors")
    assert list(lazy) == [0, 5, 9]
    tables_equal(model, states, lazy, toy_data())
    save_file(states[0], str(tmp_path / "step_0.safetensors"))
    with pytest.raises(CriticalityError, match="already holds checkpoint 0"):
        trajectory(tmp_path, init_checkpoint=tmp_path.parent / "init.safetensors")


def test_corrupt_files_are_named(tmp_path):
    model, states = toy_states()
    for e, sd in states.items():
        save_checkpoint(tmp_path / "run", e, sd)
    write_json(tmp_path / "run" / "config.json", {})
    path = tmp_path / "run" / "checkpoints" / "epoch_0001.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF  # altered after writing: the header still parses
    path.write_bytes(bytes(raw))
    with pytest.raises(CriticalityError, match="epoch_0001.safetensors does not match the sha256"):
        trajectory(tmp_path / "run")  # a run directory is checked as a whole, before any work
    lazy = trajectory(tmp_path / "run" / "checkpoints")  # as a plain folder: each file before its first read
    lazy[3]["1.weight"]
    with pytest.raises(CriticalityError, match="does not match the sha256"):
        lazy[1]["1.weight"]
    folder = tmp_path / "plain"
    folder.mkdir()
    for s, sd in states.items():
        save_file(sd, str(folder / f"step_{s}.safetensors"))
    (folder / "step_3.safetensors").write_bytes((folder / "step_3.safetensors").read_bytes()[:-9])  # truncated
    with pytest.raises(CriticalityError, match="step_3.safetensors is not a readable safetensors file"):
        trajectory(folder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CriticalityError, match="no checkpoints found"):
        trajectory(tmp_path / "empty")


# -- HF Trainer folders, written by transformers itself --------------------------------------------------

transformers = pytest.importorskip("transformers")


class Logits(transformers.LlamaForCausalLM):
    """The same keys as a Llama, returning plain logits (B, T, V) for today's engine."""

    def forward(self, input_ids):
        return super().forward(input_ids=input_ids, use_cache=False).logits


def tiny_llama(tied: bool = False) -> Logits:
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                                      tie_word_embeddings=tied)
    torch.manual_seed(0)
    return Logits(config).eval()


def next_token_error(logits, targets):  # (N, T, V), (N, T) → (N,)
    return (logits[:, :-1].argmax(-1) != targets[:, 1:]).float().mean(1)


def test_hf_trainer_sharded_folder_lazy_equals_eager(tmp_path):
    model = tiny_llama()
    states = {}
    g = torch.Generator().manual_seed(3)
    for step in (0, 4, 8):
        if step:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.05 * torch.randn(p.shape, generator=g))
        states[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.save_pretrained(tmp_path / f"checkpoint-{step}", max_shard_size="20KB")
    assert (tmp_path / "checkpoint-8" / "model.safetensors.index.json").is_file()
    lazy = trajectory(tmp_path)
    assert lazy.layout == "HF Trainer folder" and list(lazy) == [0, 4, 8]
    assert len(lazy[8].files) > 1
    ids = torch.randint(0, 32, (12, 8), generator=g)
    groups = {"embed": ["model.embed_tokens"], "block0": ["model.layers.0"], "block1": ["model.layers.1"],
              "head": ["model.norm", "lm_head"]}
    a = analyze(model, states, (ids, ids), groups=groups, seeds=0, metrics={"error": next_token_error},
                progress=False, batch_size=6)
    b = analyze(model, lazy, (ids, ids), groups=groups, seeds=0, metrics={"error": next_token_error},
                progress=False, batch_size=6)
    assert a.table.equals(b.table) and a.distances.equals(b.distances)


def test_tied_head_left_out_by_save_pretrained_is_aliased(tmp_path):
    model = tiny_llama(tied=True)
    model.save_pretrained(tmp_path / "checkpoint-0")
    checkpoint = trajectory(tmp_path)[0]
    if "lm_head.weight" not in checkpoint:
        with pytest.raises(CriticalityError, match="missing keys: lm_head.weight"):
            check_compatible(model, checkpoint)
    tied = alias_tied(checkpoint, model)
    check_compatible(model, tied)
    assert torch.equal(tied["lm_head.weight"], model.lm_head.weight)
