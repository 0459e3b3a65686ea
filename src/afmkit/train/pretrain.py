"""``afmkit pretrain``: everything from flags to a trained, checkpointed model.

Layout of ``--out``::

    run.json          the run's settings; a resumed run must match them
    tokenizer.json    the tokenizer it was trained with (+ tokenizer_config.json)
    checkpoints/      Orbax steps (weights, optimizer state, step, RNG, loader position)
    metrics.jsonl     one JSON object per step (unless --metrics names another file)
    loss.png          the loss curve, written at the end

Nothing in ``--out`` is overwritten unless ``--resume`` is given; every check that can fail
(paths, corpus, tokenizer, mesh, model dims, checkpoint compatibility) runs before the first
write.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from afmkit.errors import UserError
from afmkit.train.settings import RUN_IDENTITY, PretrainConfig, resume_command

__all__ = ["PretrainConfig", "pretrain"]

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _check_settings(cfg: PretrainConfig) -> None:
    for name in ("steps", "batch", "seq_len", "save_every", "keep", "accum"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    if cfg.compute_dtype not in COMPUTE_DTYPES:
        raise UserError(f"--compute-dtype must be one of {', '.join(COMPUTE_DTYPES)}")


def _prepare_out(cfg: PretrainConfig) -> dict[str, Any] | None:
    """Check ``--out`` against ``--resume``; return the saved run record when resuming. Raises
    before any write."""
    out = Path(cfg.out)
    run_file = out / "run.json"
    has_run = run_file.exists() or (out / "checkpoints").exists()
    if has_run and not cfg.resume:
        raise UserError(
            f"{out} already holds a training run; pass --resume to continue it, or choose another --out "
            "(nothing was changed)"
        )
    if cfg.resume and not run_file.is_file():
        raise UserError(f"--resume: {out} holds no training run (no run.json); start one without --resume")
    if not cfg.resume:
        return None
    try:
        record = json.loads(run_file.read_text())
        saved = record["settings"]
    except (json.JSONDecodeError, KeyError, OSError) as exc:
        raise UserError(f"--resume: cannot read {run_file} ({exc}); it is damaged") from None
    mine = cfg.identity()
    # --steps may grow: that extends the run (the LR schedule is re-planned, see pretrain)
    diffs = [
        f"{k}: saved {saved.get(k)!r}, now {mine[k]!r}"
        for k in RUN_IDENTITY
        if k != "steps" and saved.get(k) != mine[k]
    ]
    if diffs:
        raise UserError(
            f"--resume: the settings differ from the run in {out} ({'; '.join(diffs)}); "
            "resume with the same settings, or train into a new --out"
        )
    if cfg.steps < saved["steps"]:
        raise UserError(
            f"--resume: --steps {cfg.steps} is below the run's {saved['steps']} steps; a run can be extended "
            f"(a larger --steps), not shortened: use --steps {saved['steps']} or more"
        )
    return record


def pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    """Train per ``cfg``; returns a summary (first/last loss, steps, paths)."""
    from afmkit.config import get_size
    from afmkit.data.corpus import read_documents
    from afmkit.data.loader import PackedLoader
    from afmkit.data.packing import tokenize_documents
    from afmkit.data.tokenizer import load_tokenizer
    from afmkit.runtime import cache_dir, enable_compilation_cache
    from afmkit.sharding.mesh import describe, make_mesh
    from afmkit.sharding.plan import param_specs
    from afmkit.train import hooks as hooks_lib
    from afmkit.train.checkpoint import Checkpoints
    from afmkit.train.loop import NonFiniteError, train_loop
    from afmkit.train.optim import OptimizerConfig, build_optimizer, lr_schedule
    from afmkit.train.step import (
        StepConfig,
        TrainState,
        abstract_state,
        check_batch_layout,
        global_batch,
        init_sharded_state,
        local_batch_positions,
        make_eval_step,
        make_train_step,
        state_shardings,
    )

    warmup_given = cfg.warmup is not None
    as_given, cfg = cfg, cfg.resolved()
    # the resume command repeats the settings as given (unset ones resolve the same way again),
    # with the data paths made absolute
    hint = dataclasses.replace(as_given, data=cfg.data)
    _check_settings(cfg)
    config = get_size(cfg.model).replace(z_loss=cfg.z_loss)
    config.check_context(cfg.seq_len, what="--seq-len", fix="lower --seq-len")
    if cfg.resume and not warmup_given and (Path(cfg.out) / "run.json").is_file():
        # the default warm-up depends on --steps: an extended run keeps the one it started with
        try:
            saved_warmup = json.loads((Path(cfg.out) / "run.json").read_text())["settings"]["warmup"]
            cfg = dataclasses.replace(cfg, warmup=saved_warmup)
        except (json.JSONDecodeError, KeyError, OSError):
            pass  # _prepare_out names the damage
    record = _prepare_out(cfg)
    if jax.process_count() > 1:  # every process has checked --out before the lead writes to it
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("afmkit pretrain: --out checked")
    tokenizer = load_tokenizer(cfg.tokenizer)
    if tokenizer.vocab_size > config.vocab_size:
        raise UserError(
            f"the tokenizer {cfg.tokenizer!r} has {tokenizer.vocab_size} tokens but {cfg.model} embeds only "
            f"{config.vocab_size}; use a model size whose vocab covers the tokenizer"
        )
    mesh = make_mesh(cfg.mesh)
    param_specs(config, mesh)  # clear errors for model dims the mesh does not divide
    check_batch_layout(mesh, batch=cfg.batch, seq_len=cfg.seq_len, accum_steps=cfg.accum)
    lead = jax.process_index() == 0
    show = lead and not cfg.quiet
    out = Path(cfg.out)
    checkpoints = Checkpoints(out / "checkpoints", keep=cfg.keep) if record is not None else None
    latest = checkpoints.latest_step() if checkpoints is not None else None
    # The schedule: the first plan's length, and any extensions of it (from_step, to_step).
    planned_steps, replans = cfg.steps, []
    if record is not None and latest is not None:
        planned_steps = record.get("planned_steps", record["settings"]["steps"])
        replans = [tuple(r) for r in record.get("lr_replans", [])]
        if cfg.steps > record["settings"]["steps"]:
            replans.append((latest, cfg.steps))
    opt_config = OptimizerConfig(
        name=cfg.optimizer,
        peak_lr=cfg.lr,
        warmup_steps=cfg.warmup,
        total_steps=planned_steps,
        final_lr_fraction=cfg.final_lr_fraction,
        weight_decay=cfg.weight_decay,
        replans=tuple(replans),
    )
    optimizer = build_optimizer(opt_config)
    schedule = lr_schedule(opt_config)
    if show and record is not None and latest is not None and cfg.steps > record["settings"]["steps"]:
        print(
            f"afmkit: extending the run from {record['settings']['steps']} to {cfg.steps} steps: the LR schedule "
            f"is re-planned from step {latest} (cosine from {float(schedule(latest)):.3g} to "
            f"{cfg.final_lr_fraction * cfg.lr:.3g} at step {cfg.steps})",
            flush=True,
        )

    documents = read_documents(list(cfg.data) if cfg.data else None)
    eval_documents = []
    if cfg.eval_every:
        if len(documents) < 2:
            raise UserError("--eval-every needs at least two documents (one is held out for evaluation)")
        held_out = max(1, len(documents) // 50)
        documents, eval_documents = documents[:-held_out], documents[-held_out:]
    start = time.perf_counter()
    stream = tokenize_documents(documents, tokenizer, cache_dir=cache_dir() / "tokenized")
    if show:
        print(
            f"afmkit: {len(documents)} documents, {len(stream.tokens):,} tokens "
            f"(tokenized in {time.perf_counter() - start:.1f}s); mesh {describe(mesh)}",
            flush=True,
        )
    loader = PackedLoader(stream, seq_len=cfg.seq_len, global_batch=cfg.batch, seed=cfg.seed)
    positions = local_batch_positions(mesh, global_rows=cfg.batch, seq_len=cfg.seq_len, accum_steps=cfg.accum)

    shardings = state_shardings(config, optimizer, mesh)
    if checkpoints is None:
        checkpoints = Checkpoints(out / "checkpoints", keep=cfg.keep)
    start_step = 0
    if latest is not None:
        target = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            abstract_state(config, optimizer),
            shardings,
        )
        restored, loader_state = checkpoints.restore(latest, target.as_dict())
        state = TrainState.from_dict(restored)
        loader.restore(loader_state)
        start_step = int(state.step)
        if show:
            print(f"afmkit: resumed from step {start_step} in {checkpoints.directory}", flush=True)
    else:
        state = init_sharded_state(config, optimizer, shardings, seed=cfg.seed)
    if lead:
        out.mkdir(parents=True, exist_ok=True)
        run_record = {
            "settings": cfg.identity(),
            "planned_steps": planned_steps,
            "lr_replans": [list(r) for r in replans],
            "config": config.to_dict(),
            "mesh": describe(mesh),
        }
        tokenizer.save(out)  # the run carries its tokenizer: it loads as a model from anywhere
        tmp = out / f".run.json.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(run_record, indent=2))
        os.replace(tmp, out / "run.json")

    step_config = StepConfig(accum_steps=cfg.accum, compute_dtype=COMPUTE_DTYPES[cfg.compute_dtype])
    batch_shape = (cfg.batch, cfg.seq_len) if cfg.accum == 1 else (cfg.accum, cfg.batch // cfg.accum, cfg.seq_len)
    train_step = make_train_step(
        config=config,
        optimizer=optimizer,
        schedule=schedule,
        step_config=step_config,
        mesh=mesh,
        shardings=shardings,
        batch_shape=batch_shape,
    )

    def next_batch():
        return global_batch(loader.next_batch(positions), mesh, global_rows=cfg.batch, accum_steps=cfg.accum)

    metrics_path = Path(cfg.metrics) if cfg.metrics else out / "metrics.jsonl"
    hooks: list[hooks_lib.Hook] = []
    log = None
    if lead:
        from afmkit.train.metrics import MetricsLog, peak_flops_per_device

        log = MetricsLog(metrics_path, resume_from_step=start_step if cfg.resume else None)
        hooks.append(
            hooks_lib.MetricsHook(
                log=log,
                config=config,
                seq_len=cfg.seq_len,
                peak_per_device=peak_flops_per_device(cfg.peak_tflops),
                epoch=loader.epoch,
            )
        )
    if cfg.eval_every:
        eval_stream = tokenize_documents(eval_documents, tokenizer, cache_dir=cache_dir() / "tokenized")
        eval_loader = PackedLoader(eval_stream, seq_len=cfg.seq_len, global_batch=cfg.batch, seed=cfg.seed)
        eval_positions = local_batch_positions(mesh, global_rows=cfg.batch, seq_len=cfg.seq_len, accum_steps=1)
        eval_batches = [
            global_batch(eval_loader.next_batch(eval_positions), mesh, global_rows=cfg.batch, accum_steps=1)
            for _ in range(cfg.eval_batches)
        ]
        eval_step = make_eval_step(
            config=config, step_config=step_config, mesh=mesh, shardings=shardings, batch_shape=(cfg.batch, cfg.seq_len)
        )
        hooks.append(hooks_lib.EvalHook(every=cfg.eval_every, eval_step=eval_step, batches=eval_batches, log=log))
    hooks.append(hooks_lib.CheckpointHook(checkpoints=checkpoints, every=cfg.save_every, loader=loader))
    if cfg.profile_dir:
        hooks.append(hooks_lib.ProfileHook(directory=cfg.profile_dir, steps=cfg.profile_steps))
    if show:
        hooks.append(hooks_lib.ProgressHook(total=cfg.steps, start=start_step, log_every=cfg.log_every))
    enable_compilation_cache()
    interrupt = _StopOnCtrlC(enabled=jax.process_count() == 1)
    try:
        with interrupt:
            state = train_loop(
                state=state,
                train_step=train_step,
                next_batch=next_batch,
                start_step=start_step,
                end_step=cfg.steps,
                hooks=hooks,
                stop_requested=interrupt.requested,
            )
    except KeyboardInterrupt:  # a second Ctrl-C, or one in a multi-process run: no new save
        for hook in hooks:
            hook.close()
        checkpoints.close()
        if lead:
            _print_resume_hint(hint, checkpoints)
        raise
    except NonFiniteError as exc:
        for hook in hooks:
            hook.close()
        checkpoints.close()
        kept = checkpoints.latest_step()
        where = (
            f"the last good checkpoint, step {kept}, in {checkpoints.directory} is intact"
            if kept
            else "no checkpoint was saved"
        )
        raise UserError(f"{exc}; {where}. Lower --lr or raise --warmup, then --resume or start again") from None
    finally:
        for hook in hooks:
            hook.close()
    checkpoints.close()
    last_step = int(state.step)
    summary: dict[str, Any] = {
        "out": str(out),
        "steps": last_step,
        "start_step": start_step,
        "metrics": str(metrics_path),
    }
    if last_step < cfg.steps:
        summary["interrupted"] = True
        if lead:
            _print_resume_hint(hint, checkpoints)
    losses = [r["loss"] for r in log.records if "loss" in r] if log is not None else []
    if losses:
        summary.update(first_loss=losses[0], last_loss=losses[-1])
        from afmkit.train.metrics import plot_loss

        summary["plot"] = str(
            plot_loss(
                log.records,
                out / "loss.png",
                title=f"{cfg.model} on {'the Python stdlib' if not cfg.data else 'your data'}",
            )
        )
        tail = [r["tokens_per_s"] for r in log.records if "tokens_per_s" in r][-10:]
        summary["tokens_per_s"] = float(np.median(tail)) if tail else math.nan
    return summary


class _StopOnCtrlC:
    """While open, the first Ctrl-C (SIGINT) asks the loop to stop after the step in flight (the
    checkpoint hook then saves it); a second one stops at once. Only in the main thread of a
    single-process run: in a multi-process run every process must stop at the same step, so
    Ctrl-C there interrupts at once and names the last checkpoint."""

    def __init__(self, *, enabled: bool) -> None:
        import threading

        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.stop = False
        self.previous: Any = None

    def requested(self) -> bool:
        return self.stop

    def _handle(self, signum: int, frame: Any) -> None:
        import signal
        import sys

        if self.stop:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.stop = True
        print(
            "\nafmkit: Ctrl-C: stopping after the current step and saving a checkpoint (Ctrl-C again to stop now)",
            file=sys.stderr,
            flush=True,
        )

    def __enter__(self) -> _StopOnCtrlC:
        if self.enabled:
            import signal

            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            import signal

            signal.signal(signal.SIGINT, self.previous)


def _print_resume_hint(cfg: PretrainConfig, checkpoints: Any) -> None:
    import sys

    step = checkpoints.latest_step()
    where = (
        f"the last checkpoint is step {step} in {checkpoints.directory}"
        if step is not None
        else "no checkpoint was saved yet"
    )
    print(
        f"afmkit: training interrupted; {where}. Resume with:\n  {resume_command(cfg)}",
        file=sys.stderr,
        flush=True,
    )
