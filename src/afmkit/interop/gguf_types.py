"""How a GGUF file stores its layer matrices, read from its header alone.

``gguf.GGUFReader`` parses every metadata value (SmolLM2's vocabulary and merges: seconds);
deciding a default weight format (``afmkit.lm.default_dtype``) needs only the tensor types, so
this walks past the metadata without decoding it.
"""

from __future__ import annotations

import mmap
import os
import re
import struct

from afmkit.errors import CorruptFileError

# Sizes of GGUF's scalar metadata types (8 is a string, 9 an array).
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


def tensor_types(path: str | os.PathLike) -> dict[str, str]:
    """Each tensor's name and GGML type name (``"Q4_1"``, ``"F32"``...)."""
    from gguf import GGMLQuantizationType

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        try:
            return _read_tensor_types(data, GGMLQuantizationType)
        except (struct.error, ValueError) as exc:
            raise CorruptFileError(f"{path} is not a readable GGUF file ({exc})") from None


def _read_tensor_types(data: mmap.mmap, type_names) -> dict[str, str]:
    if data[:4] != b"GGUF":
        raise ValueError("no GGUF magic number")
    tensors, kvs = struct.unpack_from("<QQ", data, 8)
    at = 24

    def string() -> str:
        nonlocal at
        (length,) = struct.unpack_from("<Q", data, at)
        at += 8 + length
        return data[at - length : at].decode("utf-8", "replace")

    def skip(kind: int) -> None:
        nonlocal at
        if kind in _SCALAR_SIZES:
            at += _SCALAR_SIZES[kind]
        elif kind == _STRING:
            (length,) = struct.unpack_from("<Q", data, at)
            at += 8 + length
        elif kind == _ARRAY:
            item, count = struct.unpack_from("<IQ", data, at)
            at += 12
            if item in _SCALAR_SIZES:
                at += _SCALAR_SIZES[item] * count
            else:
                for _ in range(count):
                    skip(item)
        else:
            raise ValueError(f"unknown metadata type {kind}")

    for _ in range(kvs):
        string()
        (kind,) = struct.unpack_from("<I", data, at)
        at += 4
        skip(kind)
    types = {}
    for _ in range(tensors):
        name = string()
        (dims,) = struct.unpack_from("<I", data, at)
        at += 4 + 8 * dims
        (kind,) = struct.unpack_from("<I", data, at)
        at += 4 + 8  # type, then the data offset
        types[name] = type_names(kind).name
    return types


def matrix_bits(path: str | os.PathLike) -> int | None:
    """The most bits any layer matrix (``blk.*.weight``, 2-D) of the file is quantized to: 4 for
    SmolLM2's Q4_1, 8 for Q8_0, 6 for a Q4_K_M file's Q6_K matrices; None when they are floats
    (F32, F16, BF16)."""
    bits = [
        int(match.group(1))
        for name, kind in tensor_types(path).items()
        if name.startswith("blk.") and not name.endswith("_norm.weight")
        for match in [re.match(r"T?I?Q(\d)", kind)]
        if match
    ]
    return max(bits) if bits else None
