"""Issue 14 probe (scratch): where the Gluon prefill launch loses at 2k tokens. Causal 32:8 d128 reaches
632 TFLOP/s at 16k but 465 at B8 2k (cuDNN: 623 and 554; h100/prefill-gluon/runbook27-20261208-e2f60cd/):
with 8.5 key blocks a tile on average at 2k against 64.5 at 16k, that is about 3.7 blocks' time of fixed
cost a tile, against about 1.3 for cuDNN. Timed here, interleaved (CUDA events, L2 flushed), for the same
shapes causal and not: if the non-causal 2k row runs near the 16k rate, the tile's own cost (Q load, the
first block alone, the last PV and the store) is small and the causal blocks (the diagonal, masked, and the
first block, masked too) are what lose; if not, the tile's cost is.

    PYTHONPATH=src python3 ablate.py OUT.json    (GPU; about 1 minute)
"""

import json
import sys

import torch
import triton

from attnforge.bench.timing import summarize, time_interleaved
from attnforge.environment import environment_report
from attnforge.kernels import prefill

ST3_PP = dict(BLOCK_M=128, BLOCK_N=128, num_warps=4, num_stages=3, gluon=True, pingpong=True)
ROWS = ((8, 2048), (4, 4096), (2, 8192), (32, 512), (16, 1024))


def _calls(q, k, v, out, causal: bool) -> dict:
    sdpa = torch.nn.functional.scaled_dot_product_attention
    scale = q.shape[3] ** -0.5

    def gluon(persistent: bool):
        params = dict(ST3_PP, persistent=persistent)

        def call():
            prefill._prefill_into(q, k, v, out, scale, causal, None, None, None, params)
            return out

        return call

    return {"sdpa": lambda: sdpa(q, k, v, is_causal=causal, enable_gqa=True),
            "gluon-pp-ps": gluon(True), "gluon-pp": gluon(False),
            "stored": lambda: prefill.prefill_attention(q, k, v, causal=causal, out=out)}  # fmt: skip


def _check(q, k, v, causal: bool) -> dict:
    """Each launch against SDPA in float32: relative L2 error."""
    kf, vf = (t.float().repeat_interleave(q.shape[1] // k.shape[1], 1) for t in (k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), kf, vf, is_causal=causal)
    errors = {}
    for name, call in _calls(q, k, v, torch.full_like(q, float("nan")), causal).items():
        errors[name] = ((call().float() - ref).norm() / ref.norm()).item()
    return errors


def main() -> None:
    doc = {"environment": environment_report(), "rows": []}
    for batch, length in ROWS:
        q = torch.randn(batch, 32, length, 128, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(batch, 8, length, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        out = torch.empty_like(q)
        for causal in (True, False):
            flops = 4 * batch * 32 * length * length * 128 / (2 if causal else 1)
            errors = _check(q, k, v, causal)
            samples = time_interleaved(_calls(q, k, v, out, causal), reps=20)
            for name, s in samples.items():
                us = summarize(s)["median_us"]
                doc["rows"].append(dict(batch=batch, length=length, causal=causal, call=name, us=us,
                                        tflops=flops / us / 1e6, rel_l2=errors.get(name)))  # fmt: skip
                print(f"B={batch} L={length} {'causal' if causal else 'full  '} {name:12s} {us:8.1f} us "
                      f"{flops / us / 1e6:5.0f} TFLOP/s  err {errors.get(name)}", flush=True)  # fmt: skip
            with open(sys.argv[1], "w") as fh:
                json.dump(doc, fh, indent=1)
    print(triton.__version__)


if __name__ == "__main__":
    main()
