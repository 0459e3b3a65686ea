"""``afmkit posttrain dpo``: direct preference optimisation on pairs of answers to one prompt, a
recipe on the one trainer (``train.finetune`` over ``train.step``, objective
``train.objectives.Preference``).

Data: JSONL lines ``{"messages": [..., {"role": "assistant", "content": PREFERRED}],
"rejected": OTHER}``, i.e. an SFT chat whose last answer is preferred to ``rejected``, the
other answer to the same conversation (lines without ``rejected`` are skipped, or, with
``--replay-weight``, replay chats). Two recipes
write them: ``posttrain edit-data`` (the constraint editor's rewrite, which follows the prompt's
constraints, against the model's own answer it rewrote, which does not: they differ in little but
the form, so the pair teaches the form and not the content) and ``posttrain loop-cut`` (an
answer cut where its loop begins against the whole loop).

Each pair's two answers share one copy of their prompt in a packed row (``rl.policy_rows``, as
RL's samples do). The reference policy is the starting one (``--init-adapter``, or the base);
its log-probabilities are computed once, by the trainer's own forward, before the first step,
so the first step's loss is exactly log 2. They are saved in the run directory
(``REFERENCE_FILE``), so ``--resume`` skips that pass (about 24 minutes for 1,900 SmolLM2 pairs on
2 cores) when the rows and the starting adapter are the same. Settings, output layout and
``--resume`` are SFT's (``posttrain.sft``), plus ``--beta`` and ``--nll-weight`` (the preferred answer's likelihood kept
up by its own NLL term, as RPO does).

Replay (``--replay-weight W``): the file's chats without ``rejected`` add W times their answer's
mean token NLL. Chats of the reference's own answers to prompts no pair is about hold the model
where it was on them, which the pairs alone do not (chained DPO rounds drifted on text no pair
touched: docs/posttraining.md). They train only: the held-out loss stays the pairs' own.

Anchor (``--anchor-text FILE --anchor-weight W``): windows of ``--anchor-len`` tokens of a plain
text file ride along with the pairs, one per packed row, and each pair adds W times their mean
per-token KL(base || policy) over the base's top ``--anchor-top-k`` tokens and the rest lumped
(``train.objectives.Preference``, ``lumped_kl``, as ``compress recover`` distils). The base's
top-k are computed once before the first step, with the reference log-probabilities, and saved
with them. The held-out rows get the file's last windows, which no training row uses, so the
held-out loss includes W times the KL on unseen text (``anchor_kl`` in the metrics). Use text
the evaluation never reads (not the perplexity texts that measure the drift).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from afmkit import cli_args
from afmkit.errors import UserError
from afmkit.posttrain.anchor import AnchorSettings, anchor_arguments, text_windows, with_teacher
from afmkit.posttrain.sft import MAY_CHANGE_ON_RESUME, TRAINING_FILE, ChatRunSettings
from afmkit.posttrain.trunk import RUN_DIR, SETTINGS_FILE, report_unfinished, trunk_run
from afmkit.train.run_directory import check_run_directory, publish, run_identity, write_bytes, write_json

# The reference log-probabilities of the train and held-out rows, with the fingerprint of what
# they were computed from; a resumed run reads them instead of recomputing them.
REFERENCE_FILE = f"{RUN_DIR}/reference_log_probs.npz"


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPOSettings(ChatRunSettings, AnchorSettings):
    """``afmkit posttrain dpo``'s settings: a chat run's and the anchor's, plus ``beta``, ``nll_weight``
    and ``replay_weight``."""

    beta: float = 0.1  # the implicit reward's scale (DPO's beta): larger stays closer to the reference
    # times the preferred answer's mean token NLL (RPO): keeps it likely, not merely likelier
    # (without it, SmolLM2's preferred answers lost 47.5 nats each in 48 steps: docs/posttraining.md)
    nll_weight: float = 1.0
    replay_weight: float = 0.0  # times a replay chat's mean token NLL (0: chats without 'rejected' are skipped)
    steps: int = 100
    warmup: int = 5
    lr: float = 5e-5

    def check(self) -> None:
        super().check()
        if self.beta <= 0:
            raise UserError(f"--beta must be positive, got {self.beta}")
        for name in ("nll_weight", "replay_weight"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must be at least 0, got {getattr(self, name)}")
        if self.full:
            raise UserError("posttrain dpo trains a LoRA adapter; drop --full")
        self.check_anchor()


@dataclasses.dataclass(frozen=True)
class Pair:
    messages: list[dict[str, str]]  # the conversation, its last message the preferred answer
    rejected: str | None  # None: a replay chat, its last answer alone


def read_pairs(path: str | os.PathLike, *, replay: bool = False) -> list[Pair]:
    """Preference pairs from JSONL (the module docstring): the lines that carry ``rejected``,
    and with ``replay`` the other chats as replay chats (else an SFT chat file may hold them);
    one line names a bad row."""
    from afmkit.data.chat import read_chat_jsonl

    conversations = iter(read_chat_jsonl(path))  # checks every 'messages', one per non-blank line
    pairs = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        messages, rejected = next(conversations), json.loads(line).get("rejected")
        if rejected is None and not replay:
            continue
        if rejected is None and messages[-1]["role"] != "assistant":
            raise UserError(f"{path}:{number}: a replay chat needs 'messages' ending in an assistant answer")
        if rejected is not None and (not isinstance(rejected, str) or messages[-1]["role"] != "assistant"):
            raise UserError(
                f"{path}:{number}: a preference pair needs 'messages' ending in the preferred assistant answer "
                "and 'rejected', the other answer (a string)"
            )
        pairs.append(Pair(messages, rejected))
    if not any(pair.rejected is not None for pair in pairs):
        raise UserError(f"{path} holds no preference pairs: no line carries 'rejected', the answer not preferred")
    return pairs


def pair_tokens(tokenizer: Any, pair: Pair) -> tuple[list[int], list[int], list[int] | None]:
    """``(prompt, preferred, rejected)`` token ids (``rejected`` None for a replay chat): each
    answer as the chat template closes it (its end-of-turn tokens included, so where an answer
    ends is part of the preference)."""
    from afmkit.data.chat import tokenize_conversation

    def split(answer: str) -> tuple[list[int], list[int]]:
        example = tokenize_conversation(tokenizer, [*pair.messages[:-1], {"role": "assistant", "content": answer}])
        start = len(example.mask)
        while start > 0 and example.mask[start - 1] == 1:
            start -= 1
        return example.ids[:start], example.ids[start:]

    prompt, preferred = split(pair.messages[-1]["content"])
    if pair.rejected is None:
        return prompt, preferred, None
    prompt_again, rejected = split(pair.rejected)
    if prompt != prompt_again:
        raise UserError("the chat template renders one prompt two ways; cannot pair its answers")
    return prompt, preferred, rejected


def pair_rows(tokenized: list[tuple[list[int], list[int], list[int] | None]], seq_len: int) -> dict[str, np.ndarray]:
    """``PolicyBatch`` fields of the pairs packed into rows of ``seq_len`` (each pair must fit one
    row): the preferred answer in an even sequence slot, +1, the other in the next, -1; a replay
    chat's answer (``rejected`` None) likewise in an even slot, +1, the next one left empty, 0."""
    from afmkit.posttrain.rl import policy_rows

    prompts = [p for p, _, _ in tokenized for _ in range(2)]
    answers = [a for _, preferred, rejected in tokenized for a in (preferred, [] if rejected is None else rejected)]
    rows, placement = policy_rows(prompts, answers, rows_multiple=1, length=seq_len)
    for i in range(0, len(placement), 2):
        (row, slot), (row_other, slot_other) = placement[i], placement[i + 1]
        if slot % 2 or (row_other, slot_other) != (row, slot + 1):  # pack_first_fit keeps a group whole
            raise AssertionError("a preference pair was split across sequence slots")
        other = 0.0 if tokenized[i // 2][2] is None else -1.0
        rows["advantages"][row, slot], rows["advantages"][row, slot + 1] = 1.0, other
    used = rows["loss_mask"].any(axis=1)  # the packed rows come first; drop the spare ones
    return {name: value[used] for name, value in rows.items()}


def prepare_pairs(model: Any, pairs: list[Pair], settings: DPOSettings) -> tuple[list, list, dict[str, int]]:
    """Tokenized (train, held-out) pairs and counts of the ones left out: too long for a row, the
    same prompt twice (one pair or replay chat per prompt, pairs first), or both answers the same.
    Replay chats (``rejected`` None) train only, spread evenly among the training pairs: they
    share rows with pairs rather than fill rows of their own (a step of replay chats alone would
    have no pair to divide by)."""
    seen, kept, replay = set(), [], []
    counts = {"too_long": 0, "duplicate_prompt": 0, "same_answers": 0}
    for pair in sorted(pairs, key=lambda pair: pair.rejected is None):
        prompt, preferred, rejected = pair_tokens(model.tokenizer, pair)
        if preferred == rejected:
            counts["same_answers"] += 1
        elif tuple(prompt) in seen:
            counts["duplicate_prompt"] += 1
        elif len(prompt) - 1 + len(preferred) + len(rejected or ()) > settings.seq_len:
            counts["too_long"] += 1
        else:
            seen.add(tuple(prompt))
            (replay if rejected is None else kept).append((prompt, preferred, rejected))
    if len(kept) < 2:
        raise UserError(
            f"need at least 2 usable preference pairs ({counts['too_long']} too long for --seq-len "
            f"{settings.seq_len}, {counts['duplicate_prompt']} repeated prompts, {counts['same_answers']} "
            "with identical answers); add pairs or raise --seq-len"
        )
    n_eval = max(1, round(len(kept) * settings.eval_fraction))
    train = kept[:-n_eval]
    place = [(i + 0.5) / len(train) for i in range(len(train))] + [(k + 0.5) / len(replay) for k in range(len(replay))]
    mixed = [item for _, item in sorted(zip(place, train + replay), key=lambda placed: placed[0])]
    return mixed, kept[-n_eval:], counts


def reference_log_probs(
    model: Any, rows: dict[str, np.ndarray], run: Any, batch: int, *, quiet: bool = False
) -> np.ndarray:
    """Per-token log-probabilities of the rows' targets under the starting policy (``run.initial``,
    a LoRA tree, or None: the base alone, i.e. a LoRA of zeros), by the trainer's own forward."""
    import jax
    import jax.numpy as jnp

    from afmkit.posttrain.rl import PackedLogProbs
    from afmkit.sharding.mesh import make_mesh
    from afmkit.train.optim import build_optimizer
    from afmkit.train.step import abstract_state, state_shardings

    mesh, optimizer = make_mesh("data=1", devices=jax.devices()[:1]), build_optimizer(run.optimizer)
    shardings = state_shardings(model.config, optimizer, mesh, subset=run.subset, objective=run.objective)
    abstract = abstract_state(model.config, optimizer, subset=run.subset, objective=run.objective).params
    if run.initial is None:
        params = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract)
    else:
        params = jax.tree.map(lambda a, start: jnp.asarray(start, a.dtype), abstract, run.initial)
    log_probs = PackedLogProbs(
        config=model.config,
        mesh=mesh,
        shardings=shardings,
        subset=run.subset,
        objective=run.objective,
        frozen=model.params,
        batch=batch,
    )
    out = log_probs(jax.device_put(params, shardings.params), rows, progress=None if quiet else "reference log-probs")
    return np.where(rows["loss_mask"] > 0, out, 0.0)


def anchor_windows(model: Any, settings: DPOSettings, n_train: int, n_held_out: int) -> tuple[dict, dict]:
    """The anchor's windows for ``n_train`` and ``n_held_out`` pair rows (``anchor.text_windows``):
    the last ``n_held_out`` for the held-out rows, the others for the training rows in order (again
    from the first when there are fewer than rows); ``with_teacher`` adds the base's top-k."""
    windows = text_windows(model, settings, at_least=n_held_out + 1)
    n = len(windows["tokens"])
    picks = (np.arange(n_train) % (n - n_held_out), np.arange(n - n_held_out, n))
    return tuple({name: rows[index] for name, rows in windows.items()} for index in picks)


def reference_fingerprint(model_name: str, initial: Any, *packed: dict[str, np.ndarray]) -> str:
    """A digest of what the saved reference values depend on: the base (by name: ``--resume``
    already requires the same settings), the starting adapter's values and the packed rows (the
    anchor's windows among them)."""
    import jax

    digest = hashlib.sha256(model_name.encode())
    for leaf in jax.tree.leaves(initial) if initial is not None else ():
        digest.update(np.ascontiguousarray(leaf).tobytes())
    for rows in packed:
        for key in sorted(rows):
            digest.update(key.encode() + np.ascontiguousarray(rows[key]).tobytes())
    return digest.hexdigest()


def load_reference(out: Path) -> tuple[str, dict[str, np.ndarray]] | None:
    """The saved fingerprint and arrays (the train and held-out reference log-probs, and the
    anchor's teacher fields when the run has an anchor); None when missing or damaged."""
    try:
        with np.load(out / REFERENCE_FILE) as saved:
            arrays = {name: saved[name] for name in saved.files if name != "fingerprint"}
            return str(saved["fingerprint"]), arrays
    except (OSError, KeyError, ValueError):
        return None


def save_reference(out: Path, fingerprint: str, arrays: dict[str, np.ndarray]) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, fingerprint=np.array(fingerprint), **arrays)
    write_bytes(out / REFERENCE_FILE, buffer.getvalue())


def _check_out(out: Path, settings: DPOSettings) -> None:
    check_run_directory(
        out, out / SETTINGS_FILE, run_identity(settings, MAY_CHANGE_ON_RESUME), resume=settings.resume, run="DPO"
    )


def dpo(model: Any, pairs: list[Pair], out: str | os.PathLike, settings: DPOSettings) -> dict[str, Any]:
    """Train a LoRA adapter on ``model`` (a ``LanguageModel``, left unchanged) by DPO on ``pairs``;
    writes ``out`` (SFT's layout) and returns the results."""
    from afmkit.adapters.peft_io import save_adapter
    from afmkit.train.checkpoint import Checkpoints
    from afmkit.train.finetune import finetune
    from afmkit.train.objectives import AnchoredPolicyBatch, PolicyBatch, Preference

    settings.check()
    if settings.replay_weight == 0 and any(pair.rejected is None for pair in pairs):
        raise UserError("replay chats (pairs without 'rejected') need a positive --replay-weight")
    out = Path(out)
    subset, initial = settings.starting_point(model)
    train, held_out, skipped = prepare_pairs(model, pairs, settings)
    _check_out(out, settings)
    rows, eval_rows = pair_rows(train, settings.seq_len), pair_rows(held_out, settings.seq_len)
    if settings.anchor_text is not None:  # read and checked before anything is written or computed
        windows = anchor_windows(model, settings, len(rows["tokens"]), len(eval_rows["tokens"]))
    run = trunk_run(
        settings,
        subset,
        Preference(
            beta=settings.beta,
            nll_weight=settings.nll_weight,
            replay_weight=settings.replay_weight,
            anchor_weight=settings.anchor_weight,
        ),
        out,
        final_lr_fraction=1.0,
        dropout=settings.dropout,
        initial=initial,
        batch_type=PolicyBatch if settings.anchor_text is None else AnchoredPolicyBatch,
        eval_metric="loss",
    )
    # the anchor's saved top-k follow from its windows and k
    anchor = (*windows, {"top_k": np.array([settings.anchor_top_k])}) if settings.anchor_text is not None else ()
    fingerprint = reference_fingerprint(model.name, initial, rows, eval_rows, *anchor)
    saved = load_reference(out) if settings.resume else None
    if (
        saved is not None
        and saved[0] != fingerprint
        and Checkpoints(run.run_dir / "checkpoints").latest_step() is not None
    ):
        # Its checkpoint's loader would refuse these rows, but only after the reference pass.
        raise UserError(
            f"--resume: {out} was trained on other pairs, another anchor text or from another starting adapter; "
            f"resume with its --data, --anchor-text and --init-adapter, or give a new --out"
        )
    if saved is not None and saved[0] == fingerprint:
        arrays = saved[1]
        if not settings.quiet:
            print(f"reference log-probs: read from {out / REFERENCE_FILE}", file=sys.stderr)
    else:  # missing, damaged, or of a run that saved no checkpoint yet: compute
        arrays = {
            name: reference_log_probs(model, packed, run, settings.batch // settings.accum, quiet=settings.quiet)
            for name, packed in (("train", rows), ("held_out", eval_rows))
        }
        if settings.anchor_text is not None:
            for part, part_windows in zip(("train", "held_out"), windows):
                arrays |= {
                    f"{part}:{name}": a
                    for name, a in with_teacher(
                        model, part_windows, settings, batch=settings.batch // settings.accum, quiet=settings.quiet
                    ).items()
                }
        save_reference(out, fingerprint, arrays)
    rows["old_log_probs"], eval_rows["old_log_probs"] = arrays["train"], arrays["held_out"]
    for name, value in arrays.items():
        part, _, field = name.partition(":")
        if field:
            (rows if part == "train" else eval_rows)[field] = value
    write_json(out / SETTINGS_FILE, run_identity(settings, MAY_CHANGE_ON_RESUME))
    trained = finetune(model, rows, run, eval_rows=eval_rows)
    results = {
        "settings": {**dataclasses.asdict(settings), "targets": list(settings.targets)},
        "base": model.name,
        "train_pairs": sum(rejected is not None for _, _, rejected in train),
        "replay_chats": sum(rejected is None for _, _, rejected in train),
        "anchor_windows": len(np.unique(rows["anchor_tokens"], axis=0)) if "anchor_tokens" in rows else 0,
        "held_out_pairs": len(held_out),
        "skipped": skipped,
        "rows": len(rows["tokens"]),
        "steps_done": trained["steps_done"],
        "held_out_loss_start": trained["eval_before"],
        "held_out_loss_end": trained["eval_after"],
        "train_seconds": trained["seconds"],
    }

    def write(directory: Path) -> None:
        adapter = subset.adapter(trained["params"], model.config, name=out.name)
        save_adapter(
            directory,
            adapter,
            config=model.config,
            params=model.params,
            base_name=model.name,
            extra_files={TRAINING_FILE: json.dumps(results, indent=2)},
        )

    publish(out, write)
    return results


def register(recipes: Any) -> None:
    from afmkit.cli_args import lora_arguments, model_argument, setting_argument
    from afmkit.posttrain.sft import chat_run_arguments

    d = DPOSettings()
    parser = recipes.add_parser("dpo", help="direct preference optimisation on pairs of answers (a LoRA adapter)")
    model_argument(parser)
    parser.add_argument(
        "--data", required=True, help="JSONL: {'messages': [... preferred assistant answer], 'rejected': str} per line"
    )
    parser.add_argument("--out", required=True, help="directory: the PEFT adapter and its training record")
    lora_arguments(parser, d)
    setting_argument(parser, d, "beta", "DPO's beta: the scale of the implicit reward log(pi / pi_ref)")
    setting_argument(parser, d, "nll_weight", "plus this times the preferred answer's mean token NLL (RPO)")
    setting_argument(
        parser,
        d,
        "replay_weight",
        "plus this times the mean token NLL of the --data chats without 'rejected' (replay: holds the model "
        "on text no pair is about); 0 skips those chats",
    )
    anchor_arguments(parser, d, per="pair")
    chat_run_arguments(
        parser,
        d,
        rows="tokens per packed row; a pair (prompt and both answers) must fit one",
        held_out="held-out share of the pairs",
    )
    parser.set_defaults(run=cmd_dpo, trains=True)


def cmd_dpo(args: Any) -> int:
    settings = cli_args.settings_from_args(DPOSettings, args, targets=cli_args.comma_list(args.targets))
    settings.check()  # one line before loading anything
    pairs = read_pairs(args.data, replay=settings.replay_weight > 0)
    _check_out(Path(args.out), settings)
    model = cli_args.load_training_base(args.model, args.dtype)
    results = dpo(model, pairs, args.out, settings)
    report_unfinished(results["steps_done"], settings.steps)
    print(
        json.dumps({k: results[k] for k in ("held_out_loss_start", "held_out_loss_end", "steps_done", "train_seconds")})
    )
    return 0
