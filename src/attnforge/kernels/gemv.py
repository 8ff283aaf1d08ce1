"""Skinny linear layers for decode steps: `y = x @ W.T` for a few rows of x, with the neighbours fused in.

A decode step multiplies one token's hidden state (a few rows at batch > 1) by every weight matrix of the
model: each product reads a few MB of weights and does almost no arithmetic, so its time is the weight read
plus the launch. cuBLAS's kernels for one row reach about half the read bandwidth on 4-12 MB matrices (a
profile of the accelerator's step on an H100, docs/accel.md), and each neighbour (RMSNorm before the q/k/v
and gate/up products, SiLU(gate) * up before down, the residual add after o and down) is one more launch.

Here one program owns BLOCK_N output columns and reads their weight rows whole, in BLOCK_K slices, so every
weight byte is read once, contiguously, and the programs need no reduction across them. The neighbours:
  - `norm=(gain, eps)`: x is first replaced by RMSNorm(x) (`gain * (x * rsqrt(mean(x^2) + eps))`, rounded to
    the working dtype where transformers' Llama/Qwen norms round). The mean needs all of x's row: each program
    reads it (a few KB, from L2) before its slice of W;
  - `glu=True`: the weight is `[gate; up]` (the model's fused gate/up); a program reads gate rows j and up
    rows N/2 + j together and writes `silu(gate) * up` (rounded as torch's ops round), N/2 outputs: down's
    input (faster than recomputing it inside down's read of `[gate | up]`, which every down program did:
    Qwen3-0.6B's MLP 10.97 -> 10.60 us, Llama-3-8B's 123.9 -> 120.5, `gemv/glu-ab-20261206-dc4d36c.json`);
  - `bias`, and `residual` (`y = residual + (x @ W.T + bias)`, rounded after the product as an add would).
Rows are padded to a power of two (at most MAX_ROWS; to 16 with `GemvParams.dot`, the tensor-core product for
several rows); masked loads never read outside any buffer.

Several rows of 16-bit weights on a GPU with TMA (Hopper) take the swapped product (`GemvParams.swap`,
`_swap_kernel`): `y^T = W x^T`, a tile of 64 or 128 weight rows copied by TMA into shared memory as wgmma's
big operand, the rows (padded to 16) its small one (a tile of 16 or 32 rows runs on mma.sync: more programs
for few outputs). `dot`'s tiles have the rows as M = 16, below wgmma's 64, so they run on mma.sync. Few
outputs would leave SMs idle: K is then split over `split_k` programs a tile, whose float32 partials the last
of them to finish sums in split order (same bits every run).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from attnforge.environment import fp32_dot, triton_interpret
from attnforge.kernels.pdl import gdc_launch_dependents, gdc_wait, pdl_options, pdl_supported, warm_l2
from attnforge.kernels.tma import descriptor, tma_aligned, tma_capable
from attnforge.kernels.tuning import sm_count

MAX_ROWS = 16
# Where the kernel beats cuBLAS (H100, benchmarks/results/h100/gemv/): one row 1.07-1.34x on the plain product
# (1.1-3.1x with its neighbours fused). Callers choosing a path use it up to `fast_rows(device, dtype)`
# rows: FAST_ROWS anywhere, SWAP_FAST_ROWS where the swapped product runs. At 8 rows the tensor-core product
# (`dot`) beats torch's eager ops on most products, but a batch-8 decode step that fused its neighbours
# through it ran 0.94x the one with cuBLAS and inductor's fusions (Qwen3-0.6B, 672 against 719 tok/s a
# sequence, h100/accel-b8-dot-20261207-4f98fd8/); through the swapped product 1.22x (843.5 against 691.6,
# h100/gemv-swap/, with each product's fastest set).
FAST_ROWS = 1
SWAP_FAST_ROWS = 8
DOT_ROWS = 8  # 2 to DOT_ROWS rows of 16-bit weights and activations: the tensor-core product by default
# weight rows the swapped product takes by default: measured up to Llama-3-8B's gate/up; LM heads keep the dot
# set (8 rows on an H100: Qwen3-0.6B's 114.7 us swapped, 115.6 dot; Llama-3-8B's 420.8 and 385.6:
# h100/swap-ab-20261207/swap-ab-heads-1c41938.json)
SWAP_MAX_N = 32768
# 16-bit weights up to this size (Qwen3-0.6B's o and down) are asked of the L2 before the swapped product's
# PDL wait; larger ones (Llama-3-8B's) ran slower with it: the prefetch competes with the kernel before
PREFETCH_MAX_BYTES = 8 << 20
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HALF_DTYPES = (torch.float16, torch.bfloat16)
PACKED_BITS = (4, 5, 8)  # weight-only quantized codes the kernel reads (16: the weight as stored)
# Packed rows are read as 32-bit words: in_features a multiple of this (a 5-bit row is 5K/8 bytes)
WORD_FEATURES = {4: 8, 5: 32, 8: 4}


@dataclass(frozen=True)
class GemvParams:
    """Launch parameters: output columns per program, weight columns per loop step, warps, and programmatic
    dependent launch (where the GPU and Triton have it: the first weight slice is read under the previous
    kernel's tail)."""

    block_n: int
    block_k: int
    num_warps: int
    pdl: bool = True
    dot: bool = False  # the rows (padded to 16) times the slice on the tensor cores; unpacked weights only
    ahead: bool = False  # each slice's read asked for one loop step before its product (two slices in flight)
    # The swapped product (16-bit unpacked weights): block_n weight rows a tile (64 or 128: wgmma's M on
    # Hopper; 16 or 32: mma.sync, twice to four times the programs), block_k features a slice, num_stages
    # slices in flight, K split over split_k programs a tile
    swap: bool = False
    split_k: int = 1
    num_stages: int = 3
    early: bool = False  # swap: each split's first slice read before the PDL wait
    # swap through TMA with PDL: each program's weight share asked of the L2 before the wait (`warm_l2`)
    prefetch: bool = False
    # swap with K split, at most 8 rows: the partials, the residual and the last program's sum hold the 8 real
    # rows only, summed as a tree (the sum's loads in 1-2 round trips to L2 where 16 rows took up to 8:
    # `benchmarks/results/cpu/gemv-swap/merge-tail-20261208.txt`); opt-in until measured on a GPU
    narrow_merge: bool = False
    # swap with a fused norm: features a step of the norm's pass over the rows before the first product (0:
    # block_k); each step waits on the L2 (Qwen3-0.6B's gate/up took 4, Llama-3-8B's q/k/v 8:
    # `benchmarks/results/cpu/gemv-swap/rms-prologue-20261208.txt`); opt-in until measured on a GPU
    rms_block: int = 0

    def __post_init__(self) -> None:
        for name in ("block_n", "block_k"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"{name}={value} must be a power of two")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps={self.num_warps} must be one of 1, 2, 4, 8, 16")
        if self.dot and min(self.block_n, self.block_k) < 16:
            raise ValueError(f"dot=True needs block_n and block_k >= 16 (tensor-core tiles), got "
                             f"{self.block_n} and {self.block_k}")  # fmt: skip
        if self.split_k < 1 or self.num_stages < 1:
            raise ValueError(f"split_k={self.split_k} and num_stages={self.num_stages} must be >= 1")
        swapped = (self.early, self.prefetch, self.narrow_merge, self.rms_block, self.split_k != 1,
                   self.num_stages != 3)  # fmt: skip
        if not self.swap and any(swapped):
            raise ValueError("early, prefetch, narrow_merge, rms_block, split_k and num_stages are the "
                             "swapped product's (swap=True)")  # fmt: skip
        if self.rms_block < 0 or self.rms_block & (self.rms_block - 1):
            raise ValueError(f"rms_block={self.rms_block} must be 0 (block_k) or a power of two")
        if self.swap and (self.dot or self.ahead):
            raise ValueError("swap=True is a product of its own: dot and ahead do not apply")
        if self.swap and (self.block_n not in (16, 32, 64, 128) or self.block_k < 16):
            raise ValueError(f"swap=True needs block_n 16, 32, 64 or 128 and block_k >= 16, got "
                             f"{self.block_n} and {self.block_k}")  # fmt: skip


@dataclass(frozen=True)
class PackedWeight:
    """A weight-only quantized `[out_features, in_features]` matrix (the format of `accel.quant.linear`):
    `codes` uint8 `[N, K * bits / 8]` (8 bits: a code a byte; 4: two a byte, element 2j low; 5: that 4-bit
    plane then a plane of bit 4, element 8j+i in bit i of byte j), `scales` `[N, K / group_size]` in the
    working dtype and `zeros` uint8 alike: `w = (q - zero) * scale` per group."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape[0], self.codes.shape[1] * 8 // self.bits


# One kernel body (~85 lines) with its prologues and epilogues inline: Triton inlines helpers anyway.
@triton.jit
def _gemv_kernel(
    X, W, Bias, Gain, Res, Y, Scales, Zeros,
    M, N, K, stride_xm, stride_wn, stride_rm, stride_ym, stride_sn, stride_zn, eps,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    NORM: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
    USE_PDL: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, SPAN: tl.constexpr, CHUNK: tl.constexpr,
    DOT: tl.constexpr, FP32_DOT: tl.constexpr, GLU: tl.constexpr, AHEAD: tl.constexpr, ASM: tl.constexpr,
):  # fmt: skip
    if USE_PDL:  # the next kernel launched with PDL may start now; it waits for this grid before reading
        gdc_launch_dependents()
    dtype = Y.dtype.element_ty
    rows = tl.arange(0, ROWS)
    row_ok = rows < M
    pid = tl.program_id(0)
    if GLU:  # weight rows: gate j and up N + j interleaved; BLOCK_N // 2 outputs a program
        pairs = pid * (BLOCK_N // 2) + tl.arange(0, BLOCK_N) // 2
        cols = pairs + (tl.arange(0, BLOCK_N) % 2) * N
        col_ok = pairs < N
        out_cols = pid * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
    else:
        cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        out_cols = cols
    ks = tl.arange(0, BLOCK_K)
    x_rows = X + rows[:, None] * stride_xm
    # The first weight slice does not depend on the previous kernel: with PDL its read starts under that
    # kernel's tail. What a predecessor wrote (x, the residual) is read, and anything stored, after the wait.
    # The slice travels through the loop as read (bytes of codes, scales, zeros), decoded where it is used:
    # a decoded float32 slice carried across iterations was re-laid out through shared memory (with
    # barriers) every step (sm_90 SASS, triton 3.6).
    w, plane, scale, zero = _weight_slice(W, Scales, Zeros, cols, col_ok, 0, K, stride_wn, stride_sn,
                                          stride_zn, BLOCK_K, BITS, GROUP, SPAN)  # fmt: skip
    if USE_PDL:
        gdc_wait()
    inv = tl.zeros([ROWS], tl.float32)
    if NORM:
        inv = rms_scale(x_rows, row_ok, K, eps, ROWS, BLOCK_K)
    whole: tl.constexpr = DOT or (BITS == 16 and ROWS > 1)  # acc without a CHUNK axis (_slice_product)
    if whole:
        acc = tl.zeros([ROWS, BLOCK_N], tl.float32)
    else:  # a sum per CHUNK features of the slice, added up once after the loop
        acc = tl.zeros([ROWS, BLOCK_N, BLOCK_K // CHUNK], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if AHEAD:  # this slice was asked for one step ago; ask for the next one now (masked off past K)
            w_now, scale_now = _decode_slice(w, plane, scale, zero, BITS, SPAN, CHUNK, ASM)
            w, plane, scale, zero = _weight_slice(W, Scales, Zeros, cols, col_ok, k0 + BLOCK_K, K,
                                                  stride_wn, stride_sn, stride_zn, BLOCK_K, BITS, GROUP,
                                                  SPAN)  # fmt: skip
        else:
            if k0 > 0:
                w, plane, scale, zero = _weight_slice(W, Scales, Zeros, cols, col_ok, k0, K, stride_wn,
                                                      stride_sn, stride_zn, BLOCK_K, BITS, GROUP,
                                                      SPAN)  # fmt: skip
            w_now, scale_now = _decode_slice(w, plane, scale, zero, BITS, SPAN, CHUNK, ASM)
        kk = k0 + ks
        k_ok = kk < K
        x_ok = row_ok[:, None] & k_ok[None, :]
        x = tl.load(x_rows + kk[None, :], mask=x_ok, other=0.0)
        if NORM:  # normalized, rounded, times the gain, rounded (transformers' Llama/Qwen RMSNorm)
            gain = tl.load(Gain + kk, mask=k_ok, other=0.0)
            x = (x.to(tl.float32) * inv[:, None]).to(dtype)
            x = (x.to(tl.float32) * gain.to(tl.float32)[None, :]).to(dtype)
        if DOT:  # [ROWS, BLOCK_K] x [BLOCK_K, BLOCK_N] on the tensor cores, accumulated in fp32
            if FP32_DOT:
                acc += tl.dot(x.to(tl.float32), tl.trans(w_now.to(tl.float32)), input_precision="ieee")
            else:
                acc += tl.dot(x, tl.trans(w_now))
        else:
            acc += _slice_product(x.to(tl.float32), w_now, scale_now, BITS, CHUNK)
    if not whole:
        acc = tl.sum(acc, axis=2)
    if HAS_BIAS:
        acc += tl.load(Bias + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    y = acc.to(dtype)
    if GLU:  # each product rounded (the model's gate_up output), then silu(gate) * up as torch rounds it
        gate, up = tl.split(tl.reshape(y, [ROWS, BLOCK_N // 2, 2]))
        y = _silu_times(gate, up)
    out_ok = row_ok[:, None] & (out_cols < N)[None, :]
    if HAS_RES:
        res = tl.load(Res + rows[:, None] * stride_rm + out_cols[None, :], mask=out_ok, other=0.0)
        y = (res.to(tl.float32) + y.to(tl.float32)).to(dtype)
    tl.store(Y + rows[:, None] * stride_ym + out_cols[None, :], y, mask=out_ok)


@triton.jit
def rms_scale(x_rows, row_ok, K, eps, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """RMSNorm's scale per row, `rsqrt(mean(x^2) + eps)` `[ROWS]` over each whole row of K features
    (`x_rows` `[ROWS, 1]`: the rows' pointers; rows not `row_ok` read as zeros), in BLOCK_K-wide slices."""
    squares = tl.zeros([ROWS, BLOCK_K], tl.float32)
    ks = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + ks
        x = tl.load(x_rows + kk[None, :], mask=row_ok[:, None] & (kk < K)[None, :], other=0.0)
        squares += x.to(tl.float32) * x.to(tl.float32)
    return tl.rsqrt(tl.sum(squares, axis=1) / K + eps)


@triton.jit
def _silu_times(gate, up):
    """`silu(gate) * up` in their dtype, each op rounded to it (torch's `F.silu(gate) * up`)."""
    g = gate.to(tl.float32)
    h = (g * tl.sigmoid(g)).to(gate.dtype)
    return (h.to(tl.float32) * up.to(tl.float32)).to(gate.dtype)


@triton.jit
def _weight_slice(W, Scales, Zeros, cols, col_ok, k0, K, stride_wn, stride_sn, stride_zn,
                  BLOCK_K: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr,
                  SPAN: tl.constexpr):  # fmt: skip
    """The weight's rows `cols` at input features [k0, k0 + BLOCK_K), as stored: `(w, w, w, w)` with w
    `[BLOCK_N, BLOCK_K]` (BITS 16); for packed codes (`PackedWeight`'s format, contiguous bytes) `(codes,
    plane, scale, zero)`: the codes as int32 words (8 bits: four a word, `[BLOCK_N, BLOCK_K / 4]`; 4 and 5
    bits: eight nibbles a word, `[BLOCK_N, BLOCK_K / 8]`), the bytes of 5-bit codes' bit 4 (`[BLOCK_N,
    BLOCK_K / 8]`; the codes again otherwise), and the slice's groups' scales and zeros `[BLOCK_N,
    BLOCK_K // SPAN]` (SPAN = min(BLOCK_K, GROUP) features a scale). `_decode_slice` makes them numbers."""
    rows = W + cols[:, None] * stride_wn
    if BITS == 16:
        kk = k0 + tl.arange(0, BLOCK_K)
        codes = tl.load(rows + kk[None, :], mask=col_ok[:, None] & (kk < K)[None, :], other=0.0)
        plane = codes
        scale = codes
        zero = codes
    else:
        if BITS == 8:
            # four codes a 32-bit word, two adjacent words a thread (the contiguity Triton infers for kw):
            # eight codes, the eight elements of x a thread reads in one 16-byte load, so the slice and x get
            # the same layout (a 16-byte read of codes made Triton move the decoded slice through shared
            # memory to x's layout every step; sm_90 TTGIR, triton 3.6)
            w4 = tl.arange(0, BLOCK_K // 4)
            kw = k0 // 4 + w4 // 2 * 2 + w4 % 2
            words = W.to(tl.pointer_type(tl.int32)) + cols[:, None] * (stride_wn // 4) + kw[None, :]
            codes = tl.load(words, mask=col_ok[:, None] & (kw < K // 4)[None, :], other=0)
            plane = codes
        else:  # eight nibbles a 32-bit word (element 8j + i at bit 4i of word j), one word a thread
            # ([words, rows] pointers, then transposed: Triton then lays the words out along the threads,
            # one a thread, so a word's eight codes meet the eight elements of x a thread reads)
            # (* 2 // 2 hides kw's contiguity: without it Triton vectorizes the load along the words and
            # converts its layout through shared memory every step; sm_90 offline, one row of 4-bit codes
            # at 8 x 1024: 36 barriers a loop and 118 registers, against none and 56 with it;
            # cpu/gemv-packed/kw-contiguity-20261206.txt)
            kw = k0 // 8 + (tl.arange(0, BLOCK_K // 8) * 2) // 2
            kw_ok = (kw < K // 8)[:, None] & col_ok[None, :]
            words = W.to(tl.pointer_type(tl.int32)) + cols[None, :] * (stride_wn // 4) + kw[:, None]
            codes = tl.trans(tl.load(words, mask=kw_ok, other=0))
            plane = codes
            if BITS == 5:  # bit 4 of element 8j+i is bit i of byte K/2 + j
                plane = tl.trans(tl.load(W + cols[None, :] * stride_wn + K // 2 + kw[:, None], mask=kw_ok,
                                         other=0))  # fmt: skip
        g = k0 // GROUP + tl.arange(0, BLOCK_K // SPAN)
        g_mask = col_ok[:, None] & (g < K // GROUP)[None, :]
        scale = tl.load(Scales + cols[:, None] * stride_sn + g[None, :], mask=g_mask, other=0.0)
        zero = tl.load(Zeros + cols[:, None] * stride_zn + g[None, :], mask=g_mask, other=0)
    return codes, plane, scale, zero


@triton.jit
def _decode_slice(
    codes, plane, scale, zero, BITS: tl.constexpr, SPAN: tl.constexpr, CHUNK: tl.constexpr, ASM: tl.constexpr
):
    """`_weight_slice`'s raw slice as numbers: `(w, w)` as stored (BITS 16), else `(q - zero, scale)`: the
    centered codes, exact, as float32 `[BLOCK_N, BLOCK_K]`, and the float32 scales repeated for each CHUNK
    features `[BLOCK_N, BLOCK_K / CHUNK]` (the product sums CHUNK features in one thread, then scales)."""
    if BITS == 16:
        w, w_scale = codes, codes
    else:
        n: tl.constexpr = codes.shape[0]
        width: tl.constexpr = codes.shape[1] * (4 if BITS == 8 else 8)
        # q - zero, exact, without an int-to-float conversion per code (a quarter-rate instruction on Hopper,
        # which bounded the packed kernel): a code c < 2^23 OR-ed into 2^23's bits is the float 2^23 + c,
        # so (2^23 + q) - (2^23 + zero) is q - zero in one float subtraction.
        magic = _magic_words(codes, ASM) if BITS == 8 else _magic_nibbles(codes, plane, BITS)
        groups: tl.constexpr = width // SPAN
        chunks: tl.constexpr = width // CHUNK
        per: tl.constexpr = SPAN // CHUNK
        zeros = tl.reshape(tl.broadcast_to(_magic_float(zero.to(tl.int32))[:, :, None], [n, groups, per]),
                           [n, chunks])  # fmt: skip
        w = tl.reshape(tl.reshape(magic, [n, chunks, CHUNK]) - zeros[:, :, None], [n, width])
        w_scale = tl.reshape(tl.broadcast_to(scale.to(tl.float32)[:, :, None], [n, groups, per]), [n, chunks])
    return w, w_scale


@triton.jit
def _magic_float(c):
    """2^23 + c as float32, exactly, for integer codes 0 <= c < 2^23 (int32): c in the mantissa of 2^23."""
    return (c | 0x4B000000).to(tl.float32, bitcast=True)


@triton.jit
def _magic_words(words, ASM: tl.constexpr):
    """`[R, 4 W]` float32 2^23 + code (`_magic_float`) of the four uint8 codes in each int32 of `words`
    `[R, W]` (code 4i + j in byte j of word i). ASM (compiled for a GPU; the interpreter runs no PTX): one
    byte permute a code, its byte placed under 2^23's exponent byte (`prmt` of the word and 0x4B000000),
    where shifts and masks took 5.2 instructions a code (sm_90 SASS, cpu/gemv-packed/)."""
    if ASM:
        b0, b1, b2, b3 = tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 m;
            mov.b32 m, 0x4B000000;
            prmt.b32 $0, $4, m, 0x7440;
            prmt.b32 $1, $4, m, 0x7441;
            prmt.b32 $2, $4, m, 0x7442;
            prmt.b32 $3, $4, m, 0x7443;
            }""",
            constraints="=r,=r,=r,=r,r",
            args=[words],
            dtype=(tl.float32, tl.float32, tl.float32, tl.float32),
            is_pure=True,
            pack=1,
        )
    else:
        b0 = _magic_float(words & 255)
        b1 = _magic_float((words >> 8) & 255)
        b2 = _magic_float((words >> 16) & 255)
        b3 = _magic_float((words >> 24) & 255)
    rows: tl.constexpr = words.shape[0]
    # [R, W, 2, 2] holding b(2q + p) at [., i, q, p]: flattened, code 4i + 2q + p
    return tl.reshape(tl.join(tl.join(b0, b2), tl.join(b1, b3)), [rows, 4 * words.shape[1]])


@triton.jit
def _magic_nibbles(words, plane, BITS: tl.constexpr):
    """`[R, 8 W]` float32 2^23 + code of the eight 4-bit codes in each int32 of `words` `[R, W]` (code 8j + i
    at bit 4i of word j); at 5 bits, code 8j + i's bit 4 is bit i of `plane` `[R, W]` (uint8)."""
    high = plane.to(tl.uint32)
    words = words.to(tl.uint32, bitcast=True)  # logical shifts
    rows: tl.constexpr = words.shape[0]
    # [R, W, 2, 2, 2] holding code 4p + 2q + r at [., j, p, q, r]: flattened, code 8j + 4p + 2q + r
    evens = tl.join(tl.join(_nibble(words, high, 0, BITS), _nibble(words, high, 4, BITS)),
                    tl.join(_nibble(words, high, 2, BITS), _nibble(words, high, 6, BITS)))  # fmt: skip
    odds = tl.join(tl.join(_nibble(words, high, 1, BITS), _nibble(words, high, 5, BITS)),
                   tl.join(_nibble(words, high, 3, BITS), _nibble(words, high, 7, BITS)))  # fmt: skip
    return tl.reshape(tl.join(evens, odds), [rows, 8 * words.shape[1]])


@triton.jit
def _nibble(words, high, i: tl.constexpr, BITS: tl.constexpr):
    """2^23 + code i of each word (`_magic_nibbles`)."""
    code = (words >> (4 * i)) & 15
    if BITS == 5:
        code = code | (((high >> i) & 1) << 4)
    return (code | 0x4B000000).to(tl.float32, bitcast=True)


@triton.jit
def _slice_product(x, w, scale, BITS: tl.constexpr, CHUNK: tl.constexpr):
    """x `[ROWS, BLOCK_K]` (float32) times the slice from `_decode_slice`, summed per CHUNK features:
    `[ROWS, BLOCK_N, BLOCK_K / CHUNK]` (one row, or packed codes: `scale * (x . (q - zero))` in float32, the
    weight never rounded to the working dtype: no dequantized copy exists), or summed whole `[ROWS,
    BLOCK_N]` (several rows of weights as stored). The caller's `acc` has the same shape (`gemv._chunk`)."""
    rows: tl.constexpr = x.shape[0]
    n: tl.constexpr = w.shape[0]
    chunks: tl.constexpr = w.shape[1] // CHUNK
    w = w.to(tl.float32)
    if rows == 1:  # [1, K] * [N, K]: x takes the weight's layout
        dots = tl.sum(tl.reshape(x * w, [n, chunks, CHUNK]), axis=2)[None, :, :]
        product = dots if BITS == 16 else dots * scale[None, :, :]
    elif BITS == 16:
        product = tl.sum(x[:, None, :] * w[None, :, :], axis=2)
    else:  # several rows: CHUNK is the group (fewer, wider sums)
        x4 = tl.reshape(x, [rows, 1, chunks, CHUNK])
        product = tl.sum(x4 * tl.reshape(w, [1, n, chunks, CHUNK]), axis=3) * scale[None, :, :]
    return product


@triton.jit
def _swap_kernel(
    X, W, WRaw, Bias, Gain, Res, Y, Part, Counters, M, N, K, k_per_split, stride_xm, stride_wn, stride_rm,
    stride_ym, eps, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    NORM: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, GLU: tl.constexpr,
    USE_TMA: tl.constexpr, USE_PDL: tl.constexpr, FP32_DOT: tl.constexpr, EARLY: tl.constexpr,
    PREFETCH: tl.constexpr, OUT_ROWS: tl.constexpr = 16, RMS_K: tl.constexpr = 0,
):  # fmt: skip
    """`y^T = W x^T` for a tile of BLOCK_N outputs over one split of K: acc `[BLOCK_N, ROWS]` in float32.
    With GLU the weight is `[gate; up]` (2N rows): a gate tile and an up tile a slice, silu(gate) * up out.
    With SPLIT_K > 1 each program stores its partial to `Part` and counts itself in `Counters[tile]`; the
    last to arrive sums the tile's partials in split order, runs the epilogue and resets the counter.
    EARLY: the split's first weight slice is read before the PDL wait (the weight does not depend on the
    kernel before), the rest after it, and the residual right after the wait (off the merge's path).
    PREFETCH (with USE_PDL and USE_TMA): the program's whole share of the weight (`WRaw`, the pointer behind
    the descriptor W) asked of the L2 before the wait."""
    if USE_PDL:
        gdc_launch_dependents()
        if PREFETCH:
            _warm_share(WRaw, N, K, k_per_split, stride_wn, BLOCK_N, GLU)
        if not EARLY:
            gdc_wait()
    dtype = Y.dtype.element_ty
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    n0 = pid_n * BLOCK_N
    cols = n0 + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    rows = tl.arange(0, ROWS)
    row_ok = rows < M
    ks = tl.arange(0, BLOCK_K)
    x_rows = X + rows[:, None] * stride_xm
    if EARLY:
        k_early = pid_k * k_per_split
        first = k_early + ks
        first_ok = first < tl.minimum(k_early + k_per_split, K)
        w_first = _swap_tile(W, n0, k_early, cols, first, col_ok, first_ok, stride_wn, USE_TMA)
        up_first = w_first
        if GLU:
            up_first = _swap_tile(W, N + n0, k_early, N + cols, first, col_ok, first_ok, stride_wn, USE_TMA)
        if USE_PDL:
            gdc_wait()
    inv = tl.zeros([ROWS], tl.float32)
    if NORM:
        inv = rms_scale(x_rows, row_ok, K, eps, ROWS, RMS_K if RMS_K else BLOCK_K)
    k_start = pid_k * k_per_split
    k_stop = tl.minimum(k_start + k_per_split, K)
    acc = tl.zeros([BLOCK_N, ROWS], tl.float32)
    acc_up = tl.zeros([BLOCK_N, ROWS], tl.float32)
    o_rows = rows if OUT_ROWS == ROWS else tl.arange(0, OUT_ROWS)  # the rows the output is written from
    o_ok = (o_rows < M)[:, None] & col_ok[None, :]
    res = tl.zeros([OUT_ROWS, BLOCK_N], dtype)
    if EARLY:
        res = _swap_residual(Res, o_rows, cols, o_ok, stride_rm, res, HAS_RES)
        x = _swap_rows(x_rows, row_ok, Gain, inv, first, first_ok, dtype, NORM)
        acc = _swap_mma(w_first, x, acc, FP32_DOT)
        if GLU:
            acc_up = _swap_mma(up_first, x, acc_up, FP32_DOT)
    k_first = k_start
    if EARLY:
        k_first += BLOCK_K
    for k0 in tl.range(k_first, k_stop, BLOCK_K):
        kk = k0 + ks
        k_ok = kk < k_stop
        x = _swap_rows(x_rows, row_ok, Gain, inv, kk, k_ok, dtype, NORM)
        w = _swap_tile(W, n0, k0, cols, kk, col_ok, k_ok, stride_wn, USE_TMA)
        acc = _swap_mma(w, x, acc, FP32_DOT)
        if GLU:
            w_up = _swap_tile(W, N + n0, k0, N + cols, kk, col_ok, k_ok, stride_wn, USE_TMA)
            acc_up = _swap_mma(w_up, x, acc_up, FP32_DOT)
    out_ok = row_ok[:, None] & col_ok[None, :]
    if SPLIT_K == 1:
        if not EARLY:
            res = _swap_residual(Res, rows, cols, out_ok, stride_rm, res, HAS_RES)
        _swap_epilogue(tl.trans(acc), tl.trans(acc_up), Bias, res, Y, rows, cols, col_ok, out_ok, N,
                       stride_ym, HAS_BIAS, HAS_RES, GLU)  # fmt: skip
    else:
        size: tl.constexpr = ROWS * BLOCK_N
        tile = Part + (pid_n * SPLIT_K + pid_k) * (2 * size) + rows[:, None] * BLOCK_N + (cols[None, :] - n0)
        keep = (rows < OUT_ROWS)[:, None]  # all rows unless OUT_ROWS < ROWS
        tl.store(tile, tl.trans(acc), mask=keep if OUT_ROWS < ROWS else None)
        if GLU:
            tl.store(tile + size, tl.trans(acc_up), mask=keep if OUT_ROWS < ROWS else None)
        tl.debug_barrier()  # every thread's partial is written before the counter says so
        arrived = tl.atomic_add(Counters + pid_n, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:  # the last split: the partials summed in split order, then the epilogue
            total = tl.zeros([OUT_ROWS, BLOCK_N], tl.float32)
            total_up = tl.zeros([OUT_ROWS, BLOCK_N], tl.float32)
            if OUT_ROWS < ROWS:  # the first OUT_ROWS rows of each split's partial, summed as a tree
                part0 = Part + pid_n * SPLIT_K * (2 * size) + o_rows[:, None] * BLOCK_N + (cols[None, :] - n0)
                total = _tree_sum(part0, 2 * size, 0, SPLIT_K)
                if GLU:
                    total_up = _tree_sum(part0 + size, 2 * size, 0, SPLIT_K)
            else:
                for s in range(SPLIT_K):
                    total += tl.load(tile + (s - pid_k) * (2 * size))
                    if GLU:
                        total_up += tl.load(tile + (s - pid_k) * (2 * size) + size)
            if not EARLY:
                res = _swap_residual(Res, o_rows, cols, o_ok, stride_rm, res, HAS_RES)
            _swap_epilogue(total, total_up, Bias, res, Y, o_rows, cols, col_ok, o_ok, N, stride_ym, HAS_BIAS,
                           HAS_RES, GLU)  # fmt: skip
            tl.store(Counters + pid_n, 0)


@triton.jit
def _tree_sum(ptrs, stride, lo: tl.constexpr, hi: tl.constexpr):
    """Sum of the tiles at ptrs + s * stride for s in [lo, hi), in halves (a tree)."""
    if hi - lo == 1:
        return tl.load(ptrs + lo * stride)
    else:
        mid: tl.constexpr = (lo + hi) // 2
        return _tree_sum(ptrs, stride, lo, mid) + _tree_sum(ptrs, stride, mid, hi)


@triton.jit
def _warm_share(WRaw, N, K, k_per_split, stride_wn, BLOCK_N: tl.constexpr, GLU: tl.constexpr):
    """This program's weight rows (its tile's, and their up rows with GLU) over its split of K, asked of the
    L2 (`warm_l2`: one bulk prefetch a row; rows and split bounds are 16-byte aligned where TMA reads W)."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_lo = tl.program_id(1) * k_per_split
    nbytes = (tl.minimum(k_lo + k_per_split, K) - k_lo) * (WRaw.dtype.element_ty.primitive_bitwidth // 8)
    sizes = tl.zeros([BLOCK_N], tl.int32) + nbytes
    warm_l2(WRaw + cols.to(tl.int64) * stride_wn + k_lo, sizes, cols < N)
    if GLU:
        warm_l2(WRaw + (N + cols).to(tl.int64) * stride_wn + k_lo, sizes, cols < N)


@triton.jit
def _swap_rows(x_rows, row_ok, Gain, inv, kk, k_ok, dtype: tl.constexpr, NORM: tl.constexpr):
    """x's rows at features kk `[ROWS, BLOCK_K]` (zeros past them): with NORM normalized (`inv` `[ROWS]`),
    rounded, times the gain, rounded (as `_gemv_kernel`)."""
    x = tl.load(x_rows + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
    if NORM:
        gain = tl.load(Gain + kk, mask=k_ok, other=0.0)
        x = (x.to(tl.float32) * inv[:, None]).to(dtype)
        x = (x.to(tl.float32) * gain.to(tl.float32)[None, :]).to(dtype)
    return x


@triton.jit
def _swap_tile(W, n0, k0, cols, kk, col_ok, k_ok, stride_wn, USE_TMA: tl.constexpr):
    """The weight's rows [n0, n0 + BLOCK_N) at features kk `[BLOCK_N, BLOCK_K]`: through TMA (zero-filled
    past the tensor; past a split's end it multiplies x's zeros) or pointers (masked)."""
    if USE_TMA:
        w = W.load([n0, k0])
    else:
        w = tl.load(
            W + cols[:, None] * stride_wn + kk[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0
        )
    return w


@triton.jit
def _swap_mma(w, x, acc, FP32_DOT: tl.constexpr):
    """acc `[BLOCK_N, ROWS]` += w `[BLOCK_N, BLOCK_K]` @ x^T (x `[ROWS, BLOCK_K]`)."""
    if FP32_DOT:
        acc = tl.dot(w.to(tl.float32), tl.trans(x.to(tl.float32)), acc, input_precision="ieee")
    else:
        acc = tl.dot(w, tl.trans(x), acc)
    return acc


@triton.jit
def _swap_residual(Res, rows, cols, out_ok, stride_rm, none, HAS_RES: tl.constexpr):
    """The residual's tile `[ROWS, BLOCK_N]` in the output's dtype (`none` without HAS_RES)."""
    res = none
    if HAS_RES:
        res = tl.load(Res + rows[:, None] * stride_rm + cols[None, :], mask=out_ok, other=0.0).to(none.dtype)
    return res


@triton.jit
def _swap_epilogue(acc, acc_up, Bias, res, Y, rows, cols, col_ok, out_ok, N, stride_ym,
                   HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, GLU: tl.constexpr):  # fmt: skip
    """acc, acc_up `[ROWS, BLOCK_N]` plus the bias, rounded (with GLU, silu(gate) * up as torch's ops round
    it), plus the residual `res` `[ROWS, BLOCK_N]` (rounded as a separate add), stored: `_gemv_kernel`'s
    epilogue."""
    dtype = Y.dtype.element_ty
    if HAS_BIAS:
        acc += tl.load(Bias + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if GLU:
            acc_up += tl.load(Bias + N + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    y = acc.to(dtype)
    if GLU:
        y = _silu_times(y, acc_up.to(dtype))
    if HAS_RES:
        y = (res.to(tl.float32) + y.to(tl.float32)).to(dtype)
    tl.store(Y + rows[:, None] * stride_ym + cols[None, :], y, mask=out_ok)


# One row against few output columns (N <= this) reads a K of up to 4096 in one slice.
ONE_SLICE_MAX_N = 2048


def default_params(
    rows: int,
    n: int,
    k: int,
    bits: int = 16,
    dtype: torch.dtype = torch.bfloat16,
    *,
    glu: bool = False,
    norm: bool = False,
    tma: bool = False,
    sms: int = 132,
) -> GemvParams:
    """Launch parameters, from per-call times in 28-layer CUDA graphs on an H100 (GEMV sweeps under
    benchmarks/results/h100/gemv/; the products of Qwen3-0.6B and Llama-3-8B as the accelerator calls them,
    neighbours fused). By default 4 output columns per program (many programs, balanced over the SMs; each
    reads whole weight rows) in 1024-column slices, 4 warps; 16 rows: half slices (registers). For one row of
    unpacked weights:
      - few outputs (N <= ONE_SLICE_MAX_N), 1024 < K <= 4096 (Qwen3-0.6B's o and down): the whole row in one
        slice, all of it asked for before the PDL wait (1024-wide slices ran at 32-34% of the read floor where
        one-slice products ran at 72-75%: each later slice is a round trip after the wait; `slice_ab.py`);
      - other K > 1024 (Llama-3-8B's four products): 2048-column slices, 8 warps (q/k/v with its norm 23.3 ->
        19.6 us, gate/up 78.9 -> 77.4, down with silu * up 47.5 -> 46.2, o equal; gemv-sweep-20261206c),
        each slice asked for one loop step ahead (plain products: q/k/v 19.4 -> 18.4 us, o 13.8 -> 13.0,
        gate/up 78.9 -> 76.9, down 47.2 -> 40.8; fused with their norms equal; gemv-sweep-20261206d); K >
        8192 against N >= 4096 (Llama-3-8B's down) 8 columns a program (40.0 -> 38.3 us);
      - K <= 1024 against 4096 < N <= 16384 (Qwen3-0.6B's gate/up): 16 columns a program (7.2 -> 6.4 us; its
        q/k/v, N = 4096, and its LM head stay faster at 4).
    `bits`: 16 for weights as stored (any dtype), 4/5/8 for packed codes. One row of packed codes, each slice
    asked for one step ahead: 8-bit codes 8 columns a program in 1024-column slices, 2048 where N <= 4096
    (Llama-3-8B's four fused products 11.3 / 8.0 / 44.9 / 24.7 us, 70-88% of the read floor), 5-bit 8 x 1024
    (14.6 / 11.2 / 58.6 / 34.9 us where 4 x 1024 took 17.1 / 11.9 / 74.5 / 36.1, `...-548b9c4.json`);
    `gemv-packed/packed-fused-sweep-20261206-*.json`, `...-3355df7.json` for the bf16 down. 4-bit codes (the
    triton backend's; "auto" gives them to core torch's kernel) keep 4 x 1024, not measured otherwise.
    2 to DOT_ROWS rows of 16-bit weights and activations (`dtype`): the tensor-core product (rows padded to
    16), each slice asked for one step ahead; at 8 rows (`gemv-sweep-20261206d`, neighbours fused, us against
    torch's ops) 16 columns x 512 for N <= 4096 (o 6.7 / 7.2 and 15.5 / 18.1; q/k/v with its norm 7.9 /
    21.7; the downs 9.2 / 7.9 and 48.6 / 45.0 plain, the residual add fused), 32 x 256 above (q/k/v 30.1 /
    41.1, gate/up 8.6 / 23.0, the LM head 115.7 / 134.0), and more than 16384 outputs of K > 1024
    (Llama-3-8B's gate/up) not read ahead (99.0 / 104.2 where reading ahead took 106.7).
    Where the weight goes through TMA (`tma`: a Hopper GPU, an aligned weight), 2 to MAX_ROWS rows of 16-bit
    weights of at most SWAP_MAX_N rows take the swapped product instead (`_swap_params`, with `glu`, `norm`
    (the RMSNorm fused before the product) and the GPU's `sms`)."""
    if triton_interpret():  # the interpreter's cost is per program: few, wide ones
        return GemvParams(block_n=256, block_k=256, num_warps=4)
    packed = bits != 16
    if rows == 1 and bits == 8:
        return GemvParams(block_n=8, block_k=2048 if n <= 4096 else 1024, num_warps=4, ahead=True)
    if rows == 1 and bits == 5:
        return GemvParams(block_n=8, block_k=1024, num_warps=4, ahead=True)
    if rows == 1 and not packed and k > 1024:
        if n <= ONE_SLICE_MAX_N and k <= 4096:
            block_k = triton.next_power_of_2(k)
            return GemvParams(block_n=4, block_k=block_k, num_warps=8 if block_k == 4096 else 4)
        return GemvParams(block_n=8 if k > 8192 and n >= 4096 else 4, block_k=2048, num_warps=8, ahead=True)
    if rows == 1 and not packed and 4096 < n <= 16384:
        return GemvParams(block_n=16, block_k=1024, num_warps=4)
    if 1 < rows <= MAX_ROWS and tma and not packed and dtype in HALF_DTYPES and n <= SWAP_MAX_N:
        return _swap_params(n // 2 if glu else n, k, glu, norm, sms)
    if 1 < rows <= DOT_ROWS and not packed and dtype in HALF_DTYPES:
        if n <= 4096:
            return GemvParams(block_n=16, block_k=512, num_warps=4, dot=True, ahead=True)
        return GemvParams(block_n=32, block_k=256, num_warps=4, dot=True, ahead=n <= 16384 or k <= 1024)
    return GemvParams(block_n=4, block_k=1024 if rows <= 8 else 512, num_warps=4)


def _swap_params(outputs: int, k: int, glu: bool, norm: bool, sms: int) -> GemvParams:
    """The swapped product's set for `outputs` columns over K features, from per-call times at 8 rows in
    28-layer CUDA graphs on an H100 (`h100/gemv-swap/gemv-swap.json`, neighbours fused; each shape's fastest
    of 5 tiles and 2-3 splits, us against cuBLAS alone and cuBLAS + torch's ops): with glu two tiles a slice,
    64 x 256 to 4096 outputs (Qwen3-0.6B's gate/up 9.04 / 7.15 / 28.8), 128 x 128 and 8 warps above
    (Llama-3-8B's 88.0 / 79.3 / 108.1), K whole; else 128 x 128, 8 warps, 4 stages above 4096 outputs or
    for K <= 1024 (q/k/v: Qwen3-0.6B 7.00 / 5.65 / 21.5, Llama-3-8B 26.4 / 21.1 / 42.2), 64 x 256 otherwise
    (o and down: Qwen3-0.6B 5.04 / 6.09 / 7.47 and 5.78 / 7.90 / 9.29, Llama-3-8B 14.3 / 16.3 / 18.1 and
    41.6 / 43.3 / 45.4), K split so the tiles fill about one wave of `sms`.
    The 64 x 256 sets, and the glu sets beside a `norm`, read each split's first slice before the PDL wait
    (`early`; without the norm the rows are staged in shared memory too, and the glu sets' early slice takes
    it past the GPU's 227 KB: 295 / 279 KB, `cpu/gemv-swap/step-shared-20261207.txt`; the A/B of
    `h100/swap-ab-20261207`, us default -> early: gate/up 8.89 -> 7.90 and 88.2 -> 84.7, o 4.94 -> 4.55 and
    14.3 -> 13.9, down 5.65 -> 5.46 and 41.7 -> 41.4; the 128 x 128 sets equal or slower, 26.5 -> 28.2), and
    where the whole weight is at most PREFETCH_MAX_BYTES also ask each program's share of the L2 before it
    (`prefetch`: Qwen3-0.6B's o 4.41, down 5.09; Llama-3-8B's o 13.9 -> 17.5, gate/up slower too)."""
    if glu:
        wide = outputs <= 4096
        return GemvParams(64 if wide else 128, 256 if wide else 128, 4 if wide else 8, swap=True, early=norm)
    if outputs > 4096 or k <= 1024:
        return GemvParams(128, 128, 8, swap=True, split_k=wave_split(outputs, 128, sms), num_stages=4)
    return GemvParams(64, 256, 4, swap=True, split_k=wave_split(outputs, 64, sms), early=True,
                      prefetch=outputs * k * 2 <= PREFETCH_MAX_BYTES)  # fmt: skip


def wave_split(outputs: int, block_n: int, sms: int) -> int:
    """The swapped product's split of K that makes its tiles of `block_n` outputs about one wave of `sms`."""
    return max(1, sms // triton.cdiv(outputs, block_n))


def swap_split(k: int, block_k: int, split_k: int) -> tuple[int, int]:
    """(K a split reads, splits) of a swapped launch asking for `split_k` splits: whole slices of block_k
    shared evenly, no split empty (fewer than asked where K has fewer slices)."""
    slices = triton.cdiv(k, block_k)
    k_per_split = triton.cdiv(slices, min(split_k, slices)) * block_k
    return k_per_split, triton.cdiv(k, k_per_split)


def fast_rows(device: torch.device, dtype: torch.dtype) -> int:
    """Rows up to which a caller choosing between `fused_linear` and torch's matmuls takes the kernel for
    weights as stored: SWAP_FAST_ROWS where the swapped product runs (TMA: a Hopper GPU, 16-bit), FAST_ROWS
    elsewhere."""
    return SWAP_FAST_ROWS if tma_capable(device, dtype) else FAST_ROWS


def _check(x, weight, bias, gain, residual, glu=False) -> None:
    if x.dtype not in DTYPES:
        raise ValueError(f"x has dtype {x.dtype}; fused_linear supports {DTYPES}")
    if isinstance(weight, PackedWeight):
        _check_packed(weight, x)
    elif weight.dim() != 2:
        raise ValueError(f"weight must be [out_features, in_features], got shape {tuple(weight.shape)}")
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x's last dim {x.shape[-1]} must be in_features = {k}")
    if glu and n % 2:
        raise ValueError(f"glu=True needs the weight's rows to be [gate; up] (an even count), got {n}")
    rows = x.numel() // k if k else 0
    if rows > MAX_ROWS:
        raise ValueError(f"fused_linear serves at most {MAX_ROWS} rows (decode steps); x has {rows}")
    dense = None if isinstance(weight, PackedWeight) else weight
    named = {"weight": dense, "bias": bias, "norm gain": gain, "residual": residual}
    for name, tensor in named.items():
        if tensor is None:
            continue
        if tensor.dtype != x.dtype or tensor.device != x.device:
            raise ValueError(f"{name} is {tensor.dtype} on {tensor.device}; x is {x.dtype} on {x.device}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    if gain is not None and tuple(gain.shape) != (k,):
        raise ValueError(f"norm gain must have shape ({k},), got {tuple(gain.shape)}")
    out = (*x.shape[:-1], n // 2 if glu else n)
    if residual is not None and tuple(residual.shape) != out:
        raise ValueError(f"residual must have shape {out}, got {tuple(residual.shape)}")


def _check_packed(packed: PackedWeight, x: torch.Tensor) -> None:
    codes, scales, zeros = packed.codes, packed.scales, packed.zeros
    if packed.bits not in PACKED_BITS:
        raise ValueError(f"bits={packed.bits} is not supported; accepted: {PACKED_BITS}")
    if codes.dtype != torch.uint8 or codes.dim() != 2:
        raise ValueError(f"codes must be uint8 [out, in * bits / 8], got {codes.dtype} {tuple(codes.shape)}")
    n, k = packed.shape
    if packed.group_size <= 0 or k % packed.group_size:
        raise ValueError(f"in_features={k} is not divisible by group_size={packed.group_size}")
    groups = (n, k // packed.group_size)
    if tuple(scales.shape) != groups or tuple(zeros.shape) != groups or zeros.dtype != torch.uint8:
        raise ValueError(f"scales and zeros (uint8) must be {groups}, got {tuple(scales.shape)} "
                         f"{scales.dtype} and {tuple(zeros.shape)} {zeros.dtype}")  # fmt: skip
    if scales.dtype != x.dtype or {t.device for t in (codes, scales, zeros)} != {x.device}:
        raise ValueError(
            f"scales are {scales.dtype}, codes/scales/zeros on "
            f"{sorted({str(t.device) for t in (codes, scales, zeros)})}; x is {x.dtype} on {x.device}"
        )
    if any(t.stride(-1) != 1 for t in (codes, scales, zeros)):
        raise ValueError("codes, scales and zeros must be contiguous in their last dim")
    words = WORD_FEATURES[packed.bits]
    if k % words:
        raise ValueError(f"{packed.bits}-bit codes are read as 32-bit words: in_features={k} must be a "
                         f"multiple of {words}")  # fmt: skip


def _chunk(rows: int, block_k: int, packed: PackedWeight | None) -> int:
    """Features a partial sum covers: 8 for one row (one thread's 16-byte read of x: summed without
    crossing threads, sm_90 SASS 7.3 -> 4.6 instructions a bf16 weight, 9.4 -> 4.8 an 8-bit one with words;
    cpu/gemv-packed/sass-loop-20261206d.txt; 4/5-bit codes since they are read as words too: 5-bit at 8 x 1024
    1.06-1.38x 28ea064's byte codes on the H100, `gemv-packed/packed-fused-sweep-20261206-548b9c4.json`), a
    group for several rows (their 8-wide sums took 2-3x more instructions)."""
    span = block_k if packed is None else min(block_k, packed.group_size)
    return min(8, span) if rows == 1 else span


@functools.lru_cache(maxsize=256)
def _grid(n: int, block_n: int) -> tuple[int]:
    return (triton.cdiv(n, block_n),)


def launch_linear(x, weight, bias, gain, eps, residual, out, params: GemvParams | None = None,
                  glu: bool = False) -> None:  # fmt: skip
    """Run the kernel into `out` (`[..., N]`, `[..., N / 2]` with `glu`); arguments as `fused_linear`, already
    checked."""
    rows, (n_weight, k) = out.numel() // max(out.shape[-1], 1), weight.shape
    n = out.shape[-1]
    if rows == 0 or n == 0:
        return
    x2, res2 = x.reshape(rows, x.shape[-1]), None if residual is None else residual.reshape(rows, n)
    packed = weight if isinstance(weight, PackedWeight) else None
    if packed is None:
        w = weight if weight.stride(-1) == 1 else weight.contiguous()
        scales = zeros = w
    else:
        w, scales, zeros = packed.codes, packed.scales, packed.zeros
        if w.stride(0) % 4 or w.data_ptr() % 4:  # rows read as 32-bit words
            w = w.clone(memory_format=torch.contiguous_format)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if res2 is not None and res2.stride(-1) != 1:
        res2 = res2.contiguous()
    y2 = out.view(rows, n)
    swapped = packed is None and (rows > 1 if params is None else params.swap)  # may take the swap
    tma = swapped and tma_capable(x.device, x.dtype) and tma_aligned(w)
    bits = 16 if packed is None else packed.bits
    p = params or default_params(rows, n_weight, k, bits, x.dtype, glu=glu, norm=gain is not None, tma=tma,
                                 sms=sm_count(x.device) if tma else 132)  # fmt: skip
    if glu and p.block_n < 2:
        raise ValueError(f"glu=True needs block_n >= 2 (a gate and an up row a program), got {p.block_n}")
    if packed is not None and p.block_k < 16:
        raise ValueError(f"packed weights need block_k >= 16 (whole bytes of codes), got {p.block_k}")
    if packed is not None and (p.dot or p.swap):
        mode = "dot" if p.dot else "swap"
        raise ValueError(f"{mode}=True multiplies weights as stored; packed weights take the dot=False path")
    if p.swap:
        _launch_swap(x2, w, bias, gain, eps, res2, y2, p, glu, tma)
        return
    dummy, grid = y2, _grid(n, p.block_n // 2 if glu else p.block_n)
    pdl = p.pdl and pdl_supported(out.device)
    _gemv_kernel[grid](
        x2, w, dummy if bias is None else bias, dummy if gain is None else gain,
        dummy if res2 is None else res2, y2, scales, zeros,
        rows, n, k, x2.stride(0), w.stride(0), 0 if res2 is None else res2.stride(0), y2.stride(0),
        scales.stride(0), zeros.stride(0), float(eps),
        ROWS=max(16 if p.dot else 1, triton.next_power_of_2(rows)), BLOCK_N=p.block_n, BLOCK_K=p.block_k,
        NORM=gain is not None, HAS_BIAS=bias is not None, HAS_RES=res2 is not None,
        BITS=16 if packed is None else packed.bits, GROUP=1 if packed is None else packed.group_size,
        SPAN=1 if packed is None else min(p.block_k, packed.group_size),
        CHUNK=_chunk(rows, p.block_k, packed),
        DOT=p.dot, FP32_DOT=fp32_dot(x.dtype), GLU=glu, AHEAD=p.ahead, ASM=not triton_interpret(),
        num_warps=p.num_warps, **pdl_options(pdl),
    )  # fmt: skip


def _launch_swap(x2, w, bias, gain, eps, res2, y2, p: GemvParams, glu: bool, tma: bool) -> None:
    """`_swap_kernel` into `y2` `[rows, N]` (x2 `[rows, K]`, w `[N or 2N, K]` last dim contiguous, res2
    `[rows, N]` or None): through TMA where `tma`, else pointers (the interpreter, a weight TMA cannot
    read)."""
    if x2.dtype not in HALF_DTYPES:
        raise ValueError(f"swap=True multiplies 16-bit weights (float16, bfloat16), got {x2.dtype}")
    rows, n = y2.shape
    k = w.shape[1]
    tiles = triton.cdiv(n, p.block_n)
    k_per_split, split = swap_split(k, p.block_k, p.split_k)
    part, counters = _swap_workspace(y2.device, tiles, split, p.block_n) if split > 1 else (y2, y2)
    pdl = p.pdl and pdl_supported(y2.device)
    constants = swap_constants(p, split, gain is not None, bias is not None, res2 is not None, glu, tma, pdl,
                               fp32_dot(x2.dtype), rows)  # fmt: skip
    _swap_kernel[(tiles, split)](
        x2, descriptor(w, [p.block_n, p.block_k]) if tma else w, w, y2 if bias is None else bias,
        y2 if gain is None else gain, y2 if res2 is None else res2, y2, part, counters, rows, n, k,
        k_per_split, x2.stride(0), w.stride(0), 0 if res2 is None else res2.stride(0), y2.stride(0),
        float(eps), **constants, num_warps=p.num_warps, num_stages=p.num_stages, **pdl_options(pdl),
    )  # fmt: skip


def swap_constants(p: GemvParams, split: int, norm: bool, bias: bool, residual: bool, glu: bool, tma: bool,
                   pdl: bool, fp32: bool, rows: int = 16) -> dict:  # fmt: skip
    """`_swap_kernel`'s constexprs but USE_PDL (`pdl_options`) for launch `p` in `split` splits (as
    `swap_split` counts them) on `rows` rows, the neighbours fused as the flags say, the weight through TMA
    where `tma`, launched with PDL where `pdl` (the prefetch needs both), float32 products where `fp32`; the
    rows padded to 16 (the output's 8 with `narrow_merge`, a split and at most 8 rows)."""
    out_rows = 8 if p.narrow_merge and split > 1 and rows <= 8 else 16
    return dict(ROWS=16, BLOCK_N=p.block_n, BLOCK_K=p.block_k, SPLIT_K=split, NORM=norm, HAS_BIAS=bias,
                HAS_RES=residual, GLU=glu, USE_TMA=tma, FP32_DOT=fp32, EARLY=p.early,
                PREFETCH=p.prefetch and pdl and tma, OUT_ROWS=out_rows,
                RMS_K=p.rms_block if p.rms_block != p.block_k else 0)  # fmt: skip


_WORKSPACES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _swap_workspace(device, tiles: int, split: int, block_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A split product's float32 partials (`[tiles, split, 2, 16, block_n]`, gate and up) and its counters
    (`[tiles]`, zero between calls: the last program of a tile resets its own), one pair per stream and
    shape: calls on one stream run one after another (a CUDA graph keeps the pair of the stream it was
    captured on)."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream, tiles, split, block_n)
    if key not in _WORKSPACES:
        _WORKSPACES[key] = (torch.empty(tiles * split * 2 * 16 * block_n, dtype=torch.float32, device=device),
                            torch.zeros(tiles, dtype=torch.int32, device=device))  # fmt: skip
    return _WORKSPACES[key]


@torch.library.custom_op("attnforge::fused_linear", mutates_args=())
def _linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gain: torch.Tensor | None,
               eps: float, residual: torch.Tensor | None, scales: torch.Tensor | None,
               zeros: torch.Tensor | None, bits: int, group_size: int,
               glu: bool) -> torch.Tensor:  # fmt: skip
    """The kernel as an op; `weight` is the packed codes where `scales` are given (`bits`, `group_size`)."""
    if scales is not None and zeros is not None:
        weight = PackedWeight(weight, scales, zeros, bits, group_size)
    out = x.new_empty(*x.shape[:-1], weight.shape[0] // 2 if glu else weight.shape[0])
    launch_linear(x, weight, bias, gain, eps, residual, out, glu=glu)
    return out


@_linear_op.register_fake
def _(x, weight, bias, gain, eps, residual, scales, zeros, bits, group_size, glu):
    return x.new_empty(*x.shape[:-1], weight.shape[0] // 2 if glu else weight.shape[0])


def fused_linear(
    x: torch.Tensor,
    weight: torch.Tensor | PackedWeight,
    bias: torch.Tensor | None = None,
    *,
    norm: tuple[torch.Tensor, float] | None = None,
    residual: torch.Tensor | None = None,
    glu: bool = False,
    params: GemvParams | None = None,
) -> torch.Tensor:
    """`[..., K] -> [..., N]`: `residual + linear(prologue(x), weight, bias)` for at most MAX_ROWS rows.

    Args:
        x: `[..., K]`, at most MAX_ROWS rows in all.
        weight: `[N, K]` (an nn.Linear's weight), or a PackedWeight (4/5/8-bit codes read as they are:
            `scale * (x . (q - zero))` per group in float32, no dequantized weight); bias: `[N]` or None.
        norm: `(gain [K], eps)`: x goes through RMSNorm first (transformers' Llama/Qwen rounding).
        residual: `[..., N]` (`[..., N / 2]` with glu) added to the output (rounded as a separate add would
            be), or None.
        glu: the weight is `[gate; up]` (the model's fused gate_up, N = 2 * intermediate): the output is
            `[..., N / 2]` = `silu(gate product) * up product`, each rounded as torch's ops would (down's
            input).
        params: launch parameters (default: `default_params` by shape); eager calls only.
    """
    gain, eps = norm if norm is not None else (None, 0.0)
    _check(x, weight, bias, gain, residual, glu)
    if torch.compiler.is_compiling():
        if params is not None:
            raise ValueError("params cannot be passed under torch.compile (the op uses default_params)")
        if isinstance(weight, PackedWeight):
            return _linear_op(x, weight.codes, bias, gain, float(eps), residual, weight.scales,
                              weight.zeros, weight.bits, weight.group_size, glu)  # fmt: skip
        return _linear_op(x, weight, bias, gain, float(eps), residual, None, None, 16, 1, glu)
    out = x.new_empty(*x.shape[:-1], weight.shape[0] // 2 if glu else weight.shape[0])
    launch_linear(x, weight, bias, gain, eps, residual, out, params, glu)
    return out
