"""kernels/decode_step.py: a decode step's attention from the q/k/v product, against the float64 oracle over
torch's own rotation, and against the two kernels it fuses (rope_and_store, then decode_attention)."""

import new_token_reference as ref
import pytest
import torch

from attnforge import verify
from attnforge.kernels import decode, decode_params, decode_step
from attnforge.kernels.decode import decode_attention
from attnforge.kernels.decode_step import decode_step_attention
from attnforge.kernels.rope_cache import rope_and_store

DEVICE = ref.DEVICE


@pytest.fixture
def splits(monkeypatch):
    """Decode's tuning entry for every bucket: 16-key tiles in `n` splits, each merge mode's entry alike (the
    fused kernel merges in the kernel whatever the entry says)."""

    def use(n, combine="kernel", alone_tiles=2, tma=False, merge_parts=False):
        entry = {"BLOCK_N": 16, "num_splits": n, "num_warps": 4, "num_stages": 2, "combine": combine,
                 "alone_tiles": alone_tiles, "tma": tma, "merge_parts": merge_parts}  # fmt: skip
        monkeypatch.setattr(decode_params.tuning, "launch_params", lambda *args, **kwargs: entry)
        decode_params.bucket_params.cache_clear()
        decode.merged_in_kernel.cache_clear()

    yield use
    monkeypatch.undo()
    decode_params.bucket_params.cache_clear()
    decode.merged_in_kernel.cache_clear()


def _inputs(batch, heads, kv_heads, dim, dtype, max_seq, seed, positions=None):
    qkv, cache_k, cache_v, gains, drawn = ref.case(batch, heads, kv_heads, dim, dtype, seed, max_seq)
    positions = drawn if positions is None else torch.tensor(positions, device=DEVICE).view(batch, 1)
    cos, sin = ref.tables(max_seq, dim, dtype)
    return qkv, cos, sin, positions, cache_k, cache_v, gains


def _oracle(qkv, cos, sin, positions, cache_k, cache_v, heads, gains, eps=1e-6):
    """float64 attention of torch's rotated query over the cache before each position plus the new key."""
    batch, kv_heads, _, dim = cache_k.shape[0] - 1, *cache_k.shape[1:]
    q, k, v = ref.expected(qkv, heads, kv_heads, dim, cos, sin, positions, gains, eps)
    keys, values = cache_k[:batch].clone(), cache_v[:batch].clone()
    for b in range(batch):
        keys[b, :, positions[b, 0]], values[b, :, positions[b, 0]] = k[b, :, 0], v[b, :, 0]
    return verify.reference_attention(q, keys, values, causal=True, kv_lens=positions[:, 0] + 1), k, v


@pytest.mark.parametrize(
    "batch,heads,kv_heads,dim,max_seq,positions",
    [
        (2, 4, 2, 64, 70, [0, 69]),  # GQA 2:1; the first and the last slot
        (3, 6, 2, 80, 100, [37, 1, 64]),  # GQA 3:1, odd head dim, odd positions
        (1, 4, 4, 96, 50, [49]),  # MHA
        (2, 5, 1, 128, 65, [16, 33]),  # MQA 5:1, positions on tile edges
    ],
)
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("merge_parts", [False, True])  # 5 rows of 8 merged as 4 + 1 with it
def test_the_step_agrees_with_the_oracle_and_writes_only_the_new_slot(
    splits, batch, heads, kv_heads, dim, max_seq, positions, num_splits, norm, merge_parts
):
    splits(num_splits, alone_tiles=0, merge_parts=merge_parts)
    qkv, cos, sin, pos, cache_k, cache_v, gains = _inputs(
        batch, heads, kv_heads, dim, torch.float32, max_seq, seed=dim + num_splits, positions=positions
    )
    cache_k[:, :, pos.max() + 1 :] = float("nan")  # poison: keys after the newest one are never read
    before_k, before_v = cache_k.clone(), cache_v.clone()
    want, k, v = _oracle(qkv, cos, sin, pos, cache_k, cache_v, heads, gains if norm else None)
    norms = {"q_norm": (gains[0], 1e-6), "k_norm": (gains[1], 1e-6)} if norm else {}
    out = decode_step_attention(qkv, cos, sin, pos, cache_k, cache_v, num_heads=heads, **norms)
    assert out.shape == (batch, heads, 1, dim) and out.dtype == torch.float32
    errors = verify.relative_l2_per_slice(out, want)
    assert errors.max() <= verify.tolerance_for(torch.float32), errors
    for b in range(batch):
        p = pos[b, 0]
        torch.testing.assert_close(cache_k[b, :, p], k[b, :, 0], atol=1e-5, rtol=1e-5)
        assert torch.equal(cache_v[b, :, p], v[b, :, 0])
        before_k[b, :, p], before_v[b, :, p] = cache_k[b, :, p], cache_v[b, :, p]
    same = torch.equal(cache_k.nan_to_num(7.0), before_k.nan_to_num(7.0)) and torch.equal(cache_v, before_v)
    assert same, "only the new slots changed"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("combine,alone_tiles", [("last", 2), ("kernel-pdl", 0)])
def test_the_step_equals_rope_and_store_then_decode_attention(splits, dtype, combine, alone_tiles):
    splits(4, combine, alone_tiles)
    drawn = _inputs(3, 8, 2, 128, dtype, 90, seed=5, positions=[3, 89, 50])
    qkv, cos, sin, pos, cache_k, cache_v, gains = drawn
    norms = {"q_norm": (gains[0], 1e-6), "k_norm": (gains[1], 1e-6)}
    two_k, two_v = cache_k.clone(), cache_v.clone()
    out = decode_step_attention(qkv, cos, sin, pos, cache_k, cache_v, num_heads=8, **norms)
    q = rope_and_store(qkv, cos, sin, pos, two_k, two_v, num_heads=8, **norms)
    want = decode_attention(q, two_k[:3], two_v[:3], kv_lens=pos[:, 0] + 1)
    assert torch.equal(cache_k, two_k) and torch.equal(cache_v, two_v)
    errors = verify.relative_l2_per_slice(out, want)
    assert errors.max() <= verify.tolerance_for(dtype), errors


@pytest.mark.parametrize("num_splits", [1, 4])
def test_the_step_through_tma_never_reads_the_slots_from_the_new_one_on(splits, num_splits, monkeypatch):
    """The cache read through TMA descriptors (a "tma" entry, Hopper; the interpreter runs the path when the
    guard is lifted): tiles end at each sequence's new position (below one tile, from coordinates under 0), so
    NaN/Inf in its slot and past it never reach the output; the new key and value still land in the cache."""
    monkeypatch.setattr(decode, "tma_capable", lambda device, dtype: True)
    splits(num_splits, "last", 0, tma=True)
    drawn = _inputs(3, 8, 2, 64, torch.float16, 90, seed=5, positions=[3, 89, 50])
    qkv, cos, sin, pos, cache_k, cache_v, _ = drawn
    for b in range(3):
        cache_k[b, :, pos[b, 0] :], cache_v[b, :, pos[b, 0] :] = float("nan"), float("inf")
    want, k, v = _oracle(qkv, cos, sin, pos, cache_k, cache_v, 8, None)
    assert decode.merged_in_kernel((3, 8, 1, 64), 2, 90, torch.float16, DEVICE).tma_block == [1, 1, 16, 64]
    out = decode_step_attention(qkv, cos, sin, pos, cache_k, cache_v, num_heads=8)
    assert torch.isfinite(out).all()
    assert verify.relative_l2_per_slice(out, want).max() <= verify.tolerance_for(torch.float16)
    for b in range(3):
        assert torch.equal(cache_v[b, :, pos[b, 0]], v[b, :, 0])


def test_every_output_element_is_written_call_after_call(splits):
    """Into an output filled with NaN, repeatedly (the arrival counters must return to zero), sequences with
    few and with many keys in one batch."""
    splits(3, alone_tiles=1)
    qkv, cos, sin, pos, cache_k, cache_v, _ = _inputs(2, 4, 2, 64, torch.float32, 64, 9, positions=[2, 60])
    want, _, _ = _oracle(qkv, cos, sin, pos, cache_k, cache_v, 4, None)
    for _ in range(3):
        out = torch.full((2, 4, 1, 64), float("nan"), device=DEVICE)
        decode_step.launch_decode_step(qkv, cos, sin, pos, cache_k, cache_v, None, None, 0.0, 4, 0.125, out)
        assert verify.relative_l2_per_slice(out, want).max() <= verify.tolerance_for(torch.float32)


@pytest.mark.parametrize("position", [-1, 24, 10**6])
def test_a_position_outside_the_cache_writes_nothing_and_reads_inside(position):
    qkv, cos, sin, _, cache_k, cache_v, _ = _inputs(2, 2, 1, 64, torch.float32, 24, seed=3)
    before = cache_k.clone(), cache_v.clone()
    positions = torch.tensor([[position], [position]], device=DEVICE)
    out = decode_step_attention(qkv, cos, sin, positions, cache_k, cache_v, num_heads=2)
    assert torch.isfinite(out).all()
    assert torch.equal(cache_k, before[0]) and torch.equal(cache_v, before[1])


def test_compiled_calls_equal_eager_and_update_the_cache_in_place(splits):
    splits(2)
    qkv, cos, sin, pos, cache_k, cache_v, _ = _inputs(2, 4, 2, 64, torch.float32, 40, 4, positions=[5, 39])
    original = cache_k.clone(), cache_v.clone()
    eager_k, eager_v = cache_k.clone(), cache_v.clone()
    want = decode_step_attention(qkv, cos, sin, pos, eager_k, eager_v, num_heads=4)
    workspace = decode.DecodeWorkspace(DEVICE, *decode_step.workspace_size(2, 4, cache_k))

    def step(qkv, positions, own):
        return decode_step_attention(qkv, cos, sin, positions, cache_k, cache_v, num_heads=4,
                                     workspace=workspace if own else None)  # fmt: skip

    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    for own in (True, False):  # the caller's workspace, and a temporary one in the graph
        cache_k.copy_(original[0])
        cache_v.copy_(original[1])
        assert torch.equal(compiled(qkv, pos, own), want)
        assert torch.equal(cache_k, eager_k) and torch.equal(cache_v, eager_v), "the new slots, in place"


def _args():
    qkv, cos, sin, pos, cache_k, cache_v, _ = _inputs(1, 2, 1, 64, torch.float32, 24, seed=1)
    return dict(qkv=qkv, cos=cos, sin=sin, positions=pos, cache_k=cache_k, cache_v=cache_v, num_heads=2)


BAD = [
    ({"qkv": lambda a: a["qkv"][..., :-64]}, "qkv must be [b <= 2, 1, 256] (one new token)"),
    ({"num_heads": lambda a: 0}, "qkv must be [b <= 2, 1, 128]"),
    ({"cos": lambda a: a["cos"][:10], "sin": lambda a: a["sin"][:10]}, "cos and sin have 10 rows; they need"),
    (
        {
            "qkv": lambda a: torch.zeros(1, 1, 4 * 32, device=DEVICE),
            "cache_k": lambda a: torch.zeros(2, 1, 24, 32, device=DEVICE),
            "cache_v": lambda a: torch.zeros(2, 1, 24, 32, device=DEVICE),
            "cos": lambda a: a["cos"][:, :32],
            "sin": lambda a: a["sin"][:, :32],
        },
        "head_dim=32 is not supported",
    ),
    (
        {"num_heads": lambda a: 3, "qkv": lambda a: torch.zeros(1, 1, 7 * 64, device=DEVICE)},
        "num_heads=3 must be a multiple of the cache's 2 heads",
    ),
    ({"positions": lambda a: a["positions"].view(1)}, "positions must be integer [1, 1]"),
    ({"scale": lambda a: -1.0}, "scale"),
]


@pytest.mark.parametrize("change,message", BAD)
def test_bad_input_is_refused_with_the_reason(change, message):
    args = _args()
    if "num_heads" in change and "qkv" in change:  # three query heads need a cache of heads dividing them
        args["cache_k"], args["cache_v"] = (torch.zeros(2, 2, 24, 64, device=DEVICE) for _ in range(2))
    args.update({name: make(args) for name, make in change.items()})
    with pytest.raises(ValueError) as error:
        decode_step_attention(**args)
    assert message in str(error.value)
