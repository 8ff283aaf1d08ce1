# ruff: noqa: E501  (scratch kernels as they ran on the device, 2026-12-07)
import triton
import triton.language as tl


@triton.jit
def _ws_inner(
    acc,
    l_i,
    m_i,
    q,
    desc_k,
    desc_v,
    lo,
    hi,
    full_hi,
    last_visible,
    scale_log2,
    BLOCK_N: tl.constexpr,
    DIAG: tl.constexpr,
    WS: tl.constexpr,
):
    for n0 in tl.range(lo, hi, BLOCK_N, warp_specialize=WS):
        k = desc_k.load([n0, 0])
        qk = tl.dot(q, tl.trans(k))
        n = n0 + tl.arange(0, BLOCK_N)
        qk = tl.where(n[None, :] <= last_visible[:, None], qk, -1.0e30)
        m_new = tl.maximum(m_i, tl.max(qk, 1) * scale_log2)
        p = tl.math.exp2(qk * scale_log2 - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = desc_v.load([n0, 0])
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _ws_kernel(
    Q,
    K,
    V,
    Out,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_ob,
    stride_oh,
    stride_om,
    scale_log2,
    q_len,
    kv_len,
    num_heads,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    WS: tl.constexpr,
):
    bh = tl.program_id(0)
    m_block = tl.num_programs(1) - 1 - tl.program_id(1)
    b = (bh // num_heads).to(tl.int64)
    head = (bh % num_heads).to(tl.int64)
    kv_head = head // GROUP
    m0 = m_block * BLOCK_M
    dq = tl.make_tensor_descriptor(
        Q + b * stride_qb + head * stride_qh,
        shape=[q_len, HEAD_DIM],
        strides=[stride_qm, 1],
        block_shape=[BLOCK_M, HEAD_DIM],
    )
    dk = tl.make_tensor_descriptor(
        K + b * stride_kb + kv_head * stride_kh,
        shape=[kv_len, HEAD_DIM],
        strides=[stride_kn, 1],
        block_shape=[BLOCK_N, HEAD_DIM],
    )
    dv = tl.make_tensor_descriptor(
        V + b * stride_vb + kv_head * stride_vh,
        shape=[kv_len, HEAD_DIM],
        strides=[stride_vn, 1],
        block_shape=[BLOCK_N, HEAD_DIM],
    )
    do = tl.make_tensor_descriptor(
        Out + b * stride_ob + head * stride_oh,
        shape=[q_len, HEAD_DIM],
        strides=[stride_om, 1],
        block_shape=[BLOCK_M, HEAD_DIM],
    )
    q = dq.load([m0, 0])
    rows = m0 + tl.arange(0, BLOCK_M)
    shift = kv_len - q_len
    last_visible = shift + rows
    if CAUSAL:
        full_hi = tl.minimum(tl.maximum(shift + m0 + 1, 0) // BLOCK_N * BLOCK_N, kv_len // BLOCK_N * BLOCK_N)
        diag_hi = tl.minimum(kv_len, tl.maximum(shift + tl.minimum(m0 + BLOCK_M, q_len), 0))
    else:
        full_hi = kv_len // BLOCK_N * BLOCK_N
        diag_hi = kv_len
    diag_hi = tl.maximum(diag_hi, full_hi)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    acc, l_i, m_i = _ws_inner(
        acc, l_i, m_i, q, dk, dv, 0, diag_hi, full_hi, last_visible, scale_log2, BLOCK_N, False, WS
    )
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    do.store([m0, 0], out.to(Out.dtype.element_ty))
