"""``afmkit compress palettize``: a float model to a palettized one, its bits chosen per matrix.

    afmkit compress palettize --model smollm2-135m-instruct --bits-per-weight 3.5 \\
        --calibration ../shared/data/pretrain/tinyshakespeare_input.txt --calibration-start 600000 --out DIR
    afmkit compress palettize --recipe recipe.json --calibration ... --out DIR   # bits from a recipe

``compress`` is a command group: ``palettize``, and ``recover`` (the accuracy-recovery adapter,
``afmkit.compress.recover``). The phases: load the model in float32; read the calibration text; analyse
(Fisher information, per-matrix sensitivity; cached, ``afmkit.compress.sensitivity``); choose the
bits (``afmkit.compress.allocate``) or read them from ``--recipe``; palettize with Fisher-weighted
k-means (``afmkit.compress.palettize``); save. ``DIR`` then holds the model (``afmkit.load(DIR)``),
``recipe.json`` (what was applied, reusable with ``--recipe``) and ``compress_report.json`` (bits
per weight, bits by matrix type, predicted sensitivity, seconds per phase).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from afmkit import cli_args
from afmkit.compress.settings import CODE_ASSIGNMENTS, SENSITIVITY_KINDS, CompressSettings
from afmkit.errors import UserError

DEFAULTS = CompressSettings()
RECIPE_FILE = "recipe.json"
REPORT_FILE = "compress_report.json"


def register(commands: argparse._SubParsersAction) -> None:
    from afmkit.cli_args import model_argument

    group = commands.add_parser("compress", help="on-device compression: palettize a model, recover its accuracy")
    actions = group.add_subparsers(dest="compress_command", required=True, metavar="ACTION")
    p = actions.add_parser(
        "palettize",
        help="palettize a float model's matrices under a bits-per-weight budget or a recipe",
        description="Palettize a float model's matrices (16-row k-means tables, Fisher-weighted; indices chosen "
        "by GPTQ on the calibration text unless --codes nearest), each at "
        "2, 3, 4 or 8 bits chosen from measured sensitivity under --bits-per-weight, or as a --recipe says. "
        "Writes the model, recipe.json and compress_report.json to --out (docs/compression.md).",
    )
    model_argument(p, role="the float model to compress", dtype=False)
    d = DEFAULTS
    p.add_argument(
        "--bits-per-weight",
        type=float,
        default=d.bits_per_weight,
        help="average bits per linear-layer weight, look-up tables and scales counted (e.g. 3.5); or give --recipe",
    )
    p.add_argument("--recipe", default=d.recipe, help="a recipe JSON (Talaria's export) fixing every matrix's bits")
    p.add_argument(
        "--calibration",
        default=d.calibration,
        required=True,
        help="UTF-8 text for the Fisher information and sensitivities; never the text you evaluate on",
    )
    p.add_argument("--out", default=d.out, required=True, help="directory for the compressed model")
    add_calibration_window_arguments(p, d)
    p.add_argument(
        "--sensitivity",
        choices=SENSITIVITY_KINDS,
        default=d.sensitivity,
        help=f"proxy: 1/2 sum F (w-q)^2 (k-means only); measured: KL per matrix and width, one forward pass "
        f"each (slow) (default {d.sensitivity})",
    )
    p.add_argument(
        "--measure-tokens",
        type=int,
        default=d.measure_tokens,
        help=f"calibration tokens per KL measurement with --sensitivity measured (default {d.measure_tokens})",
    )
    p.add_argument(
        "--group-rows",
        type=int,
        default=d.group_rows,
        help=f"output rows sharing one look-up table (default {d.group_rows})",
    )
    p.add_argument(
        "--no-per-row-scale",
        dest="per_row_scale",
        action="store_false",
        default=d.per_row_scale,
        help="no fp16 scale per output row (kept by default: it lowers the error a lot)",
    )
    p.add_argument(
        "--embed-bits",
        type=int,
        choices=(4, 8),
        default=d.embed_bits,
        help=f"the embedding's per-channel integer bits (default {d.embed_bits})",
    )
    p.add_argument(
        "--codes",
        choices=CODE_ASSIGNMENTS,
        default=d.codes,
        help="how each weight picks its table entry: its nearest value, or gptq: error feedback so the layer's "
        f"output on the calibration text stays closest (one more forward pass over it) (default {d.codes})",
    )
    p.add_argument("--no-cache", action="store_true", default=d.no_cache, help="recompute a cached analysis")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(run=cmd_palettize)

    from afmkit.compress import recover

    r = actions.add_parser(
        "recover",
        help="train the accuracy-recovery adapter of a compressed model (distillation from the float model)",
        description="Train a rank-16 LoRA adapter on a compressed model's frozen weights by distillation "
        "(KL to the float teacher's next-token distribution) on generic text, and save it in MODEL/recovery, "
        "where afmkit.load(MODEL) applies it; --train tables trains the look-up tables instead (or both), "
        "saved as a new model in --out (docs/compression.md).",
    )
    recover.add_arguments(r)
    r.set_defaults(run=recover.cmd_recover, trains=True)


def add_calibration_window_arguments(p: argparse.ArgumentParser, d: Any) -> None:
    """Which part of ``--calibration`` the sensitivity analysis reads (``compress``, ``talaria``);
    ``d``: the command's settings, whose defaults come from ``CompressSettings``."""
    p.add_argument(
        "--calibration-start",
        type=int,
        default=d.calibration_start,
        help=f"first character of --calibration to use (default {d.calibration_start})",
    )
    p.add_argument(
        "--calibration-tokens",
        type=int,
        default=d.calibration_tokens,
        help=f"calibration tokens for the Fisher information (default {d.calibration_tokens})",
    )
    p.add_argument(
        "--seq-len", type=int, default=d.seq_len, help=f"tokens per calibration window (default {d.seq_len})"
    )


def settings_from_args(args: argparse.Namespace) -> CompressSettings:
    return check_settings(cli_args.settings_from_args(CompressSettings, args))


def check_settings(settings: CompressSettings) -> CompressSettings:
    """One line for each setting that cannot work, before anything is loaded."""
    if settings.recipe is not None and settings.bits_per_weight is not None:
        raise UserError("give --bits-per-weight or --recipe, not both: a recipe fixes every matrix's bits")
    if settings.recipe is None and settings.bits_per_weight is None:
        raise UserError("give --bits-per-weight (e.g. 3.5) or --recipe (a recipe JSON, e.g. from Talaria)")
    if settings.bits_per_weight is not None and not settings.bits_per_weight > 0:
        raise UserError(f"--bits-per-weight must be positive, got {settings.bits_per_weight:g}; e.g. 3.5")
    if settings.calibration is None or settings.out is None:
        raise UserError("compressing needs --calibration (a text file) and --out (a directory)")
    if settings.group_rows < 1:
        raise UserError(f"--group-rows must be positive, got {settings.group_rows}")
    if settings.measure_tokens < 1:
        raise UserError(f"--measure-tokens must be positive, got {settings.measure_tokens}")
    if settings.codes not in CODE_ASSIGNMENTS:
        raise UserError(f"--codes must be one of {', '.join(CODE_ASSIGNMENTS)}, not {settings.codes!r}")
    return settings


def compress(
    model: Any, settings: CompressSettings, *, model_name: str, quiet: bool = False, load_seconds: float = 0.0
) -> dict[str, Any]:
    """Compress ``model`` (a float ``LanguageModel``) as ``settings`` say; returns the report
    (also written to ``settings.out``)."""
    from afmkit.compress import allocate, gptq, recipe, sensitivity
    from afmkit.compress.palettize import bits_per_weight, palettize_params
    from afmkit.interop import native

    settings = check_settings(settings)
    seconds = {"load": load_seconds}
    clock = time.perf_counter

    begin = clock()
    fingerprint = sensitivity.model_fingerprint(model.config, model.params)
    names = sensitivity.matrix_names(model.params)
    chosen = None
    if settings.recipe is not None:  # the recipe's table layout is the one analysed and applied
        chosen = recipe.read_recipe(settings.recipe, fingerprint=fingerprint, matrices=names, model_name=model_name)
        settings = dataclasses.replace(
            settings, group_rows=chosen.group_rows, per_row_scale=chosen.per_row_scale, embed_bits=chosen.embed_bits
        )
    calibration = sensitivity.read_calibration(
        settings.calibration,
        model.tokenizer,
        start=settings.calibration_start,
        tokens=settings.calibration_tokens,
        seq_len=settings.seq_len,
    )
    seconds["calibration"] = clock() - begin

    begin = clock()
    analysis = sensitivity.analyze(
        model.config,
        model.params,
        calibration,
        model_name=model_name,
        fingerprint=fingerprint,
        settings=settings,
        use_cache=not settings.no_cache,
        quiet=quiet,
    )
    seconds["analysis"] = clock() - begin
    cached = analysis.fisher is None  # a fresh analysis holds its Fisher in memory

    begin = clock()
    shapes = analysis.shapes
    if chosen is None:
        allocation = allocate.allocate_bits(
            shapes,
            analysis.sensitivity,
            settings.bits_per_weight,
            group_rows=settings.group_rows,
            per_row_scale=settings.per_row_scale,
        )
        bits, exact = allocation.bits, allocation.exact
    else:
        bits, exact = chosen.bits, True
    predicted_bpw = allocate.bits_per_weight(
        shapes, bits, group_rows=settings.group_rows, per_row_scale=settings.per_row_scale
    )
    predicted = sum(analysis.sensitivity[n][b] for n, b in bits.items())
    seconds["allocate"] = clock() - begin

    begin = clock()
    grams = None
    if settings.codes == "gptq":  # computed as palettize_params reads them, a few layers at a time
        grams = gptq.InputGrams(model.config, model.params, calibration.windows, quiet=quiet)
    params = palettize_params(
        model.params,
        bits,
        embed_bits=settings.embed_bits,
        group_rows=settings.group_rows,
        per_row_scale=settings.per_row_scale,
        importance=analysis.load_fisher(),
        grams=grams,
    )
    seconds["palettize"] = clock() - begin
    if grams is not None:
        seconds["input_statistics"] = grams.seconds
        seconds["palettize"] -= grams.seconds

    applied = recipe.Recipe(
        model_name=model_name,
        fingerprint=fingerprint,
        bits=bits,
        group_rows=settings.group_rows,
        per_row_scale=settings.per_row_scale,
        embed_bits=settings.embed_bits,
        calibration=calibration.info(),
        predicted={"bits_per_weight": predicted_bpw, "sensitivity": predicted, "sensitivity_kind": analysis.kind},
    )
    begin = clock()
    out = Path(settings.out)
    native.save_checkpoint(out, model.config, params, model.tokenizer)
    applied.save(out / RECIPE_FILE)
    seconds["save"] = clock() - begin
    report = {
        "model": model_name,
        "fingerprint": fingerprint,
        "out": str(out),
        "bits_per_weight": bits_per_weight(params),  # from the stored arrays
        "predicted_bits_per_weight": predicted_bpw,  # from allocate's accounting (the same, checked in tests)
        "budget": settings.bits_per_weight,
        "recipe": settings.recipe,
        "allocation_exact": exact,
        "embed_bits": settings.embed_bits,
        "group_rows": settings.group_rows,
        "per_row_scale": settings.per_row_scale,
        "codes": settings.codes,
        "bits_by_type": recipe.bits_by_type(bits),
        "predicted_sensitivity": predicted,
        "sensitivity_kind": analysis.kind,
        "analysis_cached": cached,
        "analysis_seconds": analysis.seconds,
        "calibration": calibration.info(),
        "seconds": {**seconds, "total": sum(seconds.values())},
    }
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report


def cmd_palettize(args: argparse.Namespace) -> int:
    from afmkit.cli_args import load_model

    settings = settings_from_args(args)
    begin = time.perf_counter()
    model = load_model(args.model, "float32", quiet=args.quiet)
    report = compress(
        model, settings, model_name=model.name, quiet=args.quiet, load_seconds=time.perf_counter() - begin
    )
    types = ", ".join(
        f"{kind} {'/'.join(f'{n}x{b}' for b, n in counts.items())}" for kind, counts in report["bits_by_type"].items()
    )
    print(
        f"{report['out']}: {report['bits_per_weight']:.3f} bits per weight ({types}); "
        f"{report['seconds']['total']:.0f} s"
    )
    return 0
