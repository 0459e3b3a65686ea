"""``afmkit posttrain itec``: iterative teaching committee (AFM_SPEC section 5): rejection sampling
from a committee of models, SFT on the winners, and the new model joins the committee.

Each round:

1. every committee member samples K responses per train-split prompt (``rollout``: members that
   are adapters of the base decode together in mixed-adapter batches of the one engine);
2. each response is scored: the verifiable-instruction reward (strict) by default, or a reward
   model's score with ``--reward-model DIR``;
3. per prompt the best response that finished on its own and is not a loop wins (ties: the
   shorter, then committee order); a winner is kept if its reward exceeds ``--min-reward``;
   With ``--edit`` the constraint editor is a member too: an edited copy of every finished
   sample (``posttrain.constraint_edits``: its form rewritten to follow the constraints, its
   content the model's own) competes under the same reward;
4. a LoRA adapter is fine-tuned over the base on every winner kept so far (``posttrain.sft``);
5. the adapter joins the committee, and its greedy answers to the synth-if dev prompts are
   compared with the previous round's model's (IFEval is never used here).

Layout of ``--out DIR``::

    itec.json              the run's settings (``--resume`` must repeat them) and the table so far
    round-NN/samples.jsonl every scored sample of the round
    round-NN/edits.jsonl   with --edit: the editor's scored copies of them
    round-NN/winners.jsonl the kept winners as chats (``{"messages": [...]}``), SFT's input
    round-NN/adapter/      the round's adapter (PEFT layout) and its SFT run
    round-NN/dev.jsonl     its greedy dev-split responses and rewards
    round-NN/round.json    the round's table row: written last, so a round with it is done
    dev-00.jsonl           the starting model's dev responses (round 1's comparison)

A finished round (``round.json`` present) is never redone on ``--resume``; an unfinished one
restarts from its first missing file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from afmkit import cli_args
from afmkit.errors import UserError
from afmkit.posttrain.constraint_edits import EDIT_SUFFIX, edited_samples
from afmkit.posttrain.rollout import (
    Member,
    RolloutSettings,
    Sample,
    reward_model_scorer,
    rollout,
    verifier_scorer,
)
from afmkit.posttrain.sft import SFTSettings, sft
from afmkit.train.run_directory import check_new_run, check_run_directory, run_identity, write_json, write_jsonl

STATE_FILE = "itec.json"
ROUND_FILE = "round.json"
# Settings that may change on --resume (the rest define the run).
MAY_CHANGE_ON_RESUME = ("rounds", "quiet", "resume")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ItecSettings:
    """Every setting of ``afmkit posttrain itec`` and its default: the one source the CLI reads."""

    samples: int = 4  # K responses per prompt and member (iTeC needs K >= 1; RL needs K >= 2)
    rounds: int = 1
    train_prompts: int = 0  # train-split prompts per round, a new slice each round (0: all)
    dev_prompts: int = 32  # dev-split prompts for the win rate
    min_reward: float = 0.0  # a winner is kept only with a reward above this
    keep_truncated: bool = False  # responses cut at max_new_tokens may win (off: only finished ones)
    edit: bool = False  # the constraint editor joins the committee (posttrain.constraint_edits)
    max_new_tokens: int = 512
    temperature: float = 0.8
    top_p: float = 0.95
    batch: int = 64  # rows decoded together
    sft_steps: int = 100
    lora_rank: int = 16
    lr: float = 2e-4
    seed: int = 0
    resume: bool = False
    quiet: bool = False

    def check(self) -> None:
        if self.samples < 1:
            raise UserError(
                f"--samples must be at least 1, got {self.samples} (iTeC keeps the best of K >= 1 samples; "
                "it is RL's leave-one-out baseline that needs K >= 2)"
            )
        for name in ("rounds", "dev_prompts", "batch", "sft_steps", "lora_rank", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.train_prompts < 0:
            raise UserError(f"--train-prompts must be 0 (all) or more, got {self.train_prompts}")

    def rollout(self) -> RolloutSettings:
        return RolloutSettings(
            samples=self.samples,
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            batch=self.batch,
        )


# -- committee -----------------------------------------------------------------------------------
def _is_adapter_dir(spec: str) -> bool:
    from afmkit.adapters.peft_io import CONFIG_FILE

    return (Path(spec).expanduser() / CONFIG_FILE).is_file()


def check_committee(specs: Sequence[str], base: str) -> None:
    """Every member names something that exists, before any model loads."""
    from afmkit.weights import known_models

    if not specs:
        raise UserError("--committee is empty; give comma-separated members: the base model's name or adapter dirs")
    for spec in specs:
        if spec in ("base", base) or spec in known_models() or _is_adapter_dir(spec):
            continue
        if not Path(spec).expanduser().exists():
            raise UserError(
                f"committee member {spec!r} does not exist: give an adapter directory, a model path or one of "
                f"{', '.join(known_models())} ('base' is --model)"
            )


def load_committee(specs: Sequence[str], base: Any, *, dtype: Any = None) -> list[Member]:
    """Members from specs: ``base`` (or ``base.name``) is the base model itself, an adapter
    directory an adapter over it (refused if made for another base), anything else a model of
    its own (loaded with ``dtype``)."""
    import afmkit
    from afmkit.adapters.peft_io import load_adapter

    members = []
    for spec in specs:
        if spec in ("base", base.name):
            members.append(Member(base.name, base))
        elif _is_adapter_dir(spec):
            path = Path(spec).expanduser()
            adapter = load_adapter(path, config=base.config, params=base.params, name=path.name)
            members.append(Member(str(path), base, adapter))
        else:
            members.append(Member(spec, afmkit.load(spec, dtype=dtype)))
    names = [m.name for m in members]
    if len(set(names)) != len(names):
        raise UserError(f"--committee names a member twice: {', '.join(names)}")
    return members


# -- one round's pieces ----------------------------------------------------------------------------
def pick_winners(samples: Sequence[Sample], reward: str, *, keep_truncated: bool = False) -> dict[str, Sample]:
    """The best eligible sample per prompt: the highest ``reward``; ties go to the shorter, then
    the earlier (committee order, sample index). A loop is never eligible, nor (unless
    ``keep_truncated``) a response cut at the token limit: SFT on it would teach the model not to
    stop. A prompt without an eligible sample has no winner."""
    best: dict[str, tuple[tuple, Sample]] = {}
    for order, s in enumerate(samples):
        if s.loop or (s.finish_reason != "stop" and not keep_truncated):
            continue
        key = (-s.rewards[reward], len(s.tokens), order)
        if s.prompt_id not in best or key < best[s.prompt_id][0]:
            best[s.prompt_id] = (key, s)
    return {pid: s for pid, (_, s) in best.items()}


def as_chat(prompt: dict[str, Any], response: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": prompt["prompt"]}, {"role": "assistant", "content": response}]}


def win_rate(new: np.ndarray, old: np.ndarray) -> float:
    """Share of prompts where ``new`` beats ``old``, ties counting half."""
    new, old = np.asarray(new, np.float64), np.asarray(old, np.float64)
    return float(np.mean((new > old) + 0.5 * (new == old)))


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def dev_responses(member: Member, prompts: Sequence[dict[str, Any]], settings: ItecSettings, reward: str, scorers: Any):
    """Greedy answers of one model to the dev prompts, scored: rows for ``dev*.jsonl``."""
    greedy = dataclasses.replace(settings.rollout(), samples=1, temperature=0.0, top_p=1.0)
    samples = rollout([member], prompts, greedy, scorers=scorers, quiet=settings.quiet)
    return [{"prompt_id": s.prompt_id, "text": s.text, "loop": s.loop, "reward": s.rewards[reward]} for s in samples]


def _train_slice(prompts: list[dict[str, Any]], settings: ItecSettings, round_index: int) -> list[dict[str, Any]]:
    n = settings.train_prompts
    if n == 0 or n >= len(prompts):
        return prompts
    start = ((round_index - 1) * n) % len(prompts)
    return [prompts[(start + i) % len(prompts)] for i in range(n)]


# -- the run -------------------------------------------------------------------------------------
def itec(
    base: Any,
    committee: Sequence[str],
    prompts_path: str | os.PathLike,
    out: str | os.PathLike,
    settings: ItecSettings,
    *,
    reward_model: str | None = None,
    dtype: Any = None,
) -> list[dict[str, Any]]:
    """Run ``settings.rounds`` rounds (see the module docstring) into ``out``; returns the table.

    ``base``: the loaded base model (``LanguageModel``) that adapters in ``committee`` attach
    to and each round's adapter is trained over. Every input check runs before the first write.
    """
    settings.check()
    out = Path(out)
    check_committee(committee, base.name)
    train = _read_split(prompts_path, "train")
    dev = _read_split(prompts_path, "dev")[: settings.dev_prompts]
    identity = run_identity(
        settings,
        MAY_CHANGE_ON_RESUME,
        committee=list(committee),
        prompts=str(prompts_path),
        model=base.name,
        reward_model=reward_model,
    )
    check_run_directory(out, out / STATE_FILE, identity, resume=settings.resume, run="iTeC", key="settings")
    members = load_committee(committee, base, dtype=dtype)
    scorers, reward = [verifier_scorer], "strict"
    if reward_model is not None:
        from afmkit.posttrain.reward_model import load_reward_model

        scorers, reward = [reward_model_scorer(load_reward_model(reward_model, base))], "rm"

    out.mkdir(parents=True, exist_ok=True)
    table: list[dict[str, Any]] = []
    previous_dev = out / "dev-00.jsonl"
    if not previous_dev.is_file():
        write_jsonl(previous_dev, dev_responses(members[0], dev, settings, reward, scorers))
    write_json(out / STATE_FILE, {"settings": identity, "table": table})
    winners: dict[str, dict[str, Any]] = {}  # every kept winner so far, by prompt id (later rounds replace)
    for r in range(1, settings.rounds + 1):
        directory = out / f"round-{r:02d}"
        done = directory / ROUND_FILE
        if done.is_file():  # finished: its adapter rejoins the committee, its winners the SFT set
            row = json.loads(done.read_text())
            winners.update({w["prompt_id"]: w for w in _read_jsonl(directory / "winners.jsonl")})
            members.append(_round_member(base, directory))
            table.append(row)
            previous_dev = directory / "dev.jsonl"
            continue
        directory.mkdir(exist_ok=True)
        started = time.perf_counter()
        round_prompts = _train_slice(train, settings, r)
        samples_path = directory / "samples.jsonl"
        stats: dict[str, float] = {}
        if samples_path.is_file():
            samples = [Sample(**row) for row in _read_jsonl(samples_path)]
        else:
            samples = rollout(
                members, round_prompts, settings.rollout(), scorers=scorers, stats=stats, quiet=settings.quiet
            )
            write_jsonl(samples_path, [s.to_json() for s in samples])
        by_id = {str(p.get("id", p.get("key"))): p for p in round_prompts}
        candidates = samples
        if settings.edit:
            edits_path = directory / "edits.jsonl"
            if edits_path.is_file():
                edits = [Sample(**row) for row in _read_jsonl(edits_path)]
            else:
                edits = edited_samples(samples, by_id, base.tokenizer, scorers, keep_truncated=settings.keep_truncated)
                write_jsonl(edits_path, [s.to_json() for s in edits])
            candidates = samples + edits  # after the samples: on a tie the model's own answer wins
        picked = pick_winners(candidates, reward, keep_truncated=settings.keep_truncated)
        kept = {pid: s for pid, s in picked.items() if s.rewards[reward] > settings.min_reward}
        for pid, s in kept.items():
            winners[pid] = {
                "prompt_id": pid,
                "member": s.member,
                "reward": s.rewards[reward],
                **as_chat(by_id[pid], s.text),
            }
        write_jsonl(directory / "winners.jsonl", [winners[pid] for pid in sorted(winners)])
        rewards = np.array([s.rewards[reward] for s in samples])
        row = {
            "round": r,
            "members": [m.name for m in members],
            "prompts": len(round_prompts),
            "samples": len(samples),
            "mean_reward": float(rewards.mean()),
            # per prompt: its winner's reward, 0 without one
            "best_reward": float(np.mean([picked[pid].rewards[reward] if pid in picked else 0.0 for pid in by_id])),
            "loop_share": float(np.mean([s.loop for s in samples])),
            "length_share": float(np.mean([s.finish_reason == "length" for s in samples])),
            "winners_kept": len(kept),
            "edited_winners": sum(s.member.endswith(EDIT_SUFFIX) for s in kept.values()),
            "sft_conversations": len(winners),
            "rollout_tokens_per_second": stats.get("tokens_per_second"),
        }
        if not winners:
            raise UserError(
                f"round {r}: no prompt has a winner with reward above {settings.min_reward} that is not a loop; "
                "raise --samples or --temperature, or lower --min-reward"
            )
        adapter_dir = directory / "adapter"
        if not (adapter_dir / "adapter_config.json").is_file():
            sft(
                base,
                [w["messages"] for w in winners.values()],
                adapter_dir,
                SFTSettings(
                    lora_rank=settings.lora_rank,
                    steps=settings.sft_steps,
                    lr=settings.lr,
                    warmup=min(20, settings.sft_steps // 5),
                    batch=8,
                    seed=settings.seed + r,
                    resume=(adapter_dir / "training" / "settings.json").is_file(),
                    quiet=settings.quiet,
                    eval_fraction=0.05,
                ),
            )
        member = _round_member(base, directory)
        dev_path = directory / "dev.jsonl"
        if not dev_path.is_file():
            write_jsonl(dev_path, dev_responses(member, dev, settings, reward, scorers))
        new, old = _read_jsonl(dev_path), _read_jsonl(previous_dev)
        row.update(
            dev_reward=float(np.mean([d["reward"] for d in new])),
            dev_win_rate=win_rate([d["reward"] for d in new], [d["reward"] for d in old]),
            dev_loop_share=float(np.mean([d["loop"] for d in new])),
            seconds=time.perf_counter() - started,
        )
        write_json(done, row)
        members.append(member)
        table.append(row)
        previous_dev = dev_path
        write_json(out / STATE_FILE, {"settings": identity, "table": table})
        if not settings.quiet:
            print_table(table)
    return table


def _round_member(base: Any, directory: Path) -> Member:
    from afmkit.adapters.peft_io import load_adapter

    adapter = load_adapter(directory / "adapter", config=base.config, params=base.params, name=directory.name)
    return Member(f"itec-{directory.name}", base, adapter)


def _read_split(path: str | os.PathLike, split: str) -> list[dict[str, Any]]:
    from afmkit.posttrain.synth_if import read_prompts

    rows = read_prompts(path, split=split)
    if not rows:
        raise UserError(f"{path} has no {split} prompts; make a prompt file with 'afmkit posttrain synth-if'")
    return rows


COLUMNS = (
    ("round", "{:>5}"),
    ("samples", "{:>7}"),
    ("mean_reward", "{:>11.3f}"),
    ("best_reward", "{:>11.3f}"),
    ("loop_share", "{:>10.3f}"),
    ("winners_kept", "{:>12}"),
    ("dev_reward", "{:>10.3f}"),
    ("dev_win_rate", "{:>12.3f}"),
)


def print_table(table: Sequence[dict[str, Any]]) -> None:
    print("  ".join(f"{name:>{len(name)}}" for name, _ in COLUMNS))
    for row in table:
        print("  ".join(fmt.format(row[name]).rjust(len(name)) for name, fmt in COLUMNS))


# -- command -------------------------------------------------------------------------------------
def register(recipes: Any) -> None:
    from afmkit.cli_args import model_argument, run_arguments, setting_argument

    d = ItecSettings()
    parser = recipes.add_parser("itec", help="rejection sampling from a teacher committee, SFT on the winners (iTeC)")
    model_argument(parser, role="base model (adapters in the committee attach to it; each round trains one over it)")
    parser.add_argument(
        "--committee", required=True, help="comma-separated members: 'base' (--model), adapter dirs or other models"
    )
    parser.add_argument(
        "--prompts", required=True, help="a synth-if prompts file (train split sampled, dev split judged)"
    )
    parser.add_argument("--out", required=True, help="run directory (see docs/posttraining.md)")
    parser.add_argument("--reward-model", default=None, help="score with this reward model (default: the verifier)")
    setting_argument(parser, d, "samples", "responses per prompt and member, K >= 1")
    setting_argument(parser, d, "rounds", "rounds")
    setting_argument(parser, d, "train_prompts", "train prompts per round, a new slice each round; 0 = all")
    setting_argument(parser, d, "dev_prompts", "dev prompts for the win rate")
    setting_argument(parser, d, "min_reward", "keep winners above this reward")
    setting_argument(
        parser,
        d,
        "keep_truncated",
        "responses cut at --max-new-tokens may win (default: only responses that finished on their own)",
    )
    setting_argument(
        parser,
        d,
        "edit",
        "the constraint editor joins the committee: rewritten copies of finished samples compete (docs/posttraining.md)",
    )
    setting_argument(parser, d, "max_new_tokens", "tokens per response")
    setting_argument(parser, d, "temperature", "sampling temperature")
    setting_argument(parser, d, "top_p", "nucleus sampling")
    setting_argument(parser, d, "batch", "rows decoded together")
    setting_argument(parser, d, "sft_steps", "SFT steps per round")
    setting_argument(parser, d, "lora_rank", "LoRA rank")
    setting_argument(parser, d, "lr", "SFT learning rate")
    run_arguments(
        parser,
        d,
        seed="sampling and training seed",
        resume="continue the run in --out (finished rounds are kept)",
        quiet="no progress output",
    )
    parser.set_defaults(run=cmd_itec, trains=True)


def settings_from_args(args: Any) -> ItecSettings:
    return cli_args.settings_from_args(ItecSettings, args)


def cmd_itec(args: Any) -> int:
    settings = settings_from_args(args)
    settings.check()
    committee = [c.strip() for c in args.committee.split(",") if c.strip()]
    check_committee(committee, args.model)
    _read_split(args.prompts, "train")
    _read_split(args.prompts, "dev")
    if not settings.resume:  # --resume compares the settings once the base is loaded
        check_new_run(Path(args.out))
    base = cli_args.load_training_base(
        args.model, args.dtype, fix="give its base model as --model and the adapter's directory as a --committee member"
    )
    table = itec(base, committee, args.prompts, args.out, settings, reward_model=args.reward_model, dtype=args.dtype)
    print(json.dumps(table))
    return 0
