"""Experiment: GPTQ-style code assignment (error feedback through the layer-input Hessian) on the
named 3.5-bit build's own tables and scales. Writes a compressed model dir."""

import json
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import afmkit
from afmkit.compress import sensitivity
from afmkit.interop import native
from afmkit.model import transformer
from afmkit.model.palettized import PalettizedWeight, from_codes

out_dir = sys.argv[1]
damp = float(sys.argv[2]) if len(sys.argv) > 2 else 0.01
order = sys.argv[3] if len(sys.argv) > 3 else "act"
ntok = int(sys.argv[4]) if len(sys.argv) > 4 else 8192

flt = afmkit.load("smollm2-135m-instruct", dtype="float32")
comp = afmkit.load("smollm2-135m-instruct-3.5bpw", recovery=False)
cfg = flt.config
cal = sensitivity.read_calibration(
    "/work/shared/data/pretrain/tinyshakespeare_input.txt", flt.tokenizer, start=600000, tokens=ntok, seq_len=512
)
print("windows", cal.windows.shape, flush=True)

SHARED = {"wq": "attn", "wk": "attn", "wv": "attn", "wo": "o", "w_gate": "mlp", "w_up": "mlp", "w_down": "down"}


def collect(params, tokens):
    seen = {}

    class Capture:
        def layer(self, i):
            def make(w):
                def f(spec, x):
                    key = (i, SHARED[w])
                    if key not in seen:
                        seen[key] = x.reshape(-1, math.prod(x.shape[2:])).astype(jnp.float32)
                    return jnp.zeros((), x.dtype)

                return f

            return {w: make(w) for w in SHARED}

    pos = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    transformer.forward(params, tokens, pos, None, config=cfg, adapters=Capture())
    return {f"{i}.{k}": x.T @ x for (i, k), x in seen.items()}


collect_j = jax.jit(collect)
t = time.time()
H = None
for wi in range(cal.windows.shape[0]):
    h = collect_j(flt.params, jnp.asarray(cal.windows[wi : wi + 1]))
    h = {k: np.asarray(v, np.float64) for k, v in h.items()}
    H = h if H is None else {k: H[k] + h[k] for k in H}
    print("window", wi, round(time.time() - t, 1), flush=True)
ntokens = cal.windows.size
H = {k: v / ntokens for k, v in H.items()}


def as_matrix(w, in_axes):
    outs = tuple(a for a in range(w.ndim) if a not in in_axes)
    return w.transpose(in_axes + outs).reshape(math.prod(w.shape[a] for a in in_axes), -1)


def gptq_codes(W, Hm, tables, scales, group_rows, damp, order):
    """W [K, N] float; tables [groups, 2^b]; scales [N]. Returns codes [K, N]."""
    K, N = W.shape
    W = W.astype(np.float64).copy()
    s = scales.astype(np.float64)
    grid = tables.astype(np.float64)[np.arange(N) // group_rows] * s[:, None]  # [N, 2^b] values per output
    Hm = Hm.copy()
    dead = np.diag(Hm) == 0
    Hm[dead, dead] = 1
    W[dead, :] = 0
    perm = np.argsort(-np.diag(Hm)) if order == "act" else np.arange(K)
    W, Hm = W[perm], Hm[perm][:, perm]
    Hm[np.diag_indices(K)] += damp * np.mean(np.diag(Hm))
    Hinv = np.linalg.inv(Hm)
    U = np.linalg.cholesky(Hinv).T  # upper: Hinv = U^T U
    codes = np.zeros((K, N), np.int64)
    B = 128
    for b0 in range(0, K, B):
        b1 = min(b0 + B, K)
        Wb = W[b0:b1].copy()
        Err = np.zeros_like(Wb)
        for j in range(b1 - b0):
            w = Wb[j]
            c = np.argmin(np.abs(w[:, None] - grid), axis=1)
            q = grid[np.arange(N), c]
            codes[b0 + j] = c
            e = (w - q) / U[b0 + j, b0 + j]
            Wb[j + 1 :] -= np.outer(U[b0 + j, b0 + j + 1 : b1], e)
            Err[j] = e
        W[b1:] -= U[b0:b1, b1:].T @ Err
    out = np.empty_like(codes)
    out[perm] = codes
    return out


def layer_error(Wf, Wq, Hm):
    D = Wf - Wq
    return float(np.einsum("kn,kl,ln->", D, Hm, D))


params = comp.params
new_layers = []
t = time.time()
stats = []
for i, layer in enumerate(params["layers"]):
    new = dict(layer)
    for m, hk in SHARED.items():
        pw = layer[m]
        assert isinstance(pw, PalettizedWeight), (i, m)
        wf = np.asarray(flt.params["layers"][i][m], np.float32)
        Wf = as_matrix(wf, pw.in_axes).astype(np.float64)
        Hm = H[f"{i}.{hk}"]
        tables = np.asarray(pw.tables)
        scales = np.asarray(pw.scales)
        codes = gptq_codes(Wf, Hm, tables, scales, pw.group_rows, damp, order)
        nw = from_codes(codes, tables, scales, bits=pw.bits, shape=pw.shape, in_axes=pw.in_axes)
        e0 = layer_error(Wf, np.asarray(pw.matrix(), np.float64), Hm)
        e1 = layer_error(Wf, np.asarray(nw.matrix(), np.float64), Hm)
        stats.append({"name": f"layers.{i}.{m}", "bits": pw.bits, "err_kmeans": e0, "err_gptq": e1})
        new[m] = nw
    new_layers.append(new)
    print(
        "layer",
        i,
        round(time.time() - t, 1),
        " ".join(f"{s['name'].split('.')[-1]}:{s['err_gptq'] / s['err_kmeans']:.2f}" for s in stats[-7:]),
        flush=True,
    )
params = dict(params)
params["layers"] = new_layers
native.save_checkpoint(out_dir, comp.config, params, comp.tokenizer)
json.dump(
    {"damp": damp, "order": order, "tokens": int(ntokens), "stats": stats},
    open(f"{out_dir}/gptq_stats.json", "w"),  # noqa: SIM115 (a record of the run, kept as it ran)
    indent=1,
)
print("saved", out_dir)
