"""Data curation: composable, counted steps over documents (AFM spec section 4).

>>> from afmkit.data.curation import curate, default_steps
>>> kept, report = curate(documents, default_steps(decontaminate=["ifeval"]))

Steps, in the default order: ``exact_dedup``, ``length``, ``composition``, ``repetition``,
``near_dedup``, ``decontaminate`` (when evaluation sets are given) and ``pii`` (a transform).
See ``docs/data.md`` for every rule and threshold.
"""

from __future__ import annotations

from collections.abc import Sequence

from afmkit.data.curation.decontaminate import Decontaminator, EvalExample, decontaminator_for, load_eval_set
from afmkit.data.curation.dedup import ExactDedup, MinHasher, NearDedup, lsh_bands
from afmkit.data.curation.pii import PiiScrubber, luhn_valid
from afmkit.data.curation.pipeline import CurationReport, Pipeline, Rejection, Removed, Step, StepStats, curate
from afmkit.data.curation.quality import (
    CompositionFilter,
    LengthFilter,
    QualityConfig,
    RepetitionFilter,
    quality_steps,
)
from afmkit.data.curation.settings import CurationSettings

STEP_NAMES = ("exact_dedup", "length", "composition", "repetition", "near_dedup", "decontaminate", "pii")


def default_steps(
    *,
    decontaminate: Sequence[str] = (),
    profile: str = CurationSettings.profile,
    prose: QualityConfig | None = None,
    code: QualityConfig | None = None,
    near_threshold: float = CurationSettings.near_threshold,
    shingle: str = CurationSettings.shingle,
    shingle_size: int = CurationSettings.shingle_size,
    ngram: int = CurationSettings.ngram,
    min_ngram: int = CurationSettings.min_ngram,
    common_count: int = CurationSettings.common_count,
    scrub_ipv4: bool = False,
    skip: Sequence[str] = (),
) -> list[Step]:
    """The standard pipeline; ``skip`` names steps to leave out."""
    unknown = set(skip) - set(STEP_NAMES)
    if unknown:
        from afmkit.errors import UserError

        raise UserError(f"unknown step(s) {', '.join(sorted(unknown))} to skip; steps are {', '.join(STEP_NAMES)}")
    steps: list[Step] = [ExactDedup(), *quality_steps(profile=profile, prose=prose, code=code)]
    steps.append(NearDedup(threshold=near_threshold, shingle=shingle, ngram=shingle_size))
    if decontaminate:
        steps.append(decontaminator_for(decontaminate, ngram=ngram, min_ngram=min_ngram, common_count=common_count))
    steps.append(PiiScrubber(ipv4=scrub_ipv4))
    return [s for s in steps if s.name not in skip]


__all__ = [
    "STEP_NAMES",
    "CompositionFilter",
    "CurationReport",
    "Decontaminator",
    "EvalExample",
    "ExactDedup",
    "LengthFilter",
    "MinHasher",
    "NearDedup",
    "PiiScrubber",
    "Pipeline",
    "QualityConfig",
    "Rejection",
    "Removed",
    "RepetitionFilter",
    "Step",
    "StepStats",
    "curate",
    "decontaminator_for",
    "default_steps",
    "load_eval_set",
    "lsh_bands",
    "luhn_valid",
    "quality_steps",
]
