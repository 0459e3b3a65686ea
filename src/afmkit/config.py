"""Model configurations and the registry of named sizes.

A config holds shapes and hyper-parameters only; weights live outside the code. Numbers for the
AFM sizes come from ``AFM_SPEC.md``; where Apple published nothing, the value is our own choice
and says so in ``note``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from afmkit.errors import UserError

QK_NORM_POSITIONS = ("before_rope", "after_rope")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Shape of a decoder-only AFM-style transformer."""

    name: str
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    rope_base: float = 10_000.0
    norm_eps: float = 1e-5
    qk_norm: bool = False
    # Where q/k RMSNorm sits relative to RoPE. AXLearn (AFM's own code) rotates first and then
    # normalizes ("after_rope"); Qwen3 and OLMo-2 normalize first ("before_rope"). RoPE keeps each
    # head vector's RMS, so the two differ only through the learned per-dimension scale.
    qk_norm_position: str = "before_rope"
    # AFM stores one embedding for input and output ("mapped without duplications"); some
    # imported Llama-family checkpoints have a separate output matrix.
    tie_embeddings: bool = True
    max_seq_len: int = 4096
    # AFM's auxiliary z-loss coefficient (``z_loss * logsumexp(logits)**2`` per token), the one
    # source of it: the training loss reads it, ``afmkit pretrain --z-loss`` replaces it.
    z_loss: float = 1e-6
    note: str = ""

    def __post_init__(self) -> None:
        for field in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff"):
            if getattr(self, field) <= 0:
                raise UserError(f"model config {self.name!r}: {field} must be positive")
        if self.n_heads % self.n_kv_heads:
            raise UserError(
                f"model config {self.name!r}: n_heads ({self.n_heads}) must be a multiple of "
                f"n_kv_heads ({self.n_kv_heads}) for grouped-query attention"
            )
        if self.head_dim % 2:
            raise UserError(f"model config {self.name!r}: head_dim must be even for RoPE")
        if self.qk_norm_position not in QK_NORM_POSITIONS:
            raise UserError(
                f"model config {self.name!r}: qk_norm_position must be one of {', '.join(QK_NORM_POSITIONS)}, "
                f"got {self.qk_norm_position!r}"
            )
        if self.z_loss < 0:
            raise UserError(f"model config {self.name!r}: z_loss must be >= 0, got {self.z_loss}")

    # -- parameter counts, from shapes alone (nothing is allocated) --------------------------
    @property
    def embedding_params(self) -> int:
        tables = 1 if self.tie_embeddings else 2
        return tables * self.vocab_size * self.d_model

    @property
    def params_per_layer(self) -> int:
        d, hd = self.d_model, self.head_dim
        attention = d * self.n_heads * hd * 2 + d * self.n_kv_heads * hd * 2
        mlp = 3 * d * self.d_ff
        norms = 2 * d + (2 * hd if self.qk_norm else 0)
        return attention + mlp + norms

    @property
    def non_embedding_params(self) -> int:
        return self.n_layers * self.params_per_layer + self.d_model  # + final norm

    @property
    def total_params(self) -> int:
        return self.embedding_params + self.non_embedding_params

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"unknown model config fields {unknown}; known fields: {sorted(known)}")
        return cls(**data)

    def check_context(self, tokens: int, *, what: str, fix: str) -> None:
        """The model's context rule, for every caller: ``tokens`` positions must fit."""
        check_context(tokens, self.max_seq_len, what=what, fix=fix, whose=f"{self.name}'s context")

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


_SIZES = [
    ModelConfig(
        name="afm-on-device",
        vocab_size=49_152,
        d_model=3072,
        n_layers=26,
        n_heads=24,
        n_kv_heads=8,
        head_dim=128,
        d_ff=8064,
        rope_base=500_000.0,
        qk_norm=True,
        qk_norm_position="after_rope",
        max_seq_len=4096,
        note="AFM-on-device as published (arXiv 2407.21075): ~2.58B non-embedding parameters.",
    ),
    ModelConfig(
        name="afm-server",
        vocab_size=100_352,
        d_model=6144,
        n_layers=48,
        n_heads=48,
        n_kv_heads=8,
        head_dim=128,
        d_ff=16_384,
        rope_base=500_000.0,
        qk_norm=True,
        qk_norm_position="after_rope",
        max_seq_len=4096,
        note=(
            "Only the ~100K vocabulary is published. Depth, width, heads and FFN are afmkit's "
            "assumption (the on-device recipe scaled to ~19B); vocab rounded up to 784*128."
        ),
    ),
    ModelConfig(
        name="smollm2-135m",
        vocab_size=49_152,
        d_model=576,
        n_layers=30,
        n_heads=9,
        n_kv_heads=3,
        head_dim=64,
        d_ff=1536,
        rope_base=100_000.0,
        max_seq_len=8192,
        note="Shape of SmolLM2-135M; the instruct weights load as 'smollm2-135m-instruct'.",
    ),
    ModelConfig(
        name="afm-tiny",
        vocab_size=49_152,
        d_model=256,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        head_dim=64,
        d_ff=768,
        rope_base=500_000.0,
        qk_norm=True,
        qk_norm_position="after_rope",
        max_seq_len=1024,
        note="A few-layer AFM (GQA, q/k-norm, tied embedding) that trains on a CPU; SmolLM2 vocab.",
    ),
    ModelConfig(
        name="test-tiny",
        vocab_size=512,
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=16,
        d_ff=192,
        rope_base=10_000.0,
        qk_norm=True,
        max_seq_len=256,
        note="For unit tests only.",
    ),
]

SIZES: dict[str, ModelConfig] = {c.name: c for c in _SIZES}


def check_context(tokens: int, limit: int, *, what: str, fix: str, whose: str = "the context") -> None:
    """One rule and one message for every context-length check (model, batch, server): a
    ``UserError`` naming the count, the limit and the fix when ``tokens > limit``."""
    if tokens > limit:
        raise UserError(f"{what} is {tokens} tokens, more than {whose} of {limit}; {fix}")


def get_size(name: str) -> ModelConfig:
    """The registered config called ``name``; a clear error lists the known ones."""
    try:
        return SIZES[name]
    except KeyError:
        raise UserError(f"unknown model size {name!r}; known sizes: {', '.join(SIZES)}") from None
