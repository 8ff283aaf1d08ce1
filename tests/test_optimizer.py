"""The optimizer: settings, decisions and their reasons, fallback, statistics, the torch drop-in.

On CPU tests/conftest.py sets TRITON_INTERPRET=1, so where a decision says "kernel", the Triton kernel runs.
"""

import dataclasses
import functools
import importlib.util
import logging
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import attnforge as af
from attnforge import verify
from attnforge.config import AttentionConfig, OptimizerSettings
from attnforge.optimizer import AttentionOptimizer, CallFeatures, policy, runtime

# Calls of sizes (B, Hq, Hkv, Lq, Lkv, D), float32 and not causal unless said otherwise.
config_of = functools.partial(AttentionConfig.from_sizes, dtype=torch.float32, causal=False)

HAS_DECODE = importlib.util.find_spec("attnforge.kernels.decode") is not None
# Kernels run on a GPU, or on the CPU through the interpreter (conftest.py); on a GPU the tests that need a
# kernel to run also pass require_measurement=False, as the tuning table may not cover their tiny shapes.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# Calls recorded into a CUDA graph: where measured-faster decode kernels run (policy.EAGER_DECODE).
IN_GRAPH = {"device": "cuda", "features": CallFeatures(causal=True, captured=True)}


def decode_cfg(**overrides) -> AttentionConfig:
    fields = dict(num_heads=8, num_kv_heads=2, head_dim=64, seq_len=1, kv_len=300, dtype=torch.float32)
    return AttentionConfig(**{**fields, **overrides})


@pytest.fixture
def measured(monkeypatch):
    """Pretend to be a GPU without the interpreter, with a tuning table answering `speedup.value`."""

    class Speedup:
        value: float | None = 1.9
        in_graph: float | None = None
        origin = "this GPU"

    def measure(kind, bucket, architecture):
        if Speedup.value is None or (Speedup.origin != "this GPU" and not architecture):
            return None
        return policy.Measurement(Speedup.value, Speedup.origin, "test-sweep.json", Speedup.in_graph)

    def machine_for(device, kernels, failed):
        missing = {kind: why for kind, (fn, why) in kernels.items() if fn is None}
        return policy.Machine((True, "test GPU"), "NVIDIA H100 80GB HBM3", False, missing, failed, measure)

    monkeypatch.setattr(runtime, "machine_for", machine_for)
    return Speedup


# ----------------------------------------------------------------------------------------------------------
# Settings


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"min_seq_len": 0}, r"min_seq_len=0 must be a positive integer"),
        ({"max_seq_len": -5}, r"max_seq_len=-5 must be a positive integer"),
        ({"min_seq_len": 4096, "max_seq_len": 1024}, r"min_seq_len=4096 exceeds max_seq_len=1024"),
        ({"gqa_ratio_min": 0}, r"gqa_ratio_min=0 must be a positive integer"),
        ({"min_heads": 2.5}, r"min_heads=2.5 must be a positive integer"),
        ({"kernels": ("decode", "flash")}, r"unknown kernels \['flash'\]; accepted: \('decode', 'prefill'\)"),
        ({"min_speedup": 0}, r"min_speedup=0 must be a finite number > 0"),
        ({"min_speedup": math.inf}, r"min_speedup=inf must be a finite number > 0"),
        ({"enable_debug": "yes"}, r"enable_debug='yes' must be True or False"),
        ({"require_measurement": 0}, r"require_measurement=0 must be True or False"),
    ],
)
def test_invalid_settings_name_the_value_and_the_range(kwargs, message):
    with pytest.raises(ValueError, match=message):
        OptimizerSettings(**kwargs)
    with pytest.raises(ValueError, match=message):
        AttentionOptimizer(**kwargs)


def test_configure_optimizer_rejects_unknown_settings_and_keeps_the_old_ones():
    before = af.get_optimizer().settings
    with pytest.raises(ValueError, match=r"unknown setting 'min_len'; accepted: .*min_seq_len"):
        af.configure_optimizer(min_len=10)
    with pytest.raises(ValueError, match=r"min_seq_len=-1"):
        af.configure_optimizer(min_seq_len=-1)
    assert af.get_optimizer().settings == before


def test_configure_optimizer_changes_the_process_wide_optimizer():
    try:
        optimizer = af.configure_optimizer(min_seq_len=512, kernels="decode")
        assert optimizer is af.get_optimizer()
        assert optimizer.settings.min_seq_len == 512 and optimizer.settings.kernels == ("decode",)
    finally:
        af.configure_optimizer(**vars(OptimizerSettings()))


# ----------------------------------------------------------------------------------------------------------
# Decisions and reasons


def test_measured_speedup_decides_and_says_so(measured):
    optimizer = AttentionOptimizer()
    ok, reason = optimizer.should_optimize(decode_cfg(), **IN_GRAPH)
    assert ok
    assert "GQA-4:1 decode (d64-m4-b1-kv1k)" in reason
    assert (
        "measured 1.90x faster than torch SDPA (NVIDIA H100 80GB HBM3, this GPU: test-sweep.json)" in reason
    )


def test_a_decode_call_outside_a_cuda_graph_goes_to_torch_however_fast_the_kernel(measured):
    ok, reason = AttentionOptimizer().should_optimize(decode_cfg(), device="cuda")
    assert not ok and "measured faster on the GPU, but outside a CUDA graph a decode step is bound" in reason
    assert reason.endswith("falling back to torch SDPA")
    assert AttentionOptimizer().should_optimize(decode_cfg(seq_len=300), device="cuda")[0]  # prefill: eager
    measured.value = None  # an unmeasured kernel that the settings force runs eager too
    assert AttentionOptimizer(require_measurement=False).should_optimize(decode_cfg(), device="cuda")[0]


def test_a_gpu_without_entries_uses_its_architectures_unless_told_not_to(measured):
    measured.origin = "architecture sm90 (measured on h100)"
    ok, reason = AttentionOptimizer().should_optimize(decode_cfg(), **IN_GRAPH)
    assert ok and "architecture sm90 (measured on h100)" in reason
    ok, reason = AttentionOptimizer(architecture_entries=False).should_optimize(decode_cfg(), **IN_GRAPH)
    assert not ok and "no measurement" in reason


def test_slower_or_unmeasured_kernels_fall_back(measured):
    measured.value = 0.8
    ok, reason = AttentionOptimizer().should_optimize(decode_cfg(), **IN_GRAPH)
    assert not ok and "measured 0.80x torch SDPA" in reason and "below min_speedup=1" in reason
    measured.value = None
    ok, reason = AttentionOptimizer().should_optimize(decode_cfg(), **IN_GRAPH)
    assert not ok and "no measurement" in reason and "falling back to torch SDPA" in reason


def test_captured_decode_calls_go_by_the_speedup_measured_in_cuda_graphs(measured):
    measured.value, measured.in_graph = 1.12, 0.92  # faster launched alone, slower per call in a graph
    ok, reason = AttentionOptimizer().should_optimize(decode_cfg(), **IN_GRAPH)
    assert not ok and "measured 0.92x torch SDPA per call in CUDA graphs" in reason
    assert "below min_speedup=1" in reason
    measured.value, measured.in_graph = 0.95, 1.03
    ok, reason = AttentionOptimizer().should_optimize(decode_cfg(), **IN_GRAPH)
    assert ok and "measured 1.03x faster than torch SDPA per call in CUDA graphs" in reason


def test_require_measurement_false_runs_unmeasured_kernels_only(measured):
    measured.value = None
    ok, reason = AttentionOptimizer(require_measurement=False).should_optimize(decode_cfg(), **IN_GRAPH)
    assert ok and "no measurement" in reason and "running it (require_measurement=False)" in reason
    measured.value = 0.5
    assert not AttentionOptimizer(require_measurement=False).should_optimize(decode_cfg(), **IN_GRAPH)[0]


def test_min_speedup_is_the_bar(measured):
    measured.value = 1.2
    assert AttentionOptimizer(min_speedup=1.1).should_optimize(decode_cfg(), **IN_GRAPH)[0]
    assert not AttentionOptimizer(min_speedup=1.5).should_optimize(decode_cfg(), **IN_GRAPH)[0]


@pytest.mark.parametrize(
    "settings, cfg, words",
    [
        ({"min_seq_len": 1024}, {}, "kv_len 300 < min_seq_len=1024"),
        ({"max_seq_len": 256}, {}, "kv_len 300 > max_seq_len=256"),
        ({"gqa_ratio_min": 2}, {"num_kv_heads": 8}, "GQA ratio 1 < gqa_ratio_min=2"),
        ({"min_heads": 16}, {}, "8 query heads < min_heads=16"),
        ({"kernels": ("prefill",)}, {}, "the decode kernel is disabled (kernels=('prefill',))"),
        ({"kernels": ("decode",)}, {"seq_len": 300}, "the prefill kernel is disabled"),
    ],
)
def test_each_threshold_blocks_with_its_reason(measured, settings, cfg, words):
    assert AttentionOptimizer().should_optimize(decode_cfg(**cfg), **IN_GRAPH)[0]
    ok, reason = AttentionOptimizer(**settings).should_optimize(decode_cfg(**cfg), **IN_GRAPH)
    assert not ok and words in reason


def test_no_triton_means_fallback_with_that_reason(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    ok, reason = AttentionOptimizer().should_optimize(decode_cfg(), device="cpu")
    assert not ok and "Triton kernels need a CUDA GPU (or TRITON_INTERPRET=1)" in reason


def test_missing_kernel_module_means_kernel_not_available(monkeypatch):
    monkeypatch.setitem(policy.KERNEL_ENTRY_POINTS, "decode", ("attnforge.kernels.nope", "f"))
    optimizer = AttentionOptimizer()
    ok, reason = optimizer.should_optimize(decode_cfg(), device=DEVICE)
    assert not ok and "kernel not available" in reason
    q, k, v = (torch.randn(shape, device=DEVICE) for shape in ((1, 8, 1, 64), (1, 2, 30, 64), (1, 2, 30, 64)))
    out = optimizer.attention(q, k, v)
    assert verify.relative_l2_per_slice(out, verify.reference_attention(q, k, v)).max() <= 1e-4
    assert optimizer.get_stats()["fallback_reasons"] == {"kernel not available": 1}


def test_masks_and_padded_queries_go_to_the_prefill_kernel():
    optimizer = AttentionOptimizer()
    masked = CallFeatures(causal=True, has_mask=True)
    assert "prefill" in optimizer.should_optimize(decode_cfg(), device="cpu", features=masked)[1]
    assert "decode" in optimizer.should_optimize(decode_cfg(), device="cpu")[1]
    not_causal = CallFeatures(causal=False)
    assert "prefill" in optimizer.should_optimize(decode_cfg(seq_len=4), device="cpu", features=not_causal)[1]


# ----------------------------------------------------------------------------------------------------------
# Running: correctness, statistics, fallback


@pytest.mark.skipif(not HAS_DECODE, reason="decode kernel module not present yet")
@pytest.mark.parametrize("shape", [config_of(2, 8, 2, 1, 65, 64), config_of(1, 6, 1, 7, 63, 64)])
def test_decode_calls_run_the_kernel_and_pass_the_protocol(shape):
    optimizer = AttentionOptimizer(require_measurement=False)
    cases = verify.protocol_cases(dataclasses.replace(shape, causal=True), device=DEVICE)
    for case in cases:
        report = verify.check(optimizer.attention, case)
        assert report.passed, str(report)
    stats = optimizer.get_stats()
    assert stats["by_kernel"] == {"decode": len(cases)} and stats["optimization_rate"] == 1.0


@pytest.mark.parametrize("kinds", [("random", "needle", "large", "strided")])
def test_prefill_shapes_are_correct_whichever_path_runs(kinds):
    optimizer = AttentionOptimizer()
    for case in verify.protocol_cases(config_of(2, 4, 2, 65, 65, 64, causal=True), kinds=kinds):
        report = verify.check(optimizer.attention, case)
        assert report.passed, str(report)
    assert optimizer.get_stats()["calls"] == len(kinds)


def test_unsupported_calls_fall_back_with_a_reason():
    optimizer = AttentionOptimizer()
    q, k, v = torch.randn(1, 4, 3, 72), torch.randn(1, 2, 9, 72), torch.randn(1, 2, 9, 72)
    out = optimizer.attention(q, k, v)
    torch.testing.assert_close(out, verify.reference_attention(q, k, v, causal=True).float())
    v_small = torch.randn(1, 2, 9, 32)  # MLA-like: value head_dim differs
    q64, k64 = torch.randn(1, 4, 3, 64), torch.randn(1, 2, 9, 64)
    assert optimizer.attention(q64, k64, v_small).shape == (1, 4, 3, 32)
    reasons = optimizer.get_stats()["fallback_reasons"]
    assert reasons == {"head_dim unsupported": 1, "value head_dim differs": 1}


def test_a_kernel_that_raises_is_not_retried(monkeypatch):
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("planted failure")

    optimizer = AttentionOptimizer(require_measurement=False)
    monkeypatch.setattr(runtime, "load_kernel", lambda kind: (broken, ""))
    q, k, v = (torch.randn(shape, device=DEVICE) for shape in ((1, 8, 1, 64), (1, 2, 40, 64), (1, 2, 40, 64)))
    expected = verify.reference_attention(q, k, v)
    for _ in range(3):
        assert verify.relative_l2_per_slice(optimizer.attention(q, k, v), expected).max() <= 1e-4
    assert len(calls) == 1
    stats = optimizer.get_stats()
    assert stats["optimized"] == 0 and stats["fallback_reasons"] == {"kernel raised": 3}
    ok, reason = optimizer.should_optimize(AttentionConfig.from_tensors(q, k, v), device=DEVICE)
    assert not ok and "raised RuntimeError: planted failure" in reason


def test_debug_logs_each_new_decision_once(caplog, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    optimizer = AttentionOptimizer(enable_debug=True)
    q, kv = torch.randn(1, 4, 1, 64), torch.randn(1, 2, 10, 64)
    with caplog.at_level(logging.INFO, logger="attnforge"):
        for _ in range(3):
            optimizer.attention(q, kv, kv)
        optimizer.attention(torch.randn(1, 4, 32, 64), torch.randn(1, 2, 32, 64), torch.randn(1, 2, 32, 64))
    messages = [r.getMessage() for r in caplog.records if r.name == "attnforge.optimizer"]
    assert len(messages) == 2 and "decode" in messages[0] and "prefill" in messages[1]
    assert [d["calls"] for d in optimizer.decisions()] == [3, 1]
    quiet = AttentionOptimizer()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="attnforge"):
        quiet.attention(q, kv, kv)
    assert not caplog.records


def test_stats_start_at_zero_and_reset():
    optimizer = AttentionOptimizer()
    assert optimizer.get_stats()["optimization_rate"] == 0.0
    optimizer.attention(torch.randn(1, 2, 1, 64), torch.randn(1, 2, 5, 64), torch.randn(1, 2, 5, 64))
    assert optimizer.get_stats()["calls"] == 1
    optimizer.reset_stats()
    assert optimizer.get_stats()["calls"] == 0 and optimizer.decisions() == []


# ----------------------------------------------------------------------------------------------------------
# The torch drop-in

# AttentionConfig refuses seq_len > kv_len (issue 9): optimizer.py must send such calls to torch before it
# builds one (_unsupported_call). Delete this mark with that change (strict: it fails once fixed).


@pytest.mark.parametrize(
    "q_len, kv_len, is_causal, use_mask",
    [
        (1, 50, False, False),
        (17, 17, True, False),
        (5, 40, True, False),
        (40, 5, True, False),
        (9, 30, False, True),
    ],
)
def test_scaled_dot_product_attention_has_torch_semantics(q_len, kv_len, is_causal, use_mask):
    """Including torch's top-left is_causal when Lq != Lkv (attnforge's kernels are bottom-right)."""
    q, k, v = torch.randn(2, 8, q_len, 64), torch.randn(2, 2, kv_len, 64), torch.randn(2, 2, kv_len, 64)
    mask = torch.rand(2, 1, q_len, kv_len) > 0.3 if use_mask else None
    if mask is not None:
        mask[..., 0] = True  # every row sees a key: torch gives NaN for rows that see none
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=True)
    got = af.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=True)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_scaled_dot_product_attention_passes_other_calls_to_torch():
    q, k = torch.randn(3, 5, 64), torch.randn(3, 7, 64)  # 3-D
    torch.testing.assert_close(
        af.scaled_dot_product_attention(q, k, k), F.scaled_dot_product_attention(q, k, k)
    )
    q4, k4 = torch.randn(1, 4, 3, 64), torch.randn(1, 2, 3, 64)
    with pytest.raises(RuntimeError):  # GQA shapes without enable_gqa: torch's own error
        af.scaled_dot_product_attention(q4, k4, k4)


def test_import_attnforge_does_not_import_transformers():
    code = (
        "import sys, attnforge as af; af.AttentionOptimizer; af.scaled_dot_product_attention; "
        "assert 'transformers' not in sys.modules, 'transformers imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------------------------------------
# The torch fallback's CUDA routes (device-independent pieces, checked on CPU)


def test_torch_fallback_honours_every_option_on_cpu():
    q, k, v = torch.randn(2, 8, 5, 64), torch.randn(2, 2, 30, 64), torch.randn(2, 2, 30, 64)
    kv_lens, q_lens = torch.tensor([30, 12]), torch.tensor([5, 3])
    out = runtime.torch_fallback(q, k, v, causal=True, kv_lens=kv_lens, q_lens=q_lens)
    expected = verify.reference_attention(q, k, v, causal=True, kv_lens=kv_lens, q_lens=q_lens)
    assert verify.relative_l2_per_slice(out, expected).max() <= 1e-5


@pytest.mark.parametrize(("heads", "q_len", "kv_len"), [((8, 2), 4, 30), ((6, 6), 2, 17), ((7, 1), 16, 129)])
def test_a_causal_chunk_against_a_cache_falls_back_to_torchs_lower_right_bias(
    monkeypatch, heads, q_len, kv_len
):
    """No lengths or mask: torch's `causal_lower_right` (no mask tensor is built), equal to the oracle."""
    from attnforge.kernels import reference

    def no_mask(*args, **kwargs):
        raise AssertionError("a bool mask was built")

    monkeypatch.setattr(reference, "visibility_mask", no_mask)
    (hq, hkv), d = heads, 32
    q, k, v = torch.randn(2, hq, q_len, d), torch.randn(2, hkv, kv_len, d), torch.randn(2, hkv, kv_len, d)
    out = runtime.torch_fallback(q, k, v, causal=True, scale=0.3)
    expected = verify.reference_attention(q, k, v, causal=True, scale=0.3)
    assert out.shape == (2, hq, q_len, d) and verify.relative_l2_per_slice(out, expected).max() <= 1e-5


@pytest.fixture
def user_table(monkeypatch, tmp_path):
    """An empty user tuning table in a temporary cache directory, on a machine that pretends to have Triton
    (not the interpreter) on the CPU, so decisions come from the table."""
    from attnforge.kernels import tuning

    monkeypatch.setenv("ATTNFORGE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(runtime, "triton_interpret", lambda: False)
    monkeypatch.setattr(runtime, "triton_status", lambda device: (True, "test"))
    tuning.reload()
    yield lambda kind, entries: tuning.write_entries("cpu", "cpu", kind, entries)
    monkeypatch.delenv("ATTNFORGE_CACHE_DIR")
    tuning.reload()


@pytest.mark.parametrize("kind, cfg", [("decode", {}), ("prefill", {"seq_len": 300})])
def test_the_tuning_store_is_read_through_the_kernels_bucket(user_table, kind, cfg):
    """The real lookup: the kernel module names the bucket, the user's table holds the measured speed-up."""
    shape = decode_cfg(**cfg)
    bucket = policy.bucket(kind, shape, CallFeatures())
    user_table(kind, {bucket: {"params": None, "speedup": 1.7, "source": "test"}})
    ok, reason = AttentionOptimizer().should_optimize(shape, device="cpu", features=IN_GRAPH["features"])
    assert ok and f"attnforge {kind} kernel measured 1.70x faster" in reason and "this GPU: test" in reason
    other = decode_cfg(**cfg, kv_len=100_000)  # another bucket: not measured
    ok, reason = AttentionOptimizer().should_optimize(other, device="cpu")
    assert not ok and "no measurement" in reason


def test_valid_lengths_pick_their_own_bucket(user_table):
    """A static cache (kv_lens) is another race for torch than a plain cache: its own measured speed-up."""
    shape = decode_cfg()
    with_lens = CallFeatures(causal=True, has_kv_lens=True, captured=True)
    plain, lens = (policy.bucket("decode", shape, f) for f in (CallFeatures(), with_lens))
    assert plain != lens
    user_table("decode", {plain: {"speedup": 0.8}, lens: {"speedup": 3.0}})
    optimizer = AttentionOptimizer()
    assert not optimizer.should_optimize(shape, device="cpu")[0]
    ok, reason = optimizer.should_optimize(shape, device="cpu", features=with_lens)
    assert ok and "3.00x faster" in reason


def test_decisions_are_cached_per_bucket_as_the_cache_grows(monkeypatch):
    """A DynamicCache grows every step: calls in one bucket reuse one decision (no new policy run)."""
    optimizer = AttentionOptimizer()
    runs = []
    decide = policy.decide
    monkeypatch.setattr(policy, "decide", lambda *a: runs.append(1) or decide(*a))
    q = torch.randn(1, 4, 1, 64)
    for kv_len in range(1025, 1100):
        kv = torch.randn(1, 2, kv_len, 64)
        optimizer.attention(q, kv, kv)
    assert len(runs) == 1 and optimizer.get_stats()["calls"] == 75


@pytest.mark.parametrize("kernels", [("decode", "prefill"), ()], ids=["kernels", "torch"])
@pytest.mark.parametrize("q_len", [1, 3, 20])
def test_kv_starts_hide_the_left_padding_on_every_path(kernels, q_len):
    """kv_starts reaches the decode kernel as it is, and the prefill kernel and torch as a mask: every path
    equals the oracle with the keys before each start masked out (they hold large values that would dominate
    if read; masked paths multiply them by 0, so not NaN: the decode kernel's NaN case is in test_decode)."""
    optimizer = AttentionOptimizer(require_measurement=False, kernels=kernels)
    case = verify.random_case(config_of(3, 4, 2, q_len, 50, 64, causal=True), device=DEVICE)
    lens = torch.tensor([50, 40, 30], device=DEVICE)
    starts = torch.tensor([0, 7, 25], device=DEVICE)
    keys_valid = (torch.arange(50, device=DEVICE)[None, :] >= starts[:, None])[:, None, None, :]
    expected = verify.reference_attention(
        case.q, case.k, case.v, causal=True, kv_lens=lens, attn_mask=keys_valid
    )
    for b, first in enumerate(starts.tolist()):
        case.k[b, :, :first], case.v[b, :, :first] = 1e3, -1e3
    out = optimizer.attention(case.q, case.k, case.v, kv_lens=lens, kv_starts=starts)
    assert verify.relative_l2_per_slice(out, expected).max() <= verify.tolerance_for(torch.float32)
    ran = optimizer.stats.as_dict()["by_kernel"]
    assert ran == ({"decode": 1} if kernels and q_len <= 16 else {"prefill": 1} if kernels else {}), ran


def _bf16(*shape):
    return torch.zeros(*shape, dtype=torch.bfloat16)


@pytest.mark.parametrize(
    "make, aligned",
    [
        (lambda: _bf16(1, 2, 100, 128), True),  # a DynamicCache's k/v
        (lambda: _bf16(1, 1, 16, 128).transpose(1, 2), True),  # q as an attention layer makes it
        (lambda: _bf16(1, 2, 100, 136)[..., 4:132], False),  # data pointer 8 bytes past a boundary
        (lambda: _bf16(1, 2, 100, 130)[..., :128], False),  # rows 260 bytes apart
        (lambda: _bf16(1, 2, 128, 100).transpose(-1, -2), False),  # last dimension not contiguous
        (lambda: torch.zeros(1, 2, 100, 64)[..., :60], True),  # float32 rows 256 bytes apart
    ],
)
def test_the_one_pass_alignment_check_for_torch_sdpa(make, aligned):
    """What the hot path checks before a call goes to torch's fused SDPA (on CPU tensors the check runs the
    same; fused_sdpa_safe itself only applies it to CUDA tensors)."""
    from attnforge.kernels import reference

    plain = _bf16(1, 2, 100, 128)
    assert reference.fused_sdpa_aligned(plain, plain, make()) is aligned
    assert reference.fused_sdpa_aligned(make(), plain, plain) is aligned
    flat = make()[0]  # 3-D views take the general path
    assert reference.fused_sdpa_aligned(flat, plain[0], plain[0]) is aligned
