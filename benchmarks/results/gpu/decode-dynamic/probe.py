"""Issue 10 (scratch): does balancing the keys between the SMs at run time close the gap to the read floor at
16k-64k keys? (docs/notes/decode.md, "What is left for 1.2x at 16k": programs of equal work end up to 4.6 us
apart at 16k because DRAM does not serve the SMs evenly.)

One program an SM claims work items from a counter: item = (chunk, slot), a chunk being what the library's
split of the same index reads (`split_kv.split_range` with C splits), so each chunk's partial is the same
whoever computes it and the merge (by the program that finishes a slot's last chunk, in chunk order) is the
library's: the output must equal, bit for bit, `launch_decode` with num_splits=C. The counter is reset by the
last program to run out of work (graph replays start from zero). `first-cC` (eighteenth session): program p
takes item p without a claim, then claims from the counter (past the first SM-count items): at C = 16 the
first run's `claimed` programs each took at most one item, the library grid's distribution, and still ran
3.5 us slower, so a claim before the first load costs that much. Each chunk restarts the pipeline of its key
loop (`split_kv.attend`): that is what this probe weighs against the balance.

    python3 probe.py check            # bit-for-bit against the library at C chunks, every shape below
    python3 probe.py time OUT.json    # plain launches after an L2 flush, interleaved; then 28-call graphs
"""

import json
import sys

import torch
import triton
import triton.language as tl

from attnforge.bench import timing
from attnforge.environment import fp32_dot
from attnforge.kernels import decode, tuning
from attnforge.kernels.decode import LOG2E
from attnforge.kernels.split_kv import attend, finish_split, split_range


@triton.jit
def _claimed_kernel(
    Q, K, V, Out, PartO, Counters, Claims,
    stride_qb, stride_qh, stride_qd, stride_kb, stride_kh, stride_kn, stride_ob, stride_oh, stride_od,
    scale_log2, kv_len, num_kv_heads, num_chunks, ml_offset, n_slots, n_programs,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLITS_P2: tl.constexpr, PART_ROWS: tl.constexpr, S_CHUNK: tl.constexpr, STATIC_FIRST: tl.constexpr,
    FP32_DOT: tl.constexpr,
):  # fmt: skip
    # One new token (Q_LEN 1), contiguous K/V of one shape (V strides = K strides), no lengths.
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < GROUP
    d = tl.arange(0, HEAD_DIM)
    d_ok = d < HEAD_DIM
    n_items = n_slots * num_chunks
    # STATIC_FIRST: program p's first item is p (no atomic round trip before its first load); then claims
    item = tl.program_id(0) if STATIC_FIRST else tl.atomic_add(Claims, 1)
    while item < n_items:
        chunk, slot = item // n_slots, item % n_slots  # chunk-major: the first claims cover every slot
        b, h = (slot // num_kv_heads).to(tl.int64), (slot % num_kv_heads).to(tl.int64)
        head = h * GROUP + rows
        q = tl.load(Q + b * stride_qb + head[:, None] * stride_qh + d[None, :] * stride_qd,
                    mask=row_ok[:, None], other=0.0)  # fmt: skip
        alone, start, stop = split_range(0, kv_len, chunk, num_chunks, BLOCK_N, -1)
        last_visible = tl.zeros([BLOCK_M], tl.int32) + kv_len - 1
        k_head, v_head = K + b * stride_kb + h * stride_kh, V + b * stride_kb + h * stride_kh
        m_i, l_i, acc = attend(q, k_head, v_head, start, stop, kv_len, last_visible, scale_log2, d, d_ok,
                               stride_kn, 1, stride_kn, 1, BLOCK_M, HEAD_DIM, BLOCK_N, FP32_DOT, 0, 0,
                               False)  # fmt: skip
        o_ptrs = Out + b * stride_ob + head * stride_oh
        finish_split(o_ptrs, acc, l_i, m_i, Out, PartO, Counters, chunk, alone, slot, b, h, 0, d, d_ok,
                     row_ok, stride_ob, stride_oh, 0, stride_od, num_chunks, ml_offset, GROUP, 1, HEAD_DIM,
                     BLOCK_M, True, SPLITS_P2, PART_ROWS, S_CHUNK, True)  # fmt: skip
        item = tl.atomic_add(Claims, 1) + (n_programs if STATIC_FIRST else 0)
    done = tl.atomic_add(Claims + 1, 1)
    if done == n_programs - 1:  # every program has run out of work: the next launch starts from zero
        tl.store(Claims, 0)
        tl.store(Claims + 1, 0)


class Claimed:
    """The probe's launch for q [B, Hq, 1, D] against contiguous k/v [B, Hkv, L, D]: C chunks a KV head."""

    def __init__(self, q, k, chunks: int, block_n: int = 64, stages: int = 4, programs: int | None = None,
                 static_first: bool = False):  # fmt: skip
        batch, num_heads, _, head_dim = q.shape
        self.num_kv_heads, self.group = k.shape[1], num_heads // k.shape[1]
        chunks = min(chunks, triton.cdiv(k.shape[2], block_n))  # as the library caps its splits
        self.chunks, self.block_n, self.stages = chunks, block_n, stages
        self.slots = batch * self.num_kv_heads
        self.part_rows = triton.next_power_of_2(self.group)
        self.ml_offset = self.slots * chunks * self.part_rows * head_dim
        self.partials = torch.empty(self.ml_offset + self.slots * chunks * self.part_rows * 2,
                                    dtype=torch.float32, device=q.device)  # fmt: skip
        self.counters = torch.zeros(self.slots, dtype=torch.int32, device=q.device)
        self.claims = torch.zeros(2, dtype=torch.int32, device=q.device)
        self.programs = min(programs or tuning.sm_count(q.device), self.slots * chunks)
        self.static_first = static_first

    def __call__(self, q, k, v, out, scale):
        splits_p2 = triton.next_power_of_2(self.chunks)
        s_chunk = max(1, min(splits_p2, 16, 16384 // (self.part_rows * q.shape[3])))
        _claimed_kernel[(self.programs,)](
            q, k, v, out, self.partials, self.counters, self.claims,
            q.stride(0), q.stride(1), q.stride(3), k.stride(0), k.stride(1), k.stride(2), out.stride(0),
            out.stride(1), out.stride(3), scale * LOG2E, k.shape[2], self.num_kv_heads, self.chunks,
            self.ml_offset, self.slots, self.programs,
            GROUP=self.group, HEAD_DIM=q.shape[3], BLOCK_M=16, BLOCK_N=self.block_n, SPLITS_P2=splits_p2,
            PART_ROWS=self.part_rows, S_CHUNK=s_chunk, STATIC_FIRST=self.static_first,
            FP32_DOT=fp32_dot(q.dtype), num_warps=4, num_stages=self.stages,
        )  # fmt: skip


SHAPES = [(32, 8, 4096), (32, 8, 16384), (16, 8, 16384), (40, 8, 16384), (32, 8, 65536)]
CHUNKS = (16, 32, 64)


def make(heads, kv_heads, kv_len, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, heads, 1, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, kv_heads, kv_len, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, kv_heads, kv_len, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    return q, k, v


def library_params(chunks):
    """The library's launch at C splits with the probe's tiles (64 keys, 4 stages: a stored 16:8 launch; with
    128-key tiles the probe's loop inside its claim loop spills, offline sm_90)."""
    return {"BLOCK_M": 16, "BLOCK_N": 64, "num_splits": chunks, "num_warps": 4, "num_stages": 4}


def check():
    ok = True
    for heads, kv_heads, kv_len in SHAPES:
        q, k, v = make(heads, kv_heads, kv_len)
        for chunks in CHUNKS:
            want = torch.empty_like(q)
            decode.launch_decode(q, k, v, want, scale=0.088, params=library_params(chunks))
            for static_first in (False, True):
                launch = Claimed(q, k, chunks, static_first=static_first)
                for _ in range(3):  # the counters must come back to zero between launches
                    out = torch.full_like(q, float("nan"))
                    launch(q, k, v, out, 0.088)
                    torch.cuda.synchronize()
                    same = torch.equal(out, want)
                    ok &= same
                print(f"{heads}:{kv_heads} L={kv_len} C={chunks} static first {static_first}: same bits as "
                      f"the library {same}, claims left {launch.claims.tolist()}", flush=True)  # fmt: skip
                ok &= launch.claims.tolist() == [0, 0]
    print("check", "ok" if ok else "FAILED")
    return ok


def calls_for(q, k, v, out) -> dict:
    """torch's SDPA, the stored launch, the library at C splits and the probe at C chunks, for one shape."""
    calls = {"sdpa-gqa": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True),
             "stored": lambda: decode.decode_attention(q, k, v, out=out)}  # fmt: skip
    for chunks in CHUNKS:
        params, launch = library_params(chunks), Claimed(q, k, chunks)
        first = Claimed(q, k, chunks, static_first=True)
        calls[f"library-s{chunks}"] = lambda p=params: decode.launch_decode(q, k, v, out, scale=0.088,
                                                                            params=p)  # fmt: skip
        calls[f"claimed-c{chunks}"] = lambda f=launch: f(q, k, v, out, 0.088)
        calls[f"first-c{chunks}"] = lambda f=first: f(q, k, v, out, 0.088)
    return calls


def time(path):
    results = []
    for heads, kv_heads, kv_len in SHAPES:
        q, k, v = make(heads, kv_heads, kv_len)
        samples = timing.time_interleaved(calls_for(q, k, v, torch.empty_like(q)), reps=30, warmup=3)
        plain = {name: timing.summarize(values)["median_us"] for name, values in samples.items()}
        results.append({"shape": [heads, kv_heads, kv_len], "plain_us": plain})
        with open(path, "w") as fh:
            json.dump({"device": torch.cuda.get_device_name(), "rows": results}, fh, indent=1)
        line = ", ".join(f"{name} {us:.1f}" for name, us in plain.items())
        print(f"{heads}:{kv_heads} L={kv_len}: {line}", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "check":
        sys.exit(0 if check() else 1)
    time(sys.argv[2])
