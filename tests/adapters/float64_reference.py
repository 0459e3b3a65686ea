"""The model in float64 numpy, with LoRA adapters merged exactly, and the tolerance that fp32
rounding earns against it.

Every fp32 way of applying an adapter (alone, in a mixed batch, merged into the weights) computes
the same function in a different order, so each differs from the exact (float64) logits by
rounding only. How far rounding moves the logits depends on the model (SmolLM2's activations
have outliers in the hundreds, amplified through 30 layers: about 1e-4 on logits of ~30) and on
the CPU's kernels, so a test does not guess it: it measures it on the plainest fp32 path (each
row alone, unmerged), pooled over its rows, as ``rounding``, and allows every other path
``SLACK * rounding`` from the exact logits (so two paths agree to ``2 * SLACK * rounding``).

SLACK = 3: another order (a batched GEMM, gathered LoRA factors, ``W + scale*A@B`` rounded once
per weight) makes other roundings of the same size, and the largest of the ~10^5 roundings that
reach the logits varies from one order to another: up to 1.4x the plain path's, measured on an
AMD AVX-512 CPU (SmolLM2 and afm-tiny); 3 leaves room for other CPUs' kernels. A real
fault (a wrong slot, scale or row) moves logits by over 0.01, more than 100x the rounding, and
every test also checks that the plain path itself is right: its rounding is under 1% of the
adapter's effect.
"""

import numpy as np

from afmkit.adapters.lora import INPUT_AXES

SLACK = 3.0


def rounding_error(computed, exact) -> float:
    """Largest ``|computed - exact|``, but never below one fp32 spacing at the largest exact
    value: fp32 cannot resolve less, so a path that happens to round best there sets no bar."""
    exact = np.asarray(exact)
    spacing = float(np.spacing(np.float32(np.abs(exact).max())))
    return max(float(np.abs(np.asarray(computed, np.float64) - exact).max()), spacing)


def _rms_norm(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _rope(x, positions, base):
    """Half-split RoPE on ``[T, heads, head_dim]``, in float64."""
    half = x.shape[-1] // 2
    angles = np.asarray(positions)[:, None] * (1.0 / base ** (np.arange(half) / half))
    cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def reference_hidden(config, params, tokens, adapters=None, positions=None) -> np.ndarray:
    """Final hidden states ``[B, T, d]`` of ``tokens [B, T]`` in float64, each row alone (causal
    attention within the row) with its adapter merged into the weights in float64
    (``W + scale * A @ B``): the exact result that every fp32 way of applying the adapter (alone,
    in a mixed batch, merged) approximates. ``adapters``: None, one adapter for every row, or one
    (or None) per row. ``positions`` (``[T]``) default to 0..T-1."""
    tokens = np.asarray(tokens)
    batch, seq = tokens.shape
    per_row = adapters if isinstance(adapters, (list, tuple)) else [adapters] * batch
    f64 = lambda w: np.asarray(w, np.float64)  # noqa: E731
    norm = lambda x, scale: _rms_norm(x, f64(scale), config.norm_eps)  # noqa: E731
    x = f64(params["embed"])[tokens]
    positions = np.arange(seq) if positions is None else np.asarray(positions)
    groups, causal = config.n_heads // config.n_kv_heads, np.tril(np.ones((seq, seq), bool))
    for i, layer in enumerate(params["layers"]):
        base = {name: f64(layer[name]) for name in INPUT_AXES}  # converted once, shared by the rows
        merged = {}
        for row in range(batch):
            adapter = per_row[row]
            if id(adapter) not in merged:
                w = dict(base)
                for name, ab in (adapter.weights[i] if adapter is not None else {}).items():
                    # A's axes are the weight's inputs, B's its outputs: A @ B has the weight's shape.
                    w[name] = w[name] + adapter.config.scale * np.tensordot(f64(ab["a"]), f64(ab["b"]), axes=1)
                merged[id(adapter)] = w
            w = merged[id(adapter)]
            h = norm(x[row], layer["attn_norm"])
            q, k, v = (
                (h @ w[n].reshape(h.shape[-1], -1)).reshape(seq, -1, config.head_dim) for n in ("wq", "wk", "wv")
            )
            if config.qk_norm and config.qk_norm_position == "before_rope":
                q, k = norm(q, layer["q_norm"]), norm(k, layer["k_norm"])
            q, k = _rope(q, positions, config.rope_base), _rope(k, positions, config.rope_base)
            if config.qk_norm and config.qk_norm_position == "after_rope":
                q, k = norm(q, layer["q_norm"]), norm(k, layer["k_norm"])
            k, v = np.repeat(k, groups, axis=1), np.repeat(v, groups, axis=1)  # query head j reads kv head j // groups
            scores = np.where(causal, np.einsum("thk,shk->hts", q, k) / np.sqrt(config.head_dim), -np.inf)
            probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
            probs /= probs.sum(axis=-1, keepdims=True)
            attended = np.einsum("hts,shk->thk", probs, v).reshape(seq, -1)
            out = x[row] + attended @ w["wo"].reshape(attended.shape[-1], -1)
            h = norm(out, layer["mlp_norm"])
            gate, up = h @ w["w_gate"], h @ w["w_up"]
            x[row] = out + (gate / (1 + np.exp(-gate)) * up) @ w["w_down"]
    return norm(x, params["final_norm"])


def reference_logits(model, tokens, adapters=None) -> np.ndarray:
    """Float64 logits ``[B, T, vocab]`` of ``tokens [B, T]``, each row alone, under ``adapters``
    (None, one for every row, or one or None per row; see ``reference_hidden``)."""
    hidden = reference_hidden(model.config, model.params, tokens, adapters)
    if "lm_head" in model.params:
        return hidden @ np.asarray(model.params["lm_head"], np.float64)
    return hidden @ np.asarray(model.params["embed"], np.float64).T
