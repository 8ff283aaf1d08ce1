"""Issue 10 (scratch, kept with its results): one decode call per shape inside a profiler range, for Nsight
Compute to read the kernel's own duration, DRAM throughput, occupancy and warp stalls (the ~8 us a 4k call
spends over the time its bytes need: inside the kernel, or around it?).

    ncu --clock-control none --cache-control all --profile-from-start off --section SpeedOfLight \
        --section Occupancy --section WarpStateStats --section MemoryWorkloadAnalysis \
        python3 benchmarks/results/gpu/decode-profile/ncu_decode.py

Shapes: B1 d128 bf16, 16:8 at 4k / 16k / 64k keys, 32:8 at 4k, 4k valid keys in a 4352-key static cache (the
accelerator's Qwen3-0.6B call at prompt 4096), each with its tuned/heuristic launch and with 4 and 8 splits;
torch SDPA (enable_gqa) at 16:8 4k and 16k for comparison.
"""

import torch
import torch.nn.functional as F

from attnforge.kernels import decode, decode_params

SHAPES = [
    (16, 8, 4096, None),
    (16, 8, 16384, None),
    (16, 8, 65536, None),
    (32, 8, 4096, None),
    (16, 8, 4352, 4096),
]


def _inputs(hq, hkv, lkv, valid):
    q = torch.randn(1, hq, 1, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, hkv, lkv, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    lens = None if valid is None else torch.tensor([valid], device="cuda", dtype=torch.int32)
    return q, k, v, lens


def _calls():
    calls = []
    for hq, hkv, lkv, valid in SHAPES:
        q, k, v, lens = _inputs(hq, hkv, lkv, valid)
        bound = decode_params.kv_bound(lkv)
        base = decode_params.bucket_params(
            (1, hq, 1, 128), hkv, bound, lens is not None, torch.bfloat16, torch.device("cuda")
        )
        tunable = {key: base[key] for key in ("BLOCK_M", "BLOCK_N", "num_splits", "num_warps", "num_stages")}
        for splits in (tunable["num_splits"], 4, 8):
            params = dict(tunable, num_splits=splits, combine="last")
            out = torch.empty_like(q)
            print(f"{hq}:{hkv} Lkv {lkv} valid {valid} splits {splits}: {params}", flush=True)
            calls.append(
                lambda q=q, k=k, v=v, out=out, lens=lens, params=params: decode.launch_decode(
                    q, k, v, out, scale=128**-0.5, kv_lens=lens, params=params
                )
            )
        if valid is None and hq == 16 and lkv <= 16384:
            calls.append(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
    return calls


def main():
    calls = _calls()
    for call in calls:  # compile and warm every launch before the profiled range
        call()
        call()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for call in calls:
        call()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


if __name__ == "__main__":
    main()
