"""Token-level perplexity with a sliding window (the Hugging Face recipe).

The text is tokenized once. Windows of ``seq_len`` tokens start every ``stride`` tokens; each
window scores only the tokens that no earlier window scored (the first window scores all but
its first token, which has no context), using everything before them in the window as context.
So every token after the first is scored exactly once, with at least ``seq_len - stride``
tokens of context (except near the start). This is the recipe of the transformers docs page
"Perplexity of fixed-length models".

Each window is computed on its own (see ``_token_nll``) and the per-token negative
log-likelihoods are summed in float64 on the host in window order, so the result is the same,
bit for bit, whatever the batch size.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from afmkit.errors import UserError


@dataclasses.dataclass(frozen=True, kw_only=True)
class PerplexitySettings:
    """Defaults of ``afmkit eval perplexity`` and of the functions below: the one source."""

    seq_len: int = 1024  # window length in tokens
    stride: int = 512  # tokens between window starts
    batch_size: int = 4  # windows per forward pass


@dataclasses.dataclass(frozen=True, kw_only=True)
class Window:
    begin: int  # first token of the window
    end: int  # one past its last token
    score_from: int  # first token this window scores (earlier ones are context only)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PerplexityResult:
    perplexity: float
    mean_nll: float
    tokens: int  # tokens scored
    text_tokens: int  # tokens in the text
    windows: int
    seq_len: int
    stride: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def sliding_windows(n_tokens: int, *, seq_len: int, stride: int) -> list[Window]:
    """Windows of at most ``seq_len`` tokens every ``stride`` tokens, until one reaches the end."""
    if seq_len < 2:
        raise UserError(f"--seq-len must be at least 2, got {seq_len}")
    if not 1 <= stride <= seq_len:
        raise UserError(f"--stride must be between 1 and --seq-len ({seq_len}), got {stride}")
    if n_tokens < 2:
        raise UserError(f"the text has {n_tokens} token(s); perplexity needs at least 2")
    windows = []
    previous_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + seq_len, n_tokens)
        # Token 0 has no context, so the first window scores from token 1.
        windows.append(Window(begin=begin, end=end, score_from=max(previous_end, begin + 1)))
        previous_end = end
        if end == n_tokens:
            break
    return windows


@functools.partial(jax.jit, static_argnames=("config", "activation_dtype"))
def _token_nll(params: Any, tokens: jax.Array, adapters: Any, *, config: Any, activation_dtype: Any) -> jax.Array:
    """NLL of ``tokens[:, t + 1]`` given ``tokens[:, : t + 1]``, fp32, shape ``[B, T - 1]``.

    Windows go through the model one at a time inside one compiled call (``lax.map``): a matmul's
    rounding can depend on how many rows it has, and a window of ~1,000 tokens already fills
    the matrix units, so this keeps every window's numbers independent of the batch size at no
    real cost. ``adapters``: the model's default adapter (a compressed model's recovery adapter) or None.
    """
    from afmkit.model.transformer import logits_fn, token_nll

    def one_window(row: jax.Array) -> jax.Array:
        logits = logits_fn(params, row[None], config=config, activation_dtype=activation_dtype, adapters=adapters)[0]
        return token_nll(logits[:-1], row[1:])[0]

    return jax.lax.map(one_window, tokens)


def perplexity_of_tokens(
    model: Any,
    token_ids: list[int],
    *,
    seq_len: int = PerplexitySettings.seq_len,
    stride: int = PerplexitySettings.stride,
    batch_size: int = PerplexitySettings.batch_size,
    quiet: bool = True,
) -> PerplexityResult:
    from afmkit.infer.engine import activation_dtype
    from afmkit.progress import ProgressReporter

    model.config.check_context(seq_len, what="--seq-len", fix="lower --seq-len")
    if batch_size < 1:
        raise UserError(f"--batch-size must be positive, got {batch_size}")
    windows = sliding_windows(len(token_ids), seq_len=seq_len, stride=stride)
    ids = np.asarray(token_ids, np.int32)
    total = 0.0
    count = 0
    with ProgressReporter("perplexity", len(windows), unit="windows", quiet=quiet) as progress:
        for lo in range(0, len(windows), batch_size):
            group = windows[lo : lo + batch_size]
            # Every window is padded on the right to the same width (causal attention: padding
            # never changes the real positions' logits), so each is computed with the same shapes.
            width = windows[0].end - windows[0].begin
            batch = np.zeros((len(group), width), np.int32)
            for row, w in enumerate(group):
                batch[row, : w.end - w.begin] = ids[w.begin : w.end]
            nll = np.asarray(
                _token_nll(
                    model.params,
                    jnp.asarray(batch),
                    model.default_adapters(),
                    config=model.config,
                    activation_dtype=activation_dtype(model.params),
                ),
                dtype=np.float64,
            )
            group_count = 0
            for row, w in enumerate(group):
                # nll[row, j] scores token begin + j + 1.
                scored = nll[row, w.score_from - w.begin - 1 : w.end - w.begin - 1]
                total += float(scored.sum())
                group_count += scored.size
            count += group_count
            progress.advance(len(group), tokens=group_count, ppl=f"{math.exp(total / count):.3f}")
    mean = total / count
    return PerplexityResult(
        perplexity=math.exp(mean),
        mean_nll=mean,
        tokens=count,
        text_tokens=len(token_ids),
        windows=len(windows),
        seq_len=seq_len,
        stride=stride,
    )


def read_text(path: str | os.PathLike, *, max_chars: int | None = None) -> str:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"text file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text (byte {exc.start}); give a UTF-8 text file") from None
    if max_chars is not None:
        if max_chars < 1:
            raise UserError(f"--max-chars must be positive, got {max_chars}")
        text = text[:max_chars]
    if not text:
        raise UserError(f"{path} is empty")
    return text


def perplexity_of_text(
    model: Any,
    text: str,
    *,
    seq_len: int = PerplexitySettings.seq_len,
    stride: int = PerplexitySettings.stride,
    batch_size: int = PerplexitySettings.batch_size,
    quiet: bool = True,
) -> PerplexityResult:
    """Perplexity of ``text`` tokenized as the model's tokenizer does by default (with a BOS
    token only when the tokenizer adds one; SmolLM2's does not, like its Hugging Face tokenizer)."""
    return perplexity_of_tokens(
        model, model.tokenizer.encode(text), seq_len=seq_len, stride=stride, batch_size=batch_size, quiet=quiet
    )
