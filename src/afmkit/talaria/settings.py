"""``TalariaSettings``: every default of ``afmkit talaria`` and of the functions it calls."""

from __future__ import annotations

import dataclasses

from afmkit.compress.settings import CompressSettings


@dataclasses.dataclass(frozen=True, kw_only=True)
class TalariaSettings:
    device: str = "this-cpu"  # the profile the page opens on (every profile is shown)
    host: str = "127.0.0.1"  # this machine only
    port: int = 8766
    # Sensitivity: the newest cached compressor analysis of this model, or one computed from this text.
    calibration: str | None = None
    calibration_start: int = CompressSettings.calibration_start
    calibration_tokens: int = CompressSettings.calibration_tokens
    seq_len: int = CompressSettings.seq_len
    # Perplexity (Verify, and the float baseline): this text, or the calibration file's text that the
    # calibration never reads (before --calibration-start, else after what it reads).
    eval_text: str | None = None
    eval_chars: int = 20_000
    context: int = 256  # tokens attended to at decode (the KV cache's length) and prompt length at prefill
    repeats: int = 15  # timed calls per micro-benchmark (the median is kept)
    decode_tokens: int = 48  # tokens generated when Verify measures decode speed
    no_cache: bool = False  # re-measure even when a cached analysis matches
