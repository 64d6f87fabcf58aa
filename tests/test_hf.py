"""``criticality analyze-hf`` and the tiny offline LM of examples/, on folders written here by transformers.

Run: ``pytest tests/test_hf.py -q`` (about 20 s on 2 cores).

Data files in every accepted form read back to the same token ids; the model class is rebuilt from
``config.json``; the end-to-end run on a tiny Llama trajectory writes the tables, figures and report and
its cells equal the naive reference engine's; a folder without the initialization, or a data file the
model cannot read, is one line from the CLI.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from criticality import cli
from criticality.errors import CriticalityError
from criticality.paper import tiny_lm
from criticality.pipelines import analyze_hf as hf

transformers = pytest.importorskip("transformers")

TEXT = "All layers are not created equal; some are robust, some are critical.\n" * 12


def test_data_files_read_back_to_the_same_ids(tmp_path):
    ids = torch.tensor(list(TEXT.encode()), dtype=torch.int64)
    n = len(ids) // 16
    expected = ids[: n * 16].reshape(n, 16)
    (tmp_path / "a.txt").write_text(TEXT)
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": TEXT[:69]}) + "\n\n" + json.dumps({"text": TEXT[70:]}))
    np.save(tmp_path / "a.npy", ids.numpy())
    save_file({"input_ids": expected.to(torch.int32)}, str(tmp_path / "a.safetensors"))
    for name in ("a.txt", "a.jsonl", "a.npy", "a.safetensors"):
        got = hf.read_tokens(tmp_path / name, 16, vocab_size=256)["input_ids"]
        assert got.dtype == torch.int64 and torch.equal(got, expected), name
    with pytest.raises(CriticalityError, match="outside the model's vocabulary"):
        hf.read_tokens(tmp_path / "a.txt", 16, vocab_size=100)
    with pytest.raises(CriticalityError, match="holds no 'input_ids'"):
        save_file({"x": expected}, str(tmp_path / "b.safetensors"))
        hf.read_tokens(tmp_path / "b.safetensors", 16)
    (tmp_path / "bad.jsonl").write_text('{"txt": "x"}\n')
    with pytest.raises(CriticalityError, match="bad.jsonl:1: expected a JSON object with a 'text'"):
        hf.read_tokens(tmp_path / "bad.jsonl", 16)


def test_the_folders_own_tokenizer_is_used(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = sorted(set(TEXT.replace(";", " ").replace(",", " ").replace(".", " ").split()))
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]").save_pretrained(tmp_path)
    tok = hf.tokenizer(tmp_path)
    assert tok is not None
    (tmp_path / "a.txt").write_text(TEXT)
    ids = hf.read_tokens(tmp_path / "a.txt", 4, tok=tok, vocab_size=len(vocab))["input_ids"]
    assert ids[0, 0].item() == vocab["All"] and int(ids.max()) < len(vocab)


def test_padded_batches_are_dicts_with_ignored_labels():
    ids = torch.arange(12).reshape(3, 4)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1]])
    assert hf.lm_data({"input_ids": ids}, 2)[0] is ids
    batches = hf.lm_data({"input_ids": ids, "attention_mask": mask}, 2)
    assert [len(b["input_ids"]) for b in batches] == [2, 1]
    assert batches[0]["labels"][1].tolist() == [4, 5, -100, -100]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """A 2-block, width-16 byte-level Llama trained 6 steps on TEXT, checkpoints at 0, 3, 6."""
    root = tmp_path_factory.mktemp("lm")
    (root / "corpus.txt").write_text(TEXT * 4)
    out = tiny_lm.train_tiny_lm(root / "run", steps=6, save_at=(0, 3, 6), seed=1, corpus=root / "corpus.txt",
                                seq_len=16, batch_size=4, layers=2, hidden=16, progress=False)
    return out


def test_tiny_lm_writes_a_trainer_folder_and_reuses_it(lm):
    assert sorted(p.name for p in lm.glob("checkpoint-*")) == ["checkpoint-0", "checkpoint-3", "checkpoint-6"]
    state = json.loads((lm / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6 and [h["step"] for h in state["log_history"]] == [0, 3, 6]
    assert (lm / "eval.txt").read_text() and hf.build_model(lm / "checkpoint-6").config.num_hidden_layers == 2
    before = (lm / "checkpoint-6" / "model.safetensors").stat().st_mtime_ns
    tiny_lm.train_tiny_lm(lm, steps=6, save_at=(0, 3, 6), seed=1, corpus=lm.parent / "corpus.txt", seq_len=16,
                          batch_size=4, layers=2, hidden=16, progress=False)
    assert (lm / "checkpoint-6" / "model.safetensors").stat().st_mtime_ns == before


def test_analyze_hf_end_to_end_equals_the_naive_engine(lm, tmp_path, capsys):
    args = ["analyze-hf", str(lm), "--data", str(lm / "eval.txt"), "--seeds", "1", "--seq-len", "16",
            "--batch-size", "8", "--max-examples", "24", "--device", "cpu", "--no-progress"]
    assert cli.main([*args, "--out", str(tmp_path / "fast")]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "verdicts" in out and out.splitlines()[0].split()[:5] == ["group", "Δ", "token", "error", "@0"]
    assert " n/a " not in out.split("(verdicts")[0]  # p-values for token error: the sign-flip test
    assert cli.main([*args, "--out", str(tmp_path / "naive"), "--engine", "naive"]) == 0
    fast, naive = (pd.read_csv(tmp_path / d / "cells.csv") for d in ("fast", "naive"))
    assert {"model.layers.0", "model.layers.1"} <= set(fast.group.dropna())  # --groups blocks (the default)
    pd.testing.assert_frame_equal(fast[["op", "group", "checkpoint", "token_error"]],
                                  naive[["op", "group", "checkpoint", "token_error"]])
    assert np.allclose(fast.nll, naive.nll, atol=1e-5) and np.allclose(fast.perplexity, np.exp(fast.nll))
    for name in ("report.html", "summary.json", "distances.csv", "figures/robustness_token_error.png"):
        assert (tmp_path / "fast" / name).is_file(), name
    summary = json.loads((tmp_path / "fast" / "summary.json").read_text())
    assert summary["verdict_metric"] == "token_error" and summary["checkpoints"]["axis"] == "step"
    assert all(v["delta_token_error_low"] is not None for v in summary["verdicts"])  # the engine's records
    assert {"agreement", "kl"} <= set(fast.columns)  # label-free metrics on by default, as in `analyze`
    page = (tmp_path / "fast" / "report.html").read_text()
    assert "Δ token error at step 0" in page and "Final model: token error <b>" in page
    assert "test error" not in page and "sign-flip permutation test" in page  # p of token counts
    assert all(isinstance(v["p_value"], float) and 0 < v["p_value"] <= 1 for v in summary["verdicts"])
    assert all(v["units"] == "sequences" for v in summary["verdicts"])
    assert page.count('src="data:image/png;base64,') == 2 + 5  # token error, nll, five distances
    # A rerun resumes every cell (the model built from config.json fingerprints the same each time).
    assert cli.main([*args, "--out", str(tmp_path / "fast")]) == 0
    assert "computing 0" in capsys.readouterr().err


def test_missing_init_and_bad_data_are_one_line(lm, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(lm, run)
    shutil.rmtree(run / "checkpoint-0")
    assert cli.main(["analyze-hf", str(run), "--data", str(run / "eval.txt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no initialization among the checkpoints" in err and "--init-checkpoint" in err
    (tmp_path / "ids.npy").write_bytes(b"not numpy")
    code = cli.main(["analyze-hf", str(lm), "--data", str(tmp_path / "ids.npy"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "ids.npy is not a readable .npy" in err
