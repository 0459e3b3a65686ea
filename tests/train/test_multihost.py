"""Two processes on this machine join with ``jax.distributed`` (2 CPU devices each), build one
global 4-device mesh and train together; the losses equal a single process with 4 devices."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from afmkit.errors import UserError
from afmkit.train import multihost
from afmkit.train.metrics import read_metrics

SRC = str(Path(__file__).resolve().parents[2] / "src")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(out, tokenizer_dir, corpus_dir, *extra):
    return [
        sys.executable, "-m", "afmkit.cli", "pretrain", "--model", "test-tiny", "--tokenizer", str(tokenizer_dir),
        "--data", str(corpus_dir), "--steps", "2", "--batch", "4", "--seq-len", "32", "--warmup", "1",
        "--mesh", "data=2,fsdp=2", "--save-every", "2", "--out", str(out), "--quiet", *extra,
    ]  # fmt: skip


def environment(devices: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COORDINATOR")}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["PYTHONPATH"] = SRC
    return env


@pytest.mark.slow
def test_two_processes_train_together_like_one(tmp_path, tokenizer_dir, corpus_dir):
    single = tmp_path / "single"
    subprocess.run(command(single, tokenizer_dir, corpus_dir), check=True, env=environment(4), timeout=600)

    shared = tmp_path / "two"
    address = f"127.0.0.1:{free_port()}"
    processes = [
        subprocess.Popen(
            command(
                shared,
                tokenizer_dir,
                corpus_dir,
                "--coordinator",
                address,
                "--num-processes",
                "2",
                "--process-id",
                str(i),
            ),
            env=environment(2),
        )
        for i in range(2)
    ]
    assert [p.wait(timeout=600) for p in processes] == [0, 0]
    expected = [r["loss"] for r in read_metrics(single / "metrics.jsonl")]
    got = [r["loss"] for r in read_metrics(shared / "metrics.jsonl")]
    assert len(got) == 2
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert (shared / "checkpoints" / "2").is_dir()


def test_settings_from_flags_environment_and_their_errors(monkeypatch):
    for name in (
        "JAX_COORDINATOR_ADDRESS",
        "JAX_NUM_PROCESSES",
        "JAX_PROCESS_ID",
        "SLURM_JOB_ID",
        "OMPI_COMM_WORLD_SIZE",
    ):
        monkeypatch.delenv(name, raising=False)
    assert multihost.settings() is None
    assert multihost.settings(force=True).source == "JAX cluster detection"
    found = multihost.settings(coordinator="h:1", num_processes=2, process_id=1)
    assert (found.coordinator, found.num_processes, found.process_id, found.source) == ("h:1", 2, 1, "flags")
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "3")
    assert multihost.settings().source == "environment"
    monkeypatch.delenv("JAX_PROCESS_ID")
    with pytest.raises(UserError, match="also needs --process-id / JAX_PROCESS_ID"):
        multihost.settings()
    monkeypatch.setenv("JAX_PROCESS_ID", "4")
    with pytest.raises(UserError, match=r"process id 4 must lie in \[0, 4\)"):
        multihost.settings()
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_NTASKS", "16")
    assert multihost.settings().source == "SLURM"  # JAX reads the rest from SLURM's variables
