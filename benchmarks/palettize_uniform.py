"""The named compressed model's build at one width for every matrix (issue 13's "palettized 4-bit"
and "2-bit everywhere" rows): the same base, table layout, embedding and committed rank-1 k-means
importance as ``smollm2-135m-instruct-3.5bpw``, every matrix at ``--bits`` instead of its recipe's
allocation. Saved as an afmkit directory that ``afmkit.load``, ``eval`` and ``compress recover`` take.

    python benchmarks/palettize_uniform.py --bits 4 --out pal4
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from afmkit import lm
from afmkit.compress import named
from afmkit.compress.palettize import bits_per_weight, palettize_params
from afmkit.interop import native
from afmkit.weights import NAMED_COMPRESSED


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bits", type=int, choices=(2, 3, 4, 8), required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--name", default="smollm2-135m-instruct-3.5bpw", choices=sorted(NAMED_COMPRESSED))
    args = parser.parse_args()

    settings = NAMED_COMPRESSED[args.name]
    base = lm.load(settings.base, dtype="float32")
    recipe, importance = named.committed_resources(settings, base)
    params = palettize_params(
        base.params,
        {name: args.bits for name in recipe.bits},
        embed_bits=recipe.embed_bits,
        group_rows=recipe.group_rows,
        per_row_scale=recipe.per_row_scale,
        importance=importance,
    )
    native.save_checkpoint(args.out, base.config, params, base.tokenizer)
    print(json.dumps({"out": str(args.out), "bits": args.bits, "bits_per_weight": bits_per_weight(params)}))


if __name__ == "__main__":
    main()
