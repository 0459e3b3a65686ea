"""The constraint editor: a rule-based committee member for iTeC (``posttrain itec --edit``).

Self-sampling cannot teach a constraint the model never satisfies: SmolLM2-135M-Instruct's samples
never write in all lowercase or all capitals, never wrap the answer in double quotes, never repeat
the request first, so rejection sampling finds no winner to learn those from (docs/posttraining.md,
"Why self-sampling stalls"). The editor takes a finished sample and rewrites its form so that it
follows the prompt's constraints where a mechanical rewrite exists (case, quotation, a title, a
postscript, an end phrase, the request repeated first, commas removed, bullets, sections,
paragraphs (the answer's own when it has the number asked), a paragraph's first word (as a
heading line above the paragraph's own text), highlights, JSON, trimming sentences for "less
than" limits or forbidden words, two answers from two samples). The content stays the model's
own. An edited sample competes with the originals under the same verifier; it wins only by
scoring higher.

Constraints with no faithful mechanical rewrite (a response language, keywords to include, letter
counts, placeholders, "at least N" lengths, yes/no/maybe) are left to the samples. Every rewrite
is a pure function of (prompt row, response, alternative response), so a run repeats exactly.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from typing import Any

from afmkit.posttrain import verifiable

EDIT_SUFFIX = "+edit"  # an edited sample's member: the original's name plus this
# A sentence ends at . ! or ? before a space, but not after "P.S.", "e.g." or a title ("Dr.").
_NOT_AN_END = r"(?<!\b[A-Za-z]\.[A-Za-z]\.)(?<!\bMr\.)(?<!\bMs\.)(?<!\bDr\.)(?<!\bSt\.)(?<!\bMrs\.)"
_SENTENCE_END = re.compile(r"(?<=[.!?])" + _NOT_AN_END + r"\s+(?=\S)")
_SENTENCE_IN_LINE = re.compile(r"(?<=[^\d\s][.!?])" + _NOT_AN_END + r"\s+(?=\S)")  # "2. " is a list mark
_LIST_MARK = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+")
_WORD = re.compile(r"\b\w+\b")
# Closing lines for a postscript (no commas, so "no commas" can hold beside it).
_POSTSCRIPT_LINES = (
    "I hope this helps.",
    "Let me know if you have more questions.",
    "Feel free to ask for more details.",
    "Thank you for reading.",
)


def sentences(text: str) -> list[str]:
    """The response's sentences, list marks and line breaks flattened away."""
    lines = [_LIST_MARK.sub("", line).strip() for line in text.splitlines()]
    flat = " ".join(line for line in lines if line)
    return [s.strip() for s in _SENTENCE_END.split(flat) if s.strip()]


def trim_words(text: str, limit: int) -> str:
    """``text`` up to its last sentence or line end within ``limit`` words (its first sentence at
    least), lines and list marks kept; a last line announcing more (ending in ":") goes too."""
    lines, count = [], 0
    for line in text.strip().splitlines():
        kept = []
        for sentence in _SENTENCE_IN_LINE.split(line):
            words = len(_WORD.findall(sentence))
            if count + words > limit and (lines or kept):
                break
            kept.append(sentence)
            count += words
        else:
            lines.append(" ".join(kept))
            continue
        if kept:
            lines.append(" ".join(kept))
        break
    while len(lines) > 1 and (not lines[-1].strip() or lines[-1].rstrip().endswith(":")):
        lines.pop()
    return "\n".join(lines).rstrip()


def _groups(items: list[str], n: int) -> list[list[str]]:
    """``items`` in ``n`` consecutive groups of near-equal size (needs len(items) >= n)."""
    size, extra = divmod(len(items), n)
    out, start = [], 0
    for i in range(n):
        end = start + size + (1 if i < extra else 0)
        out.append(items[start:end])
        start = end
    return out


def _pick(key: str, options: Sequence[str]) -> str:
    digest = hashlib.sha256(key.encode()).digest()
    return options[digest[0] % len(options)]


def _task_line(prompt: str) -> str:
    return prompt.strip().splitlines()[0] if prompt.strip() else ""


# -- rewrites: (text, kwargs, context) -> text, or None when no rewrite applies ---------------
# prompt (str), key (str), alternative (str | None), break (what sets a wrapper's line apart:
# a single line break where blank lines count paragraphs, else a blank line)
Context = dict[str, Any]
Rewrite = Callable[[str, dict[str, Any], Context], "str | None"]


def _keep_sentences(text: str, keep: Callable[[list[str]], list[str]]) -> str | None:
    parts = sentences(text)
    kept = keep(parts)
    return " ".join(kept) if kept and kept != parts else None


def _forbidden_words(text: str, kw: dict[str, Any], _: Context) -> str | None:
    words = [w for w in kw.get("forbidden_words") or [] if w]
    pattern = re.compile("|".join(r"\b" + re.escape(w) + r"\b" for w in words), re.IGNORECASE) if words else None
    return _keep_sentences(text, lambda ss: [s for s in ss if not pattern.search(s)]) if pattern else None


def _keyword_at_most(text: str, kw: dict[str, Any], _: Context) -> str | None:
    keyword, limit = kw.get("keyword"), kw.get("frequency")
    if not keyword or kw.get("relation") != "less than" or not limit:
        return None
    pattern = re.compile(re.escape(keyword), re.IGNORECASE)

    def keep(ss: list[str]) -> list[str]:
        out, seen = [], 0
        for s in ss:
            hits = len(pattern.findall(s))
            if seen + hits < limit:
                out.append(s)
                seen += hits
        return out

    return _keep_sentences(text, keep)


def _sentences_fewer_than(text: str, kw: dict[str, Any], _: Context) -> str | None:
    limit = kw.get("num_sentences")
    if kw.get("relation") != "less than" or not limit or limit < 2:
        return None
    return _keep_sentences(text, lambda ss: ss[: limit - 1])


def _words_fewer_than(text: str, kw: dict[str, Any], _: Context) -> str | None:
    limit = kw.get("num_words")
    if kw.get("relation") != "less than" or not limit:
        return None

    def keep(ss: list[str]) -> list[str]:
        out, count = [], 0
        for s in ss:
            count += len(_WORD.findall(s))
            if count >= limit:
                break
            out.append(s)
        return out

    return _keep_sentences(text, keep)


def _capital_words(text: str, kw: dict[str, Any], _: Context) -> str | None:
    limit, relation = kw.get("capital_frequency"), kw.get("capital_relation")
    if not limit:
        return None
    capitals = [m for m in re.finditer(r"\b[A-Z][A-Z]+\b", text)]
    if relation == "less than" and len(capitals) >= limit:
        return re.sub(r"\b[A-Z][A-Z]+\b", lambda m: m.group(0).capitalize(), text)
    if relation == "at least" and len(capitals) < limit:
        # the response's longest words in capitals, as emphasis
        words = sorted({w for w in _WORD.findall(text) if len(w) > 3 and w.isalpha()}, key=lambda w: (-len(w), w))
        chosen = set(words[:limit])
        if len(chosen) < limit:
            return None
        return _WORD.sub(lambda m: m.group(0).upper() if m.group(0) in chosen else m.group(0), text)
    return None


def _paragraph_groups(text: str, n: int) -> list[str] | None:
    """``text`` as ``n`` paragraphs: its own blank-line paragraphs when it has exactly ``n``, else
    its sentences in ``n`` near-equal groups; None with fewer than ``n`` sentences."""
    own = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    if len(own) == n:
        return own
    parts = sentences(text)
    return [" ".join(g) for g in _groups(parts, n)] if len(parts) >= n else None


def _paragraphs(text: str, kw: dict[str, Any], _: Context) -> str | None:
    n = kw.get("num_paragraphs")
    paragraphs = _paragraph_groups(text, n) if n else None
    return "\n\n***\n\n".join(paragraphs) if paragraphs else None


def _nth_paragraph_first_word(text: str, kw: dict[str, Any], _: Context) -> str | None:
    n, nth, word = kw.get("num_paragraphs"), kw.get("nth_paragraph"), (kw.get("first_word") or "").strip()
    paragraphs = _paragraph_groups(text, n) if n and nth and 1 <= nth <= n and word.isalpha() else None
    if not paragraphs:
        return None
    target = paragraphs[nth - 1]
    first = re.match(r"[\"']*([A-Za-z]+)", target)
    if not first or first.group(1).lower() != word.lower():
        # the word as the paragraph's heading line: the paragraph's own text stays as written
        paragraphs[nth - 1] = f"{word.capitalize()}\n{target}"
    return "\n\n".join(paragraphs)


def _bullets(text: str, kw: dict[str, Any], _: Context) -> str | None:
    n, parts = kw.get("num_bullets"), sentences(text)
    if not n or len(parts) < n:
        return None
    return "\n".join("* " + " ".join(g) for g in _groups(parts, n))


def _sections(text: str, kw: dict[str, Any], _: Context) -> str | None:
    n, splitter, parts = kw.get("num_sections"), kw.get("section_spliter"), sentences(text)
    if not n or not splitter or len(parts) < n:
        return None
    return "\n\n".join(f"{splitter} {i}\n" + " ".join(g) for i, g in enumerate(_groups(parts, n), 1))


def _highlights(text: str, kw: dict[str, Any], _: Context) -> str | None:
    n = kw.get("num_highlights")
    if not n:
        return None
    lines, done = text.split("\n"), 0
    for i, line in enumerate(lines):  # highlight whole sentences, one line at a time
        if done >= n or "*" in line or not line.strip():
            continue
        parts = _SENTENCE_END.split(line.strip())
        for j, s in enumerate(parts):
            if done < n and s.strip():
                parts[j], done = f"*{s.strip()}*", done + 1
        lines[i] = " ".join(parts)
    return "\n".join(lines) if done >= n else None


def _two_responses(text: str, _: dict[str, Any], context: Context) -> str | None:
    other = context.get("alternative")
    if not other or other.strip() == text.strip() or "******" in text + other:
        return None
    return f"{text.strip()}\n******\n{other.strip()}"


def _title(text: str, _: dict[str, Any], context: Context) -> str | None:
    if re.search(r"<<[^\n]+>>", text):
        return None
    words = re.findall(r"[A-Za-z0-9']+", _task_line(context["prompt"]))[:6] or _WORD.findall(text)[:4]
    if not words:
        return None
    return f"<<{' '.join(w.capitalize() for w in words)}>>{context['break']}{text}"


def _repeat_prompt(text: str, kw: dict[str, Any], context: Context) -> str | None:
    request = (kw.get("prompt_to_repeat") or "").strip()
    return f"{request}{context['break']}{text}" if request else None


def _postscript(text: str, kw: dict[str, Any], context: Context) -> str | None:
    marker = (kw.get("postscript_marker") or "").strip()
    if not marker:
        return None
    return f"{text.rstrip()}{context['break']}{marker} {_pick(context['key'], _POSTSCRIPT_LINES)}"


def _end_phrase(text: str, kw: dict[str, Any], context: Context) -> str | None:
    phrase = (kw.get("end_phrase") or "").strip()
    if not phrase or text.strip().lower().endswith(phrase.lower()):
        return None
    return f"{text.rstrip()}{context['break']}{phrase}"


def _no_comma(text: str, _: dict[str, Any], __: Context) -> str | None:
    return re.sub(r"\s*,\s*", " ", text).replace(" .", ".") if "," in text else None


def _lowercase(text: str, _: dict[str, Any], __: Context) -> str | None:
    return text.lower()


def _capitals(text: str, _: dict[str, Any], __: Context) -> str | None:
    return text.upper()


def _json(text: str, _: dict[str, Any], __: Context) -> str | None:
    return json.dumps({"response": text}, ensure_ascii=False, indent=2)


def _quotation(text: str, _: dict[str, Any], __: Context) -> str | None:
    stripped = text.strip()
    return None if len(stripped) > 1 and stripped[0] == stripped[-1] == '"' else f'"{stripped}"'


# Applied in this order whatever the prompt's order: content first (what to keep), then layout,
# then what wraps the whole (title, repeated request, postscript, end phrase), then the surface
# (commas, case), JSON and quotes last because they enclose everything.
REWRITES: tuple[tuple[str, Rewrite], ...] = (
    ("keywords:forbidden_words", _forbidden_words),
    ("keywords:frequency", _keyword_at_most),
    ("length_constraints:number_sentences", _sentences_fewer_than),
    ("length_constraints:number_words", _words_fewer_than),
    ("length_constraints:number_paragraphs", _paragraphs),
    ("length_constraints:nth_paragraph_first_word", _nth_paragraph_first_word),
    ("detectable_format:number_bullet_lists", _bullets),
    ("detectable_format:multiple_sections", _sections),
    ("detectable_format:number_highlighted_sections", _highlights),
    ("combination:two_responses", _two_responses),
    ("detectable_format:title", _title),
    ("combination:repeat_prompt", _repeat_prompt),
    ("detectable_content:postscript", _postscript),
    ("startend:end_checker", _end_phrase),
    ("punctuation:no_comma", _no_comma),
    ("change_case:capital_word_frequency", _capital_words),
    ("change_case:english_lowercase", _lowercase),
    ("change_case:english_capital", _capitals),
    ("detectable_format:json_format", _json),
    ("startend:quotation", _quotation),
)
EDITABLE = frozenset(name for name, _ in REWRITES)
# Rewrites that change nothing when their constraint already holds: they also run for satisfied
# constraints, because an earlier rewrite may have broken them (a repeated request brings commas).
ALWAYS = frozenset(
    {
        "punctuation:no_comma",
        "change_case:english_lowercase",
        "change_case:english_capital",
        "startend:end_checker",
        "startend:quotation",
    }
)


def edit_response(prompt: dict[str, Any], response: str, *, alternative: str | None = None) -> str | None:
    """``response`` rewritten to follow ``prompt``'s constraints where a rewrite exists (a synth-if
    or IFEval row: ``instruction_id_list``, ``kwargs``), or None when nothing changed.

    ``alternative``: another answer to the same prompt, for "give two different responses".
    Only the constraints the response fails are rewritten (besides ``ALWAYS``'s no-op-when-held
    ones), so a satisfied layout is never rebuilt.
    """
    if not response.strip():
        return None
    ids, kwargs = list(prompt["instruction_id_list"]), [dict(k or {}) for k in prompt["kwargs"]]
    followed = verifiable.instruction_rewards([prompt], [response]).per_instruction_strict[0]
    todo = {i: k for i, k, ok in zip(ids, kwargs, followed) if i in EDITABLE and (not ok or i in ALWAYS)}
    if not todo:
        return None
    context = {
        "prompt": prompt["prompt"],
        "key": str(prompt.get("key", prompt.get("id", ""))),
        "alternative": alternative,
        "break": "\n" if "length_constraints:nth_paragraph_first_word" in ids else "\n\n",
    }
    text = response.strip()
    for name, rewrite in REWRITES:
        if name in todo:
            text = rewrite(text, todo[name], context) or text
    return text if text != response.strip() else None


def edited_samples(
    samples: Sequence[Any],
    prompts: dict[str, dict[str, Any]],
    tokenizer: Any,
    scorers: Sequence[Any],
    *,
    keep_truncated: bool = False,
) -> list[Any]:
    """An edited copy of every sample that could win (not a loop; finished, unless
    ``keep_truncated``) and that the editor changes, scored like the rollout's: ``rollout.Sample``s
    whose member is the original's plus ``EDIT_SUFFIX``. The alternative answer for "two
    responses" is the next such sample of the same prompt with another text, in rollout order."""
    from afmkit.posttrain.rollout import Sample, score_samples

    finished: dict[str, list[Any]] = {}
    for s in samples:
        if not s.loop and (s.finish_reason == "stop" or keep_truncated):
            finished.setdefault(s.prompt_id, []).append(s)
    edits: list[Any] = []
    for prompt_id, group in finished.items():
        for i, s in enumerate(group):
            others = [o.text for o in group[i + 1 :] + group[:i] if o.text.strip() != s.text.strip()]
            text = edit_response(prompts[prompt_id], s.text, alternative=others[0] if others else None)
            if text is None:
                continue
            edits.append(
                Sample(
                    prompt_id=prompt_id,
                    member=s.member + EDIT_SUFFIX,
                    index=s.index,
                    prompt_tokens=s.prompt_tokens,
                    tokens=list(tokenizer.encode(text)),
                    text=text,
                    finish_reason=s.finish_reason,
                    loop=verifiable.is_loop(text),
                    rewards={},
                )
            )
    if edits:
        score_samples(edits, prompts, scorers)
    return edits
