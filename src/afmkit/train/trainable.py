"""What a training run trains: every weight, or a LoRA adapter over a frozen base.

A subset owns the tree that ``TrainState.params`` holds and says how it meets the model:

* ``FULL``: the fp32 weights themselves (pre-training; full fine-tuning from a model's weights);
* ``LoraWeights(lora)``: only the adapter's ``A``/``B`` (fp32 master copies, keyed by layer
  number as text so checkpoints can hold them); the base is a separate argument of the step,
  never differentiated, and may be packed int4/int8 (``afmkit.model.packed``, QLoRA-style).

Both give ``apply(weights, frozen) -> (params, adapters)``: what ``forward`` runs with.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from afmkit.adapters.lora import LoraAdapter, LoraConfig, SingleAdapter, init_adapter
from afmkit.config import ModelConfig
from afmkit.errors import UserError
from afmkit.model.packed import PackedWeight, is_packed
from afmkit.model.transformer import abstract_params, init_params
from afmkit.sharding.plan import param_shardings


def cast_floats(tree: Any, dtype: Any) -> Any:
    """fp32 arrays to ``dtype``; packed weights (and integers) as they are."""
    if dtype == jnp.float32:
        return tree

    def cast(x: Any) -> Any:
        return x if isinstance(x, PackedWeight) or not jnp.issubdtype(x.dtype, jnp.floating) else x.astype(dtype)

    return jax.tree.map(cast, tree, is_leaf=lambda x: isinstance(x, PackedWeight))


@dataclasses.dataclass(frozen=True)
class FullWeights:
    """Every weight trains; there is no frozen base."""

    def init(self, config: ModelConfig, key: jax.Array) -> Any:
        return init_params(config, key, jnp.float32)

    def abstract(self, config: ModelConfig) -> Any:
        return abstract_params(config, jnp.float32)

    def shardings(self, config: ModelConfig, mesh: Mesh) -> Any:
        return param_shardings(config, mesh)

    def frozen_shardings(self, config: ModelConfig, frozen: Any, mesh: Mesh) -> Any:
        if frozen is not None:
            raise ValueError("full-weight training has no frozen base")
        return None

    def apply(self, weights: Any, frozen: Any, *, config: ModelConfig, compute_dtype: Any) -> tuple[Any, Any]:
        del frozen, config
        return cast_floats(weights, compute_dtype), None


FULL = FullWeights()


@dataclasses.dataclass(frozen=True)
class LoraWeights:
    """Only a LoRA adapter trains, over a frozen base given to the step."""

    lora: LoraConfig

    def init(self, config: ModelConfig, key: jax.Array) -> Any:
        return self.tree(init_adapter(config, self.lora, key))

    def abstract(self, config: ModelConfig) -> Any:
        return jax.eval_shape(lambda key: self.init(config, key), jax.random.PRNGKey(0))

    def shardings(self, config: ModelConfig, mesh: Mesh) -> Any:
        replicated = NamedSharding(mesh, PartitionSpec())  # rank-r matrices: small, kept whole
        return jax.tree.map(lambda _: replicated, self.abstract(config))

    def frozen_shardings(self, config: ModelConfig, frozen: Any, mesh: Mesh) -> Any:
        if frozen is None:
            raise ValueError("a LoRA subset needs the frozen base weights")
        if is_packed(frozen):
            if mesh.size > 1:
                raise UserError(
                    "a packed (int4/int8) base trains on one device only (afmkit's CPU kernels); "
                    "load the base with --dtype float32 or bfloat16 to use a mesh"
                )
            replicated = NamedSharding(mesh, PartitionSpec())
            return jax.tree.map(lambda _: replicated, frozen)
        return param_shardings(config, mesh)

    def apply(self, weights: Any, frozen: Any, *, config: ModelConfig, compute_dtype: Any) -> tuple[Any, Any]:
        layers = [weights.get(str(i), {}) for i in range(config.n_layers)]
        return cast_floats(frozen, compute_dtype), SingleAdapter(weights=layers, scale=self.lora.scale)

    @staticmethod
    def tree(adapter: LoraAdapter) -> dict[str, Any]:
        """An adapter's weights as the trained tree: fp32, layers without updates left out."""
        return {
            str(i): jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), layer)
            for i, layer in enumerate(adapter.weights)
            if layer
        }

    def adapter(self, weights: Any, config: ModelConfig, *, name: str = "") -> LoraAdapter:
        """The trained tree as a ``LoraAdapter`` in its storage precision (host arrays)."""
        import numpy as np

        dtype = np.dtype(self.lora.dtype)
        layers = [
            jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32).astype(dtype), weights.get(str(i), {}))
            for i in range(config.n_layers)
        ]
        return LoraAdapter(config=self.lora, weights=layers, name=name)
