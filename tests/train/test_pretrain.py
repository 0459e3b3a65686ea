"""``afmkit pretrain`` end to end on ``test-tiny``: bad inputs fail clearly and change nothing,
a non-finite run stops and keeps its last good checkpoint, damaged or incompatible checkpoints
are refused, and a checkpoint saved on one mesh resumes on another with the same losses."""

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from afmkit.cli import main
from afmkit.errors import UserError
from afmkit.train.metrics import read_metrics
from afmkit.train.pretrain import PretrainConfig, pretrain


def run_config(out, tokenizer_dir, corpus_dir, **changes):
    settings = dict(
        out=str(out),
        model="test-tiny",
        tokenizer=str(tokenizer_dir),
        data=(str(corpus_dir),),
        steps=4,
        batch=8,
        seq_len=32,
        lr=3e-3,
        warmup=1,
        save_every=2,
        seed=0,
        quiet=True,
    )
    settings.update(changes)
    return PretrainConfig(**settings)


def tree_digest(path: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def losses(path):
    return [r["loss"] for r in read_metrics(path) if "loss" in r]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tokenizer_dir, corpus_dir):
    out = tmp_path_factory.mktemp("run") / "out"
    summary = pretrain(
        run_config(
            out, tokenizer_dir, corpus_dir, eval_every=2, profile_dir=str(out.parent / "trace"), profile_steps="1:2"
        )
    )
    return out, summary


def test_a_run_trains_logs_checkpoints_and_plots(finished_run):
    out, summary = finished_run
    records = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    evals = [r for r in read_metrics(out / "metrics.jsonl") if "eval_loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r["step"] for r in evals] == [2, 4] and evals[1]["eval_loss"] < evals[0]["eval_loss"]
    for key in ("loss", "grad_norm", "lr", "tokens_per_s", "cross_entropy"):
        assert all(np.isfinite(r[key]) for r in records), key
    assert records[-1]["loss"] < records[0]["loss"]
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert summary["last_loss"] == records[-1]["loss"]
    assert list((out.parent / "trace").rglob("*.xplane.pb")), "the profiler hook wrote a trace"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data", "/no/such/corpus"], "data path /no/such/corpus does not exist"),
        (["--mesh", "data=3"], "needs 3 devices but 8 are available"),
        (["--mesh", "tensor=8"], "dimension 'kv_heads' of size 2 cannot be split 8 ways"),
        (["--batch", "4"], "dimension 'batch' of size 4 cannot be split 8 ways"),
        (["--seq-len", "4096"], "more than test-tiny's context of 256"),
        (["--tokenizer", "/no/tokenizer"], "is neither a known model"),
    ],
)
def test_bad_inputs_are_clear_errors_and_write_nothing(tmp_path, tokenizer_dir, corpus_dir, capsys, args, message):
    out = tmp_path / "out"
    base = ["pretrain", "--model", "test-tiny", "--tokenizer", str(tokenizer_dir), "--data", str(corpus_dir)]
    base += ["--steps", "2", "--batch", "8", "--seq-len", "32", "--out", str(out), "--quiet"]
    assert main(base + args) == 2
    err = capsys.readouterr().err
    assert err.startswith("afmkit: error: ") and message in err, err
    assert "Traceback" not in err
    assert not out.exists()


def test_empty_corpus_and_a_tokenizer_larger_than_the_vocab(tmp_path, tokenizer_dir, corpus_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("   \n")
    with pytest.raises(UserError, match="corpus is empty"):
        pretrain(run_config(tmp_path / "a", tokenizer_dir, corpus_dir, data=(str(empty),)))
    with pytest.raises(UserError, match="has 49152 tokens but test-tiny embeds only 512"):
        pretrain(run_config(tmp_path / "b", "smollm2-135m-instruct", corpus_dir))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_an_existing_run_is_never_overwritten(finished_run, tokenizer_dir, corpus_dir):
    out, _ = finished_run
    before = tree_digest(out)
    with pytest.raises(UserError, match="already holds a training run; pass --resume"):
        pretrain(run_config(out, tokenizer_dir, corpus_dir))
    with pytest.raises(UserError, match="settings differ from the run"):
        pretrain(run_config(out, tokenizer_dir, corpus_dir, model="afm-tiny", resume=True))
    assert tree_digest(out) == before


def test_incompatible_and_corrupt_checkpoints_are_refused(finished_run, tmp_path, tokenizer_dir, corpus_dir):
    import jax

    from afmkit.config import get_size
    from afmkit.sharding.mesh import make_mesh
    from afmkit.train.checkpoint import Checkpoints
    from afmkit.train.optim import OptimizerConfig, build_optimizer
    from afmkit.train.step import abstract_state, state_shardings

    source, _ = finished_run
    out = tmp_path / "copy"
    shutil.copytree(source, out)
    # a different model size against the saved arrays
    optimizer = build_optimizer(OptimizerConfig(name="adamw"))
    bigger = get_size("test-tiny").replace(d_model=128)
    mesh = make_mesh("data=8")
    target = abstract_state(bigger, optimizer)
    shardings = state_shardings(bigger, optimizer, mesh)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), target, shardings)
    checkpoints = Checkpoints(out / "checkpoints")
    with pytest.raises(UserError, match="different model size"):
        checkpoints.restore(4, target.as_dict())
    checkpoints.close()
    # damage every array file of the latest step: resuming names the step and changes nothing
    for file in (out / "checkpoints" / "4" / "state").rglob("*"):
        if file.is_file() and file.stat().st_size > 64 and "metadata" not in file.name:
            file.write_bytes(b"\0" * file.stat().st_size)
    before = tree_digest(out)
    with pytest.raises(UserError, match=r"checkpoint step 4 .* cannot be read .* it is damaged"):
        pretrain(run_config(out, tokenizer_dir, corpus_dir, resume=True))
    assert tree_digest(out) == before


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tokenizer_dir, corpus_dir):
    out = tmp_path / "diverge"
    # step 1 is finite and saved; its update (LR 1e30) makes step 2 overflow
    with pytest.raises(
        UserError, match=r"step 2: the loss is .* not finite.*last good checkpoint, step 1, .* is intact"
    ):
        pretrain(run_config(out, tokenizer_dir, corpus_dir, lr=1e30, warmup=0, steps=6, save_every=1))
    steps = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [1]
    assert all(np.isfinite(r["loss"]) for r in read_metrics(out / "metrics.jsonl"))


def test_checkpoint_from_one_mesh_resumes_on_another(finished_run, tmp_path, tokenizer_dir, corpus_dir):
    reference, _ = finished_run  # data=8, steps 1..4
    out = tmp_path / "remesh"
    # --eval-every holds out the same documents as the reference run, so the training data match
    pretrain(run_config(out, tokenizer_dir, corpus_dir, steps=4, mesh="data=8", eval_every=2))
    shutil.rmtree(out / "checkpoints" / "4")  # keep step 2 only
    pretrain(run_config(out, tokenizer_dir, corpus_dir, mesh="data=2,fsdp=2,tensor=2", eval_every=2, resume=True))
    assert json.loads((out / "run.json").read_text())["mesh"] == "data=2,fsdp=2,seq=1,tensor=2"
    np.testing.assert_allclose(losses(out / "metrics.jsonl"), losses(reference / "metrics.jsonl"), rtol=1e-4)


def test_a_larger_steps_extends_a_finished_run(finished_run, tmp_path, tokenizer_dir, corpus_dir, capsys):
    source, _ = finished_run  # 4 steps, warm-up 1, checkpoints at 2 and 4
    out = tmp_path / "extended"
    shutil.copytree(source, out)
    with pytest.raises(UserError, match=r"a run can be extended .* not shortened"):
        pretrain(run_config(out, tokenizer_dir, corpus_dir, steps=3, eval_every=2, resume=True))
    capsys.readouterr()
    summary = pretrain(run_config(out, tokenizer_dir, corpus_dir, steps=6, eval_every=2, resume=True, quiet=False))
    printed = capsys.readouterr().out
    assert "extending the run from 4 to 6 steps: the LR schedule is re-planned from step 4" in printed
    records = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6] and summary["steps"] == 6
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())[-1] == 6
    # the finished run ended on its floor; the re-planned cosine starts there and ends there
    floor = 0.1 * 3e-3
    assert [r["lr"] for r in records[4:]] == pytest.approx([floor, floor], rel=1e-5)
    saved = json.loads((out / "run.json").read_text())
    assert saved["settings"]["steps"] == 6 and saved["lr_replans"] == [[4, 6]] and saved["planned_steps"] == 4


def test_extending_mid_run_replans_a_continuous_cosine_that_a_second_resume_repeats(
    tmp_path, tokenizer_dir, corpus_dir
):
    out = tmp_path / "mid"
    pretrain(run_config(out, tokenizer_dir, corpus_dir, steps=4, warmup=1))
    shutil.rmtree(out / "checkpoints" / "4")  # as if it had crashed after the step-2 checkpoint
    pretrain(run_config(out, tokenizer_dir, corpus_dir, steps=8, warmup=1, resume=True))
    first = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    peak, floor = 3e-3, 3e-4
    # the 4-step plan at count 2 (cosine over steps 1..4), then a cosine from there to the floor at 8
    begin = floor + (peak - floor) * 0.5 * (1 + np.cos(np.pi * (2 - 1) / 3))
    want = [floor + (begin - floor) * 0.5 * (1 + np.cos(np.pi * (count - 2) / 6)) for count in range(2, 8)]
    assert [r["step"] for r in first] == list(range(1, 9))
    np.testing.assert_allclose([r["lr"] for r in first[2:]], want, rtol=1e-5)
    # crash again inside the extension: the saved plan is reused, so the losses repeat exactly
    shutil.rmtree(out / "checkpoints" / "8")
    kept = max(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    pretrain(run_config(out, tokenizer_dir, corpus_dir, steps=8, warmup=1, resume=True))
    second = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert [r["loss"] for r in second] == [r["loss"] for r in first] and kept < 8


def test_progress_lines_when_stderr_is_not_a_terminal(tmp_path, tokenizer_dir, corpus_dir, capsys):
    pretrain(run_config(tmp_path / "log", tokenizer_dir, corpus_dir, steps=4, quiet=False, log_every=2))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("training: ")]
    assert [line.split()[1] for line in lines] == ["2/4", "4/4"], lines
    assert all(" loss " in line and " tok/s" in line for line in lines), lines
    assert "ETA" in lines[0] and "done in" in lines[1]
