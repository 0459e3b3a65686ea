"""A/B in one process, interleaved: the shared adapter added inside the weight kernels (this
session) against XLA's separate LoRA products from a copy converted once (before). Prefill of 512
tokens, one-stream decode and batch-16 decode, for a named model (argv[1])."""
import json, sys, time
import afmkit
from afmkit.adapters import lora
from afmkit.infer import engine as engine_module
from afmkit.infer.engine import Engine

model = afmkit.load(sys.argv[1])
eng = Engine(model.config, model.params, model.tokenizer, eos_ids=())
text = "The lighthouse keeper wrote in the logbook every evening, describing the sea and the ships. " * 60
ids = model.tokenizer.encode(text)
prefill, short = ids[:512], ids[:32]
batch = [ids[i * 7 : i * 7 + 20 + 2 * i] for i in range(16)]
fused_low_rank, fused_pred = lora._Update.low_rank, engine_module.kernel_adds_low_rank

def mode(fused):
    lora._Update.low_rank = fused_low_rank if fused else (lambda self: None)
    engine_module.kernel_adds_low_rank = fused_pred if fused else (lambda w: False)
    eng.new_batch  # same engine; its batches rebuild their step adapters
    # a fresh batch per run: _as_steps_read runs again for the new mode

def timed(prompts, new):
    sampling = afmkit.SamplingParams(max_new_tokens=new)
    stamps = [time.perf_counter()]
    for _ in eng.stream(prompts, sampling, adapters=model.adapter):
        stamps.append(time.perf_counter())
    return stamps

def measure():
    s = timed([prefill], 1); p = 512 / (s[1] - s[0])
    s = timed([short], 65); d = 64 / (s[-1] - s[1])
    s = timed(batch, 33); b = 16 * 32 / (s[-1] - s[16])
    return p, d, b

res = {"fused": [], "xla": []}
for fused in (True, False):
    mode(fused); measure()  # compile
for _ in range(int(sys.argv[2]) if len(sys.argv) > 2 else 2):
    for fused in (False, True):
        mode(fused)
        res["fused" if fused else "xla"].append([round(v, 1) for v in measure()])
print(json.dumps({"model": sys.argv[1], "prefill, decode, batch16 tok/s": res}))
