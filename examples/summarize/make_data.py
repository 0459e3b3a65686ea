"""Build a small summarization chat dataset from LIMA's human-written answers (in ../shared/data).

Texts: prose paragraphs of LIMA answers (60-150 words, at least 3 sentences; no code, math,
lists, tables or links). Targets: an *extractive* summary made by a fixed rule, not by a model or
a person: the paragraph's most central sentence (two for paragraphs of 5+ sentences), kept in
their original order. A sentence's centrality is its mean bag-of-words cosine similarity to the
paragraph's other sentences (content words only), the idea behind LexRank/TextRank without the
graph iteration. So the adapter learns to pick a paragraph's most representative sentence(s) and
copy them; it does not learn to paraphrase.

    python examples/summarize/make_data.py --out examples/summarize/data

writes train.jsonl (the last 10% serve as held-out data in ``afmkit adapter train``) in the
``{"messages": [...]}`` format. LIMA is CC BY-NC-SA (NON-COMMERCIAL): it never ships with afmkit,
the derived files are not committed (this script rebuilds them in a second), and an adapter
trained on them inherits the non-commercial terms. LIMA is read from the shared data folder
(``$AFMKIT_SHARED_DATA``, else ``../shared/data`` beside the repository).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
from collections import Counter
from pathlib import Path

from afmkit.files import shared_data_dir

PROMPT = "Summarize the following text in one or two sentences.\n\n{text}"
_STOPWORD_TEXT = """a about above after again against all am an and any are as at be because been before being below between
    both but by can could did do does doing down during each few for from further had has have having he her here
    hers herself him himself his how i if in into is it its itself just me more most my myself no nor not now of
    off on once only or other our ours ourselves out over own same she should so some such than that the their
    theirs them themselves then there these they this those through to too under until up very was we were what
    when where which while who whom why will with would you your yours yourself yourselves also may might must
    one us like get make many much even well"""
STOPWORDS = frozenset(_STOPWORD_TEXT.split())
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
WORD = re.compile(r"[a-z][a-z'-]+")


def sentences(paragraph: str) -> list[str]:
    return [s.strip() for s in SENTENCE_END.split(paragraph) if s.strip()]


def usable(paragraph: str) -> bool:
    words = paragraph.split()
    if not 60 <= len(words) <= 150:
        return False
    if re.search(r"[`$|#*\[\]{}<>=_\\]|https?:|www\.|^\s*(\d+[.)]|[-•])", paragraph, flags=re.M):
        return False
    parts = sentences(paragraph)
    return len(parts) >= 3 and all(4 <= len(p.split()) <= 60 for p in parts) and paragraph.rstrip()[-1] in ".!?"


def central_sentences(parts: list[str], k: int) -> list[str]:
    bags = [Counter(w for w in WORD.findall(p.lower()) if w not in STOPWORDS) for p in parts]

    def cosine(a: Counter, b: Counter) -> float:
        dot = sum(a[w] * b[w] for w in a)
        norm = math.sqrt(sum(v * v for v in a.values())) * math.sqrt(sum(v * v for v in b.values()))
        return dot / norm if norm else 0.0

    scores = [
        sum(cosine(bags[i], bags[j]) for j in range(len(parts)) if j != i) / (len(parts) - 1) for i in range(len(parts))
    ]
    best = sorted(sorted(range(len(parts)), key=lambda i: (-scores[i], i))[:k])
    return [parts[i] for i in best]


LIMA_NOTICE = "LIMA is CC BY-NC-SA 4.0 (non-commercial); data and adapters derived from it are for non-commercial use"


def lima_path() -> Path:
    return shared_data_dir() / "sft" / "lima_llamafactory.json"


def build(limit: int, seed: int) -> list[dict]:
    lima = json.loads(lima_path().read_text())
    seen, rows = set(), []
    for item in lima:
        for paragraph in re.split(r"\n\s*\n", item["output"]):
            paragraph = " ".join(paragraph.split())
            if paragraph in seen or not usable(paragraph):
                continue
            seen.add(paragraph)
            parts = sentences(paragraph)
            summary = " ".join(central_sentences(parts, 2 if len(parts) >= 5 else 1))
            rows.append(
                {
                    "messages": [
                        {"role": "user", "content": PROMPT.format(text=paragraph)},
                        {"role": "assistant", "content": summary},
                    ]
                }
            )
    random.Random(seed).shuffle(rows)
    return rows[:limit]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "data"))
    parser.add_argument("--limit", type=int, default=800)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not lima_path().is_file():
        sys.exit(
            f"make_data.py: LIMA is not at {lima_path()} (it never ships with afmkit: non-commercial licence); "
            "set AFMKIT_SHARED_DATA to the folder holding sft/lima_llamafactory.json"
        )
    print(f"note: {LIMA_NOTICE}", file=sys.stderr)
    rows = build(args.limit, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "train.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    tmp.replace(out / "train.jsonl")
    print(f"wrote {len(rows)} conversations to {out / 'train.jsonl'}")


if __name__ == "__main__":
    main()
