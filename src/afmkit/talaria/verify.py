"""Verify a recipe: compress with it (``afmkit compress palettize --recipe``'s own code), load the
result, and measure what the page predicted: size, single-stream decode time per token and
perplexity on the held-out text."""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from afmkit.compress.recipe import Recipe, parse_recipe
from afmkit.talaria.settings import TalariaSettings

_DEFAULTS = TalariaSettings()

PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time"
Progress = Callable[[str, float], None]


def recipe_of(analysis: Mapping[str, Any], data: Any, *, source: str) -> Recipe:
    """``parse_recipe`` of page JSON against the analysed model: its refusals are the page's."""
    return parse_recipe(
        data,
        source=source,
        fingerprint=analysis["model"]["fingerprint"],
        matrices=analysis["matrices"],
        model_name=analysis["model"]["name"],
    )


def make_recipe(analysis: Mapping[str, Any], bits: Mapping[str, int], embed_bits: int = 8) -> Recipe:
    """The recipe the page exports for ``bits``: the analysed table layout and calibration."""
    from afmkit.talaria.roofline import predict

    predicted = predict(analysis, bits, embed_bits)
    return Recipe(
        model_name=analysis["model"]["name"],
        fingerprint=analysis["model"]["fingerprint"],
        bits={name: int(bits[name]) for name in analysis["matrices"]},
        group_rows=analysis["group_rows"],
        per_row_scale=analysis["per_row_scale"],
        embed_bits=embed_bits,
        calibration=analysis["sensitivity"]["calibration"],
        predicted={
            "bits_per_weight": predicted["bits_per_weight"],
            "sensitivity": predicted["loss_rise"],
            "sensitivity_kind": analysis["sensitivity"]["kind"],
        },
    )


def decode_seconds_per_token(model: Any, *, tokens: int, runs: int = 3) -> float:
    """Median single-stream decode time per token over ``runs`` greedy generations (after one to
    compile), from the engine's own decode timing (prefill excluded)."""
    model.generate(PROMPT, max_new_tokens=tokens, temperature=0.0, stop=())
    times = []
    for _ in range(runs):
        completion = model.generate(PROMPT, max_new_tokens=tokens, temperature=0.0, stop=())
        rate = completion.timings["decode_tok_s"]
        times.append(1.0 / rate if rate > 0 else float("nan"))
    return statistics.median(times)


def verify(
    model: Any,
    analysis: Mapping[str, Any],
    recipe: Recipe,
    eval_text: str,
    settings: TalariaSettings = _DEFAULTS,
    *,
    progress: Progress = lambda phase, fraction: None,
    workdir: str | None = None,
) -> dict[str, Any]:
    """Compress ``model`` (float) with ``recipe`` and measure the result."""
    import afmkit
    from afmkit.compress.cli import compress
    from afmkit.compress.settings import CompressSettings
    from afmkit.eval.perplexity import perplexity_of_text

    calibration = analysis["sensitivity"]["calibration"]
    keyed = analysis["sensitivity"]["settings"]
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        recipe_path = recipe.save(Path(tmp) / "recipe.json")
        out = Path(tmp) / "model"
        progress("compressing", 0.05)
        begin = time.perf_counter()
        report = compress(
            model,
            CompressSettings(
                recipe=str(recipe_path),
                calibration=calibration["file"],
                calibration_start=keyed["calibration_start"],
                calibration_tokens=keyed["calibration_tokens"],
                seq_len=keyed["seq_len"],
                out=str(out),
            ),
            model_name=model.name,
            quiet=True,
        )
        compress_seconds = time.perf_counter() - begin
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file() and f.suffix == ".safetensors")
        progress("loading", 0.5)
        compressed = afmkit.load(out)
        progress("decoding", 0.6)
        decode_s = decode_seconds_per_token(compressed, tokens=settings.decode_tokens)
        progress("perplexity", 0.8)
        ppl = perplexity_of_text(
            compressed, eval_text, seq_len=analysis["eval"]["seq_len"], stride=analysis["eval"]["stride"]
        ).perplexity
        progress("done", 1.0)
    return {
        "bits_per_weight": report["bits_per_weight"],
        "file_bytes": size,
        "decode_s": decode_s,
        "perplexity": ppl,
        "compress_seconds": compress_seconds,
        "recipe": json.loads(json.dumps(recipe.to_dict())),
    }
