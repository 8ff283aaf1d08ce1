"""Sampling on the device (transformers' semantics, never a token outside the kept set, seeded runs that
reproduce) and streamed text (stop strings, held-back tails)."""

import pytest
import torch

pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402
from transformers.generation.logits_process import (  # noqa: E402
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from attnforge.accel import SamplingParams, accelerate  # noqa: E402
from attnforge.accel.sampling import apply_repetition_penalty, draw, kept_tokens  # noqa: E402
from attnforge.accel.text import TextStream  # noqa: E402

VOCAB = 96


def test_the_kept_set_is_what_transformers_warpers_keep():
    scores = torch.randn(16, 300, generator=torch.Generator().manual_seed(0)) * 3
    for temperature, top_k, top_p in [
        (1.0, 0, 0.9),
        (0.7, 20, 1.0),
        (1.3, 50, 0.5),
        (1.0, 1, 0.3),
        (2.0, 0, 1.0),
    ]:
        expected = TemperatureLogitsWarper(temperature)(None, scores)
        if top_k:
            expected = TopKLogitsWarper(top_k)(None, expected)
        if top_p < 1:
            expected = TopPLogitsWarper(top_p)(None, expected)
        scaled = scores / torch.tensor([temperature])
        keep = kept_tokens(scaled, torch.tensor([top_k or 300]), torch.tensor([top_p]))
        assert torch.equal(keep, torch.isfinite(expected)), (temperature, top_k, top_p)


def test_draws_never_leave_the_kept_set_and_follow_its_probabilities():
    probs = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05] + [1e-4] * 20)
    scores = probs.log().expand(20000, -1).contiguous()
    torch.manual_seed(0)
    for top_k, top_p, kept in [(0, 0.8, [0, 1, 2]), (2, 1.0, [0, 1]), (4, 0.6, [0, 1])]:
        keep = kept_tokens(scores, torch.tensor([top_k or scores.shape[1]]), torch.tensor([top_p]))
        assert keep[0].nonzero().flatten().tolist() == kept
        tokens = draw(scores, keep)
        assert set(tokens.unique().tolist()) == set(kept), "a token outside the kept set was drawn"
        frequencies = torch.bincount(tokens, minlength=len(probs))[kept].float() / len(tokens)
        expected = probs[kept] / probs[kept].sum()
        assert torch.allclose(frequencies, expected, atol=0.015), (frequencies, expected)


def test_repetition_penalty_is_transformers_processor():
    generator = torch.Generator().manual_seed(1)
    scores = torch.randn(3, VOCAB, generator=generator)
    ids = torch.randint(0, VOCAB, (3, 12), generator=generator)
    expected = RepetitionPenaltyLogitsProcessor(1.3)(ids, scores.clone())
    seen = torch.zeros(3, VOCAB, dtype=torch.bool).scatter_(1, ids, True)
    assert torch.equal(apply_repetition_penalty(scores, seen, torch.tensor([1.3])), expected)


def test_greedy_is_the_default_and_its_plan():
    assert SamplingParams().greedy and SamplingParams().plan == (False, False)
    assert SamplingParams(temperature=0.8, repetition_penalty=1.1).plan == (True, True)


@pytest.fixture(scope="module")
def small():
    config = AutoConfig.for_model(
        "llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1, head_dim=64,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    return accelerate(model, CharTokenizer(), attention="torch")


def test_a_seeded_run_reproduces_and_leaves_the_callers_generator_alone(small):
    options = dict(max_new_tokens=12, ignore_eos=True, temperature=1.0, top_k=40, top_p=0.95)
    state = torch.get_rng_state()
    first = small.generate([5, 9, 13], seed=7, **options).tokens
    assert torch.equal(torch.get_rng_state(), state)
    assert small.generate([5, 9, 13], seed=7, **options).tokens == first
    assert small.generate([5, 9, 13], seed=8, **options).tokens != first


def test_a_tiny_temperature_samples_the_greedy_tokens(small):
    greedy = small.generate([5, 9, 13], max_new_tokens=10, ignore_eos=True).tokens
    assert (
        small.generate([5, 9, 13], max_new_tokens=10, ignore_eos=True, temperature=1e-4, seed=1).tokens
        == greedy
    )


def test_repetition_penalty_changes_the_tokens_as_in_transformers(small):
    model = small.model
    ids = torch.tensor([[5, 9, 13, 5, 9]])
    with torch.no_grad():
        expected = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8, do_sample=False,
            repetition_penalty=1.5, pad_token_id=0,
        )[0, 5:].tolist()  # fmt: skip
    got = small.generate(ids, max_new_tokens=8, ignore_eos=True, repetition_penalty=1.5).tokens[0]
    assert got == expected
    assert got != small.generate(ids, max_new_tokens=8, ignore_eos=True).tokens[0]


# ----------------------------------------------------------------------------------------------------------
# Text


class CharTokenizer:
    """Token t is the letter chr(97 + t % 26); token 95 is special (decodes to nothing)."""

    eos_token_id = None
    chat_template = "{{ messages }}"

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + t % 26) for t in ids if t != 95)

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) - 97 for c in text if c.isalpha()]}

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return "".join(m["content"] for m in messages) + "z"


def letters(text: str) -> list[int]:
    return [ord(c) - 97 for c in text]


def test_text_ends_before_a_stop_string_spanning_tokens():
    stream = TextStream(CharTokenizer(), ("wor",))
    pieces = [stream.push(t) for t in letters("hellowor")]
    assert "".join(pieces) == "hello" and stream.stopped


def test_a_tail_that_may_become_a_stop_string_is_held_back():
    stream = TextStream(CharTokenizer(), ("user",))
    assert [stream.push(t) for t in letters("abus")] == ["a", "b", "", ""]
    assert stream.push(letters("x")[0]) == "usx"
    assert stream.flush() == "" and stream.text == "abusx"


def test_an_incomplete_character_is_held_back():
    class Bytes(CharTokenizer):
        def decode(self, ids, skip_special_tokens=True):
            return "".join("\ufffd" if t == 99 else chr(97 + t % 26) for t in ids)

    stream = TextStream(Bytes())
    assert stream.push(0) == "a" and stream.push(99) == ""


def test_generation_stops_at_a_stop_string(small):
    free = small.generate([5, 9, 13], max_new_tokens=10, ignore_eos=True)
    stop = free.text[3:5]
    result = small.generate([5, 9, 13], max_new_tokens=10, stop=[stop, "never-there"], ignore_eos=True)
    cut = free.text.index(stop)
    assert result.text == free.text[:cut] and result.finish_reasons == ["stop"]
    decode = CharTokenizer().decode
    ending = next(n for n in range(11) if stop in decode(free.tokens[0][:n]))  # the token completing it
    assert result.tokens[0] == free.tokens[0][:ending]


def test_chat_wraps_a_string_prompt_in_the_template(small):
    as_chat = small.generate("abc", chat=True, max_new_tokens=3, ignore_eos=True)
    assert as_chat.metrics.prompt_tokens == [4]  # "abc" + the template's "z"
    messages = small.generate([{"role": "user", "content": "abc"}], max_new_tokens=3, ignore_eos=True)
    assert messages.tokens == as_chat.tokens
    assert small.generate("abc", max_new_tokens=3).metrics.prompt_tokens == [3]


def test_bad_text_options_are_refused(small):
    with pytest.raises(ValueError, match=r"^stop=\['ok', ''\] must be a non-empty string or a list of them"):
        small.generate("abc", stop=["ok", ""])

    class NoTemplate(CharTokenizer):
        chat_template = None

    plain = accelerate(small.model, NoTemplate(), attention="torch")
    with pytest.raises(
        ValueError, match=r"^NoTemplate has no chat template; pass plain text with chat=False"
    ):
        plain.generate("abc", chat=True)
