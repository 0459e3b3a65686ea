"""``afmkit talaria --model M [--device PROFILE] [--port P]``: the latency, power and quality page
that chooses each matrix's bits and exports the recipe ``afmkit compress palettize`` takes.

Order of work: check the device profile and the port (one line each, before anything loads);
load the model in float32; the analysis (the compressor's sensitivities and Talaria's
micro-benchmarks, both cached; progress bars when computed); serve the page.
"""

from __future__ import annotations

import argparse
import time

from afmkit import cli_args
from afmkit.talaria.settings import TalariaSettings

DEFAULTS = TalariaSettings()


def register(commands: argparse._SubParsersAction) -> None:
    from afmkit.cli_args import model_argument
    from afmkit.compress.cli import add_calibration_window_arguments
    from afmkit.talaria.profiles import PROFILE_NAMES

    d = DEFAULTS
    p = commands.add_parser(
        "talaria",
        help="interactive latency, power and quality page: choose bits per matrix, export a compress recipe",
        description=(__doc__ or "").split("\n\n")[0],
    )
    model_argument(p, role="the float model to analyse", dtype=False)
    p.add_argument(
        "--device",
        default=d.device,
        help=f"the device profile the page opens on: {', '.join(PROFILE_NAMES)} (default {d.device})",
    )
    p.add_argument("--host", default=d.host, help=f"address to listen on (default {d.host})")
    p.add_argument("--port", type=int, default=d.port, help=f"port of the page (default {d.port})")
    p.add_argument(
        "--calibration",
        default=d.calibration,
        help="UTF-8 text for the sensitivity analysis (default: the newest cached analysis of the model)",
    )
    add_calibration_window_arguments(p, d)
    p.add_argument(
        "--eval-text",
        default=d.eval_text,
        help="text for perplexity (default: the calibration file's text the calibration does not read)",
    )
    p.add_argument(
        "--eval-chars", type=int, default=d.eval_chars, help=f"characters of it to score (default {d.eval_chars})"
    )
    p.add_argument(
        "--context",
        type=int,
        default=d.context,
        help=f"cached tokens at decode and prompt tokens at prefill (default {d.context})",
    )
    p.add_argument(
        "--repeats", type=int, default=d.repeats, help=f"timed calls per micro-benchmark (default {d.repeats})"
    )
    p.add_argument(
        "--decode-tokens",
        type=int,
        default=d.decode_tokens,
        help=f"tokens generated when Verify times decoding (default {d.decode_tokens})",
    )
    p.add_argument("--no-cache", action="store_true", default=d.no_cache, help="re-measure a cached analysis")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(run=cmd_talaria)


def settings_from_args(args: argparse.Namespace) -> TalariaSettings:
    return check_settings(cli_args.settings_from_args(TalariaSettings, args))


def check_settings(settings: TalariaSettings) -> TalariaSettings:
    from afmkit.errors import UserError
    from afmkit.talaria.profiles import check_profile

    check_profile(settings.device)
    for name in ("context", "repeats", "decode_tokens", "eval_chars"):
        if getattr(settings, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(settings, name)}")
    return settings


def cmd_talaria(args: argparse.Namespace) -> int:
    from afmkit.cli_args import load_model
    from afmkit.talaria.analysis import analyze_model, eval_text_of
    from afmkit.talaria.app import check_port, create_app, serve

    settings = settings_from_args(args)
    check_port(settings.host, settings.port)
    model = load_model(args.model, "float32", quiet=args.quiet)
    begin = time.perf_counter()
    analysis = analyze_model(model, settings, quiet=args.quiet)
    text, _ = eval_text_of(settings, analysis["sensitivity"]["calibration"])
    if not args.quiet:
        print(f"analysis of {model.name}: {time.perf_counter() - begin:.1f} s")
    serve(create_app(analysis, model=model, eval_text=text, settings=settings), host=settings.host, port=settings.port)
    return 0
