"""The rotating KV cache (`accelerate(model, max_kv_size=N, keep=K)`) against an evicting reference.

The reference below is written from the semantics alone, with the model's own modules and torch SDPA: tokens
go through one at a time, each layer keeps a list of (position, key, value), and after each token only the
first `keep` positions and the last `N - keep` stay; the token attends to exactly those. The accelerator must
give the same logits (fp32, relative error) and the same greedy tokens, with its cache tensors at N slots.
On CPU the kernels run through the Triton interpreter (tests/conftest.py), so the "kernels" cases stay tiny;
on a GPU the same tests run the compiled step replayed from a CUDA graph (the ring's slot and length are
computed inside it), and the test at the end checks the replay against the eager step in bf16.
"""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb  # noqa: E402

from attnforge.accel import accelerate  # noqa: E402
from attnforge.accel.graph import DecodeStep  # noqa: E402
from attnforge.accel.metrics import Meter  # noqa: E402

VOCAB = 96
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, head_dim=64,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2,
            bos_token_id=1, eos_token_id=VOCAB - 1, pad_token_id=0)  # fmt: skip
LOGIT_TOLERANCE = 1e-4  # fp32, relative to the largest logit
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def model():
    config = AutoConfig.for_model("llama", **TINY)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).to(DEVICE).eval()


def prompt(length: int, seed: int = 1) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB - 1, (length,), generator=generator).tolist()


@torch.no_grad()
def evicting_reference(model, tokens: list[int], new: int, size: int, keep: int):
    """Greedy continuation of `tokens` (new tokens) and the logits that chose each, one token at a time,
    each token attending to the first `keep` positions and the last `size - keep` (itself included)."""
    base, head_dim = model.model, model.config.head_dim
    kept = [[] for _ in base.layers]  # per layer: (position, key [1, Hkv, 1, D], value)
    sequence, logits = list(tokens), []
    for t in range(len(tokens) + new - 1):
        x = base.embed_tokens(torch.tensor([[sequence[t]]], device=DEVICE))
        cos, sin = base.rotary_emb(x, torch.tensor([[t]], device=DEVICE))
        for layer, cache in zip(base.layers, kept, strict=True):
            attn, h = layer.self_attn, layer.input_layernorm(x)
            q, k, v = (proj(h).view(1, 1, -1, head_dim).transpose(1, 2)
                       for proj in (attn.q_proj, attn.k_proj, attn.v_proj))  # fmt: skip
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            cache.append((t, k, v))
            cache[:] = [e for e in cache if e[0] < keep or e[0] > t - (size - keep)]
            keys, values = torch.cat([e[1] for e in cache], 2), torch.cat([e[2] for e in cache], 2)
            out = F.scaled_dot_product_attention(q, keys, values, enable_gqa=True)
            x = x + attn.o_proj(out.transpose(1, 2).reshape(1, 1, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        if t >= len(tokens) - 1:
            logits.append(model.lm_head(base.norm(x))[0, -1].float())
            if t + 1 == len(sequence):
                sequence.append(int(logits[-1].argmax()))
    return sequence[len(tokens) :], logits


@torch.inference_mode()
def forced_logits(acc, tokens: list[int], prompt_len: int) -> list[torch.Tensor]:
    """The accelerator's logits after the prompt and after each later token of `tokens` (teacher forcing):
    its prefill, then its decode step's forward."""
    acc.reset()
    logits = [acc._prefill_logits([tokens[:prompt_len]], 0)[0]]
    step = DecodeStep(acc.walk, acc.sampler, 1, (False, False), compile_options=None)
    for position in range(prompt_len, len(tokens)):
        step.load(torch.tensor([tokens[position]], device=DEVICE), torch.tensor([position], device=DEVICE))
        logits.append(step.logits()[0].clone())
    return logits


def assert_close(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for index, (a, b) in enumerate(zip(got, want, strict=True)):
        error = float((a - b).abs().max() / b.abs().max())
        assert error <= LOGIT_TOLERANCE, f"logits {index}: relative error {error:.2e}"


def slot_counts(acc) -> set[int]:
    return {t.shape[2] for t in (*acc.cache.keys, *acc.cache.values)}


@pytest.mark.parametrize("attention", ["torch", "kernels"])
def test_a_conversation_longer_than_the_cache_equals_the_evicting_reference(model, attention):
    size, keep, new = 12, 3, 14
    tokens = prompt(7)  # 7 + 14 = 21 positions in 12 slots: the ring wraps during decode
    expected, expected_logits = evicting_reference(model, tokens, new, size, keep)
    acc = accelerate(model, max_seq_len=64, max_kv_size=size, keep=keep, attention=attention)
    assert slot_counts(acc) == {size}
    result = acc.generate(tokens, max_new_tokens=new, ignore_eos=True)
    assert result.tokens == [expected]
    assert slot_counts(acc) == {size}  # bounded memory: nothing grew
    assert_close(forced_logits(acc, tokens + expected[:-1], len(tokens)), expected_logits)


@pytest.mark.parametrize("attention", ["torch", "kernels"])
def test_a_prefill_chunk_that_wraps_equals_the_evicting_reference(model, attention):
    size, keep, new = 10, 2, 4
    tokens = prompt(23, seed=2)  # chunks of 10 positions: 0-9 fills the ring, 10-19 and 20-22 wrap it
    expected, expected_logits = evicting_reference(model, tokens, new, size, keep)
    acc = accelerate(model, max_seq_len=64, max_kv_size=size, keep=keep, attention=attention)
    assert acc.generate(tokens, max_new_tokens=new, ignore_eos=True).tokens == [expected]
    assert_close(forced_logits(acc, tokens + expected[:-1], len(tokens)), expected_logits)


def test_a_ring_of_one_slot_without_sinks_sees_only_the_token_itself(model):
    tokens = prompt(9, seed=3)
    expected, expected_logits = evicting_reference(model, tokens, 5, size=2, keep=1)
    acc = accelerate(model, max_seq_len=32, max_kv_size=2, keep=1, attention="torch")
    assert acc.generate(tokens, max_new_tokens=5, ignore_eos=True).tokens == [expected]
    assert_close(forced_logits(acc, tokens + expected[:-1], len(tokens)), expected_logits)


def test_a_batch_of_different_prompt_lengths_equals_each_reference(model):
    size, keep, new = 12, 4, 9
    prompts = [prompt(5, seed=4), prompt(30, seed=5), prompt(13, seed=6)]  # no wrap, 3 chunks, one wrap
    acc = accelerate(model, max_batch_size=3, max_seq_len=64, max_kv_size=size, keep=keep, attention="torch")
    result = acc.generate(prompts, max_new_tokens=new, ignore_eos=True)
    assert result.tokens == [evicting_reference(model, p, new, size, keep)[0] for p in prompts]
    assert slot_counts(acc) == {size}


def test_a_continued_conversation_past_the_cache_equals_the_reference(model):
    size, keep = 12, 2
    acc = accelerate(model, max_seq_len=64, max_kv_size=size, keep=keep, attention="torch")
    first = prompt(8, seed=7)
    answer = acc.generate(first, max_new_tokens=8, ignore_eos=True).tokens[0]
    follow_up = first + answer + prompt(5, seed=8)  # extends what the cache holds (16 > 12 tokens)
    second = acc.generate(follow_up, max_new_tokens=6, ignore_eos=True)
    assert second.metrics.reused_tokens == len(first) + len(answer) - 1  # the last answer token was not fed
    assert second.tokens == [evicting_reference(model, follow_up, 6, size, keep)[0]]
    diverged = first + answer[:3] + prompt(6, seed=9)  # not a continuation: the evicted past cannot come back
    third = acc.generate(diverged, max_new_tokens=4, ignore_eos=True)
    assert third.metrics.reused_tokens == 0
    assert third.tokens == [evicting_reference(model, diverged, 4, size, keep)[0]]


@pytest.mark.parametrize("attention", ["torch", "kernels"])
def test_a_cache_at_least_as_long_as_the_sequence_equals_the_static_cache_exactly(model, attention):
    tokens, new = prompt(9, seed=10), 6
    static = accelerate(model, max_seq_len=16, attention=attention)
    if attention == "kernels":  # the ring's new tokens go through rope then decode: compare the same kernels
        static.walk.attention.fuse_new_token = False
    expected = static.generate(tokens, max_new_tokens=new, ignore_eos=True).tokens
    expected_logits = forced_logits(static, tokens + expected[0][:-1], len(tokens))
    ring = accelerate(model, max_seq_len=16, max_kv_size=16, keep=4, attention=attention)
    assert ring.generate(tokens, max_new_tokens=new, ignore_eos=True).tokens == expected
    got = forced_logits(ring, tokens + expected[0][:-1], len(tokens))
    assert all(torch.equal(a, b) for a, b in zip(got, expected_logits, strict=True))


@pytest.mark.parametrize(("size", "keep"), [(12, 3), (7, 0), (2, 1), (5, 4)])
def test_the_slot_map_and_the_held_positions_agree_with_writing_token_by_token(model, size, keep):
    cache = accelerate(model, max_seq_len=64, max_kv_size=size, keep=keep, attention="torch").cache
    held = [-1] * size
    for n in range(1, 40):  # write position n - 1 where the cache says, then ask what each slot holds
        position = n - 1
        slot = int(cache.slots(torch.tensor(position)))
        evicted = held[slot]  # only a ring key that token `position` no longer sees may be overwritten
        assert evicted == -1 or keep <= evicted <= position - (size - keep), f"slot {slot} held {evicted}"
        held[slot] = position
        assert cache.held_positions(torch.tensor([n], device=cache.device))[0].tolist() == held
        assert int(cache.valid_lengths(torch.tensor(n))) == sum(h >= 0 for h in held)


def test_achieved_bandwidth_counts_at_most_the_cache_per_sequence():
    meter = Meter("cpu", [5, 10], weight_bytes=0, kv_bytes_per_token=1, kv_cap=8)
    for _ in range(3):
        meter.decode_step()
    assert meter.kv_tokens_read == (6 + 8) + (7 + 8) + (8 + 8)


def test_info_describes_the_rotating_cache(model):
    acc = accelerate(model, max_seq_len=64, max_kv_size=12, attention="torch")
    assert acc.keep == 4  # the default sinks
    assert "max_kv_size 12 (rotating: 4 kept + a ring of 8)" in acc.info["cache"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_kv_size": 12, "keep": -1}, "keep=-1 must be an integer >= 0 (tokens kept at the start"),
        ({"max_kv_size": 12, "keep": 1.5}, "keep=1.5 must be an integer >= 0"),
        ({"max_kv_size": 12, "keep": 12}, "keep=12 must be < max_kv_size=12: the ring of recent tokens"),
        ({"max_kv_size": 1, "keep": 0}, "max_kv_size=1 is too small: it must be an integer >= 2"),
        ({"max_kv_size": "8"}, "max_kv_size='8' is too small: it must be an integer >= 2"),
        ({"max_kv_size": 65}, "max_kv_size=65 exceeds max_seq_len=64: max_seq_len bounds every position"),
        ({"keep": 2}, "keep=2 needs max_kv_size (the rotating cache)"),
    ],
)
def test_bad_rotating_cache_arguments_are_refused_with_the_value(model, options, message):
    with pytest.raises(ValueError) as error:
        accelerate(model, max_seq_len=64, attention="torch", **options)
    assert message in str(error.value)


def test_positions_past_max_seq_len_are_refused_and_say_what_it_bounds(model):
    acc = accelerate(model, max_seq_len=20, max_kv_size=8, attention="torch")
    with pytest.raises(ValueError, match="with a rotating cache max_seq_len bounds positions, not memory"):
        acc.generate(prompt(12), max_new_tokens=10)


@CUDA
def test_the_graph_replays_the_eager_ring_and_allocates_nothing_per_token():
    config = AutoConfig.for_model("llama", **TINY)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to("cuda", torch.bfloat16).eval()
    prompts = [prompt(5, seed=11), prompt(41, seed=12)]  # the long one wraps in prefill, both in decode
    options = dict(max_batch_size=2, max_seq_len=128, max_kv_size=24, keep=4)
    for compiled in (False, True):  # compiled code rounds bf16 differently: compare it with itself, eager
        eager = accelerate(model, cuda_graph=False, compile=compiled, **options)
        expected = eager.generate(prompts, max_new_tokens=60, ignore_eos=True).tokens
        graphed = accelerate(model, compile=compiled, **options)
        assert graphed.generate(prompts, max_new_tokens=60, ignore_eos=True).tokens == expected
        assert graphed.info["graph"] == "captured (replayed per token)", graphed.info
        before = torch.cuda.memory_allocated()
        graphed.generate(prompts, max_new_tokens=60, ignore_eos=True)
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() == before
        assert slot_counts(graphed) == {24}
