"""Adapter training: assistant-only loss mask from the chat template; only the adapter learns."""

import json

import jax
import numpy as np
import pytest

from afmkit.adapters.peft_io import load_adapter
from afmkit.adapters.train import TRAINING_FILE, TrainSettings, train_adapter
from afmkit.data.chat import read_chat_jsonl, tokenize_conversation
from afmkit.errors import UserError


def test_mask_covers_exactly_the_assistant_turns(smollm2):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another?"},
        {"role": "assistant", "content": "Green, of course."},
    ]
    example = tokenize_conversation(smollm2.tokenizer, messages)
    decode = smollm2.tokenizer.decode
    masked = [t for t, m in zip(example.ids, example.mask) if m]
    assert decode(masked, skip_special_tokens=False) == "Blue.<|im_end|>\nGreen, of course.<|im_end|>\n"
    unmasked = decode([t for t, m in zip(example.ids, example.mask) if not m], skip_special_tokens=False)
    assert "Name a colour." in unmasked and "Blue" not in unmasked


def _conversations(n):
    # A learnable task: answer with the word reversed.
    words = ["apple", "river", "stone", "cloud", "tiger", "maple", "ocean", "piano", "light", "sugar", "grape", "lemon"]
    return [
        [{"role": "user", "content": f"Reverse: {w}"}, {"role": "assistant", "content": w[::-1]}]
        for w in (words * 3)[:n]
    ]


def test_training_lowers_held_out_loss_and_leaves_the_base_alone(tiny_model, tmp_path):
    before = [np.asarray(w).copy() for w in jax.tree.leaves(tiny_model.params)]
    settings = TrainSettings(
        rank=4, targets=("q", "v", "down"), steps=30, lr=3e-3, batch=4, save_every=10, eval_fraction=0.2
    )
    results = train_adapter(tiny_model, _conversations(30), tmp_path / "rev", settings, progress=False)
    assert results["held_out_loss_adapter"] < results["held_out_loss_base"] - 0.5
    assert results["train_loss_last10"] < results["train_loss_first10"]
    for old, new in zip(before, jax.tree.leaves(tiny_model.params)):
        np.testing.assert_array_equal(old, np.asarray(new))
    saved = json.loads((tmp_path / "rev" / TRAINING_FILE).read_text())
    assert saved["steps_done"] == 30 and saved["held_out_loss_adapter"] == results["held_out_loss_adapter"]
    adapter = load_adapter(tmp_path / "rev", config=tiny_model.config, params=tiny_model.params)
    assert adapter.config.rank == 4 and adapter.config.targets == ("q", "v", "down")


def test_bad_training_data_is_refused_with_the_line_number(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{oops\n'
    )
    with pytest.raises(UserError, match=r"bad.jsonl:2"):
        read_chat_jsonl(path)
    path.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(UserError, match="no assistant"):
        read_chat_jsonl(path)


def test_cli_adapter_train_reports_bad_input_in_one_line(tmp_path, capsys):
    from afmkit.cli import main

    code = main(["adapter", "train", "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "a")])
    assert code == 2
    assert "does not exist" in capsys.readouterr().err
    code = main(["adapter", "train", "--data", "x.jsonl", "--out", str(tmp_path / "a"), "--targets", "q,attn"])
    assert code == 2 and "unknown LoRA targets" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
