"""Native CPU kernels, compiled on first use and called from jitted code through XLA's FFI.

XLA:CPU has no matmul that reads 4- or 8-bit weights without first writing them out in full
precision, and it copies a sliced KV cache before attending to it; both make decoding slow.
``cpu_kernels.cc`` has a packed-weight matmul that dequantizes in registers and a decode
attention that reads the cache in place. It is compiled here, on the machine that runs it
(``-march=native``), with the system C++ compiler and JAX's FFI headers, and cached under
``~/.cache/afmkit/kernels`` keyed by the source, the compiler and its flags, jax and the CPU
(``AFMKIT_KERNEL_FLAGS`` adds flags, e.g. ``-mno-avx512f`` to try the portable code). Without a
compiler (or with ``AFMKIT_KERNELS=0``) callers use plain XLA, which gives the same numbers
(up to float rounding) more slowly.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from afmkit.runtime import cache_dir

KERNEL_SOURCE = Path(__file__).with_name("cpu_kernels.cc")
# FFI target name -> symbol in the library
TARGETS = {
    "afmkit_packed_matmul": "AfmkitPackedMatmul",
    "afmkit_decode_attention": "AfmkitDecodeAttention",
    "afmkit_paged_decode_attention": "AfmkitPagedDecodeAttention",
    "afmkit_lazy_zeros": "AfmkitLazyZeros",
}

# The palettized (look-up-table) weight kernel: its own library, built and loaded beside the first.
PALETTIZED_SOURCE = Path(__file__).with_name("palettized_kernels.cc")


def _cache_root() -> Path:
    return cache_dir() / "kernels"


def cpu_identity() -> str:
    """What ``-march=native`` (and XLA:CPU's code) depends on: the CPU's model name and feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    wanted = [line for line in lines if line.startswith(("model name", "flags"))][:2]
    return "\n".join(wanted) or platform.machine()


def cpu_name() -> str:
    """The CPU's model name, as benchmarks and Talaria record it beside their timings."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def build(compiler: str, source_file: Path = KERNEL_SOURCE) -> Path:
    """Compile a kernel library (once per source, compiler, jax and CPU); return its path."""
    # the source and the headers beside it that it may include
    source = b"".join(path.read_bytes() for path in [source_file, *sorted(source_file.parent.glob("*.h"))])
    flags = [
        "-O3",
        "-march=native",
        "-std=c++17",
        "-ffp-contract=off",  # a * b + c rounds twice wherever it is written (see cpu_kernels.cc)
        "-shared",
        "-fPIC",
        *os.environ.get("AFMKIT_KERNEL_FLAGS", "").split(),
    ]
    key = hashlib.sha256(
        b"|".join(
            [source, compiler.encode(), " ".join(flags).encode(), jax.__version__.encode(), cpu_identity().encode()]
        )
    ).hexdigest()[:16]
    library = _cache_root() / f"{source_file.stem}-{key}.so"
    if library.is_file():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=library.parent) as scratch:
        built = Path(scratch) / library.name
        command = [compiler, *flags, f"-I{jax.ffi.include_dir()}", str(source_file), "-o", str(built)]
        try:
            result = subprocess.run(command, capture_output=True, text=True)
        except OSError as exc:
            raise RuntimeError(f"cannot run {compiler}: {exc}") from None
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
        os.replace(built, library)  # atomic: a concurrent process sees the whole file or none
    return library


_features: dict = {"bf16": False, "isa": None}


_lock = threading.Lock()


def available() -> bool:
    """Whether the kernels are built and registered with XLA for the CPU backend (once per process;
    a failure is reported once on stderr, and callers fall back to plain XLA)."""
    with _lock:  # the server's scheduler thread and the main thread may both ask first
        return _load()


@functools.cache
def _load() -> bool:
    if os.environ.get("AFMKIT_KERNELS", "1") == "0":
        return False
    compiler = _compiler()
    if compiler is None:
        print("afmkit: no C++ compiler found; decoding runs through plain XLA (slower)", file=sys.stderr)
        return False
    try:
        library = ctypes.cdll.LoadLibrary(str(build(compiler)))
        for target, symbol in TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
        _features["bf16"] = bool(library.AfmkitHasBf16())
        library.AfmkitIsa.restype = ctypes.c_char_p
        _features["isa"] = library.AfmkitIsa().decode()
        library.AfmkitBf16Arithmetic.restype = ctypes.c_char_p
        _features["bf16_arithmetic"] = library.AfmkitBf16Arithmetic().decode()
        palettized = ctypes.cdll.LoadLibrary(str(build(compiler, PALETTIZED_SOURCE)))
        target = jax.ffi.pycapsule(palettized.AfmkitPalettizedMatmul)
        jax.ffi.register_ffi_target("afmkit_palettized_matmul", target, platform="cpu")
        int8_target = jax.ffi.pycapsule(palettized.AfmkitPalettizedMatmulInt8)
        jax.ffi.register_ffi_target("afmkit_palettized_matmul_int8", int8_target, platform="cpu")
        palettized.AfmkitPalettizedInt8Isa.restype = ctypes.c_char_p
        _features["palettized_int8_isa"] = palettized.AfmkitPalettizedInt8Isa().decode()
    except (OSError, RuntimeError, AttributeError) as exc:
        print(f"afmkit: could not build the CPU kernels, using plain XLA: {exc}", file=sys.stderr)
        return False
    return True


def has_bf16() -> bool:
    """Whether the kernels were built with bf16 dot products (the CPU has AVX512-BF16)."""
    return available() and _features["bf16"]


def describe() -> str:
    """Which code multiplies packed and palettized weights here: ``native avx512-bf16`` (or
    ``avx512``, ``avx2``, ``portable``: what the kernels were built for), followed on CPUs with AMX
    by ``, amx`` (batches run on the tiles) or ``, amx-emulated`` (AMX's sums without the tiles;
    see ``bf16_arithmetic``), or ``xla`` (no kernels: plain XLA). Benchmarks record it beside
    their timings, since the tiles change a prefill's speed severalfold."""
    if not on_cpu():
        return "xla"
    arithmetic = bf16_arithmetic()
    return f"native {_features['isa']}" + (f", {arithmetic}" if arithmetic.startswith("amx") else "")


def on_cpu() -> bool:
    """Whether jitted code runs on the CPU with the kernels available."""
    return jax.default_backend() == "cpu" and available()


def _require() -> None:
    if not available():
        raise RuntimeError("afmkit's CPU kernels are not available here (see the message above); use the XLA path")


def packed_matmul(
    x: jax.Array, packed: jax.Array, scales: jax.Array, *, bits: int, n: int, bf16: bool = False
) -> jax.Array:
    """``x [M, K]`` (fp32) times a packed ``[K, n]`` weight (``afmkit.model.packed``). With
    ``bf16`` (and a CPU with AVX512-BF16), x is rounded to bf16 for the dot products: twice the
    arithmetic rate, for prefill; the weights stay exact and accumulation is fp32 either way. On
    CPUs with AMX, batches of 5 rows or more run on its tiles, with the same sums at every row count
    (``bf16_arithmetic``)."""
    _require()
    call = jax.ffi.ffi_call(
        "afmkit_packed_matmul", jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32), vmap_method="sequential"
    )
    return call(x, packed, scales, bits=np.int64(bits), bf16=bool(bf16))


def palettized_matmul(
    x: jax.Array,
    indices: jax.Array,
    tables: jax.Array,
    scales: jax.Array | None,
    *,
    bits: int,
    bf16: bool = False,
    int8_activations: bool = False,
) -> jax.Array:
    """``x [M, K]`` (fp32) times a palettized ``[K, N]`` weight (``afmkit.model.palettized``: indices
    ``[N / 16, K / 8, bits, 16]``, tables ``[groups, 2^bits]`` of a multiple of 16 rows each, scales
    ``[N]`` or None; fp16 or fp32, multiplied in fp32), table entries expanded in registers.

    ``bf16`` (and a CPU with AVX512-BF16): x and the table entries rounded to bf16 for the CPU's bf16
    dot products (fp32 accumulation, scales in fp32), at every row count, on AMX's tiles from 3 rows
    where the CPU has them, with the same sums at every row count (``bf16_arithmetic``); otherwise
    fp32 products.

    ``int8_activations``: each row of x and each table quantized to int8 by its own absmax scale
    (as ``afmkit.model.palettized.quantize_rows`` / ``int8_tables``), the sums exact in int32 (VNNI
    dot products where the CPU has AVX512-VNNI and VBMI, else portable integer code), then
    ``* x_scale[m] * (t_scale * scale)[n]`` in fp32."""
    _require()
    n = indices.shape[0] * indices.shape[3]
    tables = tables.astype(jnp.float32)
    scales = jnp.zeros((0,), jnp.float32) if scales is None else scales.astype(jnp.float32)
    out = jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32)
    if int8_activations:
        call = jax.ffi.ffi_call("afmkit_palettized_matmul_int8", out, vmap_method="sequential")
        return call(x, indices, tables, scales, bits=np.int64(bits))
    call = jax.ffi.ffi_call("afmkit_palettized_matmul", out, vmap_method="sequential")
    return call(x, indices, tables, scales, bits=np.int64(bits), bf16=bool(bf16))


def palettized_int8_isa() -> str:
    """Which code ``palettized_matmul(..., int8_activations=True)`` runs here: ``avx512-vnni``, ``portable`` or ``xla``."""
    return _features.get("palettized_int8_isa", "xla") if on_cpu() else "xla"


def bf16_arithmetic() -> str:
    """How the kernels' bf16 dot products sum here (``packed_matmul`` and ``palettized_matmul`` with
    ``bf16``), the same at every row count: ``amx`` (on CPUs with AMX: per block of 32 inputs an even
    and an odd sum from zero, then added to the total, as AMX's tiles sum, which run the larger
    batches), ``amx-emulated`` (the same sums without the tiles: the OS did not grant them, or
    ``AFMKIT_AMX=0``), ``pairs`` (one sum per output, each pair's odd then even product, as
    ``vdpbf16ps``), ``none`` (no bf16 path: fp32) or ``xla``."""
    return _features.get("bf16_arithmetic", "xla") if on_cpu() else "xla"


def decode_attention(q: jax.Array, keys: jax.Array, values: jax.Array, lengths: jax.Array, scale: float) -> jax.Array:
    """Softmax attention of one query per row, ``q [B, KV, G, D]``, over the first ``lengths[b]``
    positions of that row's cache (``keys [B', KV, D, C]``, ``values [B', KV, C, D]``, fp32)."""
    _require()
    call = jax.ffi.ffi_call(
        "afmkit_decode_attention", jax.ShapeDtypeStruct(q.shape, jnp.float32), vmap_method="sequential"
    )
    return call(q, keys, values, lengths.astype(jnp.int32), scale=np.float32(scale))


def paged_decode_attention(
    q: jax.Array, keys: jax.Array, values: jax.Array, tables: jax.Array, lengths: jax.Array, scale: float
) -> jax.Array:
    """``decode_attention`` over a paged cache, read in place block by block: the pool's keys
    ``[blocks, KV, D, page]`` and values ``[blocks, KV, page, D]`` (fp32), each row's block table
    ``tables [B', width]`` (an entry outside the pool reads zeros, as ``PagedLayer.read``)."""
    _require()
    call = jax.ffi.ffi_call(
        "afmkit_paged_decode_attention", jax.ShapeDtypeStruct(q.shape, jnp.float32), vmap_method="sequential"
    )
    return call(q, keys, values, tables.astype(jnp.int32), lengths.astype(jnp.int32), scale=np.float32(scale))


def lazy_zeros(shape: tuple[int, ...], dtype: Any) -> jax.Array:
    """A zero array whose memory the OS commits only as it is written (a large one: pages the
    kernel hands out on first write), for a buffer reserved at its largest and filled over time."""
    _require()
    return jax.ffi.ffi_call("afmkit_lazy_zeros", jax.ShapeDtypeStruct(shape, dtype))()
