"""``afmkit posttrain sft``: packed rows give each conversation exactly its own assistant-only
loss (checked against the model run on each conversation alone); the loss falls on a toy chat
set with a LoRA adapter (saved in PEFT's layout) and with every weight (saved as an afmkit model);
an interrupted run resumes exactly, dropout included; bad input is one line and writes nothing."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import afmkit
from afmkit.adapters.peft_io import CONFIG_FILE, WEIGHTS_FILE, load_adapter
from afmkit.cli import main
from afmkit.data.chat import pack_conversations, tokenize_conversation
from afmkit.model.transformer import logits_fn
from afmkit.sharding.mesh import make_mesh
from afmkit.train.metrics import read_metrics
from afmkit.train.objectives import assistant_sft
from afmkit.train.optim import OptimizerConfig, build_optimizer
from afmkit.train.step import Batch, StepConfig, global_batch, make_eval_step, state_shardings

WORDS = ["apple", "river", "stone", "cloud", "tiger", "maple", "ocean", "piano", "light", "sugar", "grape", "lemon"]


def conversation(word):
    return [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": f"Reverse: {word}"},
        {"role": "assistant", "content": word[::-1]},
        {"role": "user", "content": "Again?"},
        {"role": "assistant", "content": word[::-1]},
    ]


@pytest.fixture(scope="module")
def checkpoint(tiny_model, tmp_path_factory):
    return tiny_model.save(tmp_path_factory.mktemp("ckpt") / "afm-tiny")


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "chats.jsonl"
    path.write_text("".join(json.dumps({"messages": conversation(w)}) + "\n" for w in WORDS * 2))
    return path


def test_packed_rows_score_each_conversation_as_if_alone(tiny_model):
    """Three conversations packed into two rows: the summed assistant-token loss equals the sum
    of each conversation's assistant-token NLL from the model run on it alone, in float64 numpy
    from its logits (segment ids stop attention across conversations; the mask picks exactly
    the assistant's targets)."""
    examples = [tokenize_conversation(tiny_model.tokenizer, conversation(w)) for w in WORDS[:3]]
    longest = max(len(e.ids) for e in examples)
    rows = pack_conversations(examples, seq_len=2 * longest)
    assert len(rows["tokens"]) == 2 and {1, 2} <= set(np.unique(rows["segment_ids"][0]).tolist())
    expected = 0.0
    for e in examples:
        logits = np.asarray(logits_fn(tiny_model.params, jnp.asarray([e.ids[:-1]]), config=tiny_model.config)[0])
        logits = logits.astype(np.float64)
        log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        nll = log_z - logits[np.arange(len(e.ids) - 1), e.ids[1:]]
        expected += float((nll * np.asarray(e.mask[1:])).sum())
    mesh = make_mesh("data=1", devices=jax.devices()[:1])
    optimizer = build_optimizer(OptimizerConfig())
    eval_step = make_eval_step(
        config=tiny_model.config,
        step_config=StepConfig(),
        mesh=mesh,
        shardings=state_shardings(tiny_model.config, optimizer, mesh),
        batch_shape=rows["tokens"].shape,
        objective=assistant_sft(),
    )
    total, count = eval_step(tiny_model.params, global_batch(rows, mesh, global_rows=2, accum_steps=1))
    assert float(count) == sum(sum(e.mask[1:]) for e in examples)
    # fp32 logits over ~100 targets: each NLL is within ~1e-6 relative of float64
    np.testing.assert_allclose(float(total), expected, rtol=1e-5)
    assert isinstance(Batch(**{k: jnp.asarray(v) for k, v in rows.items()}), Batch)


def run_sft(checkpoint, chats, out, *flags):
    where = ["--model", str(checkpoint), "--data", str(chats), "--out", str(out), "--quiet"]
    common = ["--batch", "2", "--seq-len", "96", "--warmup", "2", "--eval-fraction", "0.25"]
    return main(["posttrain", "sft", *where, *common, *flags])


def losses(out):
    return [r["loss"] for r in read_metrics(out / "training" / "metrics.jsonl") if "loss" in r]


def test_lora_sft_lowers_the_loss_and_saves_a_peft_adapter(checkpoint, chats, tmp_path, capsys):
    out = tmp_path / "lora"
    assert run_sft(checkpoint, chats, out, "--lora-rank", "4", "--steps", "15", "--lr", "5e-3") == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["held_out_loss_end"] < summary["held_out_loss_start"] - 0.5
    curve = losses(out)
    assert len(curve) == 15 and np.mean(curve[-3:]) < np.mean(curve[:3]) - 0.5
    assert {CONFIG_FILE, WEIGHTS_FILE, "training.json"} <= {p.name for p in out.iterdir()}
    assert (out / "training" / "loss.png").is_file()
    base = afmkit.load(checkpoint)
    adapter = load_adapter(out, config=base.config, params=base.params)
    assert adapter.config.rank == 4


def test_init_adapter_continues_that_adapter(checkpoint, chats, tmp_path, capsys):
    """A second run with ``--init-adapter`` starts where the first ended: its held-out loss
    before training is the first run's after (up to the fp16 storage of the saved adapter:
    relative rounding 2^-11 per weight, a loss change far below 1%), and it keeps the first
    adapter's rank whatever --lora-rank says."""
    first, second = tmp_path / "first", tmp_path / "second"
    assert run_sft(checkpoint, chats, first, "--lora-rank", "4", "--steps", "15", "--lr", "5e-3") == 0
    ended = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["held_out_loss_end"]
    assert run_sft(checkpoint, chats, second, "--init-adapter", str(first), "--steps", "1", "--lr", "1e-6") == 0
    started = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["held_out_loss_start"]
    np.testing.assert_allclose(started, ended, rtol=1e-2)
    base = afmkit.load(checkpoint)
    assert load_adapter(second, config=base.config, params=base.params).config.rank == 4


@pytest.mark.slow  # ~1 minute on 2 shared cores
def test_full_sft_saves_a_model_that_loads(checkpoint, chats, tmp_path, capsys):
    out = tmp_path / "full"
    assert run_sft(checkpoint, chats, out, "--full", "--steps", "4", "--lr", "1e-3") == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["held_out_loss_end"] < summary["held_out_loss_start"]
    trained, base = afmkit.load(out, dtype="float32"), afmkit.load(checkpoint, dtype="float32")
    changed = [
        not np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(jax.tree.leaves(trained.params), jax.tree.leaves(base.params))
    ]
    assert all(changed), "every weight trains under --full"


# ~2 minutes (three runs, each compiling its step); the default suite's exact-resume check of the
# same loop and checkpoints is tests/train/test_resume.py
@pytest.mark.slow
def test_an_interrupted_run_resumes_exactly_with_dropout(checkpoint, chats, tmp_path):
    flags = ["--lora-rank", "4", "--lr", "3e-3", "--dropout", "0.1", "--save-every", "2"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_sft(checkpoint, chats, straight, *flags, "--steps", "4") == 0
    assert run_sft(checkpoint, chats, split, *flags, "--steps", "2") == 0
    assert run_sft(checkpoint, chats, split, *flags, "--steps", "4", "--resume") == 0
    assert losses(split) == losses(straight)
    assert len(set(losses(straight))) == 4
    a = load_adapter(straight, config=afmkit.load(checkpoint).config, params=afmkit.load(checkpoint).params)
    b = load_adapter(split, config=afmkit.load(checkpoint).config, params=afmkit.load(checkpoint).params)
    for x, y in zip(jax.tree.leaves(a.weights), jax.tree.leaves(b.weights)):
        np.testing.assert_array_equal(x, y)


CHAT = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'


@pytest.mark.parametrize(
    ("content", "flags", "message"),
    [
        ("", [], "holds no conversations"),
        ('{"messages": [{"role": "user", "content": "hi"}]}\n', [], "no assistant message"),
        ('{"messages": [{"role": "user", "content": "hi"}]}\n', ["--lora-rank", "0"], "--lora-rank must be at least 1"),
        ('{"messages": []}\n', ["--dropout", "1.5"], "--dropout must lie in"),
        ('{"messages": []}\n', ["--full", "--init-adapter", "a"], "--init-adapter continues a LoRA adapter"),
        (CHAT, ["--model", "smollm2-135m-afm"], "loads with an adapter"),  # its adapter would not count
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, content, flags, message):
    data = tmp_path / "chats.jsonl"
    data.write_text(content)
    out = tmp_path / "out"
    assert main(["posttrain", "sft", "--data", str(data), "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()
