"""``afmkit curate``: stream a corpus through the curation pipeline, write the survivors as JSONL."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

from afmkit.data.curation.settings import CurationSettings
from afmkit.errors import UserError


def register(commands) -> None:
    d = CurationSettings()  # every default below (and the number its help quotes) is the dataclass's
    curate = commands.add_parser("curate", help="deduplicate, filter, scrub PII and decontaminate a corpus")
    curate.set_defaults(run=cmd_curate)
    curate.add_argument(
        "--data", nargs="+", help="text/JSONL files, directories or globs (default: the Python standard library)"
    )
    curate.add_argument("--out", required=True, help="output JSONL file of surviving documents ({text, source})")
    curate.add_argument(
        "--decontaminate",
        action="append",
        default=[],
        metavar="SET",
        help="evaluation set to decontaminate against: 'ifeval' or a JSONL/text path (repeatable)",
    )
    curate.add_argument("--rejects", help="JSONL file recording each removed document with its step and reason")
    curate.add_argument("--text-key", default=d.text_key, help=f"JSONL field holding the text (default {d.text_key!r})")
    curate.add_argument(
        "--split-paragraphs", action="store_true", help="treat each paragraph of a text file as a document"
    )
    curate.add_argument(
        "--profile",
        choices=["auto", "prose", "code"],
        default=d.profile,
        help=f"quality rules (default {d.profile}: by file suffix)",
    )
    curate.add_argument("--min-words", type=int, help="override the quality profile's minimum word count")
    curate.add_argument(
        "--near-threshold",
        type=float,
        default=d.near_threshold,
        help=f"near-duplicate Jaccard threshold (default {d.near_threshold:g})",
    )
    curate.add_argument(
        "--shingle",
        choices=["word", "char"],
        default=d.shingle,
        help=f"near-dedup shingles: word or character n-grams (default {d.shingle})",
    )
    curate.add_argument(
        "--shingle-size",
        type=int,
        default=d.shingle_size,
        help=f"words (or characters) per shingle (default {d.shingle_size})",
    )
    curate.add_argument(
        "--ngram", type=int, default=d.ngram, help=f"decontamination n-gram size in words (default {d.ngram})"
    )
    curate.add_argument(
        "--min-ngram", type=int, default=d.min_ngram, help=f"shortest benchmark n-gram used (default {d.min_ngram})"
    )
    curate.add_argument(
        "--common-count",
        type=int,
        default=d.common_count,
        help=f"corpus count that makes an n-gram common (default {d.common_count})",
    )
    curate.add_argument("--scrub-ipv4", action="store_true", help="also replace IPv4 addresses with <IP_ADDRESS>")
    curate.add_argument("--skip", action="append", default=[], metavar="STEP", help="leave out a step (repeatable)")
    curate.add_argument("--json", action="store_true", help="print the report as one JSON object on the last line")


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator:
    """A text file handle on a temporary file beside ``path`` that replaces it only on success."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def cmd_curate(args: argparse.Namespace) -> int:
    from afmkit.data.corpus import expand_sources, iter_documents, stdlib_sources
    from afmkit.data.curation import PiiScrubber, QualityConfig, default_steps
    from afmkit.data.curation.pipeline import Pipeline

    out = Path(args.out)
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; give a .jsonl file path")
    rejects_path = Path(args.rejects) if args.rejects else None
    if rejects_path is not None and rejects_path.resolve() == out.resolve():
        raise UserError("--rejects and --out must be different files")
    sources = args.data if args.data else stdlib_sources()
    inputs = expand_sources(sources)  # a missing path fails here, before any work
    if out.exists() and any(out.resolve() == p.resolve() for p in inputs):
        raise UserError(f"--out {out} is also an input; write the curated corpus to a new file")
    prose = QualityConfig.for_profile("prose")
    code = QualityConfig.for_profile("code")
    if args.min_words is not None:
        prose, code = prose.replace(min_words=args.min_words), code.replace(min_words=args.min_words)
    steps = default_steps(
        decontaminate=args.decontaminate,
        profile=args.profile,
        prose=prose,
        code=code,
        near_threshold=args.near_threshold,
        shingle=args.shingle,
        shingle_size=args.shingle_size,
        ngram=args.ngram,
        min_ngram=args.min_ngram,
        common_count=args.common_count,
        scrub_ipv4=args.scrub_ipv4,
        skip=args.skip,
    )

    def corpus():
        return iter_documents(sources, text_key=args.text_key, split_paragraphs=args.split_paragraphs)

    pipeline = Pipeline(steps)
    with _Progress(enabled=not args.json) as progress:
        total = None
        if pipeline.needs_prepass:
            total = pipeline.prepare(lambda: progress.track(corpus(), "counting benchmark n-grams", None))
        with atomic_file(out) as f_out, contextlib.ExitStack() as stack:
            f_rej = stack.enter_context(atomic_file(rejects_path)) if rejects_path else None

            preview_scrubber = PiiScrubber()  # filters run before the pii step: don't leak PII into the rejects file

            def on_reject(rejection) -> None:
                if f_rej is not None:
                    row = {**asdict(rejection), "preview": preview_scrubber.scrub(rejection.preview)[0]}
                    f_rej.write(json.dumps(row, ensure_ascii=False) + "\n")

            for document in pipeline.run(progress.track(corpus(), "curating", total), on_reject=on_reject):
                f_out.write(json.dumps({"text": document.text, "source": document.source}, ensure_ascii=False) + "\n")
            if pipeline.documents_in == 0:
                named = ", ".join(args.data) if args.data else "the standard library"
                raise UserError(f"the corpus is empty: no non-blank documents in {named}")
    report = pipeline.report()
    print_report(report, out=out)
    if args.json:
        print(json.dumps({**report.to_dict(), "out": str(out), "rejects": str(rejects_path) if rejects_path else None}))
    return 0


def print_report(report, *, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"curation: {report.documents_in:,} → {report.documents_out:,} documents ({out})")
    for column in ("step", "docs in", "removed", "docs out", "chars in", "chars out", "replaced"):
        table.add_column(column, justify="left" if column in ("step", "replaced") else "right")
    for s in report.steps:
        replaced = ", ".join(f"{k} {v:,}" for k, v in s.replacements.items())
        table.add_row(
            s.name,
            f"{s.documents_in:,}",
            f"{s.removed:,}",
            f"{s.documents_out:,}",
            f"{s.chars_in:,}",
            f"{s.chars_out:,}",
            replaced,
        )
    console = Console()
    if not console.is_terminal:  # piped or captured: don't squeeze the table into 80 columns
        console = Console(width=160)
    console.print(table)
    console.print(f"{report.seconds:.1f}s; {report.chars_in:,} → {report.chars_out:,} characters")


class _Progress:
    """A rich progress bar over documents on stderr (a spinner when the count is not known yet)."""

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled
        self.progress = None

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(
                TextColumn("[progress.description]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=Console(stderr=True),
                transient=True,
            )
            self.progress.start()
        return self

    def track(self, documents, description: str, total: int | None):
        if self.progress is None:
            yield from documents
            return
        task = self.progress.add_task(description, total=total)
        for document in documents:
            yield document
            self.progress.advance(task)
        self.progress.remove_task(task)

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()
