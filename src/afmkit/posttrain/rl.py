"""``afmkit posttrain rl``: RLHF with MDLOO (AFM_SPEC section 5), RLOO and PPO-clip as baselines.

The policy is a LoRA adapter over the frozen base (on CPUs SmolLM2's own int4 weights), fresh
(the policy starts as the base) or ``--init-adapter`` (an SFT/iTeC adapter); the reference policy
``pi_ref`` is the starting policy. Each iteration ``k``:

1. a new slice of ``--prompts-per-iteration`` train-split prompts; K samples each from the
   current policy ``pi_k`` through the one engine (``posttrain.rollout``);
2. rewards ``r``: the verifiable reward (strict) by default, a reward model's score with
   ``--reward-model DIR``;
3. the samples packed into the update's rows; per-token log-probs of every response under
   ``pi_k`` and ``pi_ref`` by the trainer's own forward on those rows
   (``train.step.make_token_log_probs``); the sequence reward ``R = r - beta log(pi_k/pi_ref)``
   and the leave-one-out advantage (``posttrain.losses``);
4. the update, through the one trainer's step (``train.step`` with the ``Policy`` objective, the
   whole iteration's samples one batch, split into microbatches of ``--train-batch`` rows):
   ``mdloo`` takes ``--inner-steps`` gradient steps on ``E_{pi_k}[(pi/pi_k) A] - (1/t_k)
   KL(pi || pi_k)``, ``rloo`` one policy-gradient step, ``ppo-clip`` ``--inner-steps`` clipped steps;
5. a checkpoint (adapter, optimizer state, RNG, iteration), the adapter in PEFT layout, one line
   of metrics; greedy dev-split accuracy every ``--dev-every`` iterations (IFEval is never used).

Anchor (``--anchor-text FILE --anchor-weight W``, ``posttrain.anchor``): the update's loss adds, per
sample (PPO-clip: per response token), W times the mean per-token KL(base || policy) on windows of a
plain text, one window per packed row. The sampled answers say nothing about such text, and
post-trained adapters drift on it (docs/posttraining.md). The base here is the model without any adapter, not the reference policy:
the anchor can pull a policy started from a drifted adapter back. Iteration i's rows take the
windows from ``(i - 1) x K x prompts-per-iteration`` on, wrapping around the file, so a resumed run
reads the same ones; the base's top-k on the windows the run's iterations read are computed once
before the first iteration.

Layout of ``--out DIR``::

    rl.json            the run's settings (``--resume`` must repeat them, ``--iterations`` aside)
    adapter/           the policy after the last finished iteration (PEFT layout)
    checkpoints/       Orbax steps, one per iteration: adapter, optimizer state, RNG
    metrics.jsonl      one record per iteration (``step`` = iteration; step 0: the starting dev score)
    curves.png         reward, KL to the reference, response length, loops, dev accuracy
    samples/iteration-NNNN.jsonl   every scored sample of an iteration

Every sample's seed is a hash of (seed, iteration, prompt, index), so a run resumed from its
last checkpoint after a kill gives the same adapter as one never interrupted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from afmkit import cli_args
from afmkit.errors import UserError
from afmkit.posttrain.anchor import AnchorSettings, anchor_arguments, text_windows, with_teacher
from afmkit.train.objectives import POLICY_ALGOS
from afmkit.train.run_directory import check_new_run, check_run_directory, run_identity, write_json, write_jsonl

STATE_FILE = "rl.json"
# Settings that may change on --resume (the rest define the run).
MAY_CHANGE_ON_RESUME = ("iterations", "quiet", "resume")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RLSettings(AnchorSettings):
    """Every setting of ``afmkit posttrain rl`` and its default: the one source the CLI reads (the
    anchor's from ``posttrain.anchor``)."""

    algo: str = "mdloo"  # mdloo | rloo | ppo-clip
    k: int = 4  # samples per prompt (the leave-one-out baseline needs K >= 2)
    beta: float = 0.05  # weight of log(pi/pi_ref) in the sequence reward
    iterations: int = 20
    prompts_per_iteration: int = 8  # train-split prompts per iteration, a new slice each time
    inner_steps: int = 4  # gradient steps per iteration for mdloo and ppo-clip (rloo takes one)
    step_size: float = 1.0  # t_k, MDLOO's mirror-descent step size (larger: looser trust region)
    clip_epsilon: float = 0.2  # PPO-clip's ratio clip
    lr: float = 2e-5
    lora_rank: int = 16  # a fresh adapter's rank (alpha 2 x rank); --init-adapter brings its own
    max_new_tokens: int = 256
    temperature: float = 1.0  # 1 and top-p 1: the samples come from pi itself (on-policy)
    top_p: float = 1.0
    # The reward of a response that did not end on its own (cut at max_new_tokens or as a
    # loop); None: the scorer's reward of what was written. Runaway answers are the base's main
    # failure, and the verifier alone often rewards their first paragraph.
    unfinished_reward: float | None = None
    batch: int = 64  # rollout rows decoded together
    train_batch: int = 4  # rows per microbatch of the update (bounds the logits' memory)
    dev_prompts: int = 32  # dev-split prompts answered greedily
    dev_every: int = 5  # iterations between dev scores (0: never)
    keep: int = 2  # checkpoints kept
    seed: int = 0
    resume: bool = False
    quiet: bool = False

    def check(self) -> None:
        if self.algo not in POLICY_ALGOS:
            raise UserError(f"unknown --algo {self.algo!r}; choose one of {', '.join(POLICY_ALGOS)}")
        if self.k < 2:
            raise UserError(
                f"--k must be at least 2, got {self.k}: the leave-one-out advantage compares each sample "
                "with the other samples of its prompt"
            )
        for name in (
            "iterations",
            "prompts_per_iteration",
            "inner_steps",
            "lora_rank",
            "max_new_tokens",
            "batch",
            "train_batch",
            "keep",
        ):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.dev_prompts < 0 or self.dev_every < 0:
            raise UserError("--dev-prompts and --dev-every must be 0 or more")
        if self.beta < 0 or self.lr <= 0 or self.step_size <= 0 or not 0 < self.clip_epsilon < 1:
            raise UserError("--beta must be >= 0, --lr and --step-size positive, --clip-epsilon in (0, 1)")
        if self.unfinished_reward is not None and not math.isfinite(self.unfinished_reward):
            raise UserError(f"--unfinished-reward must be a finite number, got {self.unfinished_reward}")
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise UserError(
                f"--temperature must be positive and --top-p in (0, 1], got {self.temperature}, {self.top_p}"
            )
        self.check_anchor()

    @property
    def steps_per_iteration(self) -> int:
        return 1 if self.algo == "rloo" else self.inner_steps


# -- one iteration's pieces ------------------------------------------------------------------
def iteration_seed(seed: int, iteration: int) -> int:
    """The rollout seed of one iteration: fresh samples each iteration, the same ones on resume."""
    return int.from_bytes(hashlib.sha256(f"rl|{seed}|{iteration}".encode()).digest()[:4], "little")


def train_slice(prompts: Sequence[dict[str, Any]], per_iteration: int, iteration: int) -> list[dict[str, Any]]:
    """Iteration ``iteration`` (1-based)'s prompts: consecutive slices, wrapping round the split."""
    n = min(per_iteration, len(prompts))
    start = ((iteration - 1) * per_iteration) % len(prompts)
    return [prompts[(start + i) % len(prompts)] for i in range(n)]


# A row of T positions holds at most T // SEGMENT_SPAN samples: the sequence slots per row (the
# advantages' second axis) then depend on the row length only, so every iteration compiles alike.
SEGMENT_SPAN = 16


def anchor_rows(anchor: dict[str, np.ndarray], rows: int, iteration: int, per_iteration: int) -> dict[str, np.ndarray]:
    """Iteration ``iteration``'s ``rows`` anchor windows (``AnchoredPolicyBatch`` fields, the base's
    top-k included): from window ``(iteration - 1) x per_iteration`` on, wrapping around."""
    n = len(anchor["anchor_tokens"])
    index = ((iteration - 1) * per_iteration + np.arange(rows)) % n
    return {name: value[index] for name, value in anchor.items()}


def pack_first_fit(
    lengths: Sequence[int], capacity: int, *, most: int, counts: Sequence[int] | None = None
) -> list[list[int]]:
    """Indices of ``lengths`` packed into bins of ``capacity`` tokens holding at most ``most``
    (the sum of the items' ``counts``, 1 each by default), first fit over the longest first (ties
    in index order, so the same lengths always pack the same way)."""
    counts = [1] * len(lengths) if counts is None else counts
    bins: list[list[int]] = []
    room: list[int] = []
    held: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        if lengths[i] > capacity:
            raise ValueError(f"a sequence of {lengths[i]} tokens does not fit a row of {capacity}")
        fit = next((b for b, free in enumerate(room) if free >= lengths[i] and held[b] + counts[i] <= most), None)
        if fit is None:
            bins.append([])
            room.append(capacity)
            held.append(0)
            fit = len(bins) - 1
        bins[fit].append(i)
        room[fit] -= lengths[i]
        held[fit] += counts[i]
    return bins


def _shared_prompt_groups(
    prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], capacity: int, most: int
) -> list[list[int]]:
    """The samples as groups that share one copy of their prompt: a prompt's samples in order,
    a new group (with its own copy) whenever the next would pass ``capacity`` tokens or ``most``
    samples. A group costs ``len(prompt) - 1 + sum(len(response))`` tokens."""
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for i, p in enumerate(prompt_ids):
        by_prompt.setdefault(tuple(p), []).append(i)
    groups = []
    for prompt, members in by_prompt.items():
        group: list[int] = []
        size = len(prompt) - 1
        for i in members:
            if group and (size + len(response_ids[i]) > capacity or len(group) == most):
                groups.append(group)
                group, size = [], len(prompt) - 1
            group.append(i)
            size += len(response_ids[i])
        groups.append(group)
    return groups


def policy_rows(
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    *,
    rows_multiple: int,
    length: int | None = None,
) -> tuple[dict[str, np.ndarray], list[tuple[int, int]]]:
    """The fields of a ``train.objectives.PolicyBatch`` and where each sample went.

    The K samples of a prompt share one copy of it: the prompt but its last token is branch 0
    of a segment, and each sample is a branch of its own holding that last token and the
    response but its last token (inputs; the targets are the response), at the positions that
    follow the prompt. So a prompt is computed once, not K times, and each response is scored
    exactly as after its own copy. Segments are packed into rows first fit: samples differ a lot
    in length (a loop runs to the limit, most answers stop far earlier), so rows of one sample
    each padded to the longest would be mostly padding. Rows are ``length`` long, by default the
    engine's prompt bucket of the longest sample (a prompt whose samples do not fit one row is
    copied into more).
    The batch keeps the shape of one sample per row (the sample count rounded up to
    ``rows_multiple``, ``T // SEGMENT_SPAN`` response slots), so every iteration of like lengths
    reuses one compiled step: the packed rows come first and the spare rows after them are empty
    microbatches, which the trainer skips. The loss mask covers the responses' targets;
    ``old_log_probs`` and ``advantages`` are zeros for ``fill_policy_rows``. Returns ``(fields,
    placement)``: sample ``i`` is branch ``placement[i][1] + 1`` of row ``placement[i][0]``."""
    from afmkit.infer.engine import prompt_bucket

    if length is None:
        length = prompt_bucket(max(len(p) + len(r) - 1 for p, r in zip(prompt_ids, response_ids)))
    slots = max(1, length // SEGMENT_SPAN)
    groups = _shared_prompt_groups(prompt_ids, response_ids, length, slots)
    sizes = [len(prompt_ids[g[0]]) - 1 + sum(len(response_ids[i]) for i in g) for g in groups]
    bins = pack_first_fit(sizes, length, most=slots, counts=[len(g) for g in groups])
    rows = -(-len(prompt_ids) // rows_multiple) * rows_multiple
    fields = {
        "tokens": np.zeros((rows, length), np.int32),
        "targets": np.zeros((rows, length), np.int32),
        "positions": np.zeros((rows, length), np.int32),
        "segment_ids": np.zeros((rows, length), np.int32),
        "branch_ids": np.zeros((rows, length), np.int32),
        "loss_mask": np.zeros((rows, length), np.float32),
        "old_log_probs": np.zeros((rows, length), np.float32),
        "advantages": np.zeros((rows, slots), np.float32),
    }
    placement = [(0, 0)] * len(prompt_ids)
    for row, members in enumerate(bins):
        at, branch = 0, 0
        for segment, g in enumerate(members, start=1):
            prompt = list(prompt_ids[groups[g][0]])
            span = slice(at, at + len(prompt) - 1)
            fields["tokens"][row, span] = prompt[:-1]
            fields["targets"][row, span] = prompt[1:]
            fields["positions"][row, span] = np.arange(len(prompt) - 1)
            fields["segment_ids"][row, span] = segment
            at = span.stop
            for i in groups[g]:
                response = list(response_ids[i])
                branch += 1
                span = slice(at, at + len(response))
                # Response token t is predicted at position len(prompt) - 1 + t, from the prompt's
                # last token (t = 0) or the response's token t - 1.
                fields["tokens"][row, span] = [prompt[-1], *response][:-1]
                fields["targets"][row, span] = response
                fields["positions"][row, span] = len(prompt) - 1 + np.arange(len(response))
                fields["segment_ids"][row, span] = segment
                fields["branch_ids"][row, span] = branch
                fields["loss_mask"][row, span] = 1.0
                placement[i] = (row, branch - 1)
                at = span.stop
    return fields, placement


def sequence_log_probs(token_log_probs: np.ndarray, rows: dict[str, np.ndarray], placement: Sequence) -> np.ndarray:
    """Each sample's response log-probability: the sum of ``token_log_probs [rows, T]`` over its
    branch's loss positions."""
    on = rows["loss_mask"] > 0
    return np.array(
        [token_log_probs[r][on[r] & (rows["branch_ids"][r] == s + 1)].sum() for r, s in placement], np.float32
    )


def fill_policy_rows(
    rows: dict[str, np.ndarray], placement: Sequence, old_log_probs: np.ndarray, advantages: np.ndarray
) -> None:
    """Put the sampling policy's per-token log-probs (``[rows, T]``, as packed) on the loss
    positions and each sample's advantage in its branch's slot."""
    rows["old_log_probs"][:] = np.where(rows["loss_mask"] > 0, old_log_probs, 0.0)
    for (row, slot), advantage in zip(placement, advantages):
        rows["advantages"][row, slot] = advantage


@dataclasses.dataclass
class PackedLogProbs:
    """``log_probs(params, rows)``: per-token log-probs ``[rows, T]`` of packed ``PolicyBatch``
    rows' targets under ``params`` (laid out as the train state's) over ``frozen``, by the
    trainer's own forward, ``batch`` rows at a time, one compiled forward per row length
    (``compiled``); rows after the last with a loss mask stay 0. ``progress`` (a label) reports
    the rows done, for a pass long enough to need it (DPO's reference over the whole data set)."""

    config: Any
    mesh: Any
    shardings: Any
    subset: Any
    objective: Any
    frozen: Any
    batch: int
    compiled: dict[tuple[int, ...], Any] = dataclasses.field(default_factory=dict)

    def __call__(self, params: Any, rows: dict[str, np.ndarray], *, progress: str | None = None) -> np.ndarray:
        from afmkit.progress import ProgressReporter

        used = int(rows["loss_mask"].any(axis=1).sum())  # the packed rows come first
        with ProgressReporter(progress or "", used, unit="rows", quiet=progress is None) as reporter:
            return self._log_probs(params, rows, used, reporter)

    def _log_probs(self, params: Any, rows: dict[str, np.ndarray], used: int, reporter: Any) -> np.ndarray:
        from afmkit.train.objectives import PolicyBatch
        from afmkit.train.step import StepConfig, global_batch, make_token_log_probs

        batch, out = self.batch, np.zeros(rows["tokens"].shape, np.float32)
        for lo in range(0, used, batch):
            micro = {name: value[lo : lo + batch] for name, value in rows.items()}
            pad = batch - len(micro["tokens"])  # all-zero rows: no tokens, no loss
            if pad:
                micro = {k: np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)]) for k, v in micro.items()}
            placed = global_batch(
                micro, self.mesh, global_rows=batch, accum_steps=1, objective=self.objective, batch_type=PolicyBatch
            )
            shape = micro["tokens"].shape
            if shape not in self.compiled:
                self.compiled[shape] = make_token_log_probs(
                    config=self.config,
                    step_config=StepConfig(),
                    mesh=self.mesh,
                    shardings=self.shardings,
                    batch_example=placed,
                    subset=self.subset,
                    objective=self.objective,
                    frozen=self.frozen,
                )
            out[lo : lo + batch] = np.asarray(self.compiled[shape](params, placed))[: batch - pad]
            reporter.advance(batch - pad, tokens=int(micro["loss_mask"].sum()))
        return out


def read_split(path: str | os.PathLike, split: str) -> list[dict[str, Any]]:
    from afmkit.posttrain.synth_if import read_prompts

    return read_prompts(path, split=split)


def plot_curves(records: Sequence[dict[str, Any]], path: Path, *, title: str) -> None:
    """One PNG: reward, KL to the reference, response length, loops / max-token hits, dev accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (
        ("reward", ("mean_reward", "dev_strict")),
        ("KL(pi_k || pi_ref), nats", ("kl_to_reference",)),
        ("response tokens", ("response_length",)),
        ("share of samples", ("loop_share", "max_tokens_share")),
    )
    fig, axes = plt.subplots(2, 2, figsize=(9, 6), dpi=110)
    for ax, (label, keys) in zip(axes.flat, panels):
        for key in keys:
            points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points), "o-" if key.startswith("dev") else "-", label=key, linewidth=1, markersize=3)
        ax.set_xlabel("iteration")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# -- the run -------------------------------------------------------------------------------------
def rl(
    base: Any,
    prompts_path: str | os.PathLike,
    out: str | os.PathLike,
    settings: RLSettings,
    *,
    init_adapter: str | os.PathLike | None = None,
    reward_model: str | os.PathLike | None = None,
) -> list[dict[str, Any]]:
    """Run ``settings.iterations`` iterations (the module docstring) into ``out``; returns the
    metric records. ``base``: the loaded base model (``LanguageModel``, never modified) that the
    policy adapter sits on. Every input check runs before the first write."""
    import jax
    import jax.numpy as jnp

    from afmkit.adapters.lora import LoraConfig
    from afmkit.adapters.peft_io import save_adapter
    from afmkit.posttrain import losses, verifiable
    from afmkit.posttrain.rollout import (
        Member,
        RolloutSettings,
        reward_model_scorer,
        rollout,
        verifier_scorer,
    )
    from afmkit.posttrain.trunk import load_init_adapter
    from afmkit.sharding.mesh import make_mesh
    from afmkit.train.checkpoint import Checkpoints
    from afmkit.train.metrics import MetricsLog
    from afmkit.train.objectives import AnchoredPolicyBatch, Policy, PolicyBatch
    from afmkit.train.optim import OptimizerConfig, build_optimizer, lr_schedule
    from afmkit.train.step import (
        StepConfig,
        TrainState,
        abstract_state,
        global_batch,
        init_sharded_state,
        make_train_step,
        state_shardings,
    )
    from afmkit.train.trainable import LoraWeights

    settings.check()
    out = Path(out)
    train = read_split(prompts_path, "train")
    dev = read_split(prompts_path, "dev")[: settings.dev_prompts] if settings.dev_prompts and settings.dev_every else []
    reference = load_init_adapter(base, init_adapter) if init_adapter is not None else None
    scorers, reward_name = [verifier_scorer], "strict"
    if reward_model is not None:
        from afmkit.posttrain.reward_model import load_reward_model

        scorers, reward_name = [reward_model_scorer(load_reward_model(reward_model, base))], "rm"
    if reference is None:
        lora = LoraConfig(rank=settings.lora_rank, alpha=2.0 * settings.lora_rank, dtype="float32")
    else:  # the starting adapter's shape; fp32 so the sampled policy is exactly the trained one
        lora = dataclasses.replace(reference.config, dtype="float32")
    lora.layer_ids(base.config)
    anchor_inputs = {}
    if settings.anchor_text is not None:  # read and checked before anything is written
        windows = text_windows(base, settings, at_least=1)
        digest = hashlib.sha256(windows["tokens"].tobytes()).hexdigest()
        anchor_inputs = {"anchor_tokens_sha256": digest}  # resuming with other text is refused
    identity = run_identity(
        settings,
        MAY_CHANGE_ON_RESUME,
        prompts=str(prompts_path),
        model=base.name,
        init_adapter=None if init_adapter is None else str(init_adapter),
        reward_model=None if reward_model is None else str(reward_model),
        **anchor_inputs,
    )
    check_run_directory(out, out / STATE_FILE, identity, resume=settings.resume, run="RL", key="settings")

    config = base.config
    subset = LoraWeights(lora)
    saved_subset = LoraWeights(dataclasses.replace(lora, dtype="float16"))  # PEFT's usual storage
    objective = Policy(
        algo=settings.algo,
        step_size=settings.step_size,
        clip_epsilon=settings.clip_epsilon,
        anchor_weight=settings.anchor_weight,
    )
    batch_type = PolicyBatch if settings.anchor_text is None else AnchoredPolicyBatch
    total_steps = settings.iterations * settings.steps_per_iteration
    optimizer_config = OptimizerConfig(
        name="adamw", peak_lr=settings.lr, warmup_steps=0, total_steps=total_steps, final_lr_fraction=1.0,
        weight_decay=0.0,
    )  # fmt: skip
    optimizer = build_optimizer(optimizer_config)
    schedule = lr_schedule(optimizer_config)
    mesh = make_mesh("data=1", devices=jax.devices()[:1])
    shardings = state_shardings(config, optimizer, mesh, subset=subset, objective=objective)

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / STATE_FILE, {"settings": identity})
    (out / "samples").mkdir(exist_ok=True)
    checkpoints = Checkpoints(out / "checkpoints", keep=settings.keep, async_save=False)
    latest = checkpoints.latest_step() if settings.resume else None
    if latest is not None:
        abstract = abstract_state(config, optimizer, subset=subset, objective=objective)
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
        restored, position = checkpoints.restore(latest, target.as_dict())
        state, done = TrainState.from_dict(restored), int(position["iteration"])
    else:
        initial = None if reference is None else LoraWeights.tree(reference)
        state = init_sharded_state(
            config, optimizer, shardings, seed=settings.seed, subset=subset, objective=objective, initial=initial
        )
        done = 0
    # pi_ref laid out as the policy's weights: the starting adapter, or zeros (a fresh policy
    # starts as the base, and a LoRA adapter of zeros adds exactly nothing)
    reference_params = jax.device_put(
        jax.tree.map(jnp.zeros_like, state.params)
        if reference is None
        else jax.tree.map(lambda p, r: jnp.asarray(r, p.dtype), state.params, LoraWeights.tree(reference)),
        shardings.params,
    )
    log = MetricsLog(out / "metrics.jsonl", resume_from_step=done)
    anchor = None
    if settings.anchor_text is not None:  # the base's top-k once (the base never changes), for the
        # windows the iterations read: the rows of iteration i start at window (i - 1) x K x P
        samples = settings.k * settings.prompts_per_iteration
        rows_per_iteration = -(-samples // settings.train_batch) * settings.train_batch  # policy_rows' count
        read = min(len(windows["tokens"]), (settings.iterations - 1) * samples + rows_per_iteration)
        windows = {name: value[:read] for name, value in windows.items()}  # wraps as before when all are read
        anchor = with_teacher(base, windows, settings, batch=settings.train_batch, quiet=settings.quiet)
    steps: dict[tuple[int, ...], Any] = {}  # one compiled step per batch shape

    def step_for(shape: tuple[int, ...], example: Any) -> Any:
        if shape not in steps:
            steps[shape] = make_train_step(
                config=config,
                optimizer=optimizer,
                schedule=schedule,
                step_config=StepConfig(accum_steps=shape[0]),
                mesh=mesh,
                shardings=shardings,
                batch_example=example,
                subset=subset,
                objective=objective,
                frozen=base.params,
            )
        return steps[shape]

    packed_log_probs = PackedLogProbs(
        config=config,
        mesh=mesh,
        shardings=shardings,
        subset=subset,
        objective=objective,
        frozen=base.params,
        batch=settings.train_batch,
    )

    def policy_member(params: Any, iteration: int) -> Member:
        return Member(f"policy-{iteration}", base, subset.adapter(jax.device_get(params), config, name="policy"))

    def save_policy(params: Any) -> None:
        saved = saved_subset.adapter(jax.device_get(params), config, name=out.name)  # PEFT layout, fp16
        save_adapter(out / "adapter", saved, config=config, params=base.params, base_name=base.name)

    def dev_scores(member: Member) -> dict[str, float]:
        greedy = RolloutSettings(
            samples=1,
            max_new_tokens=settings.max_new_tokens,
            temperature=0.0,
            top_p=1.0,
            seed=settings.seed,
            batch=settings.batch,
        )
        samples = rollout([member], dev, greedy, scorers=(), quiet=settings.quiet)
        by_id = {str(p.get("id", p.get("key"))): p for p in dev}
        scored = verifiable.instruction_rewards([by_id[s.prompt_id] for s in samples], [s.text for s in samples])
        return {
            "dev_strict": float(np.mean(scored.strict)),
            "dev_strict_all": float(np.mean(scored.strict_all)),
            "dev_loop_share": float(np.mean([s.loop for s in samples])),
        }

    if dev and not any(r.get("step") == 0 for r in log.records):
        log.write({"step": 0, **dev_scores(policy_member(state.params, 0))})

    for iteration in range(done + 1, settings.iterations + 1):
        started = time.perf_counter()
        prompts = train_slice(train, settings.prompts_per_iteration, iteration)
        member = policy_member(state.params, iteration)
        stats: dict[str, float] = {}
        rollout_settings = RolloutSettings(
            samples=settings.k,
            max_new_tokens=settings.max_new_tokens,
            temperature=settings.temperature,
            top_p=settings.top_p,
            seed=iteration_seed(settings.seed, iteration),
            batch=settings.batch,
        )
        samples = rollout([member], prompts, rollout_settings, scorers=scorers, stats=stats, quiet=settings.quiet)
        prompt_ids = [s.prompt_tokens for s in samples]
        response_ids = [s.tokens for s in samples]
        lengths = np.array([len(r) for r in response_ids])
        rows, placement = policy_rows(prompt_ids, response_ids, rows_multiple=settings.train_batch)
        compiled_before = len(steps) + len(packed_log_probs.compiled)
        old = packed_log_probs(state.params, rows)
        ref = packed_log_probs(reference_params, rows)
        old_seq = sequence_log_probs(old, rows, placement)
        ref_seq = sequence_log_probs(ref, rows, placement)
        rewards = np.array([s.rewards[reward_name] for s in samples], np.float32)
        shaped = policy_rewards(samples, rewards, settings.unfinished_reward)
        sequence_rewards = np.asarray(losses.sequence_rewards(shaped, old_seq, ref_seq, settings.beta))
        advantages = np.asarray(losses.leave_one_out_advantages(sequence_rewards.reshape(-1, settings.k))).reshape(-1)
        fill_policy_rows(rows, placement, old, advantages)
        if anchor is not None:
            rows |= anchor_rows(anchor, len(rows["tokens"]), iteration, settings.k * settings.prompts_per_iteration)
        accum = len(rows["tokens"]) // settings.train_batch
        batch = global_batch(
            rows, mesh, global_rows=len(rows["tokens"]), accum_steps=accum, objective=objective, batch_type=batch_type
        )
        train_step = step_for((accum, *rows["tokens"].shape), batch)
        rollout_seconds = time.perf_counter() - started
        train_started = time.perf_counter()
        first = None
        for _ in range(settings.steps_per_iteration):
            state, metrics = train_step(state, batch)
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            if not metrics["finite"]:
                raise UserError(
                    f"iteration {iteration}: the policy loss or its gradient is not finite; lower --lr "
                    "(the last good checkpoint is kept)"
                )
            first = metrics if first is None else first
        train_seconds = time.perf_counter() - train_started
        trained_tokens = int((rows["segment_ids"] > 0).sum()) * settings.steps_per_iteration
        checkpoints.save(iteration, state.as_dict(), {"iteration": iteration})
        save_policy(state.params)
        write_jsonl(
            out / "samples" / f"iteration-{iteration:04d}.jsonl",
            [
                {**s.to_json(), "policy_reward": float(r), "advantage": float(a)}
                for s, r, a in zip(samples, shaped, advantages)
            ],
        )
        record = {
            "step": iteration,
            "mean_reward": float(rewards.mean()),
            "mean_policy_reward": float(shaped.mean()),  # with --unfinished-reward applied
            "mean_sequence_reward": float(sequence_rewards.mean()),
            "kl_to_reference": float(np.mean(old_seq - ref_seq)),  # y ~ pi_k: a sample of KL(pi_k || pi_ref)
            "response_length": float(lengths.mean()),
            "loop_share": float(np.mean([s.loop for s in samples])),
            "max_tokens_share": float(np.mean([s.finish_reason == "length" for s in samples])),
            "loss_first": first["loss"],
            "loss_last": metrics["loss"],
            "grad_norm": metrics["grad_norm"],
            **{
                f"{k}_last": metrics[k]
                for k in ("kl_to_previous", "ratio", "clip_fraction", "anchor_kl")
                if k in metrics
            },
            "rollout_tokens_per_second": stats["tokens_per_second"],
            "train_tokens": trained_tokens,
            "train_tokens_per_second": trained_tokens / max(train_seconds, 1e-9),
            "rollout_seconds": rollout_seconds,
            "train_seconds": train_seconds,
            # rows of a length not seen before in this process: the update and log-probs compiled
            "new_row_shape": len(steps) + len(packed_log_probs.compiled) > compiled_before,
        }
        if dev and iteration % settings.dev_every == 0:
            record.update(dev_scores(policy_member(state.params, iteration)))
        record["seconds"] = time.perf_counter() - started
        log.write(record)
        plot_curves(log.records, out / "curves.png", title=f"{settings.algo} on {base.name}")
        if not settings.quiet:
            print(format_record(record, settings.iterations), flush=True)
    checkpoints.close()
    if not (out / "adapter").is_dir():  # nothing ran (already finished): the adapter is the checkpoint's
        save_policy(state.params)
    return log.records


def format_record(record: dict[str, Any], iterations: int) -> str:
    line = (
        f"iteration {record['step']}/{iterations}  reward {record['mean_reward']:.3f}  "
        f"KL(ref) {record['kl_to_reference']:.4f}  length {record['response_length']:.0f}  "
        f"loops {record['loop_share']:.2f}  max-tokens {record['max_tokens_share']:.2f}  "
        f"rollout {record['rollout_tokens_per_second']:.0f} tok/s  train {record['train_tokens_per_second']:.0f} tok/s  "
        f"{record['seconds']:.0f} s"
    )
    if "dev_strict" in record:
        line += f"  dev strict {record['dev_strict']:.3f} (all {record['dev_strict_all']:.3f})"
    return line


# -- command -------------------------------------------------------------------------------------
def register(recipes: Any) -> None:
    from afmkit.cli_args import model_argument, run_arguments, setting_argument

    d = RLSettings()
    parser = recipes.add_parser("rl", help="RLHF: MDLOO (AFM), with RLOO and PPO-clip as baselines")
    model_argument(parser, role="base model (the policy is a LoRA adapter over it)")
    parser.add_argument("--prompts", required=True, help="a synth-if prompts file (train split sampled, dev judged)")
    parser.add_argument("--out", required=True, help="run directory (see docs/posttraining.md)")
    parser.add_argument(
        "--init-adapter", default=None, help="start from this adapter (SFT/iTeC); it is also the reference policy"
    )
    parser.add_argument("--reward-model", default=None, help="reward with this reward model (default: the verifier)")
    setting_argument(parser, d, "algo", "policy update", choices=POLICY_ALGOS)
    setting_argument(parser, d, "k", "samples per prompt, K >= 2")
    setting_argument(parser, d, "beta", "KL weight in R = r - beta log(pi/pi_ref)")
    setting_argument(parser, d, "iterations", "iterations")
    setting_argument(parser, d, "prompts_per_iteration", "train prompts per iteration")
    setting_argument(parser, d, "inner_steps", "gradient steps per iteration for mdloo and ppo-clip; rloo takes 1")
    setting_argument(parser, d, "step_size", "MDLOO's step size t_k")
    setting_argument(parser, d, "clip_epsilon", "PPO-clip's clip")
    setting_argument(parser, d, "lr", "learning rate, constant")
    setting_argument(parser, d, "lora_rank", "rank of a fresh adapter")
    setting_argument(parser, d, "max_new_tokens", "tokens per response")
    setting_argument(parser, d, "temperature", "sampling temperature")
    setting_argument(parser, d, "top_p", "nucleus sampling")
    parser.add_argument(
        "--unfinished-reward",
        type=float,
        default=d.unfinished_reward,
        help="reward of a response that did not end on its own (cut at --max-new-tokens or as a loop); "
        "default: the scorer's reward of what it wrote",
    )
    setting_argument(parser, d, "batch", "rollout rows decoded together")
    setting_argument(parser, d, "train_batch", "rows per update microbatch")
    setting_argument(parser, d, "dev_prompts", "dev prompts scored greedily")
    setting_argument(parser, d, "dev_every", "iterations between dev scores; 0 = never")
    anchor_arguments(parser, d, per="sample (PPO-clip: response token)")
    run_arguments(
        parser,
        d,
        seed="sampling and initialisation seed",
        resume="continue the run in --out from its last iteration",
        quiet="no per-iteration lines",
    )
    parser.set_defaults(run=cmd_rl, trains=True)


def policy_rewards(samples: list, rewards: np.ndarray, unfinished_reward: float | None) -> np.ndarray:
    """The reward the policy is trained on: the scorer's, or ``unfinished_reward`` for a sample
    that did not finish on its own (``finish_reason`` "length" or "loop")."""
    if unfinished_reward is None:
        return rewards
    unfinished = np.array([s.finish_reason != "stop" for s in samples])
    return np.where(unfinished, np.float32(unfinished_reward), rewards).astype(np.float32)


def settings_from_args(args: Any) -> RLSettings:
    return cli_args.settings_from_args(RLSettings, args)


def cmd_rl(args: Any) -> int:
    settings = settings_from_args(args)
    settings.check()
    read_split(args.prompts, "train")
    if settings.dev_prompts and settings.dev_every:
        read_split(args.prompts, "dev")
    if not settings.resume:  # --resume compares the settings once the base is loaded
        check_new_run(Path(args.out))
    base = cli_args.load_training_base(args.model, args.dtype)
    records = rl(base, args.prompts, args.out, settings, init_adapter=args.init_adapter, reward_model=args.reward_model)
    last = records[-1] if records else {}
    print(json.dumps({k: last.get(k) for k in ("step", "mean_reward", "kl_to_reference", "dev_strict")}))
    return 0
