import json, sys
rows=[json.loads(l) for l in open('metrics.jsonl')]
dev=[(r['step'], round(r['dev_strict'],3), round(r['dev_strict_all'],3), r.get('dev_loop_share')) for r in rows if 'dev_strict' in r]
print('dev', dev)
it=[r for r in rows if 'mean_reward' in r]
for a in range(0, len(it), 10):
    blk=it[a:a+10]
    f=lambda k: round(sum(r[k] for r in blk)/len(blk),3)
    print(f"iters {blk[0]['step']}-{blk[-1]['step']}: reward {f('mean_reward')} KL {f('kl_to_reference')} len {f('response_length')} max-tok {f('max_tokens_share')} loops {f('loop_share')} secs {f('seconds')} rollout tok/s {f('rollout_tokens_per_second')} train tok/s {f('train_tokens_per_second')}")
print('total seconds', round(sum(r['seconds'] for r in it)), 'iterations', len(it))
print('max ratio_last', max(r['ratio_last'] for r in it), 'max kl_prev', max(r['kl_to_previous_last'] for r in it))
