"""prefill_attention against the float64 oracle (CPU, TRITON_INTERPRET=1, small shapes): the protocol cases,
odd sizes, every head_dim and dtype, GQA/MQA/MHA, chunked prefill, padding, masks, and each input error."""

import contextvars
import dataclasses
import functools
import math

import pytest
import torch
import triton

from attnforge import verify
from attnforge.config import AttentionConfig
from attnforge.kernels import prefill as prefill_mod
from attnforge.kernels.prefill import prefill_attention
from attnforge.verify import check

# Calls of sizes (B, Hq, Hkv, Lq, Lkv, D), float32 and not causal unless said otherwise.
config_of = functools.partial(AttentionConfig.from_sizes, dtype=torch.float32, causal=False)

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# CPU through the interpreter (CI); the same tests on a GPU where there is one.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _assert_passes(case, fn=prefill_attention):
    report = check(fn, case)
    assert report.passed, str(report)


@pytest.mark.parametrize(
    "shape",
    [
        config_of(2, 4, 2, 65, 65, 64),  # GQA, odd length past one 64-row block
        config_of(1, 3, 1, 7, 63, 96),  # MQA, chunk of 7 against a cache
        config_of(2, 2, 2, 1, 1, 80),  # MHA, a single token
    ],
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_protocol_cases_causal(shape, dtype):
    for case in verify.protocol_cases(dataclasses.replace(shape, dtype=dtype, causal=True), device=DEVICE):
        _assert_passes(case)


@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
def test_every_head_dim(head_dim):
    for causal in (True, False):
        case = verify.random_case(
            config_of(1, 2, 1, 33, 70, head_dim, dtype=torch.bfloat16, causal=causal), device=DEVICE
        )
        _assert_passes(case)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_non_causal_and_poisoned_padding(dtype):
    for case in verify.protocol_cases(
        config_of(2, 4, 1, 9, 130, 64, dtype=dtype, causal=False),
        device=DEVICE,
        kinds=("random", "needle", "poisoned"),
    ):
        _assert_passes(case)


@pytest.mark.parametrize("block", [(32, 32), (64, 32), (32, 64)])
def test_block_boundaries_with_other_tiles(block, monkeypatch):
    """Diagonal and full blocks split differently for other tile shapes (as the tuning table may pick)."""
    params = {"BLOCK_M": block[0], "BLOCK_N": block[1], "num_warps": 4, "num_stages": 2}
    monkeypatch.setattr(prefill_mod, "launch_params", lambda q, k, **_: params)
    for shape in (config_of(1, 2, 1, 65, 65, 64), config_of(2, 2, 2, 31, 97, 64)):
        kinds = ("needle", "poisoned")
        for case in verify.protocol_cases(
            dataclasses.replace(shape, dtype=torch.float16, causal=True), device=DEVICE, kinds=kinds
        ):
            _assert_passes(case)


def test_tma_load_path(monkeypatch):
    """The TMA descriptor path (chosen on Hopper GPUs by the tuning table) computes the same function; the
    interpreter runs it when the guard is lifted. Padding past kv_lens is read there and must be zeroed."""
    monkeypatch.setattr(prefill_mod, "tma_supported", lambda *tensors: True)
    params = {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2, "tma": True}
    monkeypatch.setattr(prefill_mod, "launch_params", lambda q, k, **_: params)
    for shape in (config_of(2, 4, 2, 65, 65, 64), config_of(1, 2, 1, 7, 70, 80)):
        kinds = ("random", "needle", "poisoned")
        for case in verify.protocol_cases(
            dataclasses.replace(shape, dtype=torch.float16, causal=True), device=DEVICE, kinds=kinds
        ):
            _assert_passes(case)


def test_tma_guard_rejects_unaligned_and_cpu_tensors():
    k = torch.randn(1, 2, 16, 64, dtype=torch.float16)
    assert not prefill_mod.tma_supported(k, k)
    assert not prefill_mod.warp_spec_supported(k, k, k, None, WS_PARAMS)


WS_PARAMS = {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2, "ws": True}


def _lift_warp_spec_guard(monkeypatch, params=WS_PARAMS) -> list:
    """The warp-specialized launch in the interpreter (its guard asks for a Hopper GPU): the guard keeps its
    input rules (no attn_mask, a power-of-two head_dim, rows that flatten); the calls that took it are
    recorded."""
    taken = []

    def guard(q, k, v, attn_mask, params):  # any tiles: the interpreter runs no partitions
        ok = attn_mask is None and q.shape[3] & (q.shape[3] - 1) == 0
        ok = ok and prefill_mod.rows_flatten(k) and prefill_mod.rows_flatten(v)
        taken.append(ok)
        return ok

    monkeypatch.setattr(prefill_mod, "warp_spec_supported", guard)
    monkeypatch.setattr(prefill_mod, "launch_params", lambda q, k, **_: params)
    return taken


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("sizes", [(2, 4, 2, 65, 65, 64), (1, 2, 1, 7, 70, 128), (1, 3, 3, 40, 40, 64)])
def test_warp_specialized_path(sizes, causal, monkeypatch):
    """The warp-specialized launch ("ws": one loop over every visible key block, masked throughout, Q/K/V
    through descriptors made on the device) computes the same function: odd lengths, a chunk against a cache,
    GQA/MQA/MHA, NaN/Inf past kv_lens (the K/V descriptors end there)."""
    taken = _lift_warp_spec_guard(monkeypatch)
    shape = dataclasses.replace(config_of(*sizes), dtype=torch.bfloat16, causal=causal)
    for case in verify.protocol_cases(shape, device=DEVICE, kinds=("random", "needle", "large", "poisoned")):
        _assert_passes(case)
    assert taken and all(taken)


@pytest.mark.parametrize("kv_lens", [None, [50, 31, 3]])
def test_warp_specialized_path_with_lengths(kv_lens, monkeypatch):
    """q_lens (and kv_lens) keep the warp-specialized launch: rows past q_lens[b] are 0, the others see keys
    <= kv_lens[b] - q_lens[b] + i; where kv_lens[b] < q_lens[b] the first rows see no key and are 0."""
    taken = _lift_warp_spec_guard(monkeypatch)
    case = verify.random_case(config_of(3, 4, 2, 20, 50, 64, dtype=torch.float16, causal=True), device=DEVICE)
    case.q_lens = torch.tensor([20, 5, 7], dtype=torch.int32, device=DEVICE)
    if kv_lens is not None:
        case.kv_lens = torch.tensor(kv_lens, dtype=torch.int64, device=DEVICE)
        for bi, end in enumerate(kv_lens):
            case.k[bi, :, end:] = math.nan
            case.v[bi, :, end:] = math.inf
    _assert_passes(case)
    assert taken == [True]
    if kv_lens is not None:
        out = prefill_attention(case.q, case.k, case.v, kv_lens=case.kv_lens, q_lens=case.q_lens)
        assert (
            torch.all(out[1, :, 5:] == 0) and torch.all(out[2, :, :4] == 0) and torch.all(out[2, :, 7:] == 0)
        )


SM90 = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
WS_SIZES = [(2, 32, 8, 1000, 1000, 128), (1, 16, 8, 300, 1300, 128), (2, 8, 8, 777, 777, 64)]


@pytest.mark.skipif(not SM90, reason="Triton partitions the warp-specialized launch on sm_90 GPUs only")
@pytest.mark.parametrize("sizes", WS_SIZES)
def test_warp_specialized_partitions_on_the_gpu(sizes, monkeypatch):
    """The launch `attnforge tune` tries on sm_90 (128-row tiles in two consumer warpgroups and a TMA
    producer), through the real guard: causal and not, odd lengths, a chunk, GQA and MHA, poisoned padding."""
    params = {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 4, "num_stages": 2, "ws": True}
    monkeypatch.setattr(prefill_mod, "launch_params", lambda q, k, **_: params)
    for causal in (True, False):
        shape = dataclasses.replace(config_of(*sizes), dtype=torch.bfloat16, causal=causal)
        for case in verify.protocol_cases(
            shape, device=DEVICE, kinds=("random", "needle", "large", "poisoned")
        ):
            assert prefill_mod.warp_spec_supported(case.q, case.k, case.v, None, params)
            _assert_passes(case)


@pytest.mark.skipif(not SM90, reason="Triton partitions the warp-specialized launch on sm_90 GPUs only")
@pytest.mark.parametrize("sizes", [(2, 32, 8, 4096, 4096, 128), (1, 32, 8, 512, 8192, 128)])
def test_warp_specialized_launch_repeats_bit_for_bit(sizes):
    """A producer that refills a shared-memory stage while a consumer still reads it would show as outputs
    that change from call to call: 30 calls of the same long prompt (and of a chunk against a long cache)
    give the same bits."""
    case = verify.random_case(config_of(*sizes, dtype=torch.bfloat16, causal=True), device=DEVICE)
    params = {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 4, "num_stages": 2, "ws": True}
    assert prefill_mod.warp_spec_supported(case.q, case.k, case.v, None, params)
    first = torch.empty_like(case.q)
    prefill_mod._prefill_into(case.q, case.k, case.v, first, 0.1, True, None, None, None, params)
    out = torch.empty_like(first)
    for _ in range(30):
        out.fill_(math.nan)
        prefill_mod._prefill_into(case.q, case.k, case.v, out, 0.1, True, None, None, None, params)
        assert torch.equal(out, first)
    assert torch.isfinite(first).all()


@pytest.mark.parametrize("tiles, warps", [((128, 64, 2), 4), ((128, 128, 3), 4), ((64, 128, 2), 4),
                                          ((128, 128, 2), 8)])  # fmt: skip
def test_warp_specialized_tiles_outside_the_measured_ones_are_refused(tiles, warps, monkeypatch):
    """Only the tiles measured right on the H100 (WS_TILES, 4 warps asked for) take the launch: a "ws" entry
    with others runs the heuristic's launch, whatever the call (here one the launch takes otherwise)."""
    monkeypatch.setattr(prefill_mod, "tma_supported", lambda *tensors: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    q = torch.zeros(1, 2, 256, 128, dtype=torch.bfloat16)
    measured = {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 4, "num_stages": 2, "ws": True}
    assert prefill_mod.warp_spec_supported(q, q, q, None, measured)
    params = {
        "BLOCK_M": tiles[0],
        "BLOCK_N": tiles[1],
        "num_warps": warps,
        "num_stages": tiles[2],
        "ws": True,
    }
    assert not prefill_mod.warp_spec_supported(q, q, q, None, params)


def test_rows_flatten_where_batch_and_head_strides_are_whole_rows():
    """The warp-specialized launch reads Q/K/V as rows of one 2-d tensor (one base pointer for every
    program): a contiguous tensor and a slice of a longer cache flatten; transformers' [B, L, H, D] layout
    seen as [B, H, L, D] (heads interleaved in a row) does not."""
    cache = torch.zeros(2, 4, 100, 64)
    assert prefill_mod.rows_flatten(cache) and prefill_mod.rows_flatten(cache[:, :, :37])
    assert not prefill_mod.rows_flatten(torch.zeros(2, 37, 4, 64).transpose(1, 2))
    assert not prefill_mod.rows_flatten(torch.zeros(1, 4, 1, 64).expand(3, 4, 5, 64))  # a row stride of 0


def test_warp_specialized_path_on_cache_slices_and_interleaved_heads(monkeypatch):
    """K/V slices of a longer cache take the launch (their rows start at each head's row in the buffer), and
    so does a query in transformers' layout (heads interleaved in a row: copied); K/V in that layout run the
    other launch. All right."""
    taken = _lift_warp_spec_guard(monkeypatch)
    case = verify.random_case(config_of(2, 4, 2, 21, 45, 64, dtype=torch.float16, causal=True), device=DEVICE)
    k_buf, v_buf = (
        torch.full((2, 2, 64, 64), math.nan, dtype=torch.float16, device=DEVICE) for _ in range(2)
    )
    k_buf[:, :, :45], v_buf[:, :, :45] = case.k, case.v
    case.k, case.v = k_buf[:, :, :45], v_buf[:, :, :45]
    _assert_passes(case)
    case.q = case.q.transpose(1, 2).contiguous().transpose(1, 2)
    _assert_passes(case)
    case.k, case.v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (case.k, case.v))
    _assert_passes(case)
    assert taken == [True, True, False]


def test_warp_specialized_entry_falls_back_on_what_it_cannot_take(monkeypatch):
    """A "ws" entry on a call with an attn_mask runs the heuristic's launch instead."""
    taken = _lift_warp_spec_guard(monkeypatch)
    launched = []
    monkeypatch.setattr(prefill_mod, "_prefill_kernel", _Recorder(prefill_mod._prefill_kernel, launched))
    case = verify.random_case(config_of(2, 4, 2, 20, 50, 64, dtype=torch.float16, causal=True), device=DEVICE)
    case.attn_mask = torch.rand(2, 1, 20, 50, device=DEVICE) > 0.3
    _assert_passes(case)
    assert taken == [False]
    heuristic = prefill_mod.heuristic_params(2, 4, 20, 64, torch.float16, DEVICE)
    assert launched[-1]["WARP_SPEC"] is False and launched[-1]["num_warps"] == heuristic["num_warps"]


def test_descriptor_allocator_is_set_where_none_is_and_a_callers_is_kept():
    """Descriptors made on the device need Triton's allocator: the launch sets one where the default (none)
    is in place, and leaves one the caller set."""
    from triton.runtime import _allocation

    def run():
        prefill_mod._ensure_allocator()
        assert _allocation._allocator.get() is prefill_mod._descriptor_scratch
        mine = lambda size, alignment, stream: torch.empty(size, dtype=torch.int8)
        triton.set_allocator(mine)
        prefill_mod._ensure_allocator()
        assert _allocation._allocator.get() is mine

    contextvars.Context().run(run)  # a fresh context starts from Triton's default


class _Recorder:
    """A jitted kernel whose launches' keyword arguments are recorded."""

    def __init__(self, kernel, calls: list) -> None:
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append(kwargs)
            return self.kernel[grid](*args, **kwargs)

        return launch


def test_padded_queries_and_keys_bottom_right():
    """q_lens/kv_lens: query i sees keys <= kv_lens[b] - q_lens[b] + i; rows past q_lens[b] are 0."""
    shape = config_of(3, 4, 2, 20, 50, 64)
    case = verify.random_case(dataclasses.replace(shape, causal=True, dtype=torch.float16), device=DEVICE)
    case.kv_lens = torch.tensor([50, 31, 20], dtype=torch.int32, device=DEVICE)
    case.q_lens = torch.tensor([20, 5, 0], dtype=torch.int64, device=DEVICE)
    for bi, end in enumerate(case.kv_lens.tolist()):
        case.k[bi, :, end:] = math.nan
        case.v[bi, :, end:] = math.inf
    _assert_passes(case)
    out = prefill_attention(case.q, case.k, case.v, kv_lens=case.kv_lens, q_lens=case.q_lens)
    assert torch.all(out[1, :, 5:] == 0) and torch.all(out[2] == 0)


def test_q_lens_alone_and_kv_shorter_than_queries_gives_zero_rows():
    """kv_lens[b] < q_lens[b]: the first queries see no key at all and come out 0, never NaN."""
    case = verify.random_case(config_of(2, 2, 1, 16, 16, 64, dtype=torch.float32, causal=True), device=DEVICE)
    case.q_lens = torch.tensor([16, 9], device=DEVICE)
    _assert_passes(case)
    case.kv_lens = torch.tensor([5, 16], device=DEVICE)
    _assert_passes(case)


@pytest.mark.parametrize("mask_kind", ["bool", "additive", "additive-finfo-min"])
@pytest.mark.parametrize("heads", [1, 4])
def test_attn_mask_broadcast_and_fully_masked_rows(mask_kind, heads):
    shape = config_of(2, 4, 2, 21, 70, 64)
    case = verify.random_case(dataclasses.replace(shape, dtype=torch.bfloat16, causal=True), device=DEVICE)
    keep = torch.rand(2, heads, 21, 70, device=DEVICE) > 0.4
    keep[:, :, :3] = False  # fully masked rows: 0, never NaN
    if mask_kind == "bool":
        case.attn_mask = keep
    elif mask_kind == "additive":
        case.attn_mask = torch.randn(2, heads, 21, 70, device=DEVICE).masked_fill(~keep, -math.inf)
    else:  # transformers' padding masks: finfo.min, not -inf (rows of finfo.min average uniformly)
        case.attn_mask = torch.zeros(2, heads, 21, 70, device=DEVICE).masked_fill(
            ~keep, torch.finfo(torch.float32).min
        )
    _assert_passes(case)
    out = prefill_attention(case.q, case.k, case.v, attn_mask=case.attn_mask)
    assert torch.isfinite(out).all()
    if mask_kind != "additive-finfo-min":
        assert torch.all(out[:, :, :3] == 0)


def test_attn_mask_2d_with_padding_non_causal():
    case = verify.poisoned_case(
        config_of(2, 2, 1, 8, 40, 64, dtype=torch.float16, causal=False), device=DEVICE
    )
    case.attn_mask = torch.rand(8, 40, device=DEVICE) > 0.5
    case.attn_mask[:, 0] = True
    _assert_passes(case)


def test_out_buffer_is_written_in_place():
    case = verify.strided_case(
        config_of(1, 4, 2, 17, 40, 64, dtype=torch.float16, causal=True), device=DEVICE
    )
    out = torch.full(case.q.shape, math.nan, dtype=case.q.dtype, device=DEVICE)
    result = prefill_attention(case.q, case.k, case.v, out=out, scale=0.2)
    assert result.data_ptr() == out.data_ptr()
    expected = verify.reference_attention(case.q, case.k, case.v, causal=True, scale=0.2)
    assert float(verify.relative_l2_per_slice(out, expected).max()) < 1e-2


def test_empty_query_returns_empty():
    q = torch.randn(1, 2, 0, 64)
    k = torch.randn(1, 1, 5, 64)
    assert prefill_attention(q, k, k).shape == (1, 2, 0, 64)


def test_fake_impl_traces_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 8, 33, 128, dtype=torch.bfloat16)
        k = torch.empty(2, 2, 40, 128, dtype=torch.bfloat16)
        out = prefill_attention(q, k, k, kv_lens=torch.empty(2, dtype=torch.int32))
        assert out.shape == q.shape and out.dtype == q.dtype


def test_bucket_and_heuristic():
    bucket = prefill_mod.prefill_bucket(8, 32, 2048, 2048, 128, torch.bfloat16)
    assert bucket == "d128-rows512k-kv2k"
    assert prefill_mod.prefill_bucket(1, 32, 512, 4608, 128, torch.float32) == "fp32-d128-rows16k-kv8k-chunk"
    padded = prefill_mod.prefill_bucket(
        8, 32, 2048, 2048, 128, torch.bfloat16, has_q_lens=True, has_mask=True
    )
    assert padded == "d128-rows512k-kv2k-lens-mask"
    params = prefill_mod.heuristic_params(8, 32, 2048, 128, torch.bfloat16, "cpu")
    assert set(params) == {"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"}


F16 = {"dtype": torch.float16}


def _qkv(q_shape=(1, 4, 8, 64), kv_shape=(1, 2, 16, 64)):
    return torch.randn(q_shape, **F16), torch.randn(kv_shape, **F16), torch.randn(kv_shape, **F16)


BAD_INPUTS = [
    (lambda a: dict(zip("qkv", _qkv((1, 4, 8, 72), (1, 2, 16, 72)), strict=True)), ValueError,
     r"head_dim=72 is not supported \(64, 80, 96, 128, 256\)"),
    (lambda a: dict(zip("qkv", _qkv((1, 4, 8, 64), (1, 3, 16, 64)), strict=True)), ValueError,
     "not a multiple"),
    (lambda a: {"q": torch.randn(1, 4, 17, 64, **F16)}, ValueError, "q_len=17 exceeds kv_len=16"),
    (lambda a: {k: t.double() for k, t in a.items()}, TypeError, "float64 is not supported"),
    (lambda a: {"v": a["v"].float()}, TypeError, "dtypes differ"),
    (lambda a: {"attn_mask": torch.ones(1, 3, 8, 16, dtype=torch.bool)}, ValueError,
     r"does not broadcast to \[B, Hq, Lq, Lkv\]=\(1, 4, 8, 16\)"),
    (lambda a: {"attn_mask": torch.ones(8, 16, dtype=torch.int32)}, TypeError, "attn_mask dtype torch.int32"),
    (lambda a: {"causal": 1}, TypeError, "causal=1 must be True or False"),
    (lambda a: {"out": torch.empty(1, 4, 8, 32, **F16)}, ValueError, "out must match q"),
    (lambda a: {"q": a["q"][0]}, ValueError, "q must have 4 dims"),
]  # fmt: skip
# scale, kv_lens and q_lens errors (shared with decode): tests/test_bad_input.py


@pytest.mark.parametrize("change, error, message", BAD_INPUTS)
def test_errors_name_the_offending_value(change, error, message):
    q, k, v = _qkv()
    args = {"q": q, "k": k, "v": v}
    args.update(change(args))
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises(error, match=message):
        prefill_attention(q, k, v, **args)
