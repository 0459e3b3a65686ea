"""Rollouts: K sampled responses per prompt from one or several models, through the one engine,
scored; and the teacher-forced log-probs of sampled responses (RL's old and reference policies).

A committee ``Member`` is a loaded model plus an optional LoRA adapter. ``rollout`` sends every
(prompt, member, sample) request of members that share a model through that model's engine in
one call, so members that are adapters of one base (and the bare base itself) decode together in
mixed-adapter batches (each row gathers its own adapter from the engine's ``AdapterBank``).
On CPUs the base loads as SmolLM2's own int4 weights by default (``afmkit.load``'s choice), the
fastest decoding there.

Every request's random seed is a hash of (seed, prompt id, member, sample index), and the engine
samples each row from its own key, so a run repeats exactly; a sample does not depend on the
batch it ran in up to rounding (attention over a longer padded cache can round differently and so
change a sampled token on the real model; the tests' tiny model gives equal samples).

``response_token_logprobs``: per-token log-probs of given responses after given prompts under given
weights (and per-row adapters), batched, without a cache; ``LanguageModel.logits`` is its
independent reference in the tests.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from afmkit.adapters.lora import AdapterBank, LoraAdapter, single
from afmkit.config import ModelConfig
from afmkit.errors import UserError
from afmkit.infer.engine import Engine, activation_dtype, prompt_bucket
from afmkit.infer.sampling import SamplingParams
from afmkit.model.transformer import Params, forward, output_logits
from afmkit.posttrain import verifiable
from afmkit.progress import ProgressReporter

# scorer(prompt rows, response texts) -> {reward name: [N] array}
Scorer = Callable[[Sequence[dict[str, Any]], Sequence[str]], dict[str, np.ndarray]]


@dataclasses.dataclass(frozen=True, kw_only=True)
class RolloutSettings:
    """How rollouts sample (the defaults ``itec`` and ``rl`` start from)."""

    samples: int = 4  # K responses per prompt and member
    max_new_tokens: int = 512
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 0
    seed: int = 0
    batch: int = 64  # rows decoded together (a finished row's slot goes to the next request)
    stop_loops: bool = True  # end a response as soon as it is a repetition loop (finish_reason "loop")

    def check(self, *, min_samples: int = 1) -> None:
        if self.samples < min_samples:
            raise UserError(f"--samples must be at least {min_samples}, got {self.samples}")
        if self.batch < 1 or self.max_new_tokens < 1:
            raise UserError(f"--batch and --max-new-tokens must be at least 1, got {self.batch}, {self.max_new_tokens}")


@dataclasses.dataclass(frozen=True)
class Member:
    """A committee member: a loaded ``LanguageModel`` and optionally a LoRA adapter over it."""

    name: str
    model: Any
    adapter: LoraAdapter | None = None


@dataclasses.dataclass
class Sample:
    prompt_id: str
    member: str
    index: int  # which of the K samples
    prompt_tokens: list[int]
    tokens: list[int]  # the generated ids (the EOS that ended it included)
    text: str
    finish_reason: str  # "stop" (EOS or stop string), "length" (ran to max_new_tokens) or "loop" (cut)
    loop: bool  # cut as a loop, or verifiable.is_loop on the text
    rewards: dict[str, float]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


LOOP = "loop"  # the finish reason of a response cut where it became a repetition loop


def _stop_at_loop(index: int, tokens: Sequence[int]) -> str | None:
    """The engine's ``stop_when`` for rollouts: a looping response is never a winner and its
    reward is settled, so decoding it to ``max_new_tokens`` would only burn time."""
    return LOOP if verifiable.is_loop(tokens) else None


def sample_seed(seed: int, prompt_id: str, member: str, index: int) -> int:
    """The engine seed of one request: independent of batching and of the committee's order."""
    digest = hashlib.sha256(f"{seed}|{prompt_id}|{member}|{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def chat_prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """The prompt as a user turn in the chat template, ready for the assistant's answer (as the
    IFEval harness asks it)."""
    return tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": prompt}]))


def verifier_scorer(prompts: Sequence[dict[str, Any]], responses: Sequence[str]) -> dict[str, np.ndarray]:
    """The verifiable-instruction reward: fraction of constraints followed, strict and loose."""
    r = verifiable.instruction_rewards(prompts, responses)
    return {"strict": r.strict, "loose": r.loose}


def reward_model_scorer(reward_model: Any, *, batch: int = 8) -> Scorer:
    """A scorer from a loaded ``reward_model.RewardModel``: its scalar score of the exchange."""

    def score(prompts: Sequence[dict[str, Any]], responses: Sequence[str]) -> dict[str, np.ndarray]:
        conversations = [
            [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": r}]
            for p, r in zip(prompts, responses)
        ]
        return {"rm": np.asarray(reward_model.score(conversations, batch=batch), np.float64)}

    return score


def _engine(model: Any, batch: int) -> Engine:
    if model.engine.max_batch == batch and model.engine.mesh is None:
        return model.engine
    return Engine(model.config, model.params, model.tokenizer, eos_ids=model.tokenizer.stop_ids, max_batch=batch)


def rollout(
    members: Sequence[Member],
    prompts: Sequence[dict[str, Any]],
    settings: RolloutSettings,
    *,
    scorers: Sequence[Scorer] = (verifier_scorer,),
    stats: dict[str, float] | None = None,
    quiet: bool = False,
) -> list[Sample]:
    """``settings.samples`` responses per prompt from every member, scored by every scorer.

    ``prompts``: rows with an ``id`` (or ``key``) and a ``prompt`` (synth-if rows; the verifier
    also reads their constraints). Returns samples ordered by prompt, then member, then index.
    ``stats``, if given, receives the generated token count, seconds and tokens/s. Progress goes
    to stderr (a bar on a terminal, log lines otherwise) unless ``quiet``.
    """
    settings.check()
    if not members:
        raise UserError("a rollout needs at least one committee member")
    names = [m.name for m in members]
    if len(set(names)) != len(names):
        raise UserError(f"committee members must have distinct names, got {names}")
    ids = [str(p.get("id", p.get("key", ""))) for p in prompts]
    if not prompts or "" in ids or len(set(ids)) != len(ids):
        raise UserError("rollout prompts must be a non-empty list of rows with distinct 'id's")
    by_model: dict[int, list[Member]] = {}
    for m in members:
        by_model.setdefault(id(m.model), []).append(m)
    out: dict[tuple[int, str, int], Sample] = {}
    generated, started = 0, time.perf_counter()
    for group in by_model.values():
        model = group[0].model
        model_label = ", ".join(m.name for m in group)
        prompt_ids = [chat_prompt_ids(model.tokenizer, p["prompt"]) for p in prompts]
        keys = [(i, m, k) for i in range(len(prompts)) for m in group for k in range(settings.samples)]
        keys.sort(key=lambda key: len(prompt_ids[key[0]]))  # similar lengths share a batch: less padding
        sampling = [
            SamplingParams(
                max_new_tokens=settings.max_new_tokens,
                temperature=settings.temperature,
                top_p=settings.top_p,
                top_k=settings.top_k,
                seed=sample_seed(settings.seed, ids[i], m.name, k),
            )
            for i, m, k in keys
        ]
        tokens: list[list[int]] = [[] for _ in keys]
        texts: list[list[str]] = [[] for _ in keys]
        with ProgressReporter(f"rollout ({model_label})", len(keys), unit="responses", quiet=quiet) as progress:
            for event in _engine(model, settings.batch).stream(
                [prompt_ids[i] for i, _, _ in keys],
                sampling,
                adapters=[m.adapter if m.adapter is not None else model.adapter for _, m, _ in keys],
                stop_when=_stop_at_loop if settings.stop_loops else None,
            ):
                tokens[event.index].append(event.token)
                texts[event.index].append(event.text)
                if event.finish_reason is None:
                    continue
                (i, m, k), text = keys[event.index], "".join(texts[event.index])
                generated += len(tokens[event.index])
                progress.advance(tokens=len(tokens[event.index]))
                out[(i, m.name, k)] = Sample(
                    prompt_id=ids[i],
                    member=m.name,
                    index=k,
                    prompt_tokens=list(prompt_ids[i]),
                    tokens=tokens[event.index],
                    text=text,
                    finish_reason=event.finish_reason,
                    loop=event.finish_reason == LOOP or verifiable.is_loop(text),
                    rewards={},
                )
    seconds = time.perf_counter() - started
    samples = [out[(i, m.name, k)] for i in range(len(prompts)) for m in members for k in range(settings.samples)]
    score_samples(samples, dict(zip(ids, prompts)), scorers)
    if stats is not None:
        stats.update(tokens=generated, seconds=seconds, tokens_per_second=generated / max(seconds, 1e-9))
    return samples


def score_samples(samples: Sequence[Sample], prompts: dict[str, dict[str, Any]], scorers: Sequence[Scorer]) -> None:
    """Fill each sample's ``rewards`` from every scorer (``prompts``: rows by prompt id)."""
    for scorer in scorers:
        for name, values in scorer([prompts[s.prompt_id] for s in samples], [s.text for s in samples]).items():
            for s, v in zip(samples, np.asarray(values).reshape(-1)):
                s.rewards[name] = float(v)


# -- teacher-forced log-probs ------------------------------------------------------------------
def _row_adapters(config: ModelConfig, adapters: Any, rows: int) -> Any:
    """What ``forward`` takes for ``adapters``: None, one adapter for every row, or one (or None)
    per row (a bank with one slot per distinct adapter, slot 0 the bare base)."""
    if adapters is None or isinstance(adapters, LoraAdapter):
        return None if adapters is None else single(adapters)
    adapters = list(adapters)
    if len(adapters) != rows:
        raise UserError(f"got {rows} responses but {len(adapters)} adapters; give one (or None) per response")
    distinct = list({id(a): a for a in adapters if a is not None}.values())
    if not distinct:
        return None
    if len(distinct) == 1 and all(a is not None for a in adapters):
        return single(distinct[0])
    bank = AdapterBank.for_adapters(config, distinct)
    slot = {id(a): s for s, a in enumerate(distinct, start=1)}
    return bank.rows([0 if a is None else slot[id(a)] for a in adapters])


def _token_logprobs(
    params: Params, tokens: jax.Array, adapters: Any, *, config: ModelConfig, activation_dtype: Any
) -> jax.Array:
    """``log p(tokens[:, t + 1] | tokens[:, :t + 1])`` for every t: ``[B, T - 1]`` fp32."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    hidden, _ = forward(
        params, tokens, positions, None, config=config, activation_dtype=activation_dtype, adapters=adapters
    )
    logits = output_logits(params, hidden[:, :-1]).astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    return jnp.take_along_axis(logits, tokens[:, 1:, None], axis=-1)[..., 0] - log_z


_jitted_token_logprobs = jax.jit(_token_logprobs, static_argnames=("config", "activation_dtype"))


def response_token_logprobs(
    params: Params,
    config: ModelConfig,
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    adapters: LoraAdapter | Sequence[LoraAdapter | None] | None = None,
    *,
    batch: int = 8,
) -> np.ndarray:
    """Per-token log-probs of ``response_ids[i]`` after ``prompt_ids[i]`` under ``params`` (plus
    ``adapters``: one for every row or one per row), teacher-forced: ``[N, R]`` fp32 with
    ``R = max(len(response))``, zeros past each response's end (sum a row for its sequence
    log-prob). Rows run ``batch`` at a time, shortest first (so a batch's rows are of like
    length), right-padded to a bucketed length (causal: the padding changes nothing before it)."""
    n = len(prompt_ids)
    if n != len(response_ids):
        raise UserError(f"got {n} prompts but {len(response_ids)} responses; give one response per prompt")
    if any(len(p) == 0 for p in prompt_ids):
        raise UserError("every prompt needs at least one token (the first response token is predicted from it)")
    longest = max((len(r) for r in response_ids), default=0)
    out = np.zeros((n, longest), np.float32)
    if n == 0 or longest == 0:
        return out
    act = activation_dtype(params)
    per_row = adapters is not None and not isinstance(adapters, LoraAdapter)
    adapters = list(adapters) if per_row else adapters
    order = sorted(range(n), key=lambda i: len(prompt_ids[i]) + len(response_ids[i]))
    for lo in range(0, n, batch):
        chunk = order[lo : lo + batch]
        rows = [list(prompt_ids[i]) + list(response_ids[i]) for i in chunk]
        length = max(len(r) for r in rows)
        config.check_context(length, what="a prompt plus its response", fix="score shorter responses")
        tokens = np.zeros((batch, prompt_bucket(length)), np.int32)  # full-size last batch: one compile
        for j, r in enumerate(rows):
            tokens[j, : len(r)] = r
        row_adapters = [adapters[i] for i in chunk] + [None] * (batch - len(chunk)) if per_row else adapters
        logprobs = np.asarray(
            _jitted_token_logprobs(
                params,
                jnp.asarray(tokens),
                _row_adapters(config, row_adapters, batch),
                config=config,
                activation_dtype=act,
            )
        )
        for j, i in enumerate(chunk):
            p, r = len(prompt_ids[i]), len(response_ids[i])
            # Token at position p + t is predicted at position p + t - 1.
            out[i, :r] = logprobs[j, p - 1 : p - 1 + r]
    return out
