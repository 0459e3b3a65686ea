"""Train a byte-level BPE tokenizer the AFM way (spec section 2) with Hugging Face ``tokenizers``.

The rules:

- **byte level**: text is split into UTF-8 bytes, each mapped to one of 256 printable symbols, and
  all 256 are in the base vocabulary, so every string encodes and nothing is ever unknown (this is
  the "byte fallback": a character BPE never merged is spelled as its bytes);
- **every digit its own token**: a ``Digits(individual_digits=True)`` pre-tokenizer isolates each
  digit before BPE sees it, so no merge can span two digits;
- **no Unicode normalisation**: text is encoded exactly as given, so decode(encode(x)) == x;
- **chat special tokens**: ``<|endoftext|>`` (end of document, the EOS), ``<|im_start|>`` and
  ``<|im_end|>`` (ChatML turns) take ids 0, 1 and 2 and are never split; the ChatML template is
  saved with the tokenizer.

The corpus streams through the trainer (one document at a time; large text files in chunks), so
it does not have to fit in memory.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from afmkit.data.corpus import iter_text_chunks, stdlib_sources
from afmkit.data.tokenizer import CHATML_TEMPLATE, Tokenizer
from afmkit.errors import UserError
from afmkit.files import atomic_directory

EOS_TOKEN = "<|endoftext|>"
CHAT_SPECIAL_TOKENS = (EOS_TOKEN, "<|im_start|>", "<|im_end|>")
# The smallest vocabulary that holds the 256 byte symbols and the special tokens with room for merges.
MIN_VOCAB_SIZE = 256 + len(CHAT_SPECIAL_TOKENS) + 1


@dataclass(frozen=True, kw_only=True)
class TokenizerTrainSettings:
    """Defaults of ``afmkit tokenizer train`` and of the functions below: the one source."""

    min_frequency: int = 2  # least count for a merge
    text_key: str = "text"  # JSONL field holding the text


@dataclass(frozen=True)
class TrainingStats:
    documents: int
    chars: int
    seconds: float
    vocab_size: int


def new_bpe_tokenizer() -> tokenizers.Tokenizer:
    """An untrained byte-level BPE with the AFM pre-tokenization (digits split) and no normaliser."""
    backend = tokenizers.Tokenizer(models.BPE(fuse_unk=False))
    backend.normalizer = None
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    backend.decoder = decoders.ByteLevel()
    return backend


def train_tokenizer(
    texts: Iterable[str],
    *,
    vocab_size: int,
    min_frequency: int = TokenizerTrainSettings.min_frequency,
    show_progress: bool = True,
    length: int | None = None,
) -> tuple[Tokenizer, TrainingStats]:
    """Train a byte-level BPE tokenizer on ``texts`` (any iterable of strings, consumed once)."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise UserError(
            f"--vocab-size {vocab_size} is too small: a byte-level tokenizer needs at least {MIN_VOCAB_SIZE} "
            f"(256 byte symbols + {len(CHAT_SPECIAL_TOKENS)} special tokens + merges)"
        )
    if min_frequency < 1:
        raise UserError(f"--min-frequency must be at least 1, got {min_frequency}")
    backend = new_bpe_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(CHAT_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,  # our own rich bar below; the Rust bar would fight it for the terminal
    )
    counter = _Counter()
    start = time.perf_counter()
    with _TrainingProgress(enabled=show_progress) as advance:
        backend.train_from_iterator(counter.count(texts, advance), trainer=trainer, length=length)
    seconds = time.perf_counter() - start
    if counter.documents == 0:
        raise UserError("the corpus is empty: no text to train the tokenizer on")
    tokenizer = Tokenizer(
        backend, chat_template=CHATML_TEMPLATE, eos_token=EOS_TOKEN, stop_tokens=("<|im_end|>", EOS_TOKEN)
    )
    stats = TrainingStats(
        documents=counter.documents, chars=counter.chars, seconds=seconds, vocab_size=tokenizer.vocab_size
    )
    return tokenizer, stats


def train_tokenizer_on_sources(
    sources: Sequence[str | os.PathLike] | None,
    *,
    vocab_size: int,
    min_frequency: int = TokenizerTrainSettings.min_frequency,
    text_key: str = TokenizerTrainSettings.text_key,
    show_progress: bool = True,
) -> tuple[Tokenizer, TrainingStats]:
    """Train on corpus sources (text files, JSONL, directories, globs; the standard library when ``None``)."""
    files = stdlib_sources() if sources is None else sources
    return train_tokenizer(
        iter_text_chunks(files, text_key=text_key),
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        show_progress=show_progress,
    )


def save_tokenizer(tokenizer: Tokenizer, out: str | os.PathLike, *, force: bool = False) -> Path:
    """Write ``tokenizer.json`` + ``tokenizer_config.json`` to ``out`` atomically.

    A non-empty ``out`` is refused unless ``force``; it is replaced whole only after the new files
    are written, so a failure leaves it as it was.
    """
    out = Path(out)
    check_output_directory(out, force=force)
    with atomic_directory(out) as tmp:
        tokenizer.save(tmp)
    return out


def check_output_directory(out: Path, *, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a directory path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"--out {out} is not empty; choose a new directory or pass --force to replace it")


def bytes_per_token(tokenizer: Tokenizer, texts: Iterable[str]) -> float:
    """Compression: UTF-8 bytes of ``texts`` divided by the tokens they encode to (higher is better)."""
    n_bytes = n_tokens = 0
    for text in texts:
        n_bytes += len(text.encode("utf-8"))
        n_tokens += len(tokenizer.backend.encode(text, add_special_tokens=False).ids)
    return n_bytes / max(n_tokens, 1)


class _Counter:
    def __init__(self) -> None:
        self.documents = 0
        self.chars = 0

    def count(self, texts: Iterable[str], advance) -> Iterator[str]:
        for text in texts:
            self.documents += 1
            self.chars += len(text)
            advance(len(text))
            yield text


class _TrainingProgress:
    """A rich progress line over the characters fed to the trainer (merges are computed after)."""

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled
        self.progress = None

    def __enter__(self):
        if not self.enabled:
            return lambda n: None
        from rich.console import Console
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("[progress.description]{task.description}"),
            TextColumn("{task.completed:,.0f} chars"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self.progress.start()
        task = self.progress.add_task("reading corpus, counting pairs", total=None)
        return lambda n: self.progress.advance(task, n)

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()


def cmd_tokenizer_train(args) -> int:
    """``afmkit tokenizer train``: train, save atomically, print a one-line summary (or JSON)."""
    import json

    out = Path(args.out)
    check_output_directory(out, force=args.force)  # before the slow part
    tokenizer, stats = train_tokenizer_on_sources(
        args.data or None,
        vocab_size=args.vocab_size,
        min_frequency=args.min_frequency,
        text_key=args.text_key,
        show_progress=not args.json,
    )
    save_tokenizer(tokenizer, out, force=args.force)
    record = {
        "out": str(out),
        "vocab_size": stats.vocab_size,
        "documents": stats.documents,
        "chars": stats.chars,
        "train_seconds": round(stats.seconds, 3),
    }
    if args.json:
        print(json.dumps(record))
    else:
        print(
            f"trained a {stats.vocab_size:,}-token byte-level BPE on {stats.chars:,} characters "
            f"({stats.documents:,} chunks) in {stats.seconds:.1f}s; saved to {out}"
        )
    if stats.vocab_size < args.vocab_size:
        # BPE stops when no pair occurs --min-frequency times: the corpus is too small for the vocabulary.
        print(
            f"afmkit: warning: the corpus supports only {stats.vocab_size:,} tokens at --min-frequency "
            f"{args.min_frequency} (asked for {args.vocab_size:,}); add data or lower --min-frequency",
            file=sys.stderr,
        )
    return 0


def register(commands) -> None:
    """Register ``afmkit tokenizer train`` on the CLI's sub-command set."""
    group = commands.add_parser("tokenizer", help="train tokenizers")
    actions = group.add_subparsers(required=True, metavar="ACTION")
    train = actions.add_parser("train", help="train a byte-level BPE tokenizer (digits split, ChatML tokens)")
    train.set_defaults(run=cmd_tokenizer_train)
    train.add_argument(
        "--data", nargs="+", help="text/JSONL files, directories or globs (default: the Python standard library)"
    )
    train.add_argument("--vocab-size", type=int, required=True, help="total vocabulary, e.g. 49152 or 100000")
    train.add_argument("--out", required=True, help="directory to write tokenizer.json and tokenizer_config.json")
    d = TokenizerTrainSettings()
    train.add_argument(
        "--min-frequency",
        type=int,
        default=d.min_frequency,
        help=f"least count for a merge (default {d.min_frequency})",
    )
    train.add_argument("--text-key", default=d.text_key, help=f"JSONL field holding the text (default {d.text_key!r})")
    train.add_argument("--force", action="store_true", help="replace a non-empty --out directory")
    train.add_argument("--json", action="store_true", help="print one JSON object")
