"""On a GPU: nothing any protocol input can make faults, the decode workspace is never shared between streams
or graphs, and torch's fused SDPA only ever sees inputs it can take. Skipped without CUDA.

The demo on an H200 once died here (`misaligned address` in torch's flash backend on a strided cache view);
these tests replay that sequence and a mixed one of shapes, dtypes, head dims and views, and they print the
GPU they ran on (pytest -s, or the captured stdout of a failure).
"""

import dataclasses
import functools
import math

import pytest
import torch

from attnforge import verify
from attnforge.config import AttentionConfig
from attnforge.kernels import reference
from attnforge.kernels.decode import DecodeWorkspace, decode_attention
from attnforge.optimizer import AttentionOptimizer

# Calls of sizes (B, Hq, Hkv, Lq, Lkv, D), float32 and not causal unless said otherwise.
config_of = functools.partial(AttentionConfig.from_sizes, dtype=torch.float32, causal=False)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module", autouse=True)
def report_gpu():
    print(f"\nGPU under test: {torch.cuda.get_device_name()} (torch {torch.__version__})")


def _decode(q, k, v, *, causal, **kwargs):
    return decode_attention(q, k, v, **kwargs)


def test_the_demo_sequence_runs_to_the_end():
    """The demo's candidates on the demo's shapes, including the strided case that faulted torch's flash."""
    candidates = {"torch sdpa per sequence": reference.sdpa_per_sequence, "decode": _decode}
    for shape in (config_of(2, 32, 8, 1, 4097, 128), config_of(1, 16, 2, 1, 1000, 64)):
        for name, fn in candidates.items():
            for case in verify.protocol_cases(
                dataclasses.replace(shape, dtype=torch.bfloat16, causal=True), device="cuda"
            ):
                assert verify.check(fn, case).passed, f"{name}: {case.describe()}"
    torch.cuda.synchronize()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_a_mixed_sequence_of_calls_through_the_optimizer_never_faults(dtype):
    """Shapes, head dims and strided views one after another, through the kernels and the torch fallback."""
    kernels = AttentionOptimizer(require_measurement=False)
    torch_only = AttentionOptimizer(kernels=())
    shapes = [config_of(1, 8, 2, 1, 4097, 64), config_of(3, 12, 4, 5, 300, 96),
              config_of(2, 4, 4, 1, 65, 256), config_of(1, 10, 2, 16, 1000, 80),
              config_of(2, 4, 1, 33, 33, 128)]  # fmt: skip
    for shape in shapes:
        for case in verify.protocol_cases(
            dataclasses.replace(shape, dtype=dtype, causal=True), device="cuda"
        ):
            # torch's masked paths read the padding, so NaN poisoned there is for the kernels only
            optimizers = (kernels,) if case.name == "poisoned" else (kernels, torch_only)
            for optimizer in optimizers:
                report = verify.check(optimizer.attention, case)
                assert report.passed, str(report)
    torch.cuda.synchronize()
    copies = torch_only.get_stats()["input_copies"]
    if dtype != torch.float32:  # the strided case's v starts 4 elements in: 8 bytes off for 2-byte types
        assert any("not 16-byte aligned" in reason for reason in copies), copies


def test_unaligned_views_are_copied_before_torch_sdpa():
    buffer = torch.randn(1, 2, 100, 136, device="cuda", dtype=torch.bfloat16)
    view = buffer[..., 4:132]  # data pointer 8 bytes past a 16-byte boundary
    assert reference.fused_sdpa_unsafe(view) == "data pointer not 16-byte aligned"
    reasons = []
    q = torch.randn(1, 8, 1, 128, device="cuda", dtype=torch.bfloat16)
    _, k, _ = reference.fused_sdpa_safe(q, view, view, on_copy=reasons.append)
    assert k.data_ptr() % 16 == 0
    assert reasons == ["k: data pointer not 16-byte aligned", "v: data pointer not 16-byte aligned"]


@pytest.mark.parametrize("kv_lens", [[100], [-5], [2**31 - 1], [-(2**31)]])
def test_out_of_range_kv_lens_cannot_fault(kv_lens):
    """Lengths are clamped to [0, Lkv] on the device: a 33-key cache read as 33 keys or none."""
    q = torch.randn(1, 8, 1, 64, device="cuda")
    k, v = torch.randn(1, 2, 33, 64, device="cuda"), torch.randn(1, 2, 33, 64, device="cuda")
    lens = torch.tensor(kv_lens, dtype=torch.int32, device="cuda")
    out = decode_attention(q, k, v, kv_lens=lens)
    torch.cuda.synchronize()
    clamped = torch.tensor([min(max(kv_lens[0], 0), 33)], device="cuda")
    expected = verify.reference_attention(q, k, v, kv_lens=clamped)
    assert verify.relative_l2_per_slice(out, expected).max() <= 1e-4


def _decode_case(seed: int, kv_len: int = 4096):
    generator = torch.Generator().manual_seed(seed)
    return verify.random_case(config_of(1, 32, 8, 1, kv_len, 128, dtype=torch.bfloat16), device="cuda",
                              generator=generator)  # fmt: skip


def test_two_streams_never_share_a_workspace():
    """Split-KV calls on two streams at once, each many times: every output equals its own oracle."""
    cases = [_decode_case(seed) for seed in (1, 2)]
    expected = [case.reference() for case in cases]
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    outs = [[], []]
    torch.cuda.synchronize()
    for _ in range(50):
        for i, (stream, case) in enumerate(zip(streams, cases, strict=True)):
            with torch.cuda.stream(stream):
                outs[i].append(decode_attention(case.q, case.k, case.v))
    torch.cuda.synchronize()
    for i in range(2):
        for out in outs[i]:
            assert verify.relative_l2_per_slice(out, expected[i]).max() <= 1e-2


def test_two_graphs_replayed_side_by_side_stay_correct():
    """Two captured graphs (each call with its own workspace) replayed on two streams at once."""
    cases = [_decode_case(seed) for seed in (3, 4)]
    outs = [torch.empty_like(case.q) for case in cases]
    for case, out in zip(cases, outs, strict=True):
        decode_attention(case.q, case.k, case.v, out=out)  # compile outside the capture
    graphs = []
    for case, out in zip(cases, outs, strict=True):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            decode_attention(case.q, case.k, case.v, out=out)
        graphs.append(graph)
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    torch.cuda.synchronize()
    for _ in range(30):
        for graph, stream in zip(graphs, streams, strict=True):
            with torch.cuda.stream(stream):
                graph.replay()
    torch.cuda.synchronize()
    for case, out in zip(cases, outs, strict=True):
        assert verify.relative_l2_per_slice(out, case.reference()).max() <= 1e-2


def test_a_caller_owned_workspace_is_used_and_sized_before_capture():
    case = _decode_case(5, kv_len=16384)
    workspace = DecodeWorkspace.for_call(case.q, case.k)
    out = decode_attention(case.q, case.k, case.v, workspace=workspace)
    assert verify.relative_l2_per_slice(out, case.reference()).max() <= 1e-2
    small = DecodeWorkspace("cuda")
    graph = torch.cuda.CUDAGraph()
    too_small = pytest.raises(RuntimeError, match="decode workspace too small during CUDA-graph capture")
    with too_small, torch.cuda.graph(graph):
        decode_attention(case.q, case.k, case.v, workspace=small)


def test_compile_and_graph_replay_equal_eager():
    case = _decode_case(6)
    eager = decode_attention(case.q, case.k, case.v)
    compiled = torch.compile(lambda q, k, v: decode_attention(q, k, v), fullgraph=True)
    torch.testing.assert_close(compiled(case.q, case.k, case.v), eager, rtol=0, atol=0)
    out = torch.full_like(case.q, math.nan)
    graph = torch.cuda.CUDAGraph()
    decode_attention(case.q, case.k, case.v, out=out)
    with torch.cuda.graph(graph):
        decode_attention(case.q, case.k, case.v, out=out)
    fresh = _decode_case(7)
    case.q.copy_(fresh.q), case.k.copy_(fresh.k), case.v.copy_(fresh.v)
    graph.replay()
    torch.cuda.synchronize()
    assert verify.relative_l2_per_slice(out, fresh.reference()).max() <= 1e-2


def test_a_graph_merge_entry_is_compiled_before_capture_and_replays_as_eager(graph_merge_entry):
    """Captured calls launch the entry's graph merge: its kernel was compiled and loaded by the first plain
    call (nothing compiles during the capture), and the replay agrees with the eager call and the oracle."""
    case = _decode_case(8)
    eager = decode_attention(case.q, case.k, case.v)
    out = torch.full_like(case.q, math.nan)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decode_attention(case.q, case.k, case.v, out=out)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, eager)  # the same merge arithmetic, in other programs
    assert verify.relative_l2_per_slice(out, case.reference()).max() <= 1e-2
