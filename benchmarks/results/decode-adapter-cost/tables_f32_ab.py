import sys, time, dataclasses, numpy as np, jax, jax.numpy as jnp
import afmkit
from afmkit.infer.engine import Engine
from afmkit.model.palettized import PalettizedWeight
rec = sys.argv[1]=="rec"
model = afmkit.load("smollm2-135m-instruct-3.5bpw", recovery=rec)
def f32(p):
    return jax.tree_util.tree_map(lambda l: dataclasses.replace(l, tables=l.tables.astype(jnp.float32), scales=None if l.scales is None else l.scales.astype(jnp.float32)) if isinstance(l, PalettizedWeight) else l, p, is_leaf=lambda l: isinstance(l, PalettizedWeight))
engines = {"f16": Engine(model.config, model.params, model.tokenizer, eos_ids=()), "f32": Engine(model.config, f32(model.params), model.tokenizer, eos_ids=())}
prompt=[model.tokenizer.encode(model.tokenizer.apply_chat_template([{"role":"user","content":"Write a short story about a dragon who learns to bake bread."}]))]
s=afmkit.SamplingParams(max_new_tokens=128)
outs={}
def run(e):
    toks=[]; st=[]
    for ev in e.stream(prompt,s,adapters=model.adapter): st.append(time.perf_counter()); toks.append(ev)
    return (st[-1]-st[0])/(len(st)-1), toks
for name,e in engines.items(): run(e)
res={k:[] for k in engines}
for r in range(5):
    for name,e in (engines.items() if r%2==0 else reversed(list(engines.items()))):
        t,toks=run(e); res[name].append(t*1000); outs[name]=toks
print({k:(round(float(np.median(v)),3), [round(x,2) for x in v]) for k,v in res.items()})
print("same tokens:", [str(a)==str(b) for a,b in [(outs['f16'],outs['f32'])]])
