"""The torch fallback's causal chunk against a cache (`kernels.reference.sdpa`: torch's causal_lower_right
since 2026-12-06) on a GPU: correct against float64, equal when replayed from a CUDA graph, and timed against
the bool-mask path it replaced (the same call given full kv_lens builds that mask). Quick check: CUDA events,
median of 30 calls, warm L2. Usage: python lower_right_check.py OUT.json"""

import json
import sys

import torch

from attnforge import verify
from attnforge.environment import environment_report
from attnforge.kernels import reference


def _median_us(fn, reps=30):
    for _ in range(5):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return sorted(times)[len(times) // 2]


def row(q_len, kv_len, hq=32, hkv=8, d=128):
    q = torch.randn(1, hq, q_len, d, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, hkv, kv_len, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    full = torch.full((1,), kv_len, device="cuda", dtype=torch.int32)
    new = lambda: reference.sdpa(q, k, v, causal=True)  # noqa: E731
    old = lambda: reference.sdpa(q, k, v, causal=True, kv_lens=full)  # noqa: E731
    expected = verify.reference_attention(q.double(), k.double(), v.double(), causal=True)
    eager = new()
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        new()
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        captured = new()
    graph.replay()
    torch.cuda.synchronize()
    return {
        "q_len": q_len, "kv_len": kv_len, "heads": f"{hq}:{hkv}", "head_dim": d,
        "rel_l2_new": verify.relative_l2_per_slice(eager.double(), expected).max().item(),
        "rel_l2_old": verify.relative_l2_per_slice(old().double(), expected).max().item(),
        "graph_equals_eager": torch.equal(captured, eager),
        "new_us": _median_us(new), "old_us": _median_us(old),
    }  # fmt: skip


def main(path):
    doc = {"environment": environment_report(), "rows": []}
    for q_len, kv_len in [(2, 4096), (4, 4096), (16, 4096), (512, 4608), (2048, 6144)]:
        doc["rows"].append(row(q_len, kv_len))
        with open(path, "w") as f:
            json.dump(doc, f, indent=1)
        r = doc["rows"][-1]
        times = f"lower-right {r['new_us']:8.1f} us, bool mask {r['old_us']:8.1f} us"
        errors = f"rel L2 {r['rel_l2_new']:.2e} / {r['rel_l2_old']:.2e}"
        print(f"Lq {q_len:5d} Lkv {kv_len:5d}: {times}, {errors}, graph = eager {r['graph_equals_eager']}")


if __name__ == "__main__":
    main(sys.argv[1])
