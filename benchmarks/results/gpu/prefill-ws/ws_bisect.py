"""Issue 14 probe (scratch): which feature of prefill's "ws" launch makes Triton 3.6's warp-specialized loop
wrong on sm_90? The runbook13 probe found the minimal loop (`ws_probe.py tutorial`) right and prefill's "ws"
launch wrong (rel L2 0.52-0.83, NaN at BLOCK_N 64). This kernel starts from the minimal loop and turns on
prefill's features one flag at a time (alone, then cumulatively), each run checked against SDPA in float32,
with the error of each 64-row half of the 128-row tiles (the two consumer warpgroups).
    python ws_bisect.py            (prints one line per variant; about 1-2 s of compile each)
Results: benchmarks/results/h100/prefill-ws/."""

import json
import os
import sys

import torch
import triton
import triton.language as tl

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: TRITON_INTERPRET=1, a check of the script
FLAGS = ("DESC", "GRID_SWAP", "REV", "MASK", "CAUSAL", "SAFE", "EPI", "HI_RT", "MULTOF", "TRANS")


@triton.jit
def _tile(desc, bh, row, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, DESC: tl.constexpr):
    if DESC == 3:
        return desc.load([0, bh, row, 0]).reshape(ROWS, HEAD_DIM)
    elif DESC == 4:
        return desc.load([bh, row, 0]).reshape(ROWS, HEAD_DIM)
    else:
        return desc.load([row, 0])


@triton.jit
def _bisect(
    Q, K, V, Out, scale_log2, N_CTX, num_heads,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DESC: tl.constexpr, GRID_SWAP: tl.constexpr, REV: tl.constexpr, MASK: tl.constexpr,
    CAUSAL: tl.constexpr, SAFE: tl.constexpr, EPI: tl.constexpr, HI_RT: tl.constexpr,
    MULTOF: tl.constexpr, TRANS: tl.constexpr,
):  # fmt: skip
    if GRID_SWAP:
        bh = tl.program_id(0)
        m_block = tl.program_id(1)
        if REV:
            m_block = tl.num_programs(1) - 1 - m_block
    else:
        bh = tl.program_id(1)
        m_block = tl.program_id(0)
        if REV:
            m_block = tl.num_programs(0) - 1 - m_block
    m0 = m_block * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    bh32 = bh.to(tl.int32)
    off = 0
    if DESC == 1:  # per program: its head's base pointer
        base = bh.to(tl.int64) * N_CTX * HEAD_DIM
        dq = tl.make_tensor_descriptor(Q + base, shape=[N_CTX, HEAD_DIM], strides=[HEAD_DIM, 1],
                                       block_shape=[BLOCK_M, HEAD_DIM])  # fmt: skip
        kv_rows = tl.maximum(N_CTX, 1)
        dk = tl.make_tensor_descriptor(K + base, shape=[kv_rows, HEAD_DIM], strides=[HEAD_DIM, 1],
                                       block_shape=[BLOCK_N, HEAD_DIM])  # fmt: skip
        dv = tl.make_tensor_descriptor(V + base, shape=[kv_rows, HEAD_DIM], strides=[HEAD_DIM, 1],
                                       block_shape=[BLOCK_N, HEAD_DIM])  # fmt: skip
    elif DESC >= 3:  # the same in every program: 4-d [1, H, N, D] or 3-d [H, N, D]
        st4 = [num_heads * N_CTX * HEAD_DIM, N_CTX * HEAD_DIM, HEAD_DIM, 1]
        if DESC == 3:
            dq = tl.make_tensor_descriptor(Q, shape=[1, num_heads, N_CTX, HEAD_DIM],
                                           strides=st4,
                                           block_shape=[1, 1, BLOCK_M, HEAD_DIM])  # fmt: skip
            dk = tl.make_tensor_descriptor(K, shape=[1, num_heads, N_CTX, HEAD_DIM],
                                           strides=st4,
                                           block_shape=[1, 1, BLOCK_N, HEAD_DIM])  # fmt: skip
            dv = tl.make_tensor_descriptor(V, shape=[1, num_heads, N_CTX, HEAD_DIM],
                                           strides=st4,
                                           block_shape=[1, 1, BLOCK_N, HEAD_DIM])  # fmt: skip
        else:
            dq = tl.make_tensor_descriptor(Q, shape=[num_heads, N_CTX, HEAD_DIM],
                                           strides=[N_CTX * HEAD_DIM, HEAD_DIM, 1],
                                           block_shape=[1, BLOCK_M, HEAD_DIM])  # fmt: skip
            dk = tl.make_tensor_descriptor(K, shape=[num_heads, N_CTX, HEAD_DIM],
                                           strides=[N_CTX * HEAD_DIM, HEAD_DIM, 1],
                                           block_shape=[1, BLOCK_N, HEAD_DIM])  # fmt: skip
            dv = tl.make_tensor_descriptor(V, shape=[num_heads, N_CTX, HEAD_DIM],
                                           strides=[N_CTX * HEAD_DIM, HEAD_DIM, 1],
                                           block_shape=[1, BLOCK_N, HEAD_DIM])  # fmt: skip
    else:  # flattened rows [H * N, D], offsets in the coordinates; DESC 2: the shape ends at this head
        off = bh * N_CTX
        y_dim = tl.num_programs(1 - GRID_SWAP) * N_CTX
        if DESC == 2:
            y_dim = off + N_CTX
        dq = tl.make_tensor_descriptor(Q, shape=[y_dim, HEAD_DIM], strides=[HEAD_DIM, 1],
                                       block_shape=[BLOCK_M, HEAD_DIM])  # fmt: skip
        dk = tl.make_tensor_descriptor(K, shape=[y_dim, HEAD_DIM], strides=[HEAD_DIM, 1],
                                       block_shape=[BLOCK_N, HEAD_DIM])  # fmt: skip
        dv = tl.make_tensor_descriptor(V, shape=[y_dim, HEAD_DIM], strides=[HEAD_DIM, 1],
                                       block_shape=[BLOCK_N, HEAD_DIM])  # fmt: skip
    end = N_CTX
    last_visible = rows
    if HI_RT:
        hi = tl.where(m0 < N_CTX, end, 0)
        if CAUSAL:
            hi = tl.minimum(end, m0 + BLOCK_M)
    elif CAUSAL:
        hi = m0 + BLOCK_M
    else:
        hi = N_CTX
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    q = _tile(dq, bh32, off + m0, BLOCK_M, HEAD_DIM, DESC)
    offs_n = tl.arange(0, BLOCK_N)
    for n0 in tl.range(0, hi, BLOCK_N, warp_specialize=True):
        if MULTOF:
            n0 = tl.multiple_of(n0, BLOCK_N)
        n = n0 + offs_n
        k = _tile(dk, bh32, off + n0, BLOCK_N, HEAD_DIM, DESC)
        qk = tl.dot(q, tl.trans(k)) if TRANS else tl.dot(q, k.T)
        if MASK:
            if CAUSAL:
                qk = tl.where(n[None, :] <= last_visible[:, None], qk, float("-inf"))
            else:
                qk = tl.where((n < end)[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * scale_log2)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new) if SAFE else m_new
        p = tl.math.exp2(qk * scale_log2 - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(Q.dtype.element_ty), _tile(dv, bh32, off + n0, BLOCK_N, HEAD_DIM, DESC), acc)
        m_i = m_new
    o = Out + (bh * N_CTX + rows).to(tl.int64)[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
    if EPI:
        out = acc * (1.0 / tl.where(l_i == 0.0, 1.0, l_i))[:, None]
        out = tl.where((rows < N_CTX)[:, None], out, 0.0)
        tl.store(o, out.to(Out.dtype.element_ty), mask=(rows < N_CTX)[:, None])
    else:
        tl.store(o, (acc / l_i[:, None]).to(Out.dtype.element_ty))


def run(flags: dict, q, k, v, block_n: int, stages: int) -> dict:
    bh, n_ctx, d = q.shape[0] * q.shape[1], q.shape[2], q.shape[3]
    out = torch.full_like(q, float("nan"))
    nm = triton.cdiv(n_ctx, 128)
    grid = (bh, nm) if flags["GRID_SWAP"] else (nm, bh)
    try:
        kernel = _bisect[grid](
            q, k, v, out, d**-0.5 * 1.4426950408889634, n_ctx, q.shape[1], HEAD_DIM=d,
            BLOCK_M=128, BLOCK_N=block_n, num_warps=4, num_stages=stages, **flags,
        )  # fmt: skip
        if DEV == "cuda":
            torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001 - a probe reports every failure and goes on
        return {"error": f"{type(exc).__name__}: {str(exc)[:160]}"}
    split = "setmaxnreg" in kernel.asm.get("ptx", "") if DEV == "cuda" else None  # partitioned at all?
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), is_causal=bool(flags["CAUSAL"])
    )
    diff = (out.float() - ref).view(bh, nm, 2, 64, d)
    refv = ref.view(bh, nm, 2, 64, d)
    halves = [(diff[:, :, i].norm() / refv[:, :, i].norm()).item() for i in range(2)]
    err = ((out.float() - ref).norm() / ref.norm()).item()
    return {"rel_l2": err, "half0": halves[0], "half1": halves[1], "split": split}


def variants():
    """(name, flags, BLOCK_N, stages): each feature alone on the minimal loop, each descriptor form, then
    prefill's features together with the descriptor forms the same in every program."""
    base = dict.fromkeys(FLAGS, 0)
    rows = [("minimal", dict(base), 128, 2)]
    for f in FLAGS:
        if f == "CAUSAL":
            rows.append(("+CAUSAL(mask)", {**base, "CAUSAL": 1, "MASK": 1}, 128, 2))
        else:
            rows.append((f"+{f}", {**base, f: 1}, 128, 2))
    for desc in (2, 3, 4):
        rows.append((f"DESC={desc}", {**base, "DESC": desc}, 128, 2))
    ours = {
        **base,
        "GRID_SWAP": 1,
        "REV": 1,
        "MASK": 1,
        "CAUSAL": 1,
        "SAFE": 1,
        "EPI": 1,
        "HI_RT": 1,
        "MULTOF": 1,
    }
    for desc in (0, 3, 4):
        rows.append((f"ours DESC={desc}", {**ours, "DESC": desc}, 128, 2))
        rows.append((f"ours DESC={desc} n64", {**ours, "DESC": desc}, 64, 3))
        rows.append((f"ours nc DESC={desc}", {**ours, "CAUSAL": 0, "DESC": desc}, 128, 2))
    return rows


def main():
    torch.manual_seed(0)
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    heads, n_ctx = (8, 1024) if DEV == "cuda" else (1, 256)
    dtype = torch.bfloat16 if DEV == "cuda" else torch.float16  # the interpreter computes no bf16 dot
    q, k, v = (torch.randn(1, heads, n_ctx, 128, device=DEV, dtype=dtype) for _ in range(3))
    out_path = sys.argv[1] if len(sys.argv) > 1 else os.devnull
    results = []
    for name, flags, block_n, stages in variants():
        r = {
            "name": name,
            "flags": flags,
            "BLOCK_N": block_n,
            "stages": stages,
            **run(flags, q, k, v, block_n, stages),
        }
        results.append(r)
        shown = (
            r.get("error")
            or f"rel L2 {r['rel_l2']:.2e}  halves {r['half0']:.2e} {r['half1']:.2e}  split {r['split']}"
        )
        print(f"{name:16s} {shown}", flush=True)
        with open(out_path, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
