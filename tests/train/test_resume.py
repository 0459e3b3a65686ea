"""Interrupted equals uninterrupted: a training process killed with SIGKILL mid-run and then
resumed logs exactly the per-step losses of a run that was never interrupted."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from afmkit.train.metrics import read_metrics

SRC = str(Path(__file__).resolve().parents[2] / "src")
STEPS = 10


def command(out, tokenizer_dir, corpus_dir, *extra):
    return [
        sys.executable, "-m", "afmkit.cli", "pretrain", "--model", "test-tiny", "--tokenizer", str(tokenizer_dir),
        "--data", str(corpus_dir), "--steps", str(STEPS), "--batch", "8", "--seq-len", "32", "--warmup", "2",
        "--save-every", "2", "--seed", "7", "--out", str(out), "--quiet", *extra,
    ]  # fmt: skip


def environment():
    return {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}


def loss_records(path):
    return [r for r in read_metrics(path) if "loss" in r] if path.exists() else []


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, tokenizer_dir, corpus_dir):
    reference = tmp_path / "reference"
    subprocess.run(command(reference, tokenizer_dir, corpus_dir), check=True, env=environment(), timeout=600)

    killed = tmp_path / "killed"
    process = subprocess.Popen(command(killed, tokenizer_dir, corpus_dir), env=environment())
    deadline = time.monotonic() + 600
    while len(loss_records(killed / "metrics.jsonl")) < 5:  # past the step-4 checkpoint
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert len(loss_records(killed / "metrics.jsonl")) < STEPS, "killed mid-training"

    subprocess.run(command(killed, tokenizer_dir, corpus_dir, "--resume"), check=True, env=environment(), timeout=600)
    expected = loss_records(reference / "metrics.jsonl")
    got = loss_records(killed / "metrics.jsonl")
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    np.testing.assert_array_equal([r["loss"] for r in got], [r["loss"] for r in expected])
    np.testing.assert_array_equal([r["grad_norm"] for r in got], [r["grad_norm"] for r in expected])
