"""Fine-tune a LoRA adapter on chat data: ``afmkit adapter train``.

Only the adapter is trained: the base weights are an argument of the jitted step, never
differentiated. The loss is next-token cross-entropy on the assistant's tokens only; which tokens
those are is derived from the model's own chat template (each assistant turn's span is the text
between the conversation rendered up to the turn's generation prompt and rendered through the
turn), so whatever the template adds around a reply (ChatML's ``<|im_end|>``) is learned too.

Data: JSONL, one ``{"messages": [{"role", "content"}, ...]}`` per line. A held-out slice (the
last ``eval_fraction`` of the file) is scored before and after training; the numbers are printed
and saved with the adapter (``training.json``). The adapter is saved atomically every
``save_every`` steps and at the end, in the PEFT layout.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from afmkit.adapters.lora import LoraAdapter, LoraConfig, SingleAdapter, init_adapter
from afmkit.adapters.peft_io import save_adapter
from afmkit.errors import UserError
from afmkit.model.transformer import logits_fn, token_nll

TRAINING_FILE = "training.json"


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainSettings:
    """Every setting of ``afmkit adapter train`` and its default: the one source the CLI reads."""

    rank: int = LoraConfig.rank
    alpha: float | None = None  # None: 2 x rank (LoRA's usual scale of 2)
    targets: tuple[str, ...] = LoraConfig.targets
    layers: tuple[int, ...] | None = None  # None: every layer
    steps: int = 200
    lr: float = 2e-4
    batch: int = 8
    max_len: int = 512
    warmup: int = 10
    weight_decay: float = 0.0
    eval_fraction: float = 0.1
    save_every: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        if self.alpha is None:
            object.__setattr__(self, "alpha", 2.0 * self.rank)


@dataclasses.dataclass
class Example:
    ids: list[int]
    mask: list[int]  # 1 where the token is the assistant's


def read_chat_jsonl(path: str | os.PathLike) -> list[list[dict[str, str]]]:
    """Conversations from a JSONL file; clear errors name the bad line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"training data {path} does not exist; give a JSONL file of {{'messages': [...]}} lines")
    conversations = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            messages = json.loads(line)["messages"]
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{path}:{number}: expected a JSON object with a 'messages' list") from None
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise UserError(f"{path}:{number}: 'messages' must be a list of {{'role': str, 'content': str}}")
        if not any(m["role"] == "assistant" for m in messages):
            raise UserError(f"{path}:{number}: the conversation has no assistant message to learn from")
        conversations.append(messages)
    if not conversations:
        raise UserError(f"{path} holds no conversations")
    return conversations


def tokenize_conversation(tokenizer: Any, messages: list[dict[str, str]]) -> Example:
    """Token ids of the whole conversation and a mask of the assistant's tokens."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True) if i else ""
        through = tokenizer.apply_chat_template(messages[: i + 1], add_generation_prompt=False)
        if not text.startswith(before) or not text.startswith(through):
            raise UserError("the chat template does not render conversations prefix by prefix; cannot mask turns")
        spans.append((len(before), len(through)))
    encoding = tokenizer.backend.encode(text, add_special_tokens=False)
    mask = [int(any(s <= start and end <= e and end > start for s, e in spans)) for start, end in encoding.offsets]
    return Example(ids=list(encoding.ids), mask=mask)


def _batches(examples: list[Example], *, batch: int, length: int, rng: np.random.Generator):
    """Endless shuffled batches of fixed shape ``[batch, length]`` (right-padded, mask 0)."""
    while True:
        order = rng.permutation(len(examples))
        for lo in range(0, len(order) - batch + 1 if len(order) >= batch else 1, batch):
            picked = [examples[i] for i in order[lo : lo + batch]]
            while len(picked) < batch:
                picked.append(examples[rng.integers(len(examples))])
            yield _pad(picked, length)


def _pad(examples: list[Example], length: int) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.zeros((len(examples), length), np.int32)
    mask = np.zeros((len(examples), length), np.float32)
    for row, ex in enumerate(examples):
        n = min(len(ex.ids), length)
        tokens[row, :n] = ex.ids[:n]
        mask[row, :n] = ex.mask[:n]
    return tokens, mask


def _token_losses(adapter_weights: Any, params: Any, tokens: jax.Array, mask: jax.Array, *, config: Any, scale: float):
    """(sum of assistant-token losses, their count) for a batch: exact token-weighted means."""
    adapters = None if adapter_weights is None else SingleAdapter(adapter_weights, scale)
    logits = logits_fn(params, tokens[:, :-1], config=config, adapters=adapters)
    nll, _ = token_nll(logits, tokens[:, 1:])
    weights = mask[:, 1:]
    return (nll * weights).sum(), weights.sum()


def evaluate(model: Any, adapter: LoraAdapter | None, examples: list[Example], *, batch: int, length: int) -> float:
    """Mean cross-entropy per assistant token over ``examples`` (None: the base model)."""
    fn = jax.jit(_token_losses, static_argnames=("config", "scale"))
    weights = None if adapter is None else jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), adapter.weights)
    scale = adapter.config.scale if adapter is not None else 1.0
    total, count = 0.0, 0.0
    for lo in range(0, len(examples), batch):
        chunk = examples[lo : lo + batch]
        chunk = chunk + [Example([0], [0])] * (batch - len(chunk))
        tokens, mask = _pad(chunk, length)
        s, c = fn(weights, model.params, jnp.asarray(tokens), jnp.asarray(mask), config=model.config, scale=scale)
        total, count = total + float(s), count + float(c)
    return total / max(count, 1.0)


def train_adapter(
    model: Any,
    conversations: list[list[dict[str, str]]],
    out: str | os.PathLike,
    settings: TrainSettings,
    *,
    name: str = "",
    progress: bool = True,
) -> dict[str, Any]:
    """Train an adapter for ``model`` (a ``LanguageModel``) and save it to ``out``; returns the results."""
    if settings.steps < 1 or settings.batch < 1:
        raise UserError("--steps and --batch must be positive")
    lora = LoraConfig(
        rank=settings.rank, alpha=settings.alpha, targets=settings.targets, layers=settings.layers, dtype="float16"
    )
    examples = [tokenize_conversation(model.tokenizer, c) for c in conversations]
    too_long = sum(len(e.ids) > settings.max_len for e in examples)
    examples = [e for e in examples if len(e.ids) <= settings.max_len and sum(e.mask) > 0]
    if len(examples) < 2:
        raise UserError(
            f"need at least 2 usable conversations of at most {settings.max_len} tokens ({too_long} were longer); "
            "raise --max-len or add data"
        )
    n_eval = max(1, round(len(examples) * settings.eval_fraction))
    train, held_out = examples[:-n_eval], examples[-n_eval:]
    if not train:
        raise UserError("no training conversations left after the held-out split; lower --eval-fraction")
    length = min(settings.max_len, -(-max(len(e.ids) for e in examples) // 32) * 32)

    adapter = init_adapter(model.config, lora, jax.random.PRNGKey(settings.seed), name=name)
    weights = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), adapter.weights)  # fp32 master copy
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, settings.lr, min(settings.warmup, settings.steps - 1), settings.steps, settings.lr * 0.1
    )
    optimizer = optax.adamw(schedule, weight_decay=settings.weight_decay)
    opt_state = optimizer.init(weights)
    config, scale = model.config, lora.scale

    @jax.jit
    def step(weights, opt_state, params, tokens, mask):
        loss, grads = jax.value_and_grad(_token_mean_loss)(weights, params, tokens, mask)
        updates, opt_state = optimizer.update(grads, opt_state, weights)
        return optax.apply_updates(weights, updates), opt_state, loss

    def _token_mean_loss(weights, params, tokens, mask):
        total, count = _token_losses(weights, params, tokens, mask, config=config, scale=scale)
        return total / jnp.maximum(count, 1.0)

    def snapshot(weights: Any) -> LoraAdapter:
        stored = jax.tree.map(lambda x: np.asarray(x).astype(np.float16), weights)
        return LoraAdapter(config=lora, weights=stored, name=name)

    results: dict[str, Any] = {
        "settings": {k: v for k, v in dataclasses.asdict(settings).items()},
        "train_conversations": len(train),
        "held_out_conversations": len(held_out),
        "sequence_length": length,
        "skipped_too_long": too_long,
    }
    eval_batch = settings.batch
    results["held_out_loss_base"] = evaluate(model, None, held_out, batch=eval_batch, length=length)
    print(f"held-out loss before training (base model): {results['held_out_loss_base']:.4f}")

    def save(weights: Any, done: int) -> None:
        results["steps_done"] = done
        save_adapter(
            out,
            snapshot(weights),
            config=model.config,
            params=model.params,
            base_name=model.name,
            extra_files={TRAINING_FILE: json.dumps(results, indent=2)},
        )

    rng = np.random.default_rng(settings.seed)
    batches = _batches(train, batch=settings.batch, length=length, rng=rng)
    losses: list[float] = []
    start = time.perf_counter()
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = [
        TextColumn("training"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, disable=not progress, transient=False) as bar:
        task = bar.add_task("train", total=settings.steps, loss="-")
        for i in range(1, settings.steps + 1):
            tokens, mask = next(batches)
            weights, opt_state, loss = step(weights, opt_state, model.params, jnp.asarray(tokens), jnp.asarray(mask))
            losses.append(float(loss))
            if not math.isfinite(losses[-1]):
                raise UserError(f"the training loss became {losses[-1]} at step {i}; lower --lr")
            bar.update(task, advance=1, loss=f"{np.mean(losses[-10:]):.4f}")
            if settings.save_every and i % settings.save_every == 0 and i < settings.steps:
                save(weights, i)
    results["train_seconds"] = time.perf_counter() - start
    results["train_loss_first10"] = float(np.mean(losses[:10]))
    results["train_loss_last10"] = float(np.mean(losses[-10:]))
    trained = snapshot(weights)
    results["held_out_loss_adapter"] = evaluate(model, trained, held_out, batch=eval_batch, length=length)
    print(f"held-out loss after training (with the adapter): {results['held_out_loss_adapter']:.4f}")
    save(weights, settings.steps)
    return results


def _int_list(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        values: list[int] = []
        for part in text.split(","):
            if "-" in part:
                lo, hi = part.split("-")
                values.extend(range(int(lo), int(hi) + 1))
            else:
                values.append(int(part))
        return tuple(values)
    except ValueError:
        raise UserError(f"--layers takes comma-separated layer numbers or ranges like 0-5,10; got {text!r}") from None


def register(commands: Any) -> None:
    from afmkit.cli_args import model_argument

    adapter = commands.add_parser("adapter", help="LoRA adapters: train")
    actions = adapter.add_subparsers(required=True, metavar="ACTION")
    train = actions.add_parser("train", help="fine-tune a LoRA adapter on chat data (JSONL)")
    model_argument(train)
    add_train_arguments(train)
    train.set_defaults(run=cmd_adapter_train)


def add_train_arguments(parser: Any) -> None:
    """The flags of ``adapter train``; every default (and the number its help quotes) is ``TrainSettings``'s."""
    d = TrainSettings()
    parser.add_argument("--data", required=True, help="JSONL file: one {'messages': [{role, content}...]} per line")
    parser.add_argument("--out", required=True, help="adapter directory to write (PEFT layout)")
    parser.add_argument("--rank", type=int, default=d.rank, help=f"LoRA rank (default {d.rank})")
    parser.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 2 x rank)")
    targets = ",".join(d.targets)
    parser.add_argument("--targets", default=targets, help=f"comma-separated linears to adapt (default {targets})")
    parser.add_argument("--layers", help="layers to adapt, e.g. 0-5,10 (default: all)")
    parser.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps (default {d.steps})")
    parser.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr:g})")
    parser.add_argument("--warmup", type=int, default=d.warmup, help=f"linear warmup steps (default {d.warmup})")
    parser.add_argument(
        "--weight-decay", type=float, default=d.weight_decay, help=f"AdamW weight decay (default {d.weight_decay:g})"
    )
    parser.add_argument("--batch", type=int, default=d.batch, help=f"conversations per step (default {d.batch})")
    parser.add_argument(
        "--max-len", type=int, default=d.max_len, help=f"longest conversation in tokens (default {d.max_len})"
    )
    parser.add_argument(
        "--save-every", type=int, default=d.save_every, help=f"save the adapter every N steps (default {d.save_every})"
    )
    parser.add_argument(
        "--eval-fraction",
        type=float,
        default=d.eval_fraction,
        help=f"held-out share of the data (default {d.eval_fraction:g})",
    )
    parser.add_argument("--seed", type=int, default=d.seed, help=f"adapter init and data order (default {d.seed})")


def settings_from_args(args: Any) -> TrainSettings:
    """``TrainSettings`` from parsed ``adapter train`` flags."""
    return TrainSettings(
        rank=args.rank,
        alpha=args.alpha,
        targets=tuple(t.strip() for t in args.targets.split(",") if t.strip()),
        layers=_int_list(args.layers),
        steps=args.steps,
        lr=args.lr,
        warmup=args.warmup,
        weight_decay=args.weight_decay,
        batch=args.batch,
        max_len=args.max_len,
        save_every=args.save_every,
        eval_fraction=args.eval_fraction,
        seed=args.seed,
    )


def cmd_adapter_train(args: Any) -> int:
    import afmkit

    settings = settings_from_args(args)
    LoraConfig(rank=settings.rank, alpha=settings.alpha, targets=settings.targets)  # validate before loading
    conversations = read_chat_jsonl(args.data)
    # The adapter is trained against the base at --dtype (int4: the GGUF's own 4-bit weights,
    # QLoRA-style); its fingerprint is the same for every lossless load of that base.
    model = afmkit.load(args.model, dtype=args.dtype)
    results = train_adapter(model, conversations, args.out, settings, name=Path(args.out).name)
    print(
        json.dumps(
            {
                k: results[k]
                for k in ("held_out_loss_base", "held_out_loss_adapter", "train_seconds", "train_conversations")
            }
        )
    )
    return 0
