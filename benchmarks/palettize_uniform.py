"""The named compressed model's build at one width for every matrix (issue 13's "palettized 4-bit"
and "2-bit everywhere" rows): the same base, table layout, embedding and committed rank-1 k-means
importance as ``smollm2-135m-instruct-3.5bpw``, every matrix at ``--bits`` instead of its recipe's
allocation. Saved as an afmkit directory that ``afmkit.load``, ``eval`` and ``compress recover`` take.
With ``--calibration`` the indices are chosen by GPTQ (``afmkit.compress.gptq``) on that text's
layer inputs instead of nearest value (the named build's own choice).

    python benchmarks/palettize_uniform.py --bits 4 --out pal4
    python benchmarks/palettize_uniform.py --bits 2 --calibration recovery_mix_text.txt --out pal2-gptq
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from afmkit import lm
from afmkit.compress import named
from afmkit.compress.gptq import InputGrams
from afmkit.compress.palettize import bits_per_weight, palettize_params
from afmkit.compress.sensitivity import read_calibration
from afmkit.interop import native
from afmkit.weights import NAMED_COMPRESSED


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bits", type=int, choices=(2, 3, 4, 8), required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--name", default="smollm2-135m-instruct-3.5bpw", choices=sorted(NAMED_COMPRESSED))
    parser.add_argument("--calibration", help="text whose layer inputs GPTQ's index choice reads (else: nearest)")
    parser.add_argument("--calibration-start", type=int, default=0, help="its first character used")
    parser.add_argument("--calibration-tokens", type=int, default=32768, help="its tokens read, in windows of 512")
    args = parser.parse_args()

    settings = NAMED_COMPRESSED[args.name]
    base = lm.load(settings.base, dtype="float32")
    recipe, importance = named.committed_resources(settings, base)
    grams = None
    if args.calibration:
        windows = read_calibration(
            args.calibration, base.tokenizer, start=args.calibration_start, tokens=args.calibration_tokens
        ).windows
        grams = InputGrams(base.config, base.params, windows)
    params = palettize_params(
        base.params,
        {name: args.bits for name in recipe.bits},
        embed_bits=recipe.embed_bits,
        group_rows=recipe.group_rows,
        per_row_scale=recipe.per_row_scale,
        importance=importance,
        grams=grams,
    )
    native.save_checkpoint(args.out, base.config, params, base.tokenizer)
    codes = "nearest" if grams is None else f"gptq on {args.calibration}"
    print(
        json.dumps(
            {"out": str(args.out), "bits": args.bits, "bits_per_weight": bits_per_weight(params), "codes": codes}
        )
    )


if __name__ == "__main__":
    main()
