"""kernels/gemv.py: the skinny linear with fused neighbours, against float64 and torch's own ops.

On a GPU the kernel rounds as torch does (round to nearest even), so most outputs equal torch's ops bit for
bit; the Triton interpreter truncates when it narrows to 16 bits, so on CPU the checks are relative errors.
"""

import pytest
import sm90_child
import torch
import torch.nn.functional as F

from attnforge.accel.quant.linear import dequantize_weight, quantize_weight
from attnforge.kernels import gemv
from attnforge.kernels.gemv import MAX_ROWS, GemvParams, PackedWeight, fused_linear

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def _rms(x, gain, eps):
    xf = x.float()
    return gain * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _case(rows, n, k, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=gen).to(DEVICE, dtype)  # noqa: E731
    x = make(rows, k)
    return (
        x,
        make(n, k) / k**0.5,
        make(n),
        torch.rand(k, generator=gen).add(0.5).to(DEVICE, dtype),
        make(rows, n),
    )


def _rel(y, ref):
    assert torch.isfinite(y).all()
    return ((y.double() - ref).norm() / ref.norm()).item()


SIZES = [(1, 64, 64), (1, 40, 72), (3, 33, 100), (8, 128, 48), (16, 17, 200)]


@pytest.mark.parametrize("rows,n,k", SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plain_and_bias_match_float64(rows, n, k, dtype):
    x, w, b, _, _ = _case(rows, n, k, dtype, seed=rows + n)
    assert _rel(fused_linear(x, w), F.linear(x.double(), w.double())) < TOL[dtype]
    assert _rel(fused_linear(x, w, b), F.linear(x.double(), w.double(), b.double())) < TOL[dtype]


@pytest.mark.parametrize("rows,n,k", SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_and_residual_match_torchs_ops(rows, n, k, dtype):
    x, w, _, gain, res = _case(rows, n, k, dtype, seed=7 * rows + k)
    y = fused_linear(x, w, norm=(gain, 1e-6), residual=res)
    ref = res.double() + F.linear(_rms(x, gain, 1e-6).double(), w.double())
    assert _rel(y, ref) < TOL[dtype]


def _glu_ref(x, w, b=None, prologue=lambda x: x):
    """silu(gate) * up of the fused gate_up product `[gate; up]`, in float64 after the prologue."""
    gate, up = F.linear(prologue(x).double(), w.double(), None if b is None else b.double()).chunk(2, dim=-1)
    return F.silu(gate) * up


@pytest.mark.parametrize("rows,n,k", [(1, 64, 64), (1, 74, 72), (3, 34, 100), (16, 18, 200)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_glu_output_is_silu_gate_times_up_of_the_two_halves(rows, n, k, dtype):
    """glu=True: weight `[gate; up]` (N rows, N / 2 outputs, odd halves included) with the norm before.
    Five roundings to bf16 (the norm's two, the products, silu, the multiply): on the CPU the interpreter
    truncates at each (2.3% at worst here against torch's 0.4%), hence twice the tolerance."""
    tol = TOL[dtype] * (2 if dtype == torch.bfloat16 else 1)
    x, w, b, gain, res = _case(rows, n, k, dtype, seed=rows + 3 * n)
    y = fused_linear(x, w, b, norm=(gain, 1e-6), glu=True)
    assert y.shape == (rows, n // 2)
    assert _rel(y, _glu_ref(x, w, b, lambda x: _rms(x, gain, 1e-6))) < tol
    y = fused_linear(x, w, glu=True, residual=res[:, : n // 2], params=GemvParams(2, 32, 1))
    assert _rel(y, res[:, : n // 2].double() + _glu_ref(x, w)) < tol


@pytest.mark.parametrize("bits", [4, 8])
def test_glu_over_packed_weights_and_on_the_tensor_cores(bits):
    x, w, _, gain, _ = _case(2, 48, 64, torch.float32, seed=bits)
    packed, dense = _packed(w, bits, 32)
    assert _rel(fused_linear(x, packed, glu=True), _glu_ref(x, dense)) < 1e-5
    y = fused_linear(x, w, norm=(gain, 1e-6), glu=True, params=GemvParams(16, 32, 4, dot=True))
    assert _rel(y, _glu_ref(x, w, prologue=lambda x: _rms(x, gain, 1e-6))) < 1e-5


def test_glu_under_torch_compile_equals_eager():
    x, w, b, gain, _ = _case(1, 32, 64, torch.float32, seed=21)
    compiled = torch.compile(lambda x: fused_linear(x, w, b, norm=(gain, 1e-6), glu=True), fullgraph=True)
    assert torch.equal(compiled(x), fused_linear(x, w, b, norm=(gain, 1e-6), glu=True))


def test_leading_dims_are_kept_and_strided_input_is_read_in_place():
    x, w, _, gain, _ = _case(4, 24, 32, torch.float32, seed=3)
    wide = torch.cat([x, x], dim=-1)[:, :32]  # rows 64 apart: a strided view, last dim contiguous
    y = fused_linear(wide.view(2, 2, 32), w, norm=(gain, 1e-5))
    assert y.shape == (2, 2, 24)
    ref = F.linear(_rms(x, gain, 1e-5).double(), w.double()).view(2, 2, 24)
    assert _rel(y, ref) < 1e-5


@pytest.mark.parametrize(
    "params",
    [GemvParams(4, 16, 1), GemvParams(16, 64, 2), GemvParams(32, 256, 4), GemvParams(4, 16, 1, ahead=True),
     GemvParams(16, 32, 4, dot=True, ahead=True), GemvParams(8, 64, 8, ahead=True)],
)  # fmt: skip
def test_launch_parameters_do_not_change_the_result(params):
    x, w, b, _, res = _case(2, 50, 90, torch.float32, seed=5)
    y = fused_linear(x, w, b, residual=res, params=params)
    assert _rel(y, res.double() + F.linear(x.double(), w.double(), b.double())) < 1e-5


@pytest.mark.parametrize(("rows", "n", "k"), [(1, 40, 70), (3, 33, 100), (8, 64, 96), (16, 20, 48)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_tensor_core_product_matches_float64(rows, n, k, dtype):
    """GemvParams(dot=True): the rows padded to 16 times each slice in one tl.dot, with every neighbour."""
    x, w, b, gain, res = _case(rows, n, k, dtype, seed=rows + n)
    y = fused_linear(x, w, b, norm=(gain, 1e-6), residual=res, params=GemvParams(16, 32, 4, dot=True))
    ref = res.double() + F.linear(_rms(x, gain, 1e-6).double(), w.double(), b.double())
    assert _rel(y, ref) < TOL[dtype]


def _swap_counters_are_zero():
    return all(not counters.any() for _, counters in gemv._WORKSPACES.values())


@pytest.mark.parametrize(("rows", "n", "k"), [(1, 40, 70), (3, 130, 100), (8, 64, 96), (16, 20, 200)])
@pytest.mark.parametrize("split_k", [1, 2, 3])
@pytest.mark.parametrize(("block_n", "early", "prefetch"), [(64, False, False), (128, False, False),
                                                          (64, True, False), (16, False, False),
                                                          (32, True, False), (64, False, True),
                                                          (128, True, True)])  # fmt: skip
def test_the_swapped_product_matches_float64(rows, n, k, split_k, block_n, early, prefetch):
    """GemvParams(swap=True): `y^T = W x^T` in tiles of block_n weight rows, K split over split_k programs
    (partials summed by the last; with `early` each split's first slice read apart, before the PDL wait;
    `prefetch` asks the L2 for each program's share first, on a GPU where TMA reads the weight), with every
    neighbour; odd sizes; twice, the counters back to zero."""
    x, w, b, gain, res = _case(rows, n, k, torch.bfloat16, seed=rows + n + split_k)
    params = GemvParams(block_n, 32, 4, swap=True, split_k=split_k, early=early, prefetch=prefetch)
    ref = res.double() + F.linear(_rms(x, gain, 1e-6).double(), w.double(), b.double())
    for _ in range(2):
        y = fused_linear(x, w, b, norm=(gain, 1e-6), residual=res, params=params)
        assert y.shape == (rows, n) and _rel(y, ref) < TOL[torch.bfloat16]
        assert _swap_counters_are_zero()


@pytest.mark.parametrize(("rows", "n", "k", "split_k"), [(3, 70, 100, 1), (8, 130, 96, 3)])
def test_the_early_swapped_product_without_neighbours(rows, n, k, split_k):
    """`early` with no bias, norm or residual (the residual is read early only when there is one)."""
    x, w, _, _, _ = _case(rows, n, k, torch.bfloat16, seed=rows + k)
    y = fused_linear(x, w, params=GemvParams(64, 32, 4, swap=True, split_k=split_k, early=True))
    assert y.shape == (rows, n) and _rel(y, F.linear(x.double(), w.double())) < TOL[torch.bfloat16]
    assert _swap_counters_are_zero()


@pytest.mark.parametrize(("rows", "n", "k", "split_k"), [(2, 74, 72, 1), (8, 130, 96, 3), (16, 18, 200, 2)])
@pytest.mark.parametrize(("block_n", "early", "prefetch"), [(64, False, False), (64, True, True),
                                                          (32, True, False)])  # fmt: skip
def test_the_swapped_product_with_glu(rows, n, k, split_k, block_n, early, prefetch):
    """glu with the swap: a gate tile and an up tile a slice (odd halves, the up rows past a tile's gate
    rows), bias on both, silu(gate) * up plus the residual; twice bf16's tolerance as the glu test above."""
    x, w, b, gain, res = _case(rows, n, k, torch.bfloat16, seed=n + k)
    params = GemvParams(block_n, 32, 4, swap=True, split_k=split_k, early=early, prefetch=prefetch)
    y = fused_linear(x, w, b, norm=(gain, 1e-6), residual=res[:, : n // 2], glu=True, params=params)
    ref = res[:, : n // 2].double() + _glu_ref(x, w, b, lambda x: _rms(x, gain, 1e-6))
    assert y.shape == (rows, n // 2) and _rel(y, ref) < 2 * TOL[torch.bfloat16]
    assert _swap_counters_are_zero()


@pytest.mark.parametrize(("rows", "n", "k", "split_k"), [(1, 40, 70, 2), (5, 130, 100, 3), (8, 64, 256, 8),
                                                    (12, 70, 96, 3)])  # fmt: skip
@pytest.mark.parametrize(("glu", "early"), [(False, False), (False, True), (True, False), (True, True)])
def test_the_swapped_product_with_a_narrow_merge_matches_float64(rows, n, k, split_k, glu, early):
    """`narrow_merge`: partials, residual and the last program's sum (a tree) of the 8 real rows where there
    are at most 8 (12 rows keep the 16-row merge), with every neighbour; twice, the counters back to zero."""
    x, w, b, gain, res = _case(rows, n, k, torch.bfloat16, seed=rows + n + split_k)
    params = GemvParams(64, 32, 4, swap=True, split_k=split_k, early=early, narrow_merge=True)
    out = n // 2 if glu else n
    if glu:
        ref = res[:, :out].double() + _glu_ref(x, w, b, lambda x: _rms(x, gain, 1e-6))
    else:
        ref = res.double() + F.linear(_rms(x, gain, 1e-6).double(), w.double(), b.double())
    for _ in range(2):
        y = fused_linear(x, w, b, norm=(gain, 1e-6), residual=res[:, :out], glu=glu, params=params)
        assert y.shape == (rows, out) and _rel(y, ref) < (2 if glu else 1) * TOL[torch.bfloat16]
        assert _swap_counters_are_zero()


@pytest.mark.parametrize(("rows", "n", "k", "rms_block"), [(3, 70, 300, 128), (8, 64, 1024, 1024),
                                                      (16, 40, 200, 256), (5, 96, 96, 512)])  # fmt: skip
@pytest.mark.parametrize("glu", [False, True])
def test_the_swapped_products_norm_in_wider_slices_matches_float64(rows, n, k, rms_block, glu):
    """`rms_block`: the fused RMSNorm's pass over the rows in slices of its own (wider than the product's 32,
    odd K, K below one slice), with every neighbour."""
    x, w, b, gain, res = _case(rows, n, k, torch.bfloat16, seed=rows + k)
    params = GemvParams(64, 32, 4, swap=True, split_k=2, rms_block=rms_block)
    out = n // 2 if glu else n
    if glu:
        ref = res[:, :out].double() + _glu_ref(x, w, b, lambda x: _rms(x, gain, 1e-6))
    else:
        ref = res.double() + F.linear(_rms(x, gain, 1e-6).double(), w.double(), b.double())
    y = fused_linear(x, w, b, norm=(gain, 1e-6), residual=res[:, :out], glu=glu, params=params)
    assert y.shape == (rows, out) and _rel(y, ref) < (2 if glu else 1) * TOL[torch.bfloat16]


def test_a_narrow_merge_holds_eight_rows_where_there_are_split_partials_of_at_most_eight():
    p = GemvParams(64, 256, 4, swap=True, split_k=8, narrow_merge=True)
    constants = [gemv.swap_constants(q, split, False, False, True, False, True, True, False, rows)["OUT_ROWS"]
                 for q, split, rows in ((p, 8, 8), (p, 8, 1), (p, 1, 8), (p, 8, 9),
                                        (GemvParams(64, 256, 4, swap=True, split_k=8), 8, 8))]  # fmt: skip
    assert constants == [8, 8, 16, 16, 16]


@pytest.mark.skipif(DEVICE != "cuda", reason="the defaults of a GPU (the interpreter's are one wide set)")
@pytest.mark.parametrize(("n", "k", "glu"), [(4096, 1024, False), (1024, 3072, False), (6144, 1024, True),
                                             (6144, 4096, False), (4096, 14336, False)])  # fmt: skip
@pytest.mark.parametrize("rows", [2, 8, 16])
def test_model_sized_products_of_several_rows_by_default(n, k, glu, rows):
    """Qwen3-0.6B's and Llama-3-8B's products at several rows with the default launch (on a Hopper GPU
    the swapped product through TMA, K split), neighbours fused, against float64."""
    x, w, _, gain, res = _case(rows, n, k, torch.bfloat16, seed=n + rows)
    out = n // 2 if glu else n
    y = fused_linear(x, w, norm=(gain, 1e-6), residual=res[:, :out], glu=glu)
    product = (lambda x: _glu_ref(x, w)) if glu else (lambda x: F.linear(x.double(), w.double()))
    ref = res[:, :out].double() + product(_rms(x, gain, 1e-6))
    assert _rel(y, ref) < TOL[torch.bfloat16] and _swap_counters_are_zero()


@pytest.mark.parametrize(("rows", "k"), [(1, 1500), (1, 2048), (3, 1000)])
def test_one_slice_wider_than_k_reads_every_row_whole(rows, k):
    """A slice of 4096 columns (the default for one row against few outputs): K under it is masked, with the
    norm before (its mean over the whole row) and the residual after."""
    x, w, _, gain, res = _case(rows, 40, k, torch.float32, seed=k)
    y = fused_linear(x, w, norm=(gain, 1e-5), residual=res, params=GemvParams(4, 4096, 8))
    assert _rel(y, res.double() + F.linear(_rms(x, gain, 1e-5).double(), w.double())) < 1e-5


@pytest.mark.parametrize(
    ("rows", "n", "k", "bits", "expected"),
    [
        (1, 1024, 2048, 16, GemvParams(4, 2048, 4)),  # Qwen3-0.6B's o: one slice
        (1, 1024, 3072, 16, GemvParams(4, 4096, 8)),  # its down
        (1, 1024, 1024, 16, GemvParams(4, 1024, 4)),  # one slice already
        (1, 6144, 4096, 16, GemvParams(4, 2048, 8, ahead=True)),  # Llama-3-8B q/k/v: read ahead
        (1, 4096, 14336, 16, GemvParams(8, 2048, 8, ahead=True)),  # its down: 8 columns a program
        (1, 1024, 14336, 16, GemvParams(4, 2048, 8, ahead=True)),  # too wide for one slice
        (1, 6144, 1024, 16, GemvParams(16, 1024, 4)),  # Qwen3-0.6B's gate/up: 16 columns a program
        (1, 4096, 1024, 16, GemvParams(4, 1024, 4)),  # its q/k/v
        (1, 151936, 1024, 16, GemvParams(4, 1024, 4)),  # its LM head
        (1, 1024, 2048, 8, GemvParams(8, 2048, 4, ahead=True)),  # 8-bit codes, one row, few outputs
        (1, 6144, 4096, 8, GemvParams(8, 1024, 4, ahead=True)),  # 8-bit codes, one row, many outputs
        (1, 1024, 2048, 5, GemvParams(8, 1024, 4, ahead=True)),
        (1, 1024, 2048, 4, GemvParams(4, 1024, 4)),
        (2, 1024, 2048, 8, GemvParams(4, 1024, 4)),  # several rows of codes: their own registers
        (16, 1024, 2048, 16, GemvParams(4, 512, 4)),  # more than DOT_ROWS rows
        (8, 1024, 2048, 16, GemvParams(16, 512, 4, dot=True, ahead=True)),  # 2-8 rows: the tensor cores
        (3, 4096, 1024, 16, GemvParams(16, 512, 4, dot=True, ahead=True)),
        (8, 6144, 4096, 16, GemvParams(32, 256, 4, dot=True, ahead=True)),  # more than 4096 outputs
        (8, 151936, 1024, 16, GemvParams(32, 256, 4, dot=True, ahead=True)),  # an LM head, K 1024
        (8, 28672, 4096, 16, GemvParams(32, 256, 4, dot=True)),  # Llama-3-8B's gate/up: not read ahead
    ],
)
def test_default_launch_parameters_by_shape(monkeypatch, rows, n, k, bits, expected):
    monkeypatch.setattr(gemv, "triton_interpret", lambda: False)
    assert gemv.default_params(rows, n, k, bits) == expected


@pytest.mark.parametrize(
    ("rows", "n", "k", "glu", "bits", "expected"),
    [
        (8, 4096, 1024, False, 16, GemvParams(128, 128, 8, swap=True, split_k=4, num_stages=4)),  # q/k/v
        # Qwen3-0.6B's o: 4 MiB of weight, also asked of the L2 early; Llama-3-8B's (32 MiB) not
        (8, 1024, 2048, False, 16, GemvParams(64, 256, 4, swap=True, split_k=8, early=True, prefetch=True)),
        (8, 4096, 4096, False, 16, GemvParams(64, 256, 4, swap=True, split_k=2, early=True)),
        (2, 6144, 1024, True, 16, GemvParams(64, 256, 4, swap=True)),  # its gate/up: K whole
        (16, 28672, 4096, True, 16, GemvParams(128, 128, 8, swap=True)),  # Llama-3-8B's gate/up
        (8, 6144, 4096, False, 16, GemvParams(128, 128, 8, swap=True, split_k=2, num_stages=4)),  # its q/k/v
        (8, 4096, 14336, False, 16, GemvParams(64, 256, 4, swap=True, split_k=2, early=True)),  # its down
        (8, 151936, 1024, False, 16, GemvParams(32, 256, 4, dot=True, ahead=True)),  # an LM head: no swap
        (1, 4096, 1024, False, 16, GemvParams(4, 1024, 4)),  # one row: no swap
        (8, 1024, 2048, False, 8, GemvParams(4, 1024, 4)),  # packed codes: no swap
    ],
)
def test_weights_read_through_tma_take_the_swapped_product(monkeypatch, rows, n, k, glu, bits, expected):
    monkeypatch.setattr(gemv, "triton_interpret", lambda: False)
    assert gemv.default_params(rows, n, k, bits, glu=glu, tma=True, sms=132) == expected


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (6144, GemvParams(64, 256, 4, swap=True, early=True)),
        (28672, GemvParams(128, 128, 8, swap=True, early=True)),
    ],
)
def test_the_swapped_glu_sets_read_their_first_slice_early_beside_the_norm(monkeypatch, n, expected):
    """Beside the fused RMSNorm the rows are not staged in shared memory, which leaves room for early's slice
    (without it the glu sets would need 279-295 KB of the 227 KB there are)."""
    monkeypatch.setattr(gemv, "triton_interpret", lambda: False)
    assert gemv.default_params(8, n, 1024, glu=True, norm=True, tma=True, sms=132) == expected
    assert gemv.default_params(8, n, 1024, 16, glu=True, norm=False, tma=True, sms=132).early is False
    assert gemv.default_params(8, 1024, 2048, norm=True, tma=True, sms=132).early  # the others either way


# A child process compiles the swapped kernel for sm_90 (no GPU; Triton's ahead-of-time path cannot take the
# interpreter's functions): each case's launch `default_params` gives at 8 rows, `early` forced where given
_SM90_CHILD = """
import dataclasses, json, sys
from attnforge.kernels import gemv, offline
shared = []
for n, k, glu, norm, early in json.loads(sys.argv[1]):
    p = gemv.default_params(8, n, k, glu=glu, norm=norm, tma=True, sms=132)
    if early == "narrow":
        p = dataclasses.replace(p, narrow_merge=True)
    elif early == "rms-1024":
        p = dataclasses.replace(p, rms_block=1024)
    elif early is not None:
        p = dataclasses.replace(p, early=early)
    shared.append(offline.swap_kernel_sm90(n, k, p, glu, norm, residual=not (norm or glu)).metadata.shared)
print(json.dumps(shared))
"""
_SM90_CASES = [  # (weight rows, K, glu, norm, early, or "narrow" / "rms-1024"): each family of default sets
    (4096, 1024, False, True, None),  # Qwen3-0.6B's q/k/v: 128 x 128, 4 stages
    (6144, 4096, False, True, None),  # Llama-3-8B's q/k/v: 128 x 128 above 4096 outputs
    (1024, 2048, False, False, None),  # Qwen3-0.6B's o: 64 x 256, early, prefetch
    (4096, 14336, False, False, None),  # Llama-3-8B's down: 64 x 256, early
    (6144, 1024, True, True, None),  # Qwen3-0.6B's gate/up beside its norm: early
    (6144, 1024, True, False, None),  # the same set without a norm: not early
    (28672, 4096, True, True, None),  # Llama-3-8B's gate/up, 128 x 128
    (28672, 4096, True, False, None),
    (6144, 1024, True, False, True),  # early forced without the norm: too much (the check can fail)
    (1024, 2048, False, False, "narrow"),  # Qwen3-0.6B's o with the narrow merge (8 splits)
    (4096, 1024, False, True, "narrow"),  # its q/k/v so (4 splits)
    (6144, 1024, True, True, "rms-1024"),  # its gate/up, the norm's pass in one 1024-wide slice
]


@pytest.fixture(scope="module")
def sm90_shared() -> list[int]:
    """Shared memory a program of each `_SM90_CASES` launch takes, compiled for sm_90 in a child process."""
    return sm90_child.run(_SM90_CHILD, _SM90_CASES)


def test_the_swapped_default_launches_fit_hoppers_shared_memory(sm90_shared):
    """Each default set of the swapped product, compiled for sm_90 here, within the 227 KB a program may take
    (the glu sets reading early without a norm took 295 KB and failed on the H100 first)."""
    from attnforge.kernels.offline import HOPPER_SHARED_BYTES

    for case, shared in zip(_SM90_CASES, sm90_shared, strict=True):
        assert (shared <= HOPPER_SHARED_BYTES) == (case[-1] in (None, "narrow", "rms-1024")), (case, shared)


def test_fast_rows_are_the_swapped_products_where_it_runs(monkeypatch):
    monkeypatch.setattr(gemv, "tma_capable", lambda device, dtype: dtype == torch.bfloat16)
    assert gemv.fast_rows(torch.device("cpu"), torch.bfloat16) == gemv.SWAP_FAST_ROWS == 8
    assert gemv.fast_rows(torch.device("cpu"), torch.float32) == gemv.FAST_ROWS == 1


@pytest.mark.parametrize(
    ("dtype", "rows", "dot"),
    [
        (torch.bfloat16, 8, True),
        (torch.float16, 2, True),
        (torch.float32, 8, False),
        (torch.bfloat16, 9, False),
    ],
)
def test_several_rows_take_the_tensor_cores_in_16_bit_dtypes_only(monkeypatch, dtype, rows, dot):
    """2 to DOT_ROWS rows of float16/bfloat16: the tensor-core product; float32 keeps the plain loop (its
    full-precision dot is emulated), more rows their own registers."""
    monkeypatch.setattr(gemv, "triton_interpret", lambda: False)
    assert gemv.default_params(rows, 1024, 2048, 16, dtype).dot == dot


@pytest.mark.parametrize("pdl", [True, False])
def test_the_pdl_parameter_decides_the_launch_where_the_gpu_has_it(monkeypatch, pdl):
    """GemvParams.pdl: on a GPU with programmatic dependent launch (faked here), the kernel is launched with
    it (and waits for its predecessor) only when asked."""

    launches = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **options: launches.append(options)

    monkeypatch.setattr(gemv, "pdl_supported", lambda device: True)
    monkeypatch.setattr(gemv, "_gemv_kernel", Recorder())
    x, w, *_ = _case(1, 8, 64, torch.float32, seed=15)
    fused_linear(x, w, params=GemvParams(4, 64, 4, pdl=pdl))
    assert launches[0]["USE_PDL"] is pdl and launches[0].get("launch_pdl", False) is pdl


def test_fresh_inputs_give_fresh_outputs():
    first, second = _case(1, 32, 64, torch.float32, seed=1), _case(1, 32, 64, torch.float32, seed=2)
    for x, w, *_ in (first, second):
        assert _rel(fused_linear(x, w), F.linear(x.double(), w.double())) < 1e-5


BAD = [
    (lambda x, w: fused_linear(x.int(), w), "x has dtype torch.int32"),
    (lambda x, w: fused_linear(x, w[0]), "weight must be [out_features, in_features]"),
    (lambda x, w: fused_linear(x[:, :8], w), "x's last dim 8 must be in_features = 16"),
    (lambda x, w: fused_linear(x.expand(MAX_ROWS + 1, 16), w), f"at most {MAX_ROWS} rows"),
    (lambda x, w: fused_linear(x, w.double()), "weight is torch.float64"),
    (lambda x, w: fused_linear(x, w, torch.zeros(3, device=x.device)), "bias must have shape (8,)"),
    (
        lambda x, w: fused_linear(x, w, norm=(torch.ones(5, device=x.device), 1e-6)),
        "norm gain must have shape (16,)",
    ),
    (
        lambda x, w: fused_linear(x, w, residual=torch.zeros(1, 9, device=x.device)),
        "residual must have shape (1, 8)",
    ),
    (lambda x, w: fused_linear(x, w[:7], glu=True), "glu=True needs the weight's rows to be [gate; up] (an "
                                                    "even count), got 7"),
    (lambda x, w: fused_linear(x, w, glu=True, residual=torch.zeros(1, 8, device=x.device)),
     "residual must have shape (1, 4)"),
    (lambda x, w: fused_linear(x, w, glu=True, params=GemvParams(1, 16, 1)), "glu=True needs block_n >= 2"),
]  # fmt: skip


@pytest.mark.parametrize("call,message", BAD)
def test_bad_input_is_refused_with_the_reason(call, message):
    x, w = torch.randn(1, 16, device=DEVICE), torch.randn(8, 16, device=DEVICE)
    with pytest.raises(ValueError) as error:
        call(x, w)
    assert message in str(error.value)


ONLY_SWAP = (
    "early, prefetch, narrow_merge, rms_block, split_k and num_stages are the swapped product's (swap=True)"
)


@pytest.mark.parametrize("field,value,message", [("block_n", 3, "block_n=3 must be a power of two"),
                                                 ("block_k", 0, "block_k=0 must be a power of two"),
                                                 ("num_warps", 3, "num_warps=3 must be one of"),
                                                 ("dot", True, "dot=True needs block_n and block_k >= 16 "
                                                  "(tensor-core tiles), got 8 and 64"),
                                                 ("swap", True, "swap=True needs block_n 16, 32, 64 or 128 "
                                                  "and block_k >= 16, got 8 and 64"),
                                                 ("split_k", 0, "split_k=0 and num_stages=3 must be >= 1"),
                                                 ("num_stages", 0, "split_k=1 and num_stages=0 must be >= 1"),
                                                 ("split_k", 2, ONLY_SWAP),
                                                 ("num_stages", 4, ONLY_SWAP),
                                                 ("swap_dot", True, "swap=True is a product of its own: dot "
                                                  "and ahead do not apply"),
                                                 ("early", True, ONLY_SWAP),
                                                 ("prefetch", True, ONLY_SWAP),
                                                 ("narrow_merge", True, ONLY_SWAP),
                                                 ("rms_block", 512, ONLY_SWAP),
                                                 ("swap_rms", 384, "rms_block=384 must be 0 (block_k) or a "
                                                  "power of two")])  # fmt: skip
def test_bad_launch_parameters_are_refused(field, value, message):
    values = {"block_n": 8, "block_k": 64, "num_warps": 4, field: value}
    if field == "swap_dot":
        values = {"block_n": 64, "block_k": 64, "num_warps": 4, "swap": True, "dot": True}
    if field == "swap_rms":
        values = {"block_n": 64, "block_k": 64, "num_warps": 4, "swap": True, "rms_block": value}
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        GemvParams(**values)


# ----------------------------------------------------------------------------------------------------------
# Weight-only quantized weights (accel.quant's format), dequantized in the kernel


def _packed(w, bits, group):
    codes, scales, zeros = quantize_weight(w, bits, group)
    dense = dequantize_weight(codes, scales, zeros, bits, group, w.shape[1])  # torch's rounding, w's dtype
    return PackedWeight(codes, scales, zeros, bits, group), dense


PACKED_SIZES = [(1, 40, 128, 32), (3, 33, 192, 64), (16, 17, 256, 128), (2, 5, 64, 32)]


@pytest.mark.parametrize("bits", [4, 5, 8])
@pytest.mark.parametrize("rows,n,k,group", PACKED_SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_weights_match_float64_over_their_dequantized_weight(bits, rows, n, k, group, dtype):
    x, w, bias, gain, res = _case(rows, n, k, dtype, seed=bits + n + k)
    packed, dense = _packed(w, bits, group)
    y = fused_linear(x, packed, bias, norm=(gain, 1e-6), residual=res)
    ref = res.double() + F.linear(_rms(x, gain, 1e-6).double(), dense.double(), bias.double())
    assert y.shape == (rows, n) and _rel(y, ref) < TOL[dtype]


@pytest.mark.parametrize(
    "params",
    [GemvParams(4, 16, 1), GemvParams(8, 64, 2), GemvParams(32, 256, 4), GemvParams(8, 32, 2, ahead=True)],
)  # fmt: skip
@pytest.mark.parametrize("bits", [5, 8])
def test_packed_slices_narrower_or_wider_than_a_group_give_the_same_result(params, bits):
    x, w, b, _, _ = _case(3, 50, 256, torch.float32, seed=11)
    packed, dense = _packed(w, bits, 64)
    assert (
        _rel(fused_linear(x, packed, b, params=params), F.linear(x.double(), dense.double(), b.double()))
        < 1e-5
    )


def test_packed_weights_under_torch_compile_equal_eager():
    x, w, b, gain, _ = _case(1, 32, 128, torch.float32, seed=12)
    packed, _ = _packed(w, 4, 32)
    compiled = torch.compile(lambda x: fused_linear(x, packed, b, norm=(gain, 1e-6)), fullgraph=True)
    assert torch.equal(compiled(x), fused_linear(x, packed, b, norm=(gain, 1e-6)))


def _packed_with(change):
    _, w, *_ = _case(1, 8, 64, torch.float32, seed=13)
    packed, _ = _packed(w, 4, 32)
    fields = {
        "codes": packed.codes,
        "scales": packed.scales,
        "zeros": packed.zeros,
        "bits": 4,
        "group_size": 32,
    }
    return PackedWeight(**{**fields, **change(fields)})


PACKED_BAD = [
    (lambda f: {"bits": 3}, "bits=3 is not supported; accepted: (4, 5, 8)"),
    (lambda f: {"codes": f["codes"].int()}, "codes must be uint8 [out, in * bits / 8]"),
    (lambda f: {"group_size": 48}, "in_features=64 is not divisible by group_size=48"),
    (lambda f: {"codes": f["codes"][0]}, "codes must be uint8 [out, in * bits / 8], got torch.uint8 (32,)"),
    (lambda f: {"zeros": f["zeros"].float()}, "scales and zeros (uint8) must be (8, 2)"),
    (lambda f: {"scales": f["scales"][:, :1]}, "scales and zeros (uint8) must be (8, 2), got (8, 1)"),
    (lambda f: {"scales": f["scales"].double()}, "scales are torch.float64"),
    (lambda f: {"codes": f["codes"].t().contiguous().t()}, "contiguous in their last dim"),
]


def test_packed_weights_need_slices_of_whole_code_bytes():
    x, w, *_ = _case(1, 8, 64, torch.float32, seed=14)
    packed, _ = _packed(w, 4, 32)
    message = "packed weights need block_k >= 16 (whole bytes of codes), got 8"
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        fused_linear(x, packed, params=GemvParams(4, 8, 1))
    with pytest.raises(ValueError, match="dot=True multiplies weights as stored; packed weights take the"):
        fused_linear(x, packed, params=GemvParams(16, 32, 4, dot=True))
    with pytest.raises(ValueError, match="swap=True multiplies weights as stored; packed weights take the"):
        fused_linear(x, packed, params=GemvParams(64, 32, 4, swap=True))


def test_the_swapped_product_takes_16_bit_weights_only():
    x, w, *_ = _case(2, 8, 64, torch.float32, seed=16)
    with pytest.raises(ValueError, match=r"swap=True multiplies 16-bit weights \(float16, bfloat16\), got "
                                         "torch.float32"):  # fmt: skip
        fused_linear(x, w, params=GemvParams(64, 32, 4, swap=True))


@pytest.mark.parametrize("bits", [4, 5, 8])
def test_packed_codes_are_read_as_words_from_any_view(bits):
    x, w, b, _, _ = _case(2, 24, 128, torch.float32, seed=15)
    packed, dense = _packed(w, bits, 32)
    width = packed.codes.shape[1]
    wider = torch.zeros(24, width + 3, dtype=torch.uint8, device=DEVICE)
    wider[:, 3:] = packed.codes  # rows width + 3 bytes apart, starting 3 bytes in: not 32-bit aligned
    view = PackedWeight(wider[:, 3:], packed.scales, packed.zeros, bits, 32)
    assert torch.equal(fused_linear(x, view, b), fused_linear(x, packed, b))
    assert _rel(fused_linear(x, view, b), F.linear(x.double(), dense.double(), b.double())) < 1e-5


@pytest.mark.parametrize(("bits", "k", "multiple"), [(8, 6, 4), (4, 12, 8), (5, 16, 32)])
def test_packed_codes_need_whole_words_per_row(bits, k, multiple):
    codes = torch.zeros(4, k * bits // 8, dtype=torch.uint8, device=DEVICE)
    scales = torch.ones(4, k // 2, device=DEVICE)
    zeros = torch.zeros(4, k // 2, dtype=torch.uint8, device=DEVICE)
    message = f"{bits}-bit codes are read as 32-bit words: in_features={k} must be a multiple of {multiple}"
    with pytest.raises(ValueError, match=message):
        fused_linear(torch.randn(1, k, device=DEVICE), PackedWeight(codes, scales, zeros, bits, 2))


@pytest.mark.parametrize("change,message", PACKED_BAD)
def test_bad_packed_weights_are_refused_with_the_reason(change, message):
    x = torch.randn(1, 64, device=DEVICE)
    with pytest.raises(ValueError) as error:
        fused_linear(x, _packed_with(change))
    assert message in str(error.value)


@pytest.mark.skipif(DEVICE != "cuda", reason="bit-level rounding: the interpreter truncates, GPUs round")
def test_on_a_gpu_the_prologues_round_as_torchs_ops():
    k = 256
    eye = torch.eye(k, device=DEVICE, dtype=torch.bfloat16)
    x, _, _, gain, _ = _case(4, k, k, torch.bfloat16, seed=11)
    normed = fused_linear(x, eye, norm=(gain, 1e-6))
    assert (normed != _rms(x, gain, 1e-6)).float().mean() < 0.01
    glu = fused_linear(x, torch.cat([eye, eye]), glu=True)  # silu(x) * x, rounded as torch's ops
    assert (glu != F.silu(x) * x).float().mean() < 0.01
