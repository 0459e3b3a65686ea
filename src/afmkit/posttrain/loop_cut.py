"""``afmkit posttrain loop-cut``: SFT chats that teach a model to stop where it would loop.

SmolLM2-135M's greedy answers often start well and then repeat a sentence or a list item until
the token limit (IFEval: half its answers). The fix asked of the model is small: end the answer
where the repetition would begin. This recipe writes exactly that lesson from the model's own
greedy answers to synth-if train prompts:

1. the model answers each of the first ``--prompts-limit`` train prompts greedily, through the
   one engine (``rollout``; a response is stopped as soon as it is a repetition loop);
2. an answer that ended by itself (EOS, no loop) is kept as it is; an answer that looped is cut
   after the first copy of the repeated unit (``cut_at_loop``), back to the last sentence or line
   end, and kept if at least ``--min-words`` words remain; an answer that ran to the token limit
   without a loop is dropped;
3. kept answers scoring at least ``--min-reward`` (strict verifier) become chats;
4. every looped answer also becomes a chat of what not to say: the whole answer, marked
   ``"unlikely_from"`` where its loop first repeats (``data.chat``), so SFT lowers the probability
   of each repeated token (the unlikelihood loss, ``posttrain sft --unlikelihood``).

Every kept token but the final end-of-turn is the model's own greedy choice, so SFT on these
chats (``posttrain sft --data``, e.g. with ``--init-adapter`` to continue an adapter) mostly
teaches where to stop and not to repeat, and moves the rest of the model little.

Output: ``--out`` JSONL of ``{"messages": [...]}`` with ``prompt_id``, ``kind`` ("finished",
"cut" or "loop", the unlikely text) and ``reward`` (none for "loop"); a "cut" chat also carries
the whole looped answer as ``"rejected"``, a preference pair for ``posttrain dpo``;
``answers.jsonl`` beside it (step 1, reused when present) and a
``.report.json`` of counts. Only train prompts are read; the dev split and IFEval never are.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from afmkit import cli_args
from afmkit.errors import UserError
from afmkit.posttrain.edit_data import answers_path, report_path


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoopCutSettings:
    """Defaults of ``afmkit posttrain loop-cut``: the one source the CLI reads."""

    prompts_limit: int = 512  # the first N train prompts are answered
    max_new_tokens: int = 384
    min_words: int = 12  # a cut answer shorter than this is dropped
    min_reward: float = 0.0  # keep answers whose strict verifier reward is at least this
    batch: int = 64
    quiet: bool = False

    def check(self) -> None:
        for name in ("prompts_limit", "max_new_tokens", "batch", "min_words"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.min_reward <= 1:
            raise UserError(f"--min-reward must lie in [0, 1], got {self.min_reward}")


# -- where a loop begins -------------------------------------------------------------------------
# An acceptable last character of a cut answer: a sentence end, a closing bracket or quote, code
# fence or emphasis; anything else is cut back to the last such end or line break.
_ENDS = ".!?)]}\"'`*"
_SENTENCE_END = re.compile(r"[.!?]")
_BOUNDARY = re.compile(r"(?<!\d)[.!?](?=\s)|\n")  # "2. " is a list marker, not a sentence end


def loop_start(text: str, *, min_repeats: int = 3, min_span: int = 32) -> int | None:
    """The character offset where the repetition loop that ``text`` ends in first repeats, or
    None when ``text`` ends in no loop (``verifiable.loop_period``'s test).

    The repeating part is periodic from some token on; any window of one period there is a copy
    of the unit, so the first copy is taken to end at the first sentence end it can (a whole
    sentence or list item kept once), else one period after the repeating part begins."""
    from afmkit.posttrain.verifiable import TEXT_TOKEN, loop_period

    period = loop_period(text, min_repeats=min_repeats, min_span=min_span)
    if period is None:
        return None
    matches = list(TEXT_TOKEN.finditer(text))  # loop_period's tokens, with their character spans
    tokens = ["0" if m.group().isdigit() else m.group() for m in matches]
    end = len(tokens)
    if tokens[end - 1] != tokens[end - 1 - period]:
        end -= 1  # the cycle holds up to the last (cut-off) word only
    start = end - period - 1  # walk back while each token equals the one a period later
    while start >= 0 and tokens[start] == tokens[start + period]:
        start -= 1
    first_end = start + 1 + period  # the first copy is tokens[start + 1 : first_end]
    for shift in range(period):
        i = first_end + shift - 1  # the last token of this copy
        if _SENTENCE_END.fullmatch(tokens[i]) and (i == 0 or tokens[i - 1] != "0"):  # "2." is a list marker
            return matches[i].end()
    return matches[first_end].start()


def cut_at_loop(text: str, *, min_words: int = 12) -> str | None:
    """``text`` cut where its loop first repeats, back to a sentence or line end; None when it
    ends in no loop or fewer than ``min_words`` words remain."""
    start = loop_start(text)
    if start is None:
        return None
    kept = text[:start].rstrip()
    if kept and kept[-1] not in _ENDS:
        boundaries = [m.end() for m in _BOUNDARY.finditer(kept)]
        kept = kept[: boundaries[-1]].rstrip() if boundaries else ""
    if len(kept.split()) < min_words:
        return None
    return kept


# -- the data ------------------------------------------------------------------------------------
def greedy_answers(
    model: Any, prompts: list[dict[str, Any]], settings: LoopCutSettings, *, adapter: Any = None
) -> list[dict[str, Any]]:
    """Step 1: one greedy answer per prompt (by ``model``, with ``adapter`` if given):
    ``{prompt_id, text, finish_reason, loop}``."""
    from afmkit.posttrain.rollout import Member, RolloutSettings, rollout

    greedy = RolloutSettings(
        samples=1, max_new_tokens=settings.max_new_tokens, temperature=0.0, top_p=1.0, batch=settings.batch
    )
    samples = rollout([Member(model.name, model, adapter)], prompts, greedy, scorers=(), quiet=settings.quiet)
    return [
        {"prompt_id": s.prompt_id, "text": s.text, "finish_reason": s.finish_reason, "loop": s.loop} for s in samples
    ]


def loop_cut_chats(
    prompts: list[dict[str, Any]], answers: list[dict[str, Any]], settings: LoopCutSettings
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Steps 2-3: the chats and the report's counts."""
    from afmkit.posttrain import verifiable
    from afmkit.posttrain.itec import as_chat

    by_id = {p["id"]: p for p in prompts}
    candidates, counts = [], {"finished": 0, "looped": 0, "cut": 0, "cut_too_short": 0, "at_limit_no_loop": 0}
    for answer in answers:
        text = answer["text"].strip()
        if answer["loop"]:
            counts["looped"] += 1
            cut = cut_at_loop(text, min_words=settings.min_words)
            if cut is None:
                counts["cut_too_short"] += 1
                continue
            counts["cut"] += 1
            candidates.append((by_id[answer["prompt_id"]], cut, "cut", text))
        elif answer["finish_reason"] == "stop" and text:
            counts["finished"] += 1
            candidates.append((by_id[answer["prompt_id"]], text, "finished", None))
        else:
            counts["at_limit_no_loop"] += 1
    rewards = verifiable.instruction_rewards([p for p, *_ in candidates], [t for _, t, *_ in candidates])
    chats = [
        # a cut answer carries the whole loop it was cut from: a preference pair (posttrain dpo)
        {
            "prompt_id": p["id"],
            "kind": kind,
            "reward": float(r),
            **as_chat(p, text),
            **({"rejected": loop} if loop else {}),
        }
        for (p, text, kind, loop), r in zip(candidates, rewards.strict)
        if r >= settings.min_reward
    ]
    words = sorted(len(c["messages"][-1]["content"].split()) for c in chats)
    negatives = [loop_chat(by_id[a["prompt_id"]], a["text"].strip()) for a in answers if a["loop"]]
    negatives = [n for n in negatives if n is not None]
    report = {
        "answers": len(answers),
        **counts,
        "kept": len(chats),
        "kept_cut": sum(c["kind"] == "cut" for c in chats),
        "median_words": words[len(words) // 2] if words else 0,
        "loops_marked_unlikely": len(negatives),
        "mean_reward": float(rewards.strict.mean()) if candidates else 0.0,
    }
    order = {p["id"]: i for i, p in enumerate(prompts)}  # each prompt's chats together, as sft's held-out split
    return sorted(chats + negatives, key=lambda c: order[c["prompt_id"]]), report


def loop_chat(prompt: dict[str, Any], text: str) -> dict[str, Any] | None:
    """A looped answer as a chat whose text from the loop's first repeat on is marked unlikely."""
    from afmkit.posttrain.itec import as_chat

    start = loop_start(text)
    if start is None or start >= len(text):
        return None
    chat = as_chat(prompt, text)
    chat["messages"][-1]["unlikely_from"] = start
    return {"prompt_id": prompt["id"], "kind": "loop", **chat}


def train_prompts(path: str | Path, limit: int) -> list[dict[str, Any]]:
    """The first ``limit`` train prompts of a synth-if file (refused in one line if none)."""
    from afmkit.posttrain.synth_if import read_prompts

    prompts = read_prompts(path, split="train")[:limit]
    if not prompts:
        raise UserError(f"{path} has no train prompts; make a prompts file with 'afmkit posttrain synth-if'")
    return prompts


def loop_cut(
    model: Any, prompts_path: str | Path, out: str | Path, settings: LoopCutSettings, *, adapter: Any = None
) -> dict[str, Any]:
    """The module docstring's steps for ``model`` (with ``adapter``, a ``LoraAdapter``, if
    given); writes ``out``, its answers and report; returns the report."""
    from afmkit.eval.jsonl import read_jsonl
    from afmkit.train.run_directory import write_json, write_jsonl

    settings.check()
    out = Path(out)
    prompts = train_prompts(prompts_path, settings.prompts_limit)
    saved = answers_path(out)
    answers = {a["prompt_id"]: a for a in read_jsonl(saved, what="saved answers file")} if saved.is_file() else {}
    missing = [p for p in prompts if p["id"] not in answers]
    if missing:
        answers.update({a["prompt_id"]: a for a in greedy_answers(model, missing, settings, adapter=adapter)})
        write_jsonl(saved, list(answers.values()))
    chats, report = loop_cut_chats(prompts, [answers[p["id"]] for p in prompts], settings)
    model_name = model.name if adapter is None else f"{model.name} + {adapter.name}"
    report = {"settings": dataclasses.asdict(settings), "prompts": str(prompts_path), "model": model_name, **report}
    write_jsonl(out, chats)
    write_json(report_path(out), report)
    return report


# -- command -------------------------------------------------------------------------------------
def register(recipes: Any) -> None:
    from afmkit.cli_args import model_argument, setting_argument

    d = LoopCutSettings()
    parser = recipes.add_parser(
        "loop-cut", help="SFT chats: the model's greedy answers, each loop cut where it first repeats"
    )
    model_argument(parser)
    parser.add_argument(
        "--adapter", default=None, help="answer with this LoRA adapter over --model (e.g. an SFT result)"
    )
    parser.add_argument("--prompts", required=True, help="a synth-if prompts file (its train split is used)")
    parser.add_argument(
        "--out", required=True, help="chats JSONL for 'posttrain sft --data' (answers and report beside it)"
    )
    setting_argument(parser, d, "prompts_limit", "answer the first N train prompts")
    setting_argument(parser, d, "max_new_tokens", "tokens per answer")
    setting_argument(parser, d, "min_words", "drop a cut answer with fewer words")
    setting_argument(parser, d, "min_reward", "keep answers with at least this strict verifier reward")
    setting_argument(parser, d, "batch", "rows decoded together")
    setting_argument(parser, d, "quiet", "no progress output")
    parser.set_defaults(run=cmd_loop_cut)


def cmd_loop_cut(args: Any) -> int:
    import afmkit

    settings = cli_args.settings_from_args(LoopCutSettings, args)
    settings.check()
    out = Path(args.out)
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; give a .jsonl file path")
    train_prompts(args.prompts, settings.prompts_limit)  # before loading the model
    from afmkit.posttrain.trunk import load_init_adapter

    model = afmkit.load(args.model, dtype=args.dtype)
    adapter = None if args.adapter is None else load_init_adapter(model, args.adapter, flag="--adapter")
    report = loop_cut(model, args.prompts, out, settings, adapter=adapter)
    print(
        f"wrote {report['kept']} chats to {out} ({report['kept_cut']} cut at a loop) and "
        f"{report['loops_marked_unlikely']} loops marked unlikely, from {report['answers']} greedy answers: "
        f"{report['finished']} finished, {report['looped']} looped; report in {report_path(out)}"
    )
    return 0
