"""``afmkit posttrain edit-data``: SFT chats from the constraint editor at scale.

iTeC's editor (``--edit``) can only rewrite the samples of the prompts a round draws, a few per
instruction family: too few for a 135M model to learn to write all in lowercase or to wrap its
answer in quotes. A synth-if file asks each task many times under different constraints, so
one answer to the bare task can be rewritten for every prompt of that task:

1. the model answers the bare task of each of the first ``--tasks`` train tasks (the ``task``
   field of the prompts file, in file order), once, sampled, through the one engine (``rollout``);
   answers that run to the limit or loop are dropped;
2. for every train prompt of those tasks, the answer is rewritten for the prompt's constraints
   (``constraint_edits.edit_response``) and scored by the verifier; rewrites scoring at least
   ``--min-reward`` are kept as chats (the prompt with its constraints, the rewritten answer).
   "Two different responses" gets no rewrite here: one answer per task is all there is.

Output: ``--out`` JSONL of ``{"messages": [...]}`` (``posttrain sft --data`` reads it; a chat
whose unedited answer followed fewer constraints also carries it as ``"rejected"``, a
preference pair for ``posttrain dpo``), with
``answers.jsonl`` beside it (step 1, reused when present and by the same model and adapter, so a second run with other settings
does not generate again) and a ``.report.json``: counts per instruction family (prompts, kept).
Only train prompts are used; the dev split and IFEval are never read.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path
from typing import Any

from afmkit import cli_args
from afmkit.errors import UserError


@dataclasses.dataclass(frozen=True, kw_only=True)
class EditDataSettings:
    """Defaults of ``afmkit posttrain edit-data``: the one source the CLI reads."""

    tasks: int = 500  # train tasks answered (each answer serves every prompt of its task)
    min_reward: float = 1.0  # keep rewrites whose strict reward is at least this
    # trim each answer to this many words (at a sentence end) before rewriting; 0: whole answers.
    # SFT on long answers makes greedy answers longer, and long greedy answers loop.
    max_words: int = 0
    max_new_tokens: int = 384
    # sampled as iTeC samples: greedy answers loop (SmolLM2: 103 of 200 greedy answers finished)
    temperature: float = 0.8
    top_p: float = 0.95
    batch: int = 64
    seed: int = 0
    quiet: bool = False

    def check(self) -> None:
        for name in ("tasks", "max_new_tokens", "batch"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.max_words < 0:
            raise UserError(f"--max-words must be at least 0 (0: whole answers), got {self.max_words}")
        if not 0 < self.min_reward <= 1:
            raise UserError(f"--min-reward must lie in (0, 1], got {self.min_reward}")


def answers_path(out: Path) -> Path:
    return out.with_name(out.stem + ".answers.jsonl")


def report_path(out: Path) -> Path:
    return out.with_name(out.stem + ".report.json")


def train_tasks(prompts: list[dict[str, Any]], n: int) -> dict[str, str]:
    """The first ``n`` distinct train tasks of a synth-if file: task source -> text."""
    tasks: dict[str, str] = {}
    for row in prompts:
        if "task" not in row:
            raise UserError(
                f"prompt {row.get('id')!r} has no 'task' field (files from before it was added); "
                "make the file again with 'afmkit posttrain synth-if' (the same --n and --seed give the same prompts)"
            )
        if row["task_source"] not in tasks and len(tasks) < n:
            tasks[row["task_source"]] = row["task"]
    return tasks


def rewrite_for_prompts(
    prompts: list[dict[str, Any]], answers: dict[str, str], *, min_reward: float
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Chats (with ``prompt_id``, ``task_source`` and ``reward``) for every prompt whose task has
    an answer, the answer rewritten for the prompt's constraints, kept at ``min_reward`` or
    more; and the report."""
    from afmkit.posttrain import verifiable
    from afmkit.posttrain.constraint_edits import edit_response
    from afmkit.posttrain.itec import as_chat

    candidates = []
    for row in prompts:
        answer = answers.get(row["task_source"])
        if answer is None:
            continue
        text = edit_response(row, answer) or answer
        candidates.append((row, text))
    rewards = verifiable.instruction_rewards([r for r, _ in candidates], [t for _, t in candidates]).strict
    # the unedited answer beside a kept rewrite that changed it, where it follows fewer
    # constraints: a preference pair (posttrain dpo)
    changed = [
        i
        for i, (row, text) in enumerate(candidates)
        if rewards[i] >= min_reward and text != answers[row["task_source"]]
    ]
    before = verifiable.instruction_rewards(
        [candidates[i][0] for i in changed], [answers[candidates[i][0]["task_source"]] for i in changed]
    ).strict
    worse = {i for i, reward in zip(changed, before) if reward < rewards[i]}
    chats, families = [], Counter()
    kept_families = Counter()
    for i, ((row, text), reward) in enumerate(zip(candidates, rewards)):
        families.update(row["instruction_id_list"])
        if reward >= min_reward:
            kept_families.update(row["instruction_id_list"])
            rejected = {"rejected": answers[row["task_source"]]} if i in worse else {}
            chats.append(
                {
                    "prompt_id": row["id"],
                    "task_source": row["task_source"],
                    "reward": float(reward),
                    **as_chat(row, text),
                    **rejected,
                }
            )
    report = {
        "tasks_answered": len(answers),
        "prompts_of_those_tasks": len(candidates),
        "kept": len(chats),
        "mean_reward": float(rewards.mean()) if candidates else 0.0,
        "families": {f: {"prompts": n, "kept": kept_families[f]} for f, n in sorted(families.items())},
    }
    return chats, report


def answer_tasks(
    model: Any, tasks: dict[str, str], settings: EditDataSettings, *, adapter: Any = None
) -> dict[str, str | None]:
    """The model's answer (with ``adapter``, a ``LoraAdapter``, if given) to each bare task
    (source -> text); None for an answer cut at the token limit or as a loop (saved as such, so a
    second run does not ask again)."""
    from afmkit.posttrain.rollout import Member, RolloutSettings, rollout

    rows = [{"id": source, "prompt": text} for source, text in tasks.items()]
    rollout_settings = RolloutSettings(
        samples=1,
        max_new_tokens=settings.max_new_tokens,
        temperature=settings.temperature,
        top_p=settings.top_p,
        seed=settings.seed,
        batch=settings.batch,
    )
    samples = rollout([Member(model.name, model, adapter)], rows, rollout_settings, scorers=(), quiet=settings.quiet)
    return {
        s.prompt_id: s.text.strip() if s.finish_reason == "stop" and not s.loop and s.text.strip() else None
        for s in samples
    }


def edit_data(
    model: Any, prompts_path: str | Path, out: str | Path, settings: EditDataSettings, *, adapter: Any = None
) -> dict[str, Any]:
    """Steps 1-2 of the module docstring; writes ``out``, its answers and report; returns the report."""
    from afmkit.eval.jsonl import read_jsonl
    from afmkit.posttrain.synth_if import read_prompts
    from afmkit.train.run_directory import write_json, write_jsonl

    settings.check()
    out = Path(out)
    prompts = read_prompts(prompts_path, split="train")
    tasks = train_tasks(prompts, settings.tasks)
    saved = answers_path(out)
    answered_by = model.name if adapter is None else f"{model.name} + {adapter.name}"
    answers = {}
    if saved.is_file():
        rows = read_jsonl(saved, what="saved answers file")
        others = {r["model"] for r in rows if r.get("model", answered_by) != answered_by}
        if others:  # reusing them would mix two models' answers in one data set
            raise UserError(
                f"{saved} holds answers by {sorted(others)[0]}, not {answered_by}; give a new --out or remove it"
            )
        answers = {r["task_source"]: r["answer"] for r in rows}
    missing = {s: t for s, t in tasks.items() if s not in answers}
    if missing:
        answers.update(answer_tasks(model, missing, settings, adapter=adapter))
        write_jsonl(saved, [{"task_source": s, "answer": a, "model": answered_by} for s, a in answers.items()])
    answers = {s: answers[s] for s in tasks if answers.get(s) is not None}
    if settings.max_words:
        from afmkit.posttrain.constraint_edits import trim_words

        answers = {s: trim_words(a, settings.max_words) for s, a in answers.items()}
    if not answers:
        raise UserError(
            "the model finished no answer to the tasks (every one ran to the limit or looped); raise --max-new-tokens"
        )
    chats, report = rewrite_for_prompts(prompts, answers, min_reward=settings.min_reward)
    report = {"settings": dataclasses.asdict(settings), "prompts": str(prompts_path), "model": answered_by, **report}
    write_jsonl(out, chats)
    write_json(report_path(out), report)
    return report


# -- command -------------------------------------------------------------------------------------
def register(recipes: Any) -> None:
    from afmkit.cli_args import model_argument, setting_argument

    d = EditDataSettings()
    parser = recipes.add_parser(
        "edit-data", help="SFT chats: the model's answers to bare tasks, rewritten for each prompt's constraints"
    )
    model_argument(parser)
    parser.add_argument(
        "--adapter", default=None, help="answer with this LoRA adapter over --model (e.g. a DPO result)"
    )
    parser.add_argument("--prompts", required=True, help="a synth-if prompts file (its train split is used)")
    parser.add_argument(
        "--out", required=True, help="chats JSONL for 'posttrain sft --data' (answers and report beside it)"
    )
    setting_argument(parser, d, "tasks", "train tasks to answer; each answer serves every prompt of its task")
    setting_argument(parser, d, "min_reward", "keep rewrites with at least this strict reward")
    setting_argument(parser, d, "max_words", "trim each answer to this many words at a sentence end (0: whole)")
    setting_argument(parser, d, "max_new_tokens", "tokens per answer")
    setting_argument(parser, d, "temperature", "sampling temperature of the answers (0: greedy)")
    setting_argument(parser, d, "top_p", "nucleus sampling")
    setting_argument(parser, d, "batch", "rows decoded together")
    setting_argument(parser, d, "seed", "sampling seed")
    setting_argument(parser, d, "quiet", "no progress output")
    parser.set_defaults(run=cmd_edit_data)


def cmd_edit_data(args: Any) -> int:
    import afmkit
    from afmkit.posttrain.synth_if import read_prompts

    settings = cli_args.settings_from_args(EditDataSettings, args)
    settings.check()
    out = Path(args.out)
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; give a .jsonl file path")
    train_tasks(read_prompts(args.prompts, split="train"), settings.tasks)  # the 'task' field, before loading
    from afmkit.posttrain.trunk import load_init_adapter

    model = afmkit.load(args.model, dtype=args.dtype)
    adapter = None if args.adapter is None else load_init_adapter(model, args.adapter, flag="--adapter")
    report = edit_data(model, args.prompts, out, settings, adapter=adapter)
    print(
        f"wrote {report['kept']} chats to {out}: {report['tasks_answered']} tasks answered, "
        f"{report['prompts_of_those_tasks']} prompts of those tasks, mean reward {report['mean_reward']:.3f}; "
        f"per family in {report_path(out)}"
    )
    return 0
