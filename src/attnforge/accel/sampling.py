"""Choosing the next token on the device: greedy, temperature, top-k, top-p, repetition penalty.

Every step is a fixed sequence of tensor ops on `[batch, vocab]` with the settings held in device tensors, so
the whole choice can be captured in a CUDA graph and nothing waits for the host. The semantics are
transformers' (`RepetitionPenaltyLogitsProcessor`, then `TemperatureLogitsWarper`, `TopKLogitsWarper`,
`TopPLogitsWarper`): the same ops in the same order, so the kept set of tokens is the one transformers keeps.

Drawing: the exponential race, `argmax(p / E)` with `E ~ Exp(1)` per token, picks token i with probability
p_i (and never a token outside the kept set) without a host round trip. `E` comes from torch's default
generator of the device; `seed=` seeds it (within `torch.random.fork_rng`, so the caller's random state is
left as it was), and CUDA graphs advance that generator on every replay, so a seeded run reproduces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from attnforge.kernels.argmax import argmax_rows


@dataclass(frozen=True)
class SamplingParams:
    """How to choose the next token.

    Args:
        temperature: 0 for greedy (argmax), else logits / temperature before sampling.
        top_k: keep the k most likely tokens (0: all). top_p: keep the smallest set of most likely tokens
            whose probability reaches top_p (1.0: all). Both need temperature > 0.
        repetition_penalty: transformers' penalty (> 0; 1.0: off) on every token already in the sequence
            (the prompt included): a logit s becomes s / penalty if s > 0, else s * penalty.
        seed: makes a sampled run reproducible (None: the device generator's current state).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        _number("temperature", self.temperature, "a number >= 0 (0 = greedy)", lambda x: x >= 0)
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise ValueError(f"top_k={self.top_k!r} must be an integer >= 0 (0 = keep all tokens)")
        _number("top_p", self.top_p, "in (0, 1] (1 = keep all tokens)", lambda x: 0 < x <= 1)
        _number("repetition_penalty", self.repetition_penalty, "a number > 0 (1 = off)", lambda x: x > 0)
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise ValueError(f"seed={self.seed!r} must be an integer or None")
        if self.greedy:
            unused = [f"{name}={value}" for name, value, off in
                      (("top_k", self.top_k, 0), ("top_p", self.top_p, 1.0)) if value != off]  # fmt: skip
            if unused:
                raise ValueError(
                    f"{', '.join(unused)} has no effect with temperature=0 (greedy); set temperature > 0"
                )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def plan(self) -> tuple[bool, bool]:
        """What the captured step computes: (sampled, penalized). The values live in SamplerState."""
        return (not self.greedy, self.repetition_penalty != 1.0)


def _number(name: str, value, accepted: str, ok) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not ok(value)
    ):
        raise ValueError(f"{name}={value!r} must be {accepted}")


class SamplerState:
    """Device tensors a captured step reads: the settings, and which tokens each sequence has seen."""

    def __init__(self, batch: int, vocab_size: int, device: torch.device) -> None:
        self.temperature = torch.ones(1, device=device)
        self.top_k = torch.full((1,), vocab_size, dtype=torch.int64, device=device)
        self.top_p = torch.ones(1, device=device)
        self.penalty = torch.ones(1, device=device)
        self.seen = torch.zeros(batch, vocab_size, dtype=torch.bool, device=device)
        self.vocab_size = vocab_size

    def load(self, params: SamplingParams, prompts: list[list[int]]) -> None:
        """Set the values for a new generation and mark each prompt's tokens as seen (its rows only)."""
        self.temperature.fill_(params.temperature if not params.greedy else 1.0)
        self.top_k.fill_(params.top_k or self.vocab_size)
        self.top_p.fill_(params.top_p)
        self.penalty.fill_(params.repetition_penalty)
        self.seen.zero_()
        for row, tokens in enumerate(prompts):
            self.seen[row, torch.tensor(tokens, device=self.seen.device)] = True

    def next_token(self, logits: torch.Tensor, plan: tuple[bool, bool]) -> torch.Tensor:
        """The next token `[b]` of each of the first b sequences from float32 logits `[b, vocab]`; marks it
        as seen."""
        sampled, penalized = plan
        batch = logits.shape[0]
        seen = self.seen[:batch]
        if penalized:
            logits = apply_repetition_penalty(logits, seen, self.penalty)
        if sampled:
            scores = logits / self.temperature
            keep = kept_tokens(scores, self.top_k, self.top_p)
            token = draw(scores, keep)
        else:
            token = first_max(logits)
        seen.scatter_(1, token[:, None], True)
        return token


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """transformers' repetition penalty on the tokens marked in `seen` `[b, vocab]`."""
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def kept_tokens(scores: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Bool `[b, vocab]`: the tokens transformers' TopK then TopP warpers keep (at least one per row).

    top-k keeps every score >= the k-th largest (ties kept, as transformers does); top-p, on what top-k kept,
    sorts ascending, and drops the tokens whose cumulative probability stays <= 1 - top_p (the most likely
    token always stays). One sort serves both: masking below the k-th largest does not reorder the rest.
    """
    ascending, order = torch.sort(scores, dim=-1)
    vocab = scores.shape[-1]
    kth_index = (vocab - top_k.clamp(1, vocab)).view(1, 1).expand(scores.shape[0], 1)
    kth_largest = ascending.gather(-1, kth_index)
    ascending = ascending.masked_fill(ascending < kth_largest, float("-inf"))
    cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative <= (1 - top_p)
    drop_sorted[:, -1] = False
    drop_sorted |= ascending == float("-inf")
    return ~drop_sorted.scatter(-1, order, drop_sorted)


def draw(scores: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """One token per row among `keep`, with probability softmax(scores) renormalized over the kept set."""
    probs = scores.masked_fill(~keep, float("-inf")).softmax(dim=-1)
    race = probs / torch.empty_like(probs).exponential_(1.0)
    return first_max(race.masked_fill(~keep, -1.0))


def first_max(scores: torch.Tensor) -> torch.Tensor:
    """`scores.argmax(dim=-1)` of `[b, vocab]`: on a GPU through `kernels.argmax` (torch's reduction read a
    128k row with one block: 26.6 us a step on an H100 for Llama-3-8B's vocab, `h100/argmax/`)."""
    return argmax_rows(scores) if scores.is_cuda else scores.argmax(dim=-1)
