"""The decode plan (integrations/transformers_plan.py): the mask hook decides a decode step's calls once per
forward; calls the plan covers make transformers' own SDPA call or run the decode kernel, every other call
takes the general path."""

import dataclasses
import gc

import pytest
import torch

pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402
from transformers.masking_utils import sdpa_mask  # noqa: E402

import attnforge as af  # noqa: E402
from attnforge.integrations import transformers as integration  # noqa: E402
from attnforge.integrations import transformers_plan as plan  # noqa: E402
from attnforge.kernels import decode  # noqa: E402
from attnforge.optimizer import get_optimizer  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CONFIG = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, head_dim=64,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              bos_token_id=1, eos_token_id=95, pad_token_id=0)  # fmt: skip
MASK_CONFIG = AutoConfig.for_model("llama", **CONFIG)


@pytest.fixture(autouse=True)
def torch_only():
    """Every call routed to torch unless a test says otherwise, fresh statistics; settings restored after."""
    saved = dataclasses.asdict(get_optimizer().settings)
    get_optimizer().reset()
    af.configure_optimizer(kernels=())
    yield
    gc.collect()
    integration.unpatch_transformers()
    af.configure_optimizer(**saved)
    get_optimizer().reset()


def kernels_on():
    af.configure_optimizer(kernels=("decode", "prefill"), require_measurement=False, min_seq_len=1)


def decode_hook(kv_length=10, batch=1, dtype=torch.float32, config=MASK_CONFIG):
    """The mask hook as transformers calls it for one decode step of a DynamicCache without padding."""
    return integration.attnforge_mask(batch_size=batch, q_length=1, kv_length=kv_length,
                                      q_offset=kv_length - 1, config=config, dtype=dtype,
                                      device=DEVICE)  # fmt: skip


def layer(groups=2):
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = groups, True
    return module


def decode_call(kv_length=10, batch=1, dtype=torch.float32, heads=4, kv_heads=2):
    generator = torch.Generator().manual_seed(kv_length)
    q = torch.randn(batch, 1, heads, 64, generator=generator).transpose(1, 2)  # as the layer makes it
    k, v = (torch.randn(batch, kv_heads, kv_length, 64, generator=generator) for _ in range(2))
    return q.to(DEVICE, dtype), k.to(DEVICE, dtype), v.to(DEVICE, dtype)


@pytest.fixture
def spy(monkeypatch):
    """Calls that reach transformers' sdpa_attention_forward (the general torch path)."""
    seen = []

    def spying(*args, **kwargs):
        seen.append(args[4])
        return sdpa_attention_forward(*args, **kwargs)

    monkeypatch.setattr(integration, "sdpa_attention_forward", spying)
    return seen


@pytest.mark.parametrize("batch, kv_length, heads, kv_heads", [(1, 10, 4, 2), (3, 37, 4, 2), (2, 5, 4, 4)])
def test_a_planned_decode_call_is_transformers_sdpa_to_the_bit_and_counted(
    spy, batch, kv_length, heads, kv_heads
):
    config = AutoConfig.for_model("llama", **{**CONFIG, "num_key_value_heads": kv_heads})
    assert decode_hook(kv_length, batch, config=config) is None
    assert plan.current_plan() is not None
    module, (q, k, v) = (
        layer(heads // kv_heads),
        decode_call(kv_length, batch, heads=heads, kv_heads=kv_heads),
    )
    out, _ = integration.attnforge_attention(module, q, k, v, None, scaling=0.125, position_ids=None)
    expected, _ = sdpa_attention_forward(module, q, k, v, None, scaling=0.125)
    assert spy == [] and out.shape == expected.shape == (batch, 1, heads, 64) and out.is_contiguous()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert get_optimizer().get_stats()["fallback_reasons"] == {"kernel disabled": 1}


@pytest.mark.parametrize(
    "call",
    [
        lambda module, q, k, v: (module, q, k[:, :, :-1], v[:, :, :-1], None),  # another length
        lambda module, q, k, v: (module, q.double(), k.double(), v.double(), None),  # another dtype
        lambda module, q, k, v: (
            module,
            q,
            k,
            v,
            torch.ones(1, 1, 1, k.shape[2], dtype=torch.bool, device=DEVICE),
        ),
        lambda module, q, k, v: (module, q, k, v[..., :32], None),  # value head_dim differs
        lambda module, q, k, v: (module, q[:, :2], k[:, :1], v[:, :1], None),  # fewer heads
    ],
    ids=["kv-length", "dtype", "mask", "value-dim", "heads"],
)
def test_calls_the_plan_does_not_cover_take_the_general_path(spy, call):
    decode_hook()
    args = call(layer(), *decode_call())
    out, _ = integration.attnforge_attention(*args, scaling=0.125)
    expected, _ = sdpa_attention_forward(*args, scaling=0.125)
    assert len(spy) == 1 and spy[0] is args[4]
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_planned_calls_are_counted_one_by_one_across_a_statistics_reset(spy):
    decode_hook()
    module, (q, k, v) = layer(), decode_call()
    for _ in range(3):
        integration.attnforge_attention(module, q, k, v, None)
    assert get_optimizer().get_stats()["fallback_reasons"] == {"kernel disabled": 3} and spy == []
    get_optimizer().reset_stats()  # the plan's statistics entry is gone: the rest of the forward takes the
    integration.attnforge_attention(module, q, k, v, None)  # general path, counted in the new statistics
    assert get_optimizer().get_stats()["fallback_reasons"] == {"kernel disabled": 1} and len(spy) == 1
    decode_hook()
    integration.attnforge_attention(module, q, k, v, None)
    assert get_optimizer().get_stats()["fallback_reasons"] == {"kernel disabled": 2} and len(spy) == 1


def test_a_plan_is_dropped_when_the_optimizer_forgets_its_decisions(spy):
    decode_hook()
    af.configure_optimizer(min_seq_len=1)  # any settings change: the planned decision may no longer hold
    module, (q, k, v) = layer(), decode_call()
    integration.attnforge_attention(module, q, k, v, None)
    assert len(spy) == 1


@pytest.mark.parametrize(
    "arguments",
    [
        dict(
            q_length=1,
            kv_length=10,
            q_offset=9,
            dtype=torch.float32,
            config=AutoConfig.for_model("llama", **{**CONFIG, "head_dim": 288}),
        ),  # transformers repeats KV heads beyond head_dim 256
        dict(q_length=4, kv_length=4, q_offset=0, dtype=torch.float32, config=MASK_CONFIG),  # a prompt
        dict(q_length=1, kv_length=10, q_offset=9, dtype=None, config=MASK_CONFIG),
    ],
    ids=["head-dim-288", "prefill", "no-dtype"],
)
def test_only_plain_decode_steps_are_planned(arguments):
    decode_hook()
    assert plan.current_plan() is not None
    integration.attnforge_mask(batch_size=1, device=DEVICE, **arguments)
    assert plan.current_plan() is None


@pytest.mark.parametrize("batch, kv_length", [(1, 64), (3, 37)])
def test_a_planned_decode_kernel_call_is_the_general_paths_output_and_counted(
    spy, monkeypatch, batch, kv_length
):
    kernels_on()
    decided = []  # calls decided one by one (the general path)
    per_call = get_optimizer().run_kernel_if_chosen
    monkeypatch.setattr(
        get_optimizer(), "run_kernel_if_chosen", lambda *a, **kw: decided.append(1) or per_call(*a, **kw)
    )
    decode_hook(kv_length, batch)
    assert plan.current_plan().kernel
    module, (q, k, v) = layer(), decode_call(kv_length, batch)
    out, _ = integration.attnforge_attention(module, q, k, v, None, scaling=0.125)
    assert decided == []
    plan._Current.plan = None  # the same call through the general path: the optimizer's per-call decision
    expected, _ = integration.attnforge_attention(module, q, k, v, None, scaling=0.125)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert decided == [1] and spy == [] and get_optimizer().get_stats()["by_kernel"] == {"decode": 2}


def test_planned_kernel_calls_use_an_external_decode_kernel_when_one_is_installed(spy):
    kernels_on()
    served = []

    def external(q, k, v, **kwargs):
        served.append(q.shape)
        return decode.decode_attention(q, k, v, **kwargs)

    get_optimizer().use_kernel("decode", external, label="external")
    try:
        decode_hook()
        assert plan.current_plan().kernel and plan.current_plan().prepared is None
        module, (q, k, v) = layer(), decode_call()
        out, _ = integration.attnforge_attention(module, q, k, v, None, scaling=0.125)
    finally:
        get_optimizer().use_kernel("decode", None)
    expected = decode.decode_attention(q, k, v, scale=0.125).transpose(1, 2)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert served == [q.shape] and spy == []


def test_a_planned_kernel_that_fails_falls_back_for_good(spy, monkeypatch, caplog):
    kernels_on()
    decode_hook()
    module, (q, k, v) = layer(), decode_call()
    get_optimizer().attention(q, k, v)  # loads the kernels, so that the decode one can be made to fail

    def broken(*args, **kwargs):
        raise RuntimeError("planted failure")

    monkeypatch.setattr(decode.DecodeLaunch, "__call__", broken)  # the launch the plan prepared
    out, _ = integration.attnforge_attention(module, q, k, v, None, scaling=0.125)
    expected, _ = sdpa_attention_forward(module, q, k, v, None, scaling=0.125)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert len(spy) == 1 and "planted failure" in caplog.text
    decode_hook()  # the next forward plans torch: the failure is remembered
    assert not plan.current_plan().kernel


def test_a_prompt_that_continues_a_cache_gets_transformers_mask():
    """q_length > 1 behind cached keys: None would let torch SDPA align the causal mask top-left."""
    arguments = dict(batch_size=1, q_length=5, kv_length=12, q_offset=7)
    expected = sdpa_mask(**arguments, config=MASK_CONFIG, dtype=torch.float32, device=DEVICE)
    got = integration.attnforge_mask(**arguments, config=MASK_CONFIG, dtype=torch.float32, device=DEVICE)
    assert expected is not None and torch.equal(got, expected)


def tiny_llama(implementation):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(MASK_CONFIG, attn_implementation=implementation).to(DEVICE).eval()


def test_generation_through_the_plan_equals_transformers_sdpa(spy):
    """Chunked prefill and greedy decoding with a DynamicCache: every logit as transformers' sdpa gives it,
    the decode steps through the plan, every call counted."""
    ids = torch.randint(3, 95, (1, 30), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    logits = {}
    for side in ("sdpa", "attnforge"):
        model = tiny_llama("sdpa")
        if side == "attnforge":
            assert integration.patch_model(model)
            spy.clear()
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            chunks = [model(ids[:, :20], past_key_values=cache).logits,
                      model(ids[:, 20:], past_key_values=cache).logits]  # fmt: skip
            new = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                                 attention_mask=torch.ones_like(ids), pad_token_id=0)  # fmt: skip
        logits[side] = (torch.cat(chunks, dim=1), new)
    torch.testing.assert_close(logits["attnforge"][0], logits["sdpa"][0], rtol=0, atol=0)
    assert torch.equal(logits["attnforge"][1], logits["sdpa"][1])
    # 2 layers x (chunk 1, chunk 2, the generate prompt, 5 decode steps); only the decode steps planned
    assert get_optimizer().get_stats()["calls"] == 2 * 8 and len(spy) == 2 * 3
