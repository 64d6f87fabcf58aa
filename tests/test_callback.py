"""A real ``transformers.Trainer`` run (with accelerate) makes folders ``analyze-hf`` reads in one command.

Run: ``PYTHONPATH=src .venv/bin/pytest tests/test_callback.py -q`` (about 40 s on 2 cores).

- with :class:`CriticalityCallback` and no manual save: ``checkpoint-0`` equals the weights before training,
  the paper's early steps are saved, the analysis at the end reaches the Trainer's log, and
  ``criticality analyze-hf OUTPUT`` works with nothing else;
- a fine-tuning run from a saved "pretrained" folder, without the callback: ``--init-checkpoint`` that folder;
- folders the Trainer writes for GPT-NeoX, Llama, Mixtral, Qwen2-MoE and T5 read back through the key
  mapping (renamed ``embed_out``, per-expert MoE files, tied weights left out) equal the trained model.
"""

from __future__ import annotations

import json

import pytest
import torch

from criticality import cli
from criticality.adapters import hub
from criticality.adapters.callback import CriticalityCallback
from criticality.core.trajectory import alias_tied, trajectory
from criticality.errors import CriticalityError

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

TEXT = "Which layers of a trained network matter? Reset one, evaluate, tabulate.\n" * 20


def neox(seed: int = 0):
    torch.manual_seed(seed)
    return transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64))


def dataset(n: int = 16, t: int = 16, vocab: int = 256, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": row, "labels": row} for row in ids]


def train(model, out, steps: int, callbacks=(), save_steps: int | None = None, lr: float = 1e-2, data=None):
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, learning_rate=lr,
        save_steps=save_steps or steps, logging_steps=1, report_to="none", use_cpu=True, disable_tqdm=True,
        save_only_model=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data or dataset())
    for cb in callbacks:
        cb.attach(trainer) if isinstance(cb, CriticalityCallback) else trainer.add_callback(cb)
    trainer.train()
    return trainer


@pytest.mark.slow
def test_callback_run_is_analysable_with_one_command(tmp_path, capsys):
    model = neox()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    eval_ids = torch.tensor(list(TEXT.encode()[: 8 * 16])).reshape(8, 16)
    callback = CriticalityCallback(early=[1], eval_data=eval_ids)
    trainer = train(model, tmp_path / "out", steps=3, callbacks=[callback])
    folders = sorted(p.name for p in (tmp_path / "out").glob("checkpoint-*"))
    assert folders == ["checkpoint-0", "checkpoint-1", "checkpoint-3"]
    found = trajectory(tmp_path / "out")
    init = alias_tied(hub.to_model_keys(found[0], model), model)
    for k, v in before.items():
        assert torch.equal(init[k], v), k
    final = alias_tied(hub.to_model_keys(found[3], model), model)
    assert any(not torch.equal(final[k], v) for k, v in before.items())  # it trained
    logged = [e for e in trainer.state.log_history if any(k.startswith("criticality/") for k in e)]
    assert logged and set(logged[-1]["criticality_verdicts"]) == {v["group"] for v in callback.result.summary[
        "verdicts"]}
    assert "criticality/gpt_neox.layers.0/delta_token_error" in logged[-1]
    assert json.loads((tmp_path / "out" / "criticality.json").read_text())["integrity"]["checked"] == 3
    (tmp_path / "eval.txt").write_text(TEXT)
    args = ["analyze-hf", str(tmp_path / "out"), "--data", str(tmp_path / "eval.txt"), "--seq-len", "16",
            "--seeds", "1", "--no-progress"]
    assert cli.main(args) == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "out" / "analysis" / "summary.json").read_text())
    assert summary["checkpoints"]["numbers"] == [0, 1, 3]


@pytest.mark.slow
def test_fine_tuning_run_from_a_pretrained_folder(tmp_path, capsys):
    neox(seed=3).save_pretrained(tmp_path / "pretrained")
    model = transformers.GPTNeoXForCausalLM.from_pretrained(tmp_path / "pretrained")
    train(model, tmp_path / "ft", steps=4, save_steps=2)
    (tmp_path / "eval.txt").write_text(TEXT)
    base = ["analyze-hf", str(tmp_path / "ft"), "--data", str(tmp_path / "eval.txt"), "--seq-len", "16",
            "--seeds", "1", "--no-progress"]
    assert cli.main(base) == 2
    assert "no initialization among the checkpoints" in capsys.readouterr().err
    assert cli.main([*base, "--init-checkpoint", str(tmp_path / "pretrained")]) == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "ft" / "analysis" / "summary.json").read_text())
    assert summary["checkpoints"]["numbers"] == [0, 2, 4]
    assert [v["group"] for v in summary["verdicts"]][:2] == ["gpt_neox.embed_in", "gpt_neox.layers.0"]


def test_paper_schedule_saves_the_early_steps_and_epochs():
    class Control:
        should_save = False

    class State:
        global_step, epoch = 0, 0.0

    for unit, event, field in (("step", "on_step_end", "global_step"), ("epoch", "on_epoch_end", "epoch")):
        callback, saved = CriticalityCallback(early="paper", unit=unit), []
        for t in range(1, 100):
            control, state = Control(), State()
            setattr(state, field, t)
            getattr(callback, event)(None, state, control)
            saved += [t] if control.should_save else []
        assert saved == [1, 2, 3, 8, 40, 90]
    assert CriticalityCallback().on_log(None, None, None) is None  # events it does not use do nothing


def test_callback_refuses_bad_schedules():
    with pytest.raises(CriticalityError, match="unit must be one of"):
        CriticalityCallback(unit="token")
    with pytest.raises(CriticalityError, match="early must be 'paper' or positive steps"):
        CriticalityCallback(early=[0, 2])


def tiny(name: str):
    c = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=64)
    kv = dict(num_key_value_heads=2)
    return {
        "gpt-neox": lambda: transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**c)),
        "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**c, **kv)),
        "mixtral": lambda: transformers.MixtralForCausalLM(transformers.MixtralConfig(
            **c, **kv, num_local_experts=4, num_experts_per_tok=2)),
        "qwen2-moe": lambda: transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
            **c, **kv, moe_intermediate_size=16, shared_expert_intermediate_size=32, num_experts=4,
            num_experts_per_tok=2)),
        "t5": lambda: transformers.T5ForConditionalGeneration(transformers.T5Config(
            vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0)),
    }[name]()


@pytest.mark.parametrize("name", ["gpt-neox", "llama", "mixtral", "qwen2-moe", "t5"])
def test_trainer_checkpoints_read_back_through_the_key_mapping(tmp_path, name):
    torch.manual_seed(0)
    model = tiny(name)
    train(model, tmp_path, steps=2, data=dataset(8, 8, vocab=64))
    checkpoint = hub.checkpoint_at(tmp_path / "checkpoint-2")
    mapped = alias_tied(hub.to_model_keys(checkpoint, model), model)
    own = model.state_dict()
    assert sorted(mapped) == sorted(own)
    for k, v in own.items():
        assert mapped.shape_of(k) == tuple(v.shape), k
        assert torch.equal(mapped[k], v.detach().cpu()), k
    reference = type(model).from_pretrained(tmp_path / "checkpoint-2").state_dict()
    assert all(torch.equal(mapped[k], reference[k]) for k in own)
    if name in ("gpt-neox", "mixtral", "qwen2-moe"):  # the files are not under the model's keys
        assert set(checkpoint) != set(own)
