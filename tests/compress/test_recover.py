"""``afmkit compress recover`` on a small random model: distillation lowers the KL to the float
teacher on text it never saw, the adapter is applied when the compressed model loads (and left
off on request), ``adapter train --init-from-recovery`` starts from it, and bad input is one line."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest

import afmkit
from afmkit.cli import EXIT_USER_ERROR, main
from afmkit.compress.recover import RECOVERY_DIR, RESULTS_FILE
from afmkit.eval.perplexity import perplexity_of_text
from afmkit.interop import native
from afmkit.model.transformer import init_params

pytestmark = pytest.mark.usefixtures("private_cache")  # fixtures: tests/compress/conftest.py


def recover(*argv) -> int:
    return main(["compress", "recover", *map(str, argv)])


def full_kl(teacher, student, ids) -> float:
    """Mean KL(teacher || student) over every position and the whole vocabulary, float64 numpy."""
    t = np.asarray(teacher.logits(ids), np.float64)
    s = np.asarray(student.logits(ids), np.float64)
    log_p = t - np.log(np.exp(t - t.max(-1, keepdims=True)).sum(-1, keepdims=True)) - t.max(-1, keepdims=True)
    log_q = s - np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1, keepdims=True)) - s.max(-1, keepdims=True)
    return float((np.exp(log_p) * (log_p - log_q)).sum(-1).mean())


@pytest.fixture(scope="module")
def recovered(models):
    code = main(
        [
            "compress",
            "recover",
            *("--model", str(models / "small"), "--teacher", str(models / "float")),
            *("--data", str(models / "train.txt"), "--steps", "40", "--batch", "4", "--seq-len", "64"),
            *("--lr", "1e-2", "--top-k", "16", "--eval-rows", "2", "--save-every", "20", "--quiet"),
        ]
    )
    assert code == 0
    return models / "small"


def test_recovery_lowers_kl_to_the_teacher_on_held_out_text(recovered, models):
    results = json.loads((recovered / RECOVERY_DIR / RESULTS_FILE).read_text())
    assert results["steps_done"] == 40
    assert results["held_out_kl_after"] < results["held_out_kl_before"]
    teacher = afmkit.load(models / "float", dtype="float32")
    bare = afmkit.load(recovered, recovery=False)
    with_recovery = afmkit.load(recovered)
    assert bare.adapter is None and with_recovery.adapter is not None
    ids = teacher.tokenizer.encode((models / "held_out.txt").read_text())[:200]
    before, after = full_kl(teacher, bare, ids), full_kl(teacher, with_recovery, ids)
    # The full-vocabulary KL on text recovery never read: lower by a clear margin, not by noise.
    assert after < 0.9 * before, (before, after)


def test_the_recovery_adapter_is_applied_on_load_everywhere(recovered, models):
    bare = afmkit.load(recovered, recovery=False)
    model = afmkit.load(recovered)
    text = (models / "held_out.txt").read_text()[:2000]
    plain = perplexity_of_text(bare, text, seq_len=64, stride=32).perplexity
    applied = perplexity_of_text(model, text, seq_len=64, stride=32).perplexity
    assert applied != plain
    # generation without an adapter runs with the recovery adapter: the same as naming it
    prompt = "To be, or not"
    implicit = model.generate(prompt, max_new_tokens=8, temperature=0.0)
    explicit = bare.generate(prompt, max_new_tokens=8, temperature=0.0, adapter=model.adapter)
    assert implicit.tokens == explicit.tokens


def test_no_recovery_flag_measures_the_compressed_weights_alone(recovered, models, tmp_path, capsys):
    text = tmp_path / "held_out.txt"
    text.write_text((models / "held_out.txt").read_text()[:2000])
    flags = ["eval", "perplexity", "--model", str(recovered), "--text", str(text), "--seq-len", "64", "--stride", "32"]
    results = {}
    for extra in ([], ["--no-recovery"]):
        assert main([*flags, *extra, "--json"]) == 0
        results[bool(extra)] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["perplexity"]
    bare = perplexity_of_text(afmkit.load(recovered, recovery=False), text.read_text(), seq_len=64, stride=32)
    applied = perplexity_of_text(afmkit.load(recovered), text.read_text(), seq_len=64, stride=32)
    assert results[True] == pytest.approx(bare.perplexity, rel=1e-6)
    assert results[False] == pytest.approx(applied.perplexity, rel=1e-6)
    assert results[True] != results[False]


def test_init_from_recovery_starts_the_task_adapter_from_it(recovered, tmp_path):
    from afmkit.adapters.peft_io import load_adapter
    from afmkit.adapters.train import TrainSettings, train_adapter

    model = afmkit.load(recovered)
    conversations = [
        [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": f"{w} {w}."}]
        for w in ("yes", "no", "maybe", "never", "always", "often")
    ]
    # One step at a learning rate of 1e-30: AdamW moves each weight by about 1e-30, far below
    # the fp16 spacing of any stored value, so the saved task adapter is where training started.
    settings = TrainSettings(steps=1, batch=2, lr=1e-30, warmup=0, save_every=0, init_from_recovery=True)
    results = train_adapter(model, conversations, tmp_path / "task", settings, progress=False)
    task = load_adapter(tmp_path / "task", config=model.config, params=model.params)
    assert task.config.rank == model.adapter.config.rank
    for got, want in zip(jax.tree.leaves(task.weights), jax.tree.leaves(model.adapter.weights)):
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    # Its held-out loss before training is the base's with the recovery adapter, not without it.
    bare_settings = dataclasses.replace(settings, init_from_recovery=False)
    bare = train_adapter(model, conversations, tmp_path / "bare", bare_settings, progress=False)
    assert results["held_out_loss_base"] != bare["held_out_loss_base"]


def test_init_from_recovery_refuses_a_model_without_one(models, tmp_path, capsys):
    data = tmp_path / "chats.jsonl"
    chat = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    data.write_text("\n".join(json.dumps(chat) for _ in range(4)) + "\n")
    argv = ["adapter", "train", "--model", str(models / "float"), "--data", str(data), "--out", str(tmp_path / "a")]
    assert main([*argv, "--init-from-recovery", "--steps", "1"]) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert "no recovery adapter" in err and "compress recover" in err and len(err.splitlines()) == 1


def test_refusals_are_one_line(models, tmp_path, capsys):
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import WordLevel

    from afmkit.data.tokenizer import Tokenizer

    other_config = dataclasses.replace(afmkit.load(models / "float").config, vocab_size=64)
    vocab = {f"w{i}": i for i in range(64)}
    other = Tokenizer(Backend(WordLevel(vocab, unk_token="w0")), eos_token="w1")
    native.save_checkpoint(tmp_path / "other", other_config, init_params(other_config, jax.random.PRNGKey(0)), other)
    common = ("--data", str(models / "train.txt"), "--quiet")
    cases = [
        (("--model", models / "float", "--teacher", models / "float", *common), "not a compressed model"),
        (("--model", models / "small", "--teacher", tmp_path / "other", *common), "another tokenizer"),
        (("--model", models / "small", "--steps", 0, *common), "--steps must be positive"),
    ]
    for argv, message in cases:
        assert recover(*argv) == EXIT_USER_ERROR
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
