"""AFM's reward model: the base model's trunk, a scalar score head on the last token, and
single-sided grade heads (instruction following, verbosity, truthfulness, harmlessness; 3 levels
each) on the same last-token embedding (AFM_SPEC section 5).

The heads are a small pytree of their own (``init_reward_heads``); the trunk is any model
``forward`` runs: fp32/bf16 weights, a packed int4/int8 base, with or without a LoRA adapter
(``adapters=``). The loss is ``afmkit.posttrain.losses.reward_model_loss``.

Each row of a batch holds one conversation (prompt + reply), right-padded: ``segment_ids`` is 1
on its tokens and 0 on padding, and the score is read at the row's last non-pad token. Rows are
tokenized by ``preference_data.conversation_ids``, which ends every row at the reply's
end-of-turn token, so a scored rollout (which stops at that token) and a training pair are read
at the same place.

On disk (``save_reward_model``): ``reward_model.json`` (the grade names, the trunk's kind, the
base model's fingerprint, ``adapters.peft_io.base_fingerprint``, and the tokenizer's), the heads
in ``reward_heads.safetensors``, and the trunk beside them: nothing (heads over the frozen
base), a PEFT adapter's files (so the directory is also a PEFT adapter directory), or full
weights as an afmkit checkpoint's files (so ``afmkit.load`` opens the trunk). Loading checks
the tokenizer (always) and the base (adapter and heads-only trunks) and refuses a mismatch with
one line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from afmkit.adapters.lora import LoraAdapter, single
from afmkit.adapters.peft_io import base_fingerprint, load_adapter, read_safetensors, save_adapter, write_safetensors
from afmkit.config import ModelConfig
from afmkit.errors import CorruptFileError, UserError
from afmkit.files import atomic_directory
from afmkit.model.packed import dequantize_params, is_packed
from afmkit.model.transformer import Params, forward

GRADE_NAMES = ("instruction_following", "verbosity", "truthfulness", "harmlessness")
GRADE_LEVELS = 3  # e.g. poor / acceptable / good

FORMAT = "afmkit-reward-model"
VERSION = 1
META_FILE = "reward_model.json"
HEADS_FILE = "reward_heads.safetensors"
SCORE_BUCKET = 64  # scored rows are padded to a multiple of this many tokens

Heads = dict[str, dict[str, jax.Array]]


def init_reward_heads(config: ModelConfig, key: jax.Array) -> Heads:
    """Fresh fp32 heads: ``score`` (``w [d]``, ``b []``) and ``grades`` (``w [d, H, 3]``,
    ``b [H, 3]``). Weights ~ N(0, 1/d): the final norm makes the last-token embedding's entries
    O(1), so initial scores and grade logits are O(1) too."""
    d = config.d_model
    score_key, grade_key = jax.random.split(key)
    std = 1.0 / np.sqrt(d)
    return {
        "score": {"w": std * jax.random.normal(score_key, (d,), jnp.float32), "b": jnp.zeros((), jnp.float32)},
        "grades": {
            "w": std * jax.random.normal(grade_key, (d, len(GRADE_NAMES), GRADE_LEVELS), jnp.float32),
            "b": jnp.zeros((len(GRADE_NAMES), GRADE_LEVELS), jnp.float32),
        },
    }


def last_token_index(segment_ids: jax.Array) -> jax.Array:
    """Index of each row's last non-pad token (``segment_ids > 0``) ``[B]``; 0 for an empty row."""
    real = segment_ids > 0
    from_end = jnp.argmax(real[:, ::-1], axis=1)
    return jnp.where(real.any(axis=1), real.shape[1] - 1 - from_end, 0)


def apply_heads(heads: Heads, embedding: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Scores ``[B]`` and grade logits ``[B, H, 3]`` from last-token embeddings ``[B, d]`` (fp32)."""
    embedding = embedding.astype(jnp.float32)
    scores = embedding @ heads["score"]["w"] + heads["score"]["b"]
    grade_logits = jnp.einsum("bd,dhl->bhl", embedding, heads["grades"]["w"]) + heads["grades"]["b"]
    return scores, grade_logits


def reward_outputs(
    params: Params,
    heads: Heads,
    tokens: jax.Array,
    positions: jax.Array,
    segment_ids: jax.Array,
    *,
    config: ModelConfig,
    adapters: Any = None,
    activation_dtype: Any = None,
) -> tuple[jax.Array, jax.Array]:
    """``(scores [B], grade_logits [B, H, 3])`` for right-padded rows ``tokens [B, T]`` (one
    conversation per row; ``segment_ids`` 1 on its tokens, 0 on padding), read from the final
    hidden state of each row's last token. ``adapters``: a LoRA trunk (``lora.single(adapter)``
    or a ``SingleAdapter`` of trainable weights), as ``forward`` takes it."""
    hidden, _ = forward(
        params,
        tokens,
        positions,
        None,
        config=config,
        activation_dtype=activation_dtype,
        segment_ids=segment_ids,
        adapters=adapters,
    )
    last = last_token_index(segment_ids)
    embedding = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
    return apply_heads(heads, embedding)


# -- a trained reward model -------------------------------------------------------------------
def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A short hash of what turns text into the ids a reward model reads: the vocabulary in id
    order, the special tokens and the chat template."""
    digest = hashlib.sha256()
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    digest.update("\x00".join(sorted(vocab, key=vocab.__getitem__)).encode())
    specials = [tokenizer.bos_token, tokenizer.eos_token, list(tokenizer.stop_tokens), tokenizer.chat_template]
    digest.update(json.dumps(specials).encode())
    return digest.hexdigest()[:24]


@dataclasses.dataclass
class RewardModel:
    """A loaded reward model: the trunk's weights (the base, or full fine-tuned weights), its
    optional LoRA adapter, the heads and the tokenizer."""

    config: ModelConfig
    params: Params
    heads: Heads
    tokenizer: Any
    adapter: LoraAdapter | None = None
    name: str = ""

    def outputs(self, tokens: Any, segment_ids: Any) -> tuple[np.ndarray, np.ndarray]:
        """Scores ``[B]`` and grade probabilities ``[B, H, 3]`` of right-padded rows."""
        tokens = jnp.asarray(tokens, jnp.int32)
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        adapters = None if self.adapter is None else single(self.adapter)
        scores, grade_logits = _jitted_outputs(
            self.params, self.heads, tokens, positions, jnp.asarray(segment_ids, jnp.int32), self.config, adapters
        )
        return np.asarray(scores), np.asarray(jax.nn.softmax(grade_logits, axis=-1))

    def score(self, conversations: Sequence[Sequence[dict[str, str]]], *, batch: int = 8) -> np.ndarray:
        """Scores ``[N]`` of whole conversations (each ending with the assistant's reply), in
        their order. Rows are batched by length and padded to a multiple of ``SCORE_BUCKET``
        tokens, so padding stays small and few shapes compile; a row's score does not depend
        on its padding (it is read at its own last token, and padding is its own segment)."""
        from afmkit.posttrain.preference_data import conversation_ids, pad_rows

        rows = [conversation_ids(self.tokenizer, list(messages)) for messages in conversations]
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        scores = np.zeros((len(rows),), np.float32)
        for lo in range(0, len(order), batch):
            chunk = order[lo : lo + batch]
            longest = max(len(rows[i]) for i in chunk)
            length = -(-longest // SCORE_BUCKET) * SCORE_BUCKET
            tokens, segment_ids = pad_rows([rows[i] for i in chunk] + [[]] * (batch - len(chunk)), length)
            scores[chunk] = self.outputs(tokens, segment_ids)[0][: len(chunk)]
        return scores


_jitted_outputs = jax.jit(
    lambda params, heads, tokens, positions, segment_ids, config, adapters: reward_outputs(
        params, heads, tokens, positions, segment_ids, config=config, adapters=adapters
    ),
    static_argnums=(5,),
)


def save_reward_model(
    directory: str | os.PathLike,
    heads: Heads,
    *,
    config: ModelConfig,
    base_params: Params,
    tokenizer: Any,
    adapter: LoraAdapter | None = None,
    trunk_params: Params | None = None,
    base_name: str = "",
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write a trained reward model atomically: the heads plus the trunk, which is the frozen base
    (neither ``adapter`` nor ``trunk_params``), a LoRA ``adapter`` over it, or full fine-tuned
    ``trunk_params``. ``base_params`` is the base it was trained from (for its fingerprint)."""
    if adapter is not None and trunk_params is not None:
        raise ValueError("a reward model's trunk is an adapter or full weights, not both")
    _check_heads(heads, config, source="the heads")
    trunk = "adapter" if adapter is not None else "full" if trunk_params is not None else "base"
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "grades": list(GRADE_NAMES),
        "grade_levels": GRADE_LEVELS,
        "trunk": trunk,
        "base_fingerprint": base_fingerprint(config, base_params),
        "base_config": config.name,
        "base_name": base_name or config.name,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
    }
    tensors = {
        f"{head}.{part}": np.asarray(value, np.float32)
        for head, parts in heads.items()
        for part, value in parts.items()
    }
    with atomic_directory(directory) as tmp:
        write_safetensors(tmp / HEADS_FILE, tensors)
        part = tmp / "trunk.part"
        if adapter is not None:
            save_adapter(part, adapter, config=config, params=base_params, base_name=base_name)
        if trunk_params is not None:
            from afmkit.interop.native import save_checkpoint

            full = dequantize_params(trunk_params) if is_packed(trunk_params) else trunk_params
            save_checkpoint(part, config, full, tokenizer)
        if part.exists():  # flat: atomic_directory syncs files, not sub-directories
            for path in part.iterdir():
                path.rename(tmp / path.name)
            part.rmdir()
        for file_name, text in (extra_files or {}).items():
            (tmp / file_name).write_text(text)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
    return Path(directory)


def read_reward_metadata(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise UserError(f"{directory} is not a reward model (no {META_FILE}); train one with 'afmkit posttrain reward'")
    try:
        meta = json.loads(path.read_text())
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptFileError(f"cannot read {path}: {exc}; the reward model is damaged") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise UserError(
            f"{directory} is not an afmkit reward model of version {VERSION} "
            f"(found {meta.get('format')} v{meta.get('version')})"
        )
    if meta.get("grades") != list(GRADE_NAMES) or meta.get("grade_levels") != GRADE_LEVELS:
        raise UserError(f"{directory} has grade heads {meta.get('grades')}; this afmkit reads {list(GRADE_NAMES)}")
    return meta


def load_reward_model(directory: str | os.PathLike, base: Any, *, dtype: Any = None) -> RewardModel:
    """Load a reward model for ``base`` (an ``afmkit.LanguageModel``: the model whose tokenizer
    produces the ids it will score and, for adapter or heads-only trunks, the weights it runs on).

    Refused with one line: another tokenizer (always), another base (adapter and heads-only
    trunks, by ``base_fingerprint``). A full-weight trunk loads with ``dtype``."""
    directory = Path(directory)
    meta = read_reward_metadata(directory)
    name = directory.name
    tokenizer_print = tokenizer_fingerprint(base.tokenizer)
    if meta.get("tokenizer_fingerprint") != tokenizer_print:
        raise UserError(
            f"reward model {name!r} was trained with another tokenizer (fingerprint "
            f"{meta.get('tokenizer_fingerprint')}, base {meta.get('base_name')!r}) than {base.name!r}'s "
            f"({tokenizer_print}); use it with a model of that tokenizer, or train one for this model"
        )
    if meta["trunk"] in ("adapter", "base"):
        expected = base_fingerprint(base.config, base.params)
        if meta.get("base_fingerprint") != expected:
            raise UserError(
                f"reward model {name!r} was trained on another base model (fingerprint {meta.get('base_fingerprint')}, "
                f"base {meta.get('base_name')!r}); {base.name!r} has fingerprint {expected}. "
                "Load it with the model it was made for, or retrain it for this one"
            )
    config, params, adapter = base.config, base.params, None
    if meta["trunk"] == "adapter":
        adapter = load_adapter(directory, config=config, fingerprint=meta["base_fingerprint"], name=name)
    elif meta["trunk"] == "full":
        from afmkit.lm import load

        trunk = load(directory, dtype=dtype)
        config, params = trunk.config, trunk.params
    elif meta["trunk"] != "base":
        raise CorruptFileError(f"{directory / META_FILE}: unknown trunk {meta['trunk']!r}")
    tensors = read_safetensors(directory / HEADS_FILE)
    try:
        heads = {
            # write_safetensors stores a scalar as [1] (np.ascontiguousarray makes 0-d arrays 1-d).
            "score": {"w": jnp.asarray(tensors["score.w"]), "b": jnp.asarray(tensors["score.b"]).reshape(())},
            "grades": {"w": jnp.asarray(tensors["grades.w"]), "b": jnp.asarray(tensors["grades.b"])},
        }
    except KeyError as exc:
        raise CorruptFileError(
            f"{directory / HEADS_FILE} lacks the tensor {exc}; the reward model is damaged"
        ) from None
    _check_heads(heads, config, source=str(directory / HEADS_FILE))
    return RewardModel(config=config, params=params, heads=heads, tokenizer=base.tokenizer, adapter=adapter, name=name)


def _check_heads(heads: Heads, config: ModelConfig, *, source: str) -> None:
    want = {
        "score": {"w": (config.d_model,), "b": ()},
        "grades": {"w": (config.d_model, len(GRADE_NAMES), GRADE_LEVELS), "b": (len(GRADE_NAMES), GRADE_LEVELS)},
    }
    got = {head: {part: tuple(np.shape(v)) for part, v in parts.items()} for head, parts in heads.items()}
    if got != want:
        raise UserError(f"{source}: head shapes {got} do not fit a model of d_model={config.d_model} (need {want})")
