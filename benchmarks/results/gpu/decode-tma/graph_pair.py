"""Issue 10 (scratch): narrow the fault of `attnforge tune`'s graph timing on the static-cache target (B1
32:8, 4096 valid keys of a 32k cache; `h100/decode-tma/graph-crash-20261207-323c2ea/`): each set of graphs
below is captured and replayed in turn as `timing.time_graphs_per_call` does (tune's makers: `kernel_call` and
`torch_calls` over 28 layers of distinct buffers), in a process of its own.

    python3 graph_pair.py OUT.json
"""

import json
import subprocess
import sys

# Sets of graphs: torch's paths (by name) and launches of ours (params).
BEST = {"BLOCK_M": 16, "BLOCK_N": 64, "num_splits": 16, "num_warps": 4, "num_stages": 4}
MERGES = [BEST, {**BEST, "combine": "kernel"}, {**BEST, "combine": "kernel-pdl"}]
SETS = {
    "torch sdpa-gqa alone": {"torch": ["sdpa-gqa"]},
    "torch hf-repeat_kv alone": {"torch": ["hf-repeat_kv"]},
    "torch sdpa-gqa twice": {"torch": ["sdpa-gqa", "sdpa-gqa"]},
    "ours alone": {"ours": [BEST]},
    "ours merged three ways": {"ours": MERGES},
    "ours + torch sdpa-gqa": {"ours": [BEST], "torch": ["sdpa-gqa"]},
    "ours merged three ways + torch sdpa-gqa": {"ours": MERGES, "torch": ["sdpa-gqa"]},
}

CHILD = r"""
import json, sys, torch
from attnforge.bench import targets, timing, tune
spec = json.loads(sys.argv[1])
target = targets.Target("decode", 1, 32, 8, 1, 32768, 128, valid=(4096,))
case = tune.make_case(target, torch.device("cuda"), 0)
buffers = [(torch.randn_like(case.q), torch.randn_like(case.k), torch.randn_like(case.v)) for _ in range(28)]
makers = {}
for i, params in enumerate(spec.get("ours", [])):
    makers[f"ours {i}"] = (lambda p: lambda j: targets.kernel_call(
        target, tune._layer_case(case, buffers[j]), p, torch.empty_like(case.q)))(params)
for i, name in enumerate(spec.get("torch", [])):
    makers[f"torch {i}"] = (lambda n: lambda j: targets.torch_calls(
        tune._layer_case(case, buffers[j]))[n])(name)
timed = timing.time_graphs_per_call(makers, layers=28, reps=5)
torch.cuda.synchronize()
print(json.dumps({k: v if isinstance(v, str) else min(v) for k, v in timed.items()}))
"""


def main():
    results = {}
    for name, spec in SETS.items():
        proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True,
                              timeout=180)  # fmt: skip
        last = (proc.stdout.strip().splitlines() or [""])[-1]
        try:
            results[name] = json.loads(last)
        except json.JSONDecodeError:
            results[name] = {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:300]}
        print(name, results[name], flush=True)
        with open(sys.argv[1], "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
