"""decode_attention against the float64 oracle (CPU: Triton interpreter, small sizes)."""

import dataclasses
import functools
import math

import pytest
import sm90_child
import torch

from attnforge import verify
from attnforge.config import AttentionConfig
from attnforge.kernels import decode, decode_params
from attnforge.kernels.decode import decode_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Calls of sizes (B, Hq, Hkv, Lq, Lkv, D), float32 and not causal unless said otherwise.
config_of = functools.partial(AttentionConfig.from_sizes, dtype=torch.float32, causal=False)


def _decode(q, k, v, *, causal, **kwargs):
    assert causal, "decode attention is always causal among the new tokens"
    return decode_attention(q, k, v, **kwargs)


def _assert_all_pass(shape, dtype, kinds=verify.CASE_KINDS):
    for case in verify.protocol_cases(
        dataclasses.replace(shape, dtype=dtype, causal=True), kinds=kinds, device=DEVICE
    ):
        report = verify.check(_decode, case)
        assert report.passed, str(report)


@pytest.mark.parametrize(
    "shape",
    [
        config_of(2, 8, 2, 1, 65, 64),  # GQA 4:1, odd length
        config_of(1, 6, 1, 7, 63, 64),  # MQA, 7 new tokens
        config_of(3, 4, 4, 1, 1000, 64),  # MHA, longer cache, odd batch
        config_of(1, 5, 1, 16, 129, 64),  # 16 new tokens (the most decode takes), GQA 5:1
        config_of(2, 2, 2, 1, 1, 64),  # a one-key cache
    ],
    ids=str,
)
def test_protocol_fp32(shape):
    _assert_all_pass(shape, torch.float32)


@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_head_dim_and_half_dtype(head_dim, dtype):
    _assert_all_pass(config_of(1, 4, 2, 2, 37, head_dim), dtype, kinds=("random", "needle", "poisoned"))


@pytest.mark.parametrize("block_m", [16, 32])
def test_row_blocks_of_a_kv_head_agree_with_the_oracle(block_m):
    """MQA with 32 query rows per KV head, served whole or in two 16-row blocks, with split-KV merges."""
    case = verify.needle_case(config_of(1, 32, 1, 1, 200, 64, causal=True), device=DEVICE)
    out = torch.full_like(case.q, math.nan)
    params = {"BLOCK_M": block_m, "BLOCK_N": 32, "num_splits": 3, "num_warps": 4, "num_stages": 2}
    decode.launch_decode(case.q, case.k, case.v, out, scale=0.125, kv_lens=None, params=params)
    assert verify.relative_l2_per_slice(out, case.reference()).max() <= verify.tolerance_for(torch.float32)


def test_row_blocks_must_be_powers_of_two():
    case = verify.random_case(config_of(1, 4, 1, 1, 20, 64, causal=True), device=DEVICE)
    with pytest.raises(ValueError, match=r"BLOCK_M=24 must be a power of two >= 16"):
        decode.launch_decode(case.q, case.k, case.v, torch.empty_like(case.q), scale=0.1,
                             params={"BLOCK_M": 24, "BLOCK_N": 32, "num_splits": 1})  # fmt: skip


@pytest.mark.parametrize("combine", decode_params.COMBINE_MODES)
@pytest.mark.parametrize("kv_lens", [None, [300, 5]])
@pytest.mark.parametrize("heads, q_len", [((8, 2), 3), ((10, 2), 1)], ids=["4:1-Lq3", "5:1-Lq1"])
def test_each_way_of_merging_the_splits_agrees_with_the_oracle(combine, kv_lens, heads, q_len):
    """The last program merging, or a second kernel (with programmatic dependent launch where supported);
    12 and 5 real rows of 16- and 8-row partials (the padding rows are neither written nor read)."""
    shape = config_of(2, *heads, q_len, 300, 64, causal=True)
    case = verify.needle_case(shape, kv_lens=kv_lens, device=DEVICE)
    out = torch.full_like(case.q, math.nan)
    params = {"BLOCK_N": 32, "num_splits": 4, "num_warps": 4, "num_stages": 2, "combine": combine}
    decode.launch_decode(case.q, case.k, case.v, out, scale=0.125, kv_lens=case.kv_lens, params=params)
    assert verify.relative_l2_per_slice(out, case.reference()).max() <= verify.tolerance_for(torch.float32)


@pytest.mark.parametrize("merge_parts", [False, True])
@pytest.mark.parametrize(
    "heads, q_len",
    [((8, 2), 1), ((10, 2), 1), ((12, 2), 1), ((14, 2), 1), ((9, 1), 1), ((5, 1), 2), ((16, 2), 3)],
    ids=["4:1", "5:1", "6:1", "7:1", "9:1", "5:1-Lq2", "8:1-Lq3"],
)
def test_the_last_program_merges_the_splits_either_way(merge_parts, heads, q_len):
    """4 .. 24 real rows of 4- to 32-row partials, merged by the last program in one part, or with
    "merge_parts" 5 rows as 4 + 1 and 9-10 as 8 + 1 / 8 + 2 (`split_kv.merge_two_parts`), the others in one
    part with fewer splits a step where they hold many rows; one sequence read by split 0 alone."""
    shape = config_of(3, *heads, q_len, 300, 64, causal=True)
    case = verify.needle_case(shape, kv_lens=[300, 5, 77], device=DEVICE)
    out = torch.full_like(case.q, math.nan)
    params = {"BLOCK_N": 32, "num_splits": 4, "num_warps": 4, "num_stages": 2, "merge_parts": merge_parts}
    decode.launch_decode(case.q, case.k, case.v, out, scale=0.125, kv_lens=case.kv_lens, params=params)
    assert verify.relative_l2_per_slice(out, case.reference()).max() <= verify.tolerance_for(torch.float32)


@pytest.mark.parametrize(
    ("rows", "part_rows", "lo"),
    [(5, 8, 1), (6, 8, 0), (7, 8, 0), (8, 8, 0), (3, 4, 0), (9, 16, 1), (10, 16, 2), (11, 16, 0),
     (40, 16, 0)],
)  # fmt: skip
def test_two_part_merges_where_the_second_part_is_a_quarter_of_the_first_or_less(rows, part_rows, lo):
    assert decode_params.merge_lo_rows(rows, part_rows) == lo


@pytest.mark.parametrize(
    ("splits", "part_rows", "lo", "d_block", "parts", "chunk"),
    [
        (16, 8, 0, 128, False, 16),  # 128 floats a thread: the default
        (16, 8, 1, 128, True, 16),  # 4 + 1 rows: 80
        (16, 8, 0, 128, True, 8),  # 8 rows: 64 a step, two steps
        (16, 16, 0, 128, True, 4),
        (16, 4, 0, 256, False, 16),
        (16, 4, 0, 256, True, 8),
        (5, 8, 0, 128, True, 8),  # no more than the splits (to a power of two)
        (3, 2, 0, 128, True, 4),
        (16, 64, 0, 256, False, 1),  # one split a step at the least
    ],
)
def test_a_merge_step_loads_what_stays_in_flight(splits, part_rows, lo, d_block, parts, chunk):
    assert decode_params.merge_chunk(splits, part_rows, lo, d_block, parts) == chunk


def test_merge_parts_sets_the_launchs_merge_and_leaves_the_default_as_it_was():
    """GQA 5:1 at d128 with 16 splits: two parts of 4 + 1 rows, 16 splits a step, with "merge_parts"; one part
    of 8 rows and 16 a step without (the launch every stored entry makes); a second-kernel merge takes no
    parts; 8:1 steps of 8 splits with it."""

    def launch(heads: int, **extra):
        p = decode_params.complete_params({"BLOCK_N": 128, "num_splits": 16, "num_warps": 4, "num_stages": 3,
                                           **extra}, heads, 4096)  # fmt: skip
        shape = (1, 8 * heads, 1, 128)
        return decode.DecodeLaunch(p, shape, 8, torch.bfloat16, "cpu", False, False).constants

    default, parts = launch(5), launch(5, merge_parts=True)
    assert (default["MERGE_LO"], default["S_CHUNK"]) == (0, 16)
    assert (parts["MERGE_LO"], parts["S_CHUNK"]) == (1, 16)
    assert launch(5, merge_parts=True, combine="kernel")["MERGE_LO"] == 0
    assert (launch(8)["S_CHUNK"], launch(8, merge_parts=True)["S_CHUNK"]) == (16, 8)


_SM90_MERGE = """
import json, sys
from attnforge.kernels import decode, decode_step, offline
types = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "Out": "*bf16", "KvLens": "*i32", "KvStarts": "*i32",
         "PartO": "*fp32", "Counters": "*i32", "scale_log2": "fp32", "QKV": "*bf16", "Cos": "*bf16",
         "Sin": "*bf16", "Positions": "*i64", "QGain": "*bf16", "KGain": "*bf16", "CacheK": "*bf16",
         "CacheV": "*bf16", "KSrc": "*bf16", "VSrc": "*bf16", "eps": "fp32"}
common = dict(GROUP=5, HEAD_DIM=128, D_BLOCK=128, BLOCK_M=16, NUM_M_BLOCKS=1, BLOCK_N=128, SPLIT=True,
              SPLITS_P2=16, PART_ROWS=8, S_CHUNK=16, FP32_DOT=False, USE_PDL=True, ALONE_TILES=2,
              USE_TMA=False)
options = {"num_warps": 4, "num_stages": 3, "launch_pdl": True}
local = []
for lo in json.loads(sys.argv[1]):
    plain = dict(common, Q_LEN=1, HAS_KV_LENS=True, HAS_KV_STARTS=False, MERGE_LAST=True, MERGE_LO=lo)
    step = dict(common, NUM_HEADS=40, Q_NORM=True, K_NORM=True, MERGE_LO=lo)
    for kernel, constants in ((decode._decode_kernel, plain), (decode_step._decode_step_kernel, step)):
        shared = offline.compile_sm90(kernel, constants, types, options).metadata.shared
        local.append(shared <= offline.HOPPER_SHARED_BYTES)
print(json.dumps(local))
"""


def test_the_two_part_merge_compiles_for_hopper():
    """The decode kernel and the decode step with the two-part merge of GQA 5:1 (MERGE_LO 1) and without it,
    compiled for sm_90 (a part's rows must be compile-time constants there; the interpreter takes any), each
    within the shared memory a program may take."""
    assert sm90_child.run(_SM90_MERGE, [0, 1]) == [True] * 4


def test_mqa_splits_merged_by_a_second_kernel_agree_with_the_oracle():
    """32 query rows of one KV head over 18 tiles: the heuristic takes them in two 16-row blocks (few KV
    heads) and 18 splits, whose 288 partial rows are more than the last program merges (MERGE_ROWS), so a
    second kernel merges them; a one-launch merge (the decode step's) takes fewer splits instead."""
    p = decode_params.heuristic_params(1, 2200, 1, 32, 64, 4, 132)
    assert (p["BLOCK_M"], p["num_splits"], p["combine"]) == (16, 18, "kernel-pdl")
    case = verify.needle_case(config_of(1, 32, 1, 1, 2200, 64, causal=True), device=DEVICE)
    out = torch.full_like(case.q, math.nan)
    decode.launch_decode(case.q, case.k, case.v, out, scale=0.125, params=p)
    assert verify.relative_l2_per_slice(out, case.reference()).max() <= verify.tolerance_for(torch.float32)
    one = decode.merged_in_kernel((1, 32, 1, 64), 1, 2200, torch.float32, torch.device("cpu"))
    assert one.params["combine"] == "last" and one.splits == decode_params.MERGE_ROWS // 16


def test_heuristic_splits_the_rows_of_few_kv_heads_only():
    """Rows in 16-row blocks where each KV head of the batch has ROW_SPLIT_SMS_PER_HEAD SMs or more (MQA);
    8 KV heads keep one block for all of a head's rows (Lq 8: 32 rows)."""
    assert decode_params.heuristic_params(1, 4096, 1, 32, 128, 2, 132)["BLOCK_M"] == 16
    assert decode_params.heuristic_params(4, 4096, 1, 32, 128, 2, 132)["BLOCK_M"] == 16
    assert decode_params.heuristic_params(1, 4096, 8, 32, 128, 2, 132)["BLOCK_M"] == 32
    assert decode_params.heuristic_params(5, 4096, 1, 64, 128, 2, 132)["BLOCK_M"] == 64


@pytest.mark.parametrize("alone_tiles", [0, 2, 8])
@pytest.mark.parametrize("combine", ["last", "kernel"])
def test_short_sequences_read_by_one_split_agree_with_the_oracle_call_after_call(alone_tiles, combine):
    """Sequences whose valid keys fit in `alone_tiles` tiles are read by split 0 alone (no partials, no
    merge), the others split and merge, in one batch (empty, 1 tile, 4 tiles, 10 tiles of 32 keys): every
    output right, twice in a row (the merged slots' counters are reset; the others are never touched)."""
    case = verify.random_case(config_of(4, 8, 2, 1, 300, 64, causal=True), kv_lens=[0, 17, 100, 300],
                              device=DEVICE)  # fmt: skip
    params = {"BLOCK_N": 32, "num_splits": 4, "num_warps": 4, "num_stages": 2, "combine": combine,
              "alone_tiles": alone_tiles}  # fmt: skip
    expected = case.reference()
    workspace = decode.DecodeWorkspace.for_call(case.q, case.k, case.kv_lens)
    for _ in range(2):
        out = torch.full_like(case.q, math.nan)
        decode.launch_decode(case.q, case.k, case.v, out, scale=0.125, kv_lens=case.kv_lens, params=params,
                             workspace=workspace)  # fmt: skip
        assert torch.equal(out[0], torch.zeros_like(out[0]))  # no valid key: output 0
        errors = verify.relative_l2_per_slice(out[1:], expected[1:])
        assert errors.max() <= verify.tolerance_for(torch.float32)
        assert not workspace.counters.any()


def _poisoned_half_case(batch, q_len, kv_len, kv_lens, dtype=torch.float16):
    """A GQA 4:1 d64 case whose keys and values past each valid length are NaN and +Inf."""
    case = verify.random_case(config_of(batch, 8, 2, q_len, kv_len, 64, dtype=dtype, causal=True),
                              kv_lens=kv_lens, device=DEVICE)  # fmt: skip
    for b, end in enumerate(kv_lens):
        case.k[b, :, end:] = math.nan
        case.v[b, :, end:] = math.inf
    return case


@pytest.mark.parametrize("num_splits, q_len", [(1, 1), (3, 1), (4, 3)])
def test_the_tma_launch_never_reads_past_the_valid_keys(num_splits, q_len, monkeypatch):
    """K/V through TMA descriptors (a tuning entry's "tma", Hopper; the interpreter runs the path when the
    guard is lifted): a tile that would pass a sequence's valid length is read shifted back to end there
    (below one tile, from coordinates under 0 that read as zeros), so the NaN/Inf past it never reach the
    output; odd lengths, one split and several, 1 and 3 new tokens (causal among them)."""
    monkeypatch.setattr(decode, "tma_capable", lambda device, dtype: True)
    case = _poisoned_half_case(4, q_len, 100, [q_len, 17, 70, 100])
    params = {"BLOCK_N": 32, "num_splits": num_splits, "num_warps": 4, "num_stages": 2, "tma": True}
    launch = decode.decode_launch(tuple(case.q.shape), 2, 100, True, False, case.q.dtype, DEVICE, params)
    assert launch.tma_block == [1, 1, 32, 64]
    out = torch.full_like(case.q, math.nan)
    decode.launch_decode(case.q, case.k, case.v, out, scale=0.125, kv_lens=case.kv_lens, params=params)
    assert torch.isfinite(out).all()
    assert verify.relative_l2_per_slice(out, case.reference()).max() <= verify.tolerance_for(torch.float16)


def test_the_tma_launch_takes_pointers_where_descriptors_cannot_read_the_call(monkeypatch):
    """Where TMA cannot read the call (a head_dim not 64 / 128, kv_starts, a base not 16-byte aligned, no
    Hopper GPU) the "tma" entry launches through pointers, with the same result."""
    assert not decode.tma_launchable(128, torch.bfloat16, torch.device("cpu"), False)  # no Hopper GPU here
    monkeypatch.setattr(decode, "tma_capable", lambda device, dtype: True)
    assert decode.tma_launchable(128, torch.bfloat16, DEVICE, False)
    assert not decode.tma_launchable(80, torch.bfloat16, DEVICE, False)
    assert not decode.tma_launchable(64, torch.bfloat16, DEVICE, True)
    case = _poisoned_half_case(2, 1, 64, [64, 40])
    shifted = torch.empty(case.k.numel() + 1, dtype=case.k.dtype, device=DEVICE)[1:].view_as(case.k)
    shifted.copy_(case.k)  # its base is 2 bytes past an aligned one
    params = {"BLOCK_N": 16, "num_splits": 2, "num_warps": 4, "num_stages": 2, "tma": True}
    out = torch.full_like(case.q, math.nan)
    decode.launch_decode(case.q, shifted, case.v, out, scale=0.125, kv_lens=case.kv_lens, params=params)
    assert verify.relative_l2_per_slice(out, case.reference()).max() <= verify.tolerance_for(torch.float16)


def test_alone_tiles_must_not_be_negative():
    case = verify.random_case(config_of(1, 4, 1, 1, 64, 64, causal=True), device=DEVICE)
    params = {"BLOCK_N": 16, "num_splits": 2, "alone_tiles": -1}
    with pytest.raises(
        ValueError, match=r"alone_tiles=-1 must be >= 0 \(0: only empty sequences skip the merge\)"
    ):
        decode.launch_decode(case.q, case.k, case.v, torch.empty_like(case.q), scale=0.1, params=params)


def test_an_unknown_merge_is_refused():
    case = verify.random_case(config_of(1, 4, 1, 1, 64, 64, causal=True), device=DEVICE)
    with pytest.raises(ValueError, match=r"combine='tree' is not one of \('last', 'kernel', 'kernel-pdl'\)"):
        decode.launch_decode(case.q, case.k, case.v, torch.empty_like(case.q), scale=0.1,
                             params={"BLOCK_N": 16, "num_splits": 2, "combine": "tree"})  # fmt: skip


@pytest.mark.parametrize("num_splits", [1, 3, 8])
def test_split_paths_agree_with_the_oracle(num_splits):
    """One split writes directly; several merge through the workspace, including empty splits."""
    case = verify.needle_case(config_of(2, 8, 2, 3, 300, 64, causal=True), device=DEVICE)
    out = torch.full_like(case.q, math.nan)
    params = {"BLOCK_N": 32, "num_splits": num_splits, "num_warps": 4, "num_stages": 2}
    decode.launch_decode(case.q, case.k, case.v, out, scale=0.125, kv_lens=None, params=params)
    errors = verify.relative_l2_per_slice(out, case.reference())
    assert errors.max() <= verify.tolerance_for(torch.float32)


def test_poisoned_cache_with_many_splits_and_short_lengths():
    """Short valid lengths leave whole splits empty; NaN/Inf beyond them must not matter."""
    case = verify.random_case(
        config_of(4, 4, 1, 1, 500, 64, causal=True), kv_lens=[1, 17, 250, 500], device=DEVICE
    )
    for b, end in enumerate(case.kv_lens.tolist()):
        case.k[b, :, end:] = math.nan
        case.v[b, :, end:] = math.inf
    out = torch.empty_like(case.q)
    params = {"BLOCK_N": 32, "num_splits": 16, "num_warps": 4, "num_stages": 2}
    decode.launch_decode(case.q, case.k, case.v, out, scale=0.125, kv_lens=case.kv_lens, params=params)
    assert torch.isfinite(out).all()
    assert verify.relative_l2_per_slice(out, case.reference()).max() <= 1e-4


def test_counters_reset_so_repeated_calls_agree():
    case = verify.random_case(config_of(1, 4, 2, 1, 200, 64, causal=True), device=DEVICE)
    first = decode_attention(case.q, case.k, case.v)
    for _ in range(3):
        torch.testing.assert_close(decode_attention(case.q, case.k, case.v), first, rtol=0, atol=0)


def test_out_buffer_is_written_in_place_and_returned():
    case = verify.random_case(config_of(2, 4, 2, 1, 40, 64, causal=True), device=DEVICE)
    out = torch.full_like(case.q, math.nan)
    assert decode_attention(case.q, case.k, case.v, out=out) is out
    assert verify.relative_l2_per_slice(out, case.reference()).max() <= 1e-4


def test_int64_kv_lens_and_custom_scale():
    case = verify.poisoned_case(config_of(2, 4, 2, 1, 50, 64, causal=True), device=DEVICE)
    case.kv_lens = case.kv_lens.long()
    case.scale = 0.3
    assert verify.check(_decode, case).passed


def test_custom_op_is_registered_with_a_fake_impl():
    q, k = torch.randn(1, 4, 1, 64, device=DEVICE), torch.randn(1, 2, 9, 64, device=DEVICE)
    with torch._subclasses.fake_tensor.FakeTensorMode():
        fq, fk = torch.empty(1, 4, 1, 64), torch.empty(1, 2, 9, 64)
        assert torch.ops.attnforge.decode_attention(fq, fk, fk, 0.125, None, None).shape == (1, 4, 1, 64)
    torch.library.opcheck(torch.ops.attnforge.decode_attention.default, (q, k, k.clone(), 0.125, None, None))


def test_a_compiled_graph_runs_on_the_callers_workspace_and_allocates_no_scratch(monkeypatch):
    """torch.compile with `workspace=`: the op runs the kernel on the caller's buffers (no workspace made or
    zeroed per call), agrees with the eager call, and leaves the counters at zero."""
    case = verify.random_case(config_of(2, 8, 2, 1, 300, 64, causal=True), kv_lens=[300, 41], device=DEVICE)
    workspace = decode.DecodeWorkspace.for_call(case.q, case.k, case.kv_lens)
    eager = decode_attention(case.q, case.k, case.v, kv_lens=case.kv_lens, workspace=workspace)
    made, init = [], decode.DecodeWorkspace.__init__
    monkeypatch.setattr(decode.DecodeWorkspace, "__init__", lambda self, *a: made.append(a) or init(self, *a))

    def call(q, k, v, lens):
        return decode_attention(q, k, v, kv_lens=lens, workspace=workspace)

    # traced whole and functionalized (aot_eager: inductor would need a C++ compiler on the CI machine)
    compiled = torch.compile(call, backend="aot_eager", fullgraph=True)
    out = compiled(case.q, case.k, case.v, case.kv_lens)
    assert made == [] and torch.equal(out, eager) and not workspace.counters.any()
    torch.library.opcheck(torch.ops.attnforge.decode_attention_in.default,
                          (case.q, case.k, case.v, 0.125, case.kv_lens, None, workspace.partials,
                           workspace.counters))  # fmt: skip


def test_a_workspace_over_given_buffers_never_grows():
    case = verify.random_case(config_of(1, 8, 2, 1, 600, 64, causal=True), device=DEVICE)
    small = decode.DecodeWorkspace.over(torch.empty(4, device=DEVICE), torch.zeros(1, dtype=torch.int32))
    with pytest.raises(
        ValueError,
        match=r"decode workspace too small: needs \d+ partial floats and \d+ "
        r"counters, has 4 and 1; size it with DecodeWorkspace.for_call",
    ):
        decode_attention(case.q, case.k, case.v, workspace=small)


def test_ops_that_compiled_graphs_run_keep_no_scratch_between_calls(monkeypatch):
    """torch.compile's CUDA graphs refuse memory that outlives a recording, and warm up inside their own
    pool: the ops (decode's and the optimizer's) take a fresh workspace per call; eager calls share one per
    stream."""
    from attnforge import kernels
    from attnforge.optimizer import AttentionOptimizer

    seen = []
    original = decode.DecodeWorkspace.buffers

    def spy(workspace, *sizes):
        seen.append(workspace)
        return original(workspace, *sizes)

    monkeypatch.setattr(decode.DecodeWorkspace, "buffers", spy)
    case = verify.random_case(config_of(1, 4, 2, 1, 300, 64, causal=True), device=DEVICE)
    for _ in range(2):
        decode_attention(case.q, case.k, case.v)
    assert seen[0] is seen[1]  # eager: the stream's workspace
    optimizer = AttentionOptimizer(kernels=("decode",), require_measurement=False, min_seq_len=1)
    for _ in range(2):
        torch.ops.attnforge.decode_attention(case.q, case.k, case.v, 0.125, None, None)
        torch.ops.attnforge.optimized_attention(case.q, case.k, case.v, None, False, None, None, None, None,
                                                id(optimizer))  # fmt: skip
    assert optimizer.get_stats()["by_kernel"] == {"decode": 2}
    assert len({id(w) for w in seen[2:]}) == 4 and seen[0] not in seen[2:]
    assert not kernels.workspaces_are_temporary()
    with kernels.temporary_workspaces():
        assert kernels.workspaces_are_temporary()
    assert not kernels.workspaces_are_temporary()


def test_bucket_names():
    assert decode_params.decode_bucket(1, 4096, 4, 1, 128) == "d128-m4-b1-kv4k"
    assert decode_params.decode_bucket(300, 300_000, 1, 1, 64) == "d64-m1-bmax-kvmaxk"


@pytest.mark.parametrize("kv_len, bound", [(1, 1024), (1024, 1024), (1025, 2048), (4096, 4096), (4097, 8192)])
def test_kv_bound_is_the_longest_cache_of_the_bucket(kv_len, bound):
    assert decode_params.kv_bound(kv_len) == bound
    bucket = functools.partial(decode_params.decode_bucket, 1, group=4, q_len=1, head_dim=128)
    assert bucket(kv_len) == bucket(bound)


def test_calls_of_one_bucket_share_a_launch_and_short_caches_cap_the_splits():
    sizes = ((2, 8, 1, 64), 2)
    first = decode.decode_launch(*sizes, 1000, False, False, torch.float32, torch.device(DEVICE))
    assert decode.decode_launch(*sizes, 1001, False, False, torch.float32, torch.device(DEVICE)) is first
    short = decode.decode_launch(*sizes, 20, False, False, torch.float32, torch.device(DEVICE))
    assert short.splits <= -(-20 // short.params["BLOCK_N"]) and short.grid == (short.splits, short.slots)


def test_captured_calls_merge_as_the_entry_says_and_the_first_plain_call_prepares_them(graph_merge_entry):
    device = torch.empty(0, device=DEVICE).device  # "cuda:0", as launch_decode sees it (not "cuda")
    sizes = ((2, 8, 1, 64), 2, 300, False, False, torch.float32, device)
    plain, captured = (decode.decode_launch(*sizes, None, mode) for mode in (False, True))
    assert (plain.params["combine"], captured.params["combine"]) == ("kernel", "last")
    assert plain.twin(300) is captured and captured.twin is None
    assert (plain.floats, plain.slots, plain.grid) == (captured.floats, captured.slots, captured.grid)
    case = verify.needle_case(config_of(2, 8, 2, 1, 300, 64, causal=True), device=DEVICE)
    out = torch.full_like(case.q, math.nan)
    decode.launch_decode(case.q, case.k, case.v, out, scale=0.125)  # not captured: the plain launch
    assert plain.twin is None  # prepared once (compiled and loaded on a GPU)
    assert verify.relative_l2_per_slice(out, case.reference()).max() <= verify.tolerance_for(torch.float32)


def test_captured_calls_take_the_entrys_graph_launch_and_workspaces_fit_both(graph_launch_entry):
    """An entry whose captured calls launch otherwise (other tiles, more splits): the plain launch holds it as
    its twin, a workspace sized by `workspace_size` serves both, and both launches are correct."""
    device = torch.empty(0, device=DEVICE).device
    sizes = ((2, 8, 1, 64), 2, 300, False, False, torch.float32, device)
    plain, captured = (decode.decode_launch(*sizes, None, mode) for mode in (False, True))
    assert plain.twin(300) is captured and (plain.splits, captured.splits) == (4, 8)
    assert (plain.params["BLOCK_N"], captured.params["BLOCK_N"]) == (32, 16)
    case = verify.needle_case(config_of(2, 8, 2, 1, 300, 64, causal=True), device=DEVICE)
    floats, slots = decode.workspace_size(case.q, case.k)
    assert (floats, slots) == (captured.floats, captured.slots) and captured.floats > plain.floats
    workspace = decode.DecodeWorkspace(case.q.device, floats, slots)
    tolerance = verify.tolerance_for(torch.float32)
    for launch in (plain, captured):
        out = torch.full_like(case.q, math.nan)
        launch(case.q, case.k, case.v, out, 0.125, workspace=workspace)
        assert verify.relative_l2_per_slice(out, case.reference()).max() <= tolerance
    assert workspace.partials.numel() == floats  # neither launch had to grow it


@pytest.mark.parametrize("sizes", [(1, 4, 2, 10, 64), (3, 8, 1, 37, 64), (2, 6, 6, 5, 80)])
def test_a_prepared_decode_is_decode_attention_to_the_bit(sizes):
    batch, heads, kv_heads, kv_len, dim = sizes
    generator = torch.Generator().manual_seed(kv_len)
    q = torch.randn(batch, 1, heads, dim, generator=generator).transpose(1, 2).to(DEVICE)  # a layer's q
    k, v = (torch.randn(batch, kv_heads, kv_len, dim, generator=generator).to(DEVICE) for _ in range(2))
    prepared = decode.prepared_decode(q.shape, k.shape, q.dtype, q.device)
    for scale in (None, 0.3):
        out = prepared(q, k, v, scale)
        assert out.shape == q.shape and out.is_contiguous()
        torch.testing.assert_close(out, decode_attention(q, k, v, scale=scale), rtol=0, atol=0)


def _qkv(q_shape=(1, 8, 1, 64), kv_shape=(1, 2, 16, 64), dtype=torch.float32):
    return (
        torch.randn(q_shape, dtype=dtype),
        torch.randn(kv_shape, dtype=dtype),
        torch.randn(kv_shape, dtype=dtype),
    )


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda: (torch.randn(8, 1, 64), *_qkv()[1:]), ValueError, r"q must have 4 dims"),
        (lambda: _qkv((2, 8, 1, 64)), ValueError, r"must agree in batch"),
        (lambda: _qkv((1, 8, 1, 128)), ValueError, r"head_dim"),
        (
            lambda: _qkv((1, 6, 1, 64), (1, 4, 16, 64)),
            ValueError,
            r"q heads 6 are not a multiple of k/v heads 4",
        ),
        (
            lambda: _qkv((1, 4, 1, 72), (1, 2, 16, 72)),
            ValueError,
            r"head_dim=72 is not supported \(64, 80, 96",
        ),
        (lambda: _qkv((1, 4, 17, 64), (1, 2, 32, 64)), ValueError, r"q_len=17 is not supported .*1\.\.16"),
        (lambda: _qkv((1, 4, 8, 64), (1, 2, 4, 64)), ValueError, r"q_len=8 exceeds kv_len=4"),
        (lambda: _qkv(dtype=torch.float64), TypeError, r"dtype torch.float64 is not supported"),
        (lambda: (_qkv()[0].half(), *_qkv()[1:]), TypeError, r"dtypes differ"),
    ],
)
def test_bad_inputs_name_the_value(make, error, message):
    q, k, v = make()
    with pytest.raises(error, match=message):
        decode_attention(q, k, v)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (
            {"kv_lens": torch.tensor([3, 4], dtype=torch.int32)},
            ValueError,
            r"kv_lens must .* shape \[B\]=\(1,\)",
        ),
        ({"kv_lens": torch.tensor([3.0])}, TypeError, r"kv_lens dtype torch.float32 is not supported"),
        ({"kv_lens": [3]}, TypeError, r"kv_lens must be an integer tensor .* got list"),
        ({"out": torch.empty(1, 8, 2, 64)}, ValueError, r"out must match q: shape \(1, 8, 1, 64\)"),
    ],
)
def test_bad_options_name_the_value(kwargs, error, message):
    q, k, v = _qkv()
    with pytest.raises(error, match=message):
        decode_attention(q, k, v, **kwargs)


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("q_len", [1, 3])
def test_left_padding_through_kv_starts_is_never_read(num_splits, q_len):
    """kv_starts (a left-padded batch): keys before each start hold NaN/Inf and must not matter; the result
    equals the oracle with those keys masked out. Starts past the length read nothing; negative ones clamp."""
    case = verify.random_case(
        config_of(4, 8, 2, q_len, 90, 64, causal=True), kv_lens=[90, 70, 50, 90], device=DEVICE
    )
    starts = torch.tensor([0, 13, 47, -5], dtype=torch.int32, device=DEVICE)
    for b, first in enumerate(starts.clamp(min=0).tolist()):
        case.k[b, :, :first] = math.nan
        case.v[b, :, :first] = math.inf
    keys_valid = torch.arange(90, device=DEVICE)[None, :] >= starts[:, None]
    expected = verify.reference_attention(
        case.q, case.k.nan_to_num(0.0, 0.0, 0.0), case.v.nan_to_num(0.0, 0.0, 0.0), causal=True,
        kv_lens=case.kv_lens, attn_mask=keys_valid[:, None, None, :],
    )  # fmt: skip
    out = torch.full_like(case.q, math.nan)
    params = {"BLOCK_N": 16, "num_splits": num_splits, "num_warps": 4, "num_stages": 2}
    decode.launch_decode(case.q, case.k, case.v, out, scale=case.q.shape[-1] ** -0.5, kv_lens=case.kv_lens,
                         kv_starts=starts, params=params)  # fmt: skip
    assert verify.relative_l2_per_slice(out, expected).max() <= verify.tolerance_for(torch.float32)
    past = decode_attention(case.q[:1], case.k[:1], case.v[:1], kv_starts=torch.tensor([95], device=DEVICE))
    assert torch.equal(past, torch.zeros_like(past))


def test_kv_starts_is_checked_like_kv_lens():
    q, k = torch.randn(2, 4, 1, 64), torch.randn(2, 2, 9, 64)
    with pytest.raises(ValueError, match=r"kv_starts must be an integer tensor .* got shape \(3,\)"):
        decode_attention(q, k, k, kv_starts=torch.zeros(3, dtype=torch.int32))
    with pytest.raises(TypeError, match=r"kv_starts dtype torch.float32 is not supported"):
        decode_attention(q, k, k, kv_starts=torch.zeros(2))


def test_lengths_given_as_strided_views_are_read_per_sequence():
    """kv_lens / kv_starts as columns of one [B, 2] tensor (as transformers' mask hook packs them)."""
    case = verify.random_case(config_of(3, 4, 2, 1, 40, 64, causal=True), device=DEVICE)
    ranges = torch.tensor([[0, 40], [5, 17], [30, 33]], dtype=torch.int32, device=DEVICE)
    starts, lens = ranges[:, 0], ranges[:, 1]
    assert not lens.is_contiguous()
    keys_valid = torch.arange(40, device=DEVICE)[None, :] >= starts[:, None]
    expected = verify.reference_attention(case.q, case.k, case.v, kv_lens=lens.contiguous(),
                                          attn_mask=keys_valid[:, None, None, :])  # fmt: skip
    out = decode_attention(case.q, case.k, case.v, kv_lens=lens, kv_starts=starts)
    assert verify.relative_l2_per_slice(out, expected).max() <= verify.tolerance_for(torch.float32)
