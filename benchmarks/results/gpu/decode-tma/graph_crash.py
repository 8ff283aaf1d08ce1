"""Issue 10 (scratch): which decode launch of the static-cache target (B1 32:8, 4096 valid keys of a 32k
cache) fails inside a CUDA graph (runbook22: `tune` ended with an illegal memory access while timing that
target's graphs). Each candidate of `attnforge tune --full` runs in a process of its own (a device fault
poisons the context): eager once against the oracle, then a graph of 28 calls on distinct buffers
replayed 5 times.

    python3 graph_crash.py OUT.json [WORKERS]
"""

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

CHILD = r"""
import json, sys, torch
from attnforge.bench import targets, tune
from attnforge.kernels import decode
from attnforge import verify
target = targets.Target("decode", 1, 32, 8, 1, 32768, 128, valid=(4096,))
params = json.loads(sys.argv[1])
case = tune.make_case(target, torch.device("cuda"), 0)
out = torch.full_like(case.q, float("nan"))
decode.launch_decode(case.q, case.k, case.v, out, scale=case.q.shape[-1] ** -0.5, kv_lens=case.kv_lens,
                     params=params)
torch.cuda.synchronize()
err = verify.relative_l2_per_slice(out.float(), case.reference().float()).max().item()
layers = [(torch.randn_like(case.q), torch.randn_like(case.k), torch.randn_like(case.v)) for _ in range(28)]
outs = [torch.empty_like(case.q) for _ in range(28)]
def run():
    for (q, k, v), o in zip(layers, outs):
        decode.launch_decode(q, k, v, o, scale=0.088, kv_lens=case.kv_lens, params=params)
s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(s):
    run()
torch.cuda.current_stream().wait_stream(s); torch.cuda.synchronize()
g = torch.cuda.CUDAGraph()
with torch.cuda.graph(g):
    run()
for _ in range(5):
    g.replay()
torch.cuda.synchronize()
print(json.dumps({"eager_rel_l2": err, "graph": "ok", "finite": bool(torch.isfinite(outs[0]).all())}))
"""


def run_one(params: dict) -> dict:
    name = tune_name(params)
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(params)], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    last = (proc.stdout.strip().splitlines() or [""])[-1]
    try:
        result = json.loads(last)
    except json.JSONDecodeError:
        result = {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:300]}
    print(name, result, flush=True)
    return {"name": name, "params": params, **result}


def tune_name(params):
    from attnforge.bench.tune import params_name

    return params_name(params)


def main():
    import torch

    from attnforge.bench import targets, tune

    target = targets.Target("decode", 1, 32, 8, 1, 32768, 128, valid=(4096,))
    candidates = tune.candidates_for(target, torch.device("cuda"), quick=False)
    workers = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(run_one, candidates))
    with open(sys.argv[1], "w") as fh:
        json.dump(results, fh, indent=1)
    bad = [r["name"] for r in results if "error" in r]
    print(f"{len(results)} launches, {len(bad)} failed: {bad}")


if __name__ == "__main__":
    main()
