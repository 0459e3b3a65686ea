"""Side-by-side (SxS) preference evaluation: model A against model B on the same prompts.

1. Both models answer every prompt (greedy, chat template), each response appended to
   ``responses_a.jsonl`` / ``responses_b.jsonl`` as it finishes (resumable).
2. ``pairs.jsonl`` holds ``{key, prompt, a, b}``.
3. A grader sees every pair in **both orders** (A first, then B first); each judgment is
   appended to ``grades.jsonl`` (resumable) and mapped back from positions to models.
4. Per prompt, the judgments are summed (+1 A better, -1 B better, 0 tie): a positive sum is a
   win for A, negative a loss, zero a tie. A grader that always picks the first position gives
   +1 and -1, a tie: position bias cancels instead of deciding the result.
5. Win / tie / lose rates over prompts with 95% Wilson score intervals (each rate is a
   binomial proportion over independent prompts; Wilson stays inside [0, 1] and is accurate for
   small n and rates near 0 or 1, where the normal approximation is not).
6. How the outcomes go with answer length (words): graders of every kind tend to prefer the
   longer answer, and a win rate alone cannot show whether length decided it.

Human grades from ``sxs_ui`` (one judgment per prompt, shown in a random order) go through the
same report.
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from afmkit.errors import UserError
from afmkit.eval.graders import STRENGTHS, Grader, PairGrade
from afmkit.eval.jsonl import ResultsFile, read_jsonl, require_fields, write_text_atomic

Z_95 = 1.959963984540054


@dataclasses.dataclass(frozen=True, kw_only=True)
class SxsSettings:
    """Defaults of ``afmkit eval sxs`` and of ``generate_side``: the one source."""

    max_new_tokens: int = 512  # most tokens per response
    batch_size: int = 8  # prompts generated together


def load_prompts(path: str | os.PathLike, *, limit: int | None = None) -> list[dict[str, str]]:
    """``[{key, prompt}]`` from a JSONL file with a ``prompt`` field (``key`` optional: line number)."""
    prompts = []
    for line, row in enumerate(read_jsonl(path, what="prompts file"), start=1):
        require_fields(row, {"prompt": str}, path=path, line=line)
        if not row["prompt"].strip():
            raise UserError(f"{path} line {line}: 'prompt' is empty")
        prompts.append({"key": str(row.get("key", line)), "prompt": row["prompt"]})
    if len({p["key"] for p in prompts}) != len(prompts):
        raise UserError(f"{path} has duplicate keys; each prompt needs its own 'key'")
    return prompts[:limit] if limit else prompts


def _responses_path(out: Path, side: str) -> Path:
    return Path(out) / f"responses_{side}.jsonl"


def responses_complete(out: Path, side: str, prompts: Sequence[dict[str, str]]) -> bool:
    path = _responses_path(out, side)
    if not path.exists():
        return False
    done = ResultsFile(path)
    return all(p["key"] in done for p in prompts)


def generate_side(
    model: Any,
    prompts: Sequence[dict[str, str]],
    out: Path,
    *,
    side: str,
    max_new_tokens: int = SxsSettings.max_new_tokens,
    batch_size: int = SxsSettings.batch_size,
    quiet: bool = False,
    run_settings: dict[str, Any] | None = None,
) -> ResultsFile:
    from afmkit.eval.generation import GenerationItem, check_run_settings, generate_responses
    from afmkit.infer.sampling import SamplingParams

    if run_settings is not None:
        check_run_settings(_responses_path(out, side), {**run_settings, "max_new_tokens": max_new_tokens})
    results = ResultsFile(_responses_path(out, side))
    items = [GenerationItem(key=p["key"], messages=[{"role": "user", "content": p["prompt"]}]) for p in prompts]
    generate_responses(
        model,
        items,
        results,
        sampling=SamplingParams(max_new_tokens=max_new_tokens),
        batch_size=batch_size,
        description=f"model {side.upper()}",
        quiet=quiet,
    )
    return results


def write_pairs(out: Path, prompts: Sequence[dict[str, str]], *, model_a: str, model_b: str) -> list[dict[str, str]]:
    import json

    a, b = ResultsFile(_responses_path(out, "a")), ResultsFile(_responses_path(out, "b"))
    pairs = [
        {
            "key": p["key"],
            "prompt": p["prompt"],
            "a": a.get(p["key"])["response"],
            "b": b.get(p["key"])["response"],
            "model_a": model_a,
            "model_b": model_b,
        }
        for p in prompts
    ]
    write_text_atomic(Path(out) / "pairs.jsonl", "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
    return pairs


def read_pairs(path: str | os.PathLike) -> list[dict[str, str]]:
    pairs = []
    for line, row in enumerate(read_jsonl(path, what="pairs file"), start=1):
        require_fields(row, {"key": (str, int), "prompt": str, "a": str, "b": str}, path=path, line=line)
        pairs.append({**row, "key": str(row["key"])})
    return pairs


def model_winner(grade_winner: str, order: str) -> str:
    """Map a shown-position winner back to a model: ``order`` is "ab" (A shown first) or "ba"."""
    if grade_winner in ("tie", "invalid"):
        return grade_winner
    first_model, second_model = order[0], order[1]
    return first_model if grade_winner == "first" else second_model


def grade_pairs(pairs: Sequence[dict[str, str]], grader: Grader, out: Path, *, quiet: bool = False) -> list[dict]:
    """Grade every pair in both orders; judgments already in ``grades.jsonl`` are kept."""
    from afmkit.progress import ProgressReporter

    grades = ResultsFile(Path(out) / "grades.jsonl")
    jobs = [(pair, order) for pair in pairs for order in ("ab", "ba") if f"{pair['key']}:{order}" not in grades]
    with ProgressReporter(f"grading ({grader.name})", len(jobs), unit="judgments", quiet=quiet) as progress:
        for pair, order in jobs:
            first, second = (pair["a"], pair["b"]) if order == "ab" else (pair["b"], pair["a"])
            grade: PairGrade = grader.grade(prompt=pair["prompt"], first=first, second=second)
            grades.append(
                {
                    "key": f"{pair['key']}:{order}",
                    "pair": pair["key"],
                    "order": order,
                    "shown_winner": grade.winner,
                    "strength": grade.strength,
                    "winner": model_winner(grade.winner, order),
                    "grader": grader.name,
                    "raw": grade.raw,
                }
            )
            progress.advance()
    keys = {p["key"] for p in pairs}
    return [g for g in grades if g["pair"] in keys]


def wilson_interval(successes: int, n: int, *, z: float = Z_95) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion (as fractions)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denominator = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return (max(0.0, center - half), min(1.0, center + half))


def length_preference(outcome_by_pair: dict[str, str], pairs: Sequence[dict[str, str]]) -> dict[str, Any]:
    """How A's per-prompt outcomes (``"win"``, ``"tie"``, ``"lose"``) go with answer length in words
    (whitespace-separated, so any grader's report reads the same): the median lengths, how often the
    longer answer won among the decided prompts whose answers differ in length, and A's wins split by
    whether its answer was the longer or the shorter one."""
    words = {str(p["key"]): (len(p["a"].split()), len(p["b"].split())) for p in pairs}
    graded = [(outcome, *words[key]) for key, outcome in outcome_by_pair.items() if key in words]
    unequal = [(outcome, a, b) for outcome, a, b in graded if outcome != "tie" and a != b]
    longer_won = sum((outcome == "win") == (a > b) for outcome, a, b in unequal)

    def split(a_longer: bool) -> dict[str, int]:
        part = [outcome for outcome, a, b in unequal if (a > b) == a_longer]
        return {"prompts": len(part), "a_won": part.count("win")}

    a_words, b_words = [a for _, a, _ in graded], [b for _, _, b in graded]
    return {
        "median_words": {
            "a": statistics.median(a_words) if graded else None,
            "b": statistics.median(b_words) if graded else None,
        },
        "longer_won": longer_won,
        "decided_unequal": len(unequal),
        "longer_won_rate": round(100 * longer_won / len(unequal), 2) if unequal else None,
        "a_longer": split(True),
        "a_shorter": split(False),
    }


def report_from_grades(
    grades: Sequence[dict], *, model_a: str, model_b: str, grader: str, pairs: Sequence[dict[str, str]] | None = None
) -> dict[str, Any]:
    """Win / tie / lose of model A against B over prompts, with 95% Wilson intervals (percent); with
    the graded ``pairs``, also how the outcomes go with answer length (``length_preference``)."""
    by_pair: dict[str, list[dict]] = defaultdict(list)
    for g in grades:
        by_pair[g["pair"]].append(g)
    outcome_by_pair: dict[str, str] = {}
    invalid_pairs = 0
    for pair, judgments in by_pair.items():
        valid = [g for g in judgments if g["winner"] != "invalid"]
        if not valid:
            invalid_pairs += 1
            continue
        total = sum(+1 if g["winner"] == "a" else -1 if g["winner"] == "b" else 0 for g in valid)
        outcome_by_pair[pair] = "win" if total > 0 else "lose" if total < 0 else "tie"
    outcomes = Counter(outcome_by_pair.values())
    n = sum(outcomes.values())
    if n == 0 and grades:
        raise UserError(
            f"none of the {len(grades)} verdicts could be parsed (each needs a 'Verdict: ...' line); read the "
            "grader's raw answers in grades.jsonl and check --judge-model"
        )
    if n == 0:
        raise UserError("no grades yet; grade some pairs first")
    rates = {}
    for outcome in ("win", "tie", "lose"):
        low, high = wilson_interval(outcomes[outcome], n)
        rates[outcome] = {
            "count": outcomes[outcome],
            "rate": round(100 * outcomes[outcome] / n, 2),
            "ci95": [round(100 * low, 2), round(100 * high, 2)],
        }
    judged = [g for g in grades if g["winner"] != "invalid"]
    decided = [g for g in judged if g["shown_winner"] in ("first", "second")]
    both_orders = [j for j in by_pair.values() if {g["order"] for g in j if g["winner"] != "invalid"} == {"ab", "ba"}]
    consistent = sum(len({g["winner"] for g in j if g["winner"] != "invalid"}) == 1 for j in both_orders)
    strengths = {
        side: {s: sum(1 for g in judged if g["winner"] == side and g.get("strength") == s) for s in STRENGTHS}
        for side in ("a", "b")
    }
    return {
        "model_a": model_a,
        "model_b": model_b,
        "grader": grader,
        "prompts": n,
        "invalid_prompts": invalid_pairs,
        "judgments": len(judged),
        "invalid_judgments": len(grades) - len(judged),
        **rates,
        "first_position_preferred": round(100 * sum(g["shown_winner"] == "first" for g in decided) / len(decided), 2)
        if decided
        else None,
        "order_consistency": round(100 * consistent / len(both_orders), 2) if both_orders else None,
        "strengths": strengths,
        "method": "per prompt: sum of judgments (+1 A, -1 B, 0 tie) over both orders; sign gives win/tie/lose; "
        "95% Wilson score intervals over prompts",
        **({"length": length_preference(outcome_by_pair, pairs)} if pairs is not None else {}),
    }


def length_line(report: dict[str, Any]) -> str | None:
    """One sentence on answer length and outcome, or None when the report has no lengths."""
    length = report.get("length")
    if not length or not length["decided_unequal"]:
        return None
    median = length["median_words"]
    return (
        f"the longer answer won {length['longer_won']} of {length['decided_unequal']} decided prompts "
        f"({length['longer_won_rate']:.1f}%); A won {length['a_longer']['a_won']} of {length['a_longer']['prompts']} "
        f"where its answer was longer, {length['a_shorter']['a_won']} of {length['a_shorter']['prompts']} where "
        f"shorter; median words A {median['a']:g}, B {median['b']:g}"
    )


def format_report(report: dict[str, Any]) -> str:
    lines = [
        f"{report['model_a']} (A) vs {report['model_b']} (B), grader {report['grader']}, {report['prompts']} prompts"
    ]
    for outcome in ("win", "tie", "lose"):
        r = report[outcome]
        lines.append(f"  {outcome:5s} {r['rate']:6.2f}%  [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}]  ({r['count']})")
    if report.get("first_position_preferred") is not None:
        lines.append(
            f"  first shown response preferred in {report['first_position_preferred']:.1f}% of decided judgments"
        )
    length = length_line(report)
    if length:
        lines.append(f"  {length}")
    if report.get("invalid_judgments"):
        lines.append(f"  {report['invalid_judgments']} judgments could not be parsed and were left out")
    return "\n".join(lines)


def write_report(out: Path, report: dict[str, Any]) -> dict[str, Path]:
    from afmkit.eval.report import bar_chart, markdown_table, write_json_report, write_markdown

    out = Path(out)
    outcomes = ("win", "tie", "lose")
    chart = bar_chart(
        out / "sxs.png",
        labels=[o for o in outcomes],
        series={"A vs B": [report[o]["rate"] for o in outcomes]},
        errors={"A vs B": [tuple(report[o]["ci95"]) for o in outcomes]},
        title=f"{report['model_a']} vs {report['model_b']} ({report['grader']})",
        ylabel="share of prompts (%), 95% CI",
    )
    text = "\n".join(
        [
            "# Side-by-side",
            "",
            f"A = `{report['model_a']}`, B = `{report['model_b']}`, grader: {report['grader']}, "
            f"{report['prompts']} prompts ({report['judgments']} judgments).",
            "",
            markdown_table(
                ["A's outcome", "share (%)", "95% CI", "prompts"],
                [
                    [
                        o,
                        f"{report[o]['rate']:.2f}",
                        f"{report[o]['ci95'][0]:.2f}–{report[o]['ci95'][1]:.2f}",
                        report[o]["count"],
                    ]
                    for o in outcomes
                ],
            ),
            "",
            f"Method: {report['method']}.",
            *(["", f"Length: {length}."] if (length := length_line(report)) else []),
            "",
            f"![win tie lose]({chart.name})",
            "",
        ]
    )
    return {
        "json": write_json_report(out / "sxs.json", report),
        "markdown": write_markdown(out / "sxs.md", text),
        "chart": chart,
    }
