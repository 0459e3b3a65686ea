import time, numpy as np, jax, jax.numpy as jnp, sys
from afmkit.model import palettized as PL
from afmkit.model.palettized import from_codes
rng=np.random.default_rng(0)
def w(k,n,bits):
    codes=rng.integers(0,2**bits,size=(k,n)); t=rng.standard_normal((n//16,2**bits)).astype(np.float16)
    s=rng.uniform(.5,2,size=n).astype(np.float16)
    return from_codes(codes,t,s,bits=bits,shape=(k,n))
REP=50
def bench(f,*a):
    f(*a).block_until_ready()
    ts=[]
    for _ in range(50):
        t=time.perf_counter(); f(*a).block_until_ready(); ts.append(time.perf_counter()-t)
    return np.min(ts)/REP*1e6, np.median(ts)/REP*1e6
for (k,n) in [(32,16),(576,16),(576,64),(576,192),(576,576),(576,1536)]:
    bits=4
    ws=[w(k,n,bits) for _ in range(REP)]
    x=jnp.asarray(rng.standard_normal((1,k)).astype(np.float32))
    def chain(x,ws):
        acc=0.
        for wi in ws:
            y = PL.palettized_matmul(x,wi)[0,0]; acc=acc+y; x = x*(1+y*1e-30)
        return acc
    def chain0(x,ws):
        acc=0.
        for wi in ws:
            y = (x[0,:16]*wi.tables[0,0]).sum(); acc=acc+y; x = x*(1+y*1e-30)
        return acc
    print(f"{k}x{n}: kernel min/med {bench(jax.jit(chain),x,ws)}  no-kernel {bench(jax.jit(chain0),x,ws)}", flush=True)
