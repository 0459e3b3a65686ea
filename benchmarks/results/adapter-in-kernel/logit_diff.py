"""One prompt's logits through the kernel path and XLA's path, and against the fp32 merged reference."""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

import afmkit
from afmkit.adapters import lora
from afmkit.adapters.lora import merge, single
from afmkit.model.packed import dequantize_params
from afmkit.model.transformer import logits_fn

m = afmkit.load(sys.argv[1])
ids = m.tokenizer.encode(
    m.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Write a short story about a lighthouse keeper, in three paragraphs."}]
    )
)
tokens = jnp.asarray([ids])
ad = single(m.adapter.astype(jnp.float32))
f = jax.jit(lambda p, t, a: logits_fn(p, t, config=m.config, adapters=a))
kernel = np.asarray(f(m.params, tokens, ad))
orig = lora._Update.low_rank
lora._Update.low_rank = lambda self: None
f2 = jax.jit(lambda p, t, a: logits_fn(p, t, config=m.config, adapters=a))
xla = np.asarray(f2(m.params, tokens, ad))
d = np.abs(kernel - xla)
top2 = np.sort(xla[0], axis=-1)[:, -2:]
print(
    json.dumps(
        {
            "max_abs_diff": float(d.max()),
            "mean_abs_diff": float(d.mean()),
            "max_abs_logit": float(np.abs(xla).max()),
            "argmax_agree": float((kernel.argmax(-1) == xla.argmax(-1)).mean()),
            "min_top2_gap": float((top2[:, 1] - top2[:, 0]).min()),
        }
    )
)

lora._Update.low_rank = orig
ref_params = merge(dequantize_params(m.params), m.adapter.astype(jnp.float32))
f3 = jax.jit(lambda p, t: logits_fn(p, t, config=m.config))
ref = np.asarray(f3(ref_params, tokens))
print(
    json.dumps(
        {
            "kernel_vs_ref_max": float(np.abs(kernel - ref).max()),
            "xla_vs_ref_max": float(np.abs(xla - ref).max()),
            "kernel_vs_ref_mean": float(np.abs(kernel - ref).mean()),
            "xla_vs_ref_mean": float(np.abs(xla - ref).mean()),
        }
    )
)
