"""Interrupted equals uninterrupted: a training process killed with SIGKILL mid-run, or stopped
with Ctrl-C (SIGINT), and then resumed logs exactly the per-step losses of a run that was never
interrupted. The runs use ``--recipe afm-core``, so AFM's optimizer state goes through the
checkpoints."""

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from afmkit.train.metrics import read_metrics

SRC = str(Path(__file__).resolve().parents[2] / "src")
STEPS = 10


def command(out, tokenizer_dir, corpus_dir, *extra):
    return [
        sys.executable, "-m", "afmkit.cli", "pretrain", "--recipe", "afm-core", "--model", "test-tiny",
        "--tokenizer", str(tokenizer_dir), "--data", str(corpus_dir), "--steps", str(STEPS), "--batch", "8",
        "--seq-len", "32", "--warmup", "2",
        "--save-every", "2", "--seed", "7", "--out", str(out), "--quiet", *extra,
    ]  # fmt: skip


def environment():
    return {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}


def loss_records(path):
    return [r for r in read_metrics(path) if "loss" in r] if path.exists() else []


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tokenizer_dir, corpus_dir):
    out = tmp_path_factory.mktemp("reference") / "run"
    subprocess.run(command(out, tokenizer_dir, corpus_dir), check=True, env=environment(), timeout=600)
    records = loss_records(out / "metrics.jsonl")
    assert records[-1]["loss"] < records[0]["loss"], "AFM's recipe should train test-tiny"
    return records


def wait_for_steps(process, metrics, count):
    deadline = time.monotonic() + 600
    while len(loss_records(metrics)) < count:
        assert process.poll() is None, "the run ended before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.05)


def assert_same_run(got, expected):
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    np.testing.assert_array_equal([r["loss"] for r in got], [r["loss"] for r in expected])
    np.testing.assert_array_equal([r["grad_norm"] for r in got], [r["grad_norm"] for r in expected])


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, tokenizer_dir, corpus_dir, reference):
    killed = tmp_path / "killed"
    process = subprocess.Popen(command(killed, tokenizer_dir, corpus_dir), env=environment())
    wait_for_steps(process, killed / "metrics.jsonl", 5)  # past the step-4 checkpoint
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert len(loss_records(killed / "metrics.jsonl")) < STEPS, "killed mid-training"

    subprocess.run(command(killed, tokenizer_dir, corpus_dir, "--resume"), check=True, env=environment(), timeout=600)
    assert_same_run(loss_records(killed / "metrics.jsonl"), reference)


def test_ctrl_c_saves_names_the_checkpoint_and_its_resume_command_finishes_the_run(
    tmp_path, tokenizer_dir, corpus_dir, reference
):
    out = tmp_path / "interrupted"
    process = subprocess.Popen(
        command(out, tokenizer_dir, corpus_dir), env=environment(), stderr=subprocess.PIPE, text=True
    )
    wait_for_steps(process, out / "metrics.jsonl", 3)  # step 3 is not a checkpoint step (--save-every 2)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=600)
    assert process.returncode == 130, err
    assert "Traceback" not in err, err
    logged = len(loss_records(out / "metrics.jsonl"))
    assert 3 <= logged < STEPS, "stopped mid-training"
    # the step in flight finished and was saved before exiting
    assert f"the last checkpoint is step {logged} in {out / 'checkpoints'}" in err, err
    resume = err.split("Resume with:\n", 1)[1].splitlines()[0].strip()
    words = shlex.split(resume)
    assert words[:2] == ["afmkit", "pretrain"] and words[-1] == "--resume", resume

    subprocess.run([sys.executable, "-m", "afmkit.cli", *words[1:]], check=True, env=environment(), timeout=600)
    assert_same_run(loss_records(out / "metrics.jsonl"), reference)
