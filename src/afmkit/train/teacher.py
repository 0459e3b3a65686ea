"""A teacher's next-token distributions over plain text: what a student is held to.

``text_rows`` cuts tokenized text into packed rows; ``add_teacher`` adds a model's top-k
next-token distribution at every position (``objectives.teacher_top_k``), computed once before
training so the step never holds the teacher. Two recipes train against them: the
accuracy-recovery adapter (``compress.recover``: the float model teaches the compressed one) and
DPO's anchor (``posttrain.dpo --anchor-text``: the base holds the policy on generic text).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def text_rows(token_ids: list[int], seq_len: int) -> dict[str, np.ndarray]:
    """Consecutive windows of ``seq_len`` tokens as packed rows (one document per row): every
    position is a distillation target (the teacher's next-token distribution needs no label)."""
    n_rows = len(token_ids) // seq_len
    tokens = np.asarray(token_ids[: n_rows * seq_len], np.int32).reshape(n_rows, seq_len)
    return {
        "tokens": tokens,
        "targets": np.roll(tokens, -1, axis=1),
        "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), tokens.shape).copy(),
        "segment_ids": np.ones_like(tokens),
        "loss_mask": np.ones(tokens.shape, np.float32),
    }


def add_teacher(teacher: Any, rows: dict[str, np.ndarray], *, k: int, batch: int, quiet: bool) -> dict[str, np.ndarray]:
    """``rows`` with the teacher's top-k fields (``objectives.teacher_top_k``), ``batch`` rows per
    call. The teacher is the model as it loaded: its default adapter (``smollm2-135m-afm``'s
    post-training adapter, a compressed model's recovery adapter) applies, as it does when it
    generates."""
    import jax
    import jax.numpy as jnp

    from afmkit.infer.engine import activation_dtype
    from afmkit.progress import ProgressReporter
    from afmkit.train.objectives import ModelView, teacher_top_k

    compute = activation_dtype(teacher.params)
    adapters = teacher.default_adapters()  # as its logits and generation apply it, converted once

    @jax.jit
    def top_k(params: Any, adapters: Any, tokens: Any, positions: Any, segment_ids: Any) -> dict[str, Any]:
        view = ModelView(config=teacher.config, params=params, adapters=adapters, compute_dtype=compute)
        return teacher_top_k(view, {"tokens": tokens, "positions": positions, "segment_ids": segment_ids}, k=k)

    n = len(rows["tokens"])
    parts: list[dict[str, np.ndarray]] = []
    with ProgressReporter("teacher top-k", n, unit="rows", quiet=quiet) as progress:
        for lo in range(0, n, batch):
            chunk = {name: rows[name][lo : lo + batch] for name in ("tokens", "positions", "segment_ids")}
            real = len(chunk["tokens"])
            chunk = {name: np.pad(a, [(0, batch - real), (0, 0)]) for name, a in chunk.items()}  # one shape
            out = top_k(
                teacher.params, adapters, *(jnp.asarray(chunk[n_]) for n_ in ("tokens", "positions", "segment_ids"))
            )
            parts.append({name: np.asarray(v)[:real] for name, v in out.items()})
            progress.advance(real)
    return {**rows, **{name: np.concatenate([p[name] for p in parts]) for name in parts[0]}}
