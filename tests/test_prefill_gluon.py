"""The Gluon prefill launch (kernels/prefill_gluon.py): what it takes and its fallback (any machine), and on
an sm_90 GPU each schedule against the float64 oracle: odd sizes, GQA/MQA/MHA, chunks, poisoned padding past
kv_lens, q_lens, transformers' layout, cache slices, repeats bit for bit."""

import math

import pytest
import torch

from attnforge import verify
from attnforge.bench import targets
from attnforge.config import AttentionConfig
from attnforge.kernels import prefill as prefill_mod
from attnforge.kernels import prefill_gluon
from attnforge.verify import check

SM90 = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SCHEDULES = [dict(BLOCK_M=128, BLOCK_N=128, num_warps=4, num_stages=s, gluon=True, pingpong=pp, persistent=ps)
             for s, pp, ps in prefill_gluon.SCHEDULES]  # fmt: skip
PARAMS = SCHEDULES[0]
PINGPONG = dict(PARAMS, num_stages=3, pingpong=True)
PERSISTENT = dict(PINGPONG, persistent=True)


def _schedule_id(params: dict) -> str:
    flags = "".join(name for name, key in (("-pp", "pingpong"), ("-ps", "persistent")) if params[key])
    return f"st{params['num_stages']}{flags}"


def _config(*sizes, dtype=torch.bfloat16, causal=True) -> AttentionConfig:
    return AttentionConfig.from_sizes(*sizes, dtype=dtype, causal=causal)


def _assert_passes(case, params):
    def fn(q, k, v, causal, scale=None, kv_lens=None, q_lens=None, attn_mask=None):
        out = torch.full_like(q, math.nan)  # a row the launch leaves unwritten shows
        scale = scale or q.shape[3] ** -0.5
        prefill_mod._prefill_into(q, k, v, out, scale, causal, kv_lens, q_lens, attn_mask, params)
        return out

    report = check(fn, case)
    assert report.passed, str(report)


# ----------------------------------------------------------------------------------------------------------
# Any machine


def test_what_the_launch_takes():
    """takes(): fp16/bf16, head_dim 64 or 128, no attn_mask, a schedule it has, TMA-readable strides (a Q in
    transformers' layout and a slice of a longer cache are)."""
    q = torch.zeros(2, 8, 64, 128, dtype=torch.bfloat16)
    assert prefill_gluon.takes(q, q, q, None, PARAMS)
    assert prefill_gluon.takes(q.transpose(1, 2).contiguous().transpose(1, 2), q[:, :, :37], q, None, PARAMS)
    assert not prefill_gluon.takes(q, q, q, torch.ones(64, 64, dtype=torch.bool), PARAMS)
    assert not prefill_gluon.takes(q.float(), q.float(), q.float(), None, PARAMS)
    d96 = torch.zeros(2, 8, 64, 96, dtype=torch.bfloat16)
    assert not prefill_gluon.takes(d96, d96, d96, None, PARAMS)
    assert not prefill_gluon.takes(q, q, q, None, dict(PARAMS, num_stages=4))
    assert prefill_gluon.takes(q, q, q, None, PERSISTENT)  # the persistent schedule: ping-pong, 3 stages
    assert not prefill_gluon.takes(q, q, q, None, dict(PERSISTENT, num_stages=2))
    assert not prefill_gluon.takes(q, q, q, None, dict(PERSISTENT, pingpong=False))
    odd_rows = torch.zeros(2, 8, 64, 136, dtype=torch.bfloat16)[..., :128]  # rows 272 bytes apart: aligned
    assert prefill_gluon.takes(odd_rows, q, q, None, PARAMS)
    unaligned = torch.zeros(2, 8, 64, 132, dtype=torch.bfloat16)[..., :128]  # rows 264 bytes apart
    assert not prefill_gluon.takes(unaligned, q, q, None, PARAMS)
    assert not prefill_gluon.takes(q, q[..., 1:65], q, None, PARAMS)  # a base 2 bytes off


def test_the_launch_needs_an_sm90_gpu_and_triton_3_6(monkeypatch):
    """Not on the CPU (nor in the interpreter), nor on another GPU generation, nor with a Triton older than
    the one it was written for (Gluon's API moves)."""
    q = torch.zeros(1, 2, 64, 64, dtype=torch.float16)
    assert not prefill_gluon.supported(q, q, q, None, PARAMS)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(prefill_gluon, "TRITON_VERSION", (3, 6))
    assert prefill_gluon.supported(q, q, q, None, PARAMS)
    monkeypatch.setattr(prefill_gluon, "TRITON_VERSION", (3, 5))
    assert not prefill_gluon.supported(q, q, q, None, PARAMS)
    monkeypatch.setattr(prefill_gluon, "TRITON_VERSION", (3, 6))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (10, 0))
    assert not prefill_gluon.supported(q, q, q, None, PARAMS)


def test_a_gluon_entry_runs_the_heuristics_launch_where_the_launch_cannot(monkeypatch):
    """Here (no sm_90 GPU) a "gluon" entry runs the heuristic's launch, right."""
    launched = []
    kernel = prefill_mod._prefill_kernel

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launched.append(kwargs)
                return kernel[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(prefill_mod, "_prefill_kernel", Recorder())
    case = verify.random_case(_config(2, 4, 2, 20, 50, 64, dtype=torch.float16), device=DEVICE)
    if SM90:
        case.attn_mask = torch.rand(2, 1, 20, 50, device=DEVICE) > 0.3  # what it cannot take there
    _assert_passes(case, PARAMS)
    heuristic = prefill_mod.heuristic_params(2, 4, 20, 64, torch.float16, DEVICE)
    assert launched and launched[-1]["num_warps"] == heuristic["num_warps"]


def test_the_bench_refuses_a_gluon_launch_it_would_not_run():
    target = targets.Target("prefill", 1, 4, 2, 64, 64, 64)
    if SM90:
        pytest.skip("the launch runs here")
    case = targets.make_case(target, torch.device(DEVICE), seed=0)
    with pytest.raises(ValueError, match="the Gluon launch cannot take this call or this schedule"):
        targets.kernel_call(target, case, PARAMS, torch.empty_like(case.q))


# ----------------------------------------------------------------------------------------------------------
# An sm_90 GPU

gpu = pytest.mark.skipif(not SM90, reason="the Gluon launch runs on sm_90 GPUs only")
KINDS = ("random", "needle", "large", "poisoned")


@gpu
@pytest.mark.parametrize("params", SCHEDULES, ids=_schedule_id)
@pytest.mark.parametrize(
    "sizes", [(2, 32, 8, 1000, 1000, 128), (1, 16, 8, 300, 1300, 128), (2, 8, 8, 777, 777, 64),
              (3, 4, 1, 1, 129, 128), (1, 2, 2, 5, 5, 64), (2, 4, 4, 129, 257, 64)],
)  # fmt: skip
def test_each_schedule_against_the_oracle(sizes, params):
    """Causal and not, odd lengths, chunks against a cache, a single token, GQA/MQA/MHA, d64/d128, NaN and
    Inf past kv_lens (never read: the last block is loaded shifted)."""
    for causal in (True, False):
        for case in verify.protocol_cases(_config(*sizes, causal=causal), device=DEVICE, kinds=KINDS):
            assert prefill_mod.gluon_supported(case.q, case.k, case.v, None, params)
            _assert_passes(case, params)


@gpu
@pytest.mark.parametrize("params", SCHEDULES, ids=_schedule_id)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lengths(params, dtype):
    """kv_lens and q_lens: rows past q_lens[b] are 0, the others see keys <= kv_lens[b] - q_lens[b] + i; a
    sequence with no valid key (or fewer than its queries) gives rows of 0; padding holds NaN and Inf."""
    case = verify.random_case(_config(5, 8, 2, 300, 700, 128, dtype=dtype), device=DEVICE)
    kv_lens = [700, 0, 129, 100, 333]
    case.kv_lens = torch.tensor(kv_lens, dtype=torch.int64, device=DEVICE)
    case.q_lens = torch.tensor([300, 10, 128, 200, 1], dtype=torch.int32, device=DEVICE)
    for bi, end in enumerate(kv_lens):
        case.k[bi, :, end:] = math.nan
        case.v[bi, :, end:] = math.inf
    _assert_passes(case, params)


@gpu
def test_transformers_layout_cache_slices_and_a_strided_out():
    """Q in transformers' layout (heads interleaved in a row), K/V slices of a longer cache holding NaN past
    them, and an output with strides of its own are read and written in place."""
    case = verify.random_case(_config(2, 8, 2, 333, 400, 128), device=DEVICE)
    k_buf, v_buf = (torch.full((2, 2, 512, 128), math.nan, dtype=torch.bfloat16, device=DEVICE) for _ in "kv")
    k_buf[:, :, :400], v_buf[:, :, :400] = case.k, case.v
    case.k, case.v = k_buf[:, :, :400], v_buf[:, :, :400]
    case.q = case.q.transpose(1, 2).contiguous().transpose(1, 2)
    for params in SCHEDULES:
        assert prefill_mod.gluon_supported(case.q, case.k, case.v, None, params)
        _assert_passes(case, params)
    out = torch.full((2, 333, 8, 128), math.nan, dtype=torch.bfloat16, device=DEVICE).transpose(1, 2)
    prefill_mod._prefill_into(case.q, case.k, case.v, out, 0.1, True, None, None, None, PARAMS)
    expected = torch.empty_like(case.q)
    prefill_mod._prefill_into(case.q, case.k, case.v, expected, 0.1, True, None, None, None, PARAMS)
    assert torch.equal(out, expected)


@gpu
@pytest.mark.parametrize("params", SCHEDULES, ids=_schedule_id)
def test_repeats_bit_for_bit(params):
    """A stage refilled while a consumer still reads it, or turns passed out of order, would show as outputs
    that change from call to call: 20 calls of a long prompt and of a padded batch give the same bits."""
    case = verify.random_case(_config(2, 32, 8, 4096, 4096, 128), device=DEVICE)
    lens = torch.tensor([4096, 1500], dtype=torch.int32, device=DEVICE)
    for kv_lens in (None, lens):
        first = torch.empty_like(case.q)
        prefill_mod._prefill_into(case.q, case.k, case.v, first, 0.1, True, kv_lens, kv_lens, None, params)
        out = torch.empty_like(first)
        for _ in range(20):
            out.fill_(math.nan)
            prefill_mod._prefill_into(case.q, case.k, case.v, out, 0.1, True, kv_lens, kv_lens, None, params)
            assert torch.equal(out, first)
        assert torch.isfinite(first).all()


@gpu
@pytest.mark.parametrize("sizes, valid", [
    ((16, 32, 8, 1024, 1024, 128), (1024, 0, 900, 1, 700, 129, 0, 1023)), ((3, 8, 2, 2000, 2000, 64), None),
    ((1, 4, 4, 70, 300, 128), None)])  # fmt: skip
def test_the_persistent_schedule_does_the_one_tile_launchs_work(sizes, valid):
    """One program an SM walking more tiles than there are SMs (sequences of no rows among them), its ring
    and turns running on across tiles, gives the bits of the one-tile ping-pong launch, which does the same
    work per tile."""
    case = verify.random_case(_config(*sizes), device=DEVICE)
    lens = None if valid is None else torch.tensor(valid * 2, dtype=torch.int32, device=DEVICE)[: sizes[0]]
    outs = []
    for params in (PINGPONG, PERSISTENT):
        outs.append(torch.full_like(case.q, math.nan))
        prefill_mod._prefill_into(case.q, case.k, case.v, outs[-1], 0.1, True, lens, lens, None, params)
    assert torch.equal(outs[0], outs[1]) and torch.isfinite(outs[1]).all()


@gpu
def test_a_gluon_entry_with_an_attn_mask_runs_another_launch():
    case = verify.random_case(_config(2, 4, 2, 200, 300, 128), device=DEVICE)
    case.attn_mask = torch.rand(2, 1, 200, 300, device=DEVICE) > 0.3
    assert not prefill_mod.gluon_supported(case.q, case.k, case.v, case.attn_mask, PARAMS)
    _assert_passes(case, PARAMS)
