"""A heads-only reward model over frozen SmolLM2-135M-Instruct on hh-rlhf (docs/posttraining.md).

The baseline a trained trunk (LoRA or full) must beat: the last-token embeddings of every
conversation are computed once through the frozen model (``forward`` and
``reward_model.last_token_index``, as ``reward_outputs`` reads them), then only the score head is trained with AFM's loss
(``losses.reward_model_loss``, hh-rlhf level 1, p = 0.85) by full-batch Adam. Reports held-out
pair accuracy on ``preference_data.split_pairs``' test part, with its binomial standard error,
and the embedding throughput. Writes JSON (``--out``) and prints it.

    python benchmarks/reward_probe.py --train-pairs 600 --out reward_probe.json
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import afmkit
from afmkit.posttrain import losses, preference_data
from afmkit.posttrain import reward_model as rm


def embeddings(model, rows: list[list[int]], *, batch: int) -> np.ndarray:
    """Final hidden state of each row's last token ``[N, d]``: what the reward heads read."""
    d = model.config.d_model

    @jax.jit
    def hidden_last(tokens, segment_ids):
        from afmkit.model.transformer import forward

        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        hidden, _ = forward(model.params, tokens, positions, None, config=model.config, segment_ids=segment_ids)
        return jnp.take_along_axis(hidden, rm.last_token_index(segment_ids)[:, None, None], axis=1)[:, 0]

    order = np.argsort([len(r) for r in rows])  # similar lengths together: less padding
    out = np.zeros((len(rows), d), np.float32)
    for lo in range(0, len(rows), batch):
        picked = order[lo : lo + batch]
        chunk = [rows[i] for i in picked]
        length = -(-max(len(r) for r in chunk) // 64) * 64  # few compiled shapes
        tokens, segment_ids = preference_data.pad_rows(chunk + [[0]] * (batch - len(chunk)), length)
        out[picked] = np.asarray(hidden_last(jnp.asarray(tokens), jnp.asarray(segment_ids)))[: len(chunk)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train-pairs", type=int, default=600)
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", default="reward_probe.json")
    args = parser.parse_args()

    pairs, counts = preference_data.hh_rlhf_pairs()
    train, test = preference_data.split_pairs(pairs)
    rng = np.random.default_rng(0)
    train = [train[i] for i in rng.permutation(len(train))[: args.train_pairs]]
    model = afmkit.load()
    tokenized = {}
    for name, part in (("train", train), ("test", test)):
        tokenized[name], dropped = preference_data.tokenize_pairs(model.tokenizer, part, max_len=args.max_len)
        counts[f"{name}_dropped_too_long"] = dropped
    rows = [r for name in ("train", "test") for p in tokenized[name] for r in (p.chosen, p.rejected)]
    start = time.perf_counter()
    emb = embeddings(model, rows, batch=args.batch)
    seconds = time.perf_counter() - start
    n_train = 2 * len(tokenized["train"])
    train_emb, test_emb = emb[:n_train].reshape(-1, 2, emb.shape[1]), emb[n_train:].reshape(-1, 2, emb.shape[1])

    def loss(w, e):
        scores = e @ w["w"] + w["b"]
        total, metrics = losses.reward_model_loss(
            scores[:, 0], scores[:, 1], jnp.full(e.shape[0], preference_data.HH_RLHF_LEVEL), grade_weight=0.0
        )
        return total / metrics["count"], metrics

    # Standardise features (the probe's own scale); the head is then w / std on raw embeddings.
    mean, std = train_emb.reshape(-1, emb.shape[1]).mean(0), train_emb.reshape(-1, emb.shape[1]).std(0) + 1e-6
    train_x, test_x = (train_emb - mean) / std, (test_emb - mean) / std
    w = {"w": jnp.zeros(emb.shape[1]), "b": jnp.zeros(())}
    optimizer = optax.adamw(1e-2, weight_decay=1e-2)
    state = optimizer.init(w)
    step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    for _ in range(args.steps):
        (_, _), grad = step(w, jnp.asarray(train_x))
        updates, state = optimizer.update(grad, state, w)
        w = optax.apply_updates(w, updates)
    results = {}
    for name, x in (("train", train_x), ("test", test_x)):
        value, metrics = loss(w, jnp.asarray(x))
        accuracy = float(metrics["pair_accuracy"] / metrics["count"])
        n = int(metrics["count"])
        results[name] = {
            "pairs": n,
            "loss": float(value),
            "pair_accuracy": accuracy,
            "stderr": float(np.sqrt(accuracy * (1 - accuracy) / n)),
        }
    report = {
        "model": "smollm2-135m-instruct (int4, frozen)",
        "counts": counts,
        "embedding_tokens": int(sum(len(r) for r in rows)),
        "embedding_seconds": seconds,
        "embedding_tokens_per_s": sum(len(r) for r in rows) / seconds,
        "probe_steps": args.steps,
        **results,
    }
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
