"""recovery-both-1's rule (benchmarks/results/recovery-both-1/README.md): rules 2 and 3 against recovery-mix-1."""
import json, sys
last = lambda f: json.loads(open(f).read().strip().splitlines()[-1])
sh, hh = last("ppl_shakespeare.log"), last("ppl_harmless.log")
dev = json.load(open("dev64/results.json"))
at_limit = sum(json.loads(l)["finish_reason"] == "length" for l in open("dev64/responses.jsonl"))
checks = {
    "dev64 strict average > 25.53": (dev["strict_average"], dev["strict_average"] > 25.53),
    "shakespeare 20k ppl <= 36.4902": (sh["perplexity"], sh["perplexity"] <= 36.4901699466001),
    "harmless 20k ppl <= 11.6838": (hh["perplexity"], hh["perplexity"] <= 11.683766585468144),
}
out = {"checks": {k: {"value": v, "holds": ok} for k, (v, ok) in checks.items()}, "dev64": dev, "dev64_at_limit": at_limit,
       "ships": all(ok for _, ok in checks.values())}
json.dump(out, open("decision.json", "w"), indent=1)
print(json.dumps(out["checks"]), "dev64 at limit", at_limit, "SHIPS" if out["ships"] else "DOES NOT SHIP")
sys.exit(0 if out["ships"] else 1)
