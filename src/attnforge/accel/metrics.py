"""Live generation metrics: tokens so far, TTFT, decode tok/s, achieved memory bandwidth.

Achieved bandwidth = bytes a decode step must read / time per step, where the bytes are the weights (every
parameter once, the embedding table only where the LM head shares it) plus the valid keys and values of every
sequence at that step. It is the physical measure of a batch-1 decode (gpt-fast reports it too): the weights-
only roofline is the device's read bandwidth / weight bytes.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field


@dataclass
class GenerationMetrics:
    """What one generation (or one moment of a stream) measured.

    Attributes:
        prompt_tokens: per sequence. reused_tokens: prompt tokens whose keys/values were already in the cache
            (a conversation continued: not prefilled again). new_tokens: per sequence, generated so far.
        ttft_s: start of the call to the first new token on the host (prefill included).
        decode_s: first new token to the latest one on the host; decode_steps: steps in that time.
        decode_tok_s: new tokens per second per sequence (each step gives every sequence one).
        total_tok_s: over the batch. bandwidth_gb_s: achieved (see the module docstring), 1e9 bytes/s.
    """

    device: str
    prompt_tokens: list[int]
    reused_tokens: int = 0
    new_tokens: list[int] = field(default_factory=list)
    ttft_s: float | None = None
    decode_s: float = 0.0
    decode_steps: int = 0
    decode_tok_s: float | None = None
    total_tok_s: float | None = None
    bandwidth_gb_s: float | None = None
    bytes_per_step: float | None = None

    def line(self) -> str:
        """One line for a terminal, e.g. '12 tokens | TTFT 85 ms | 39.5 tok/s | 1.23 GB/s (cpu)'."""
        parts = [f"{sum(self.new_tokens)} tokens"]
        if self.reused_tokens:
            parts.append(f"{self.reused_tokens} prompt tokens reused from the cache")
        if self.ttft_s is not None:
            parts.append(f"TTFT {self.ttft_s * 1e3:.0f} ms")
        if self.decode_tok_s is not None:
            per_sequence = " per sequence" if len(self.prompt_tokens) > 1 else ""
            parts.append(f"{self.decode_tok_s:.1f} tok/s{per_sequence}")
        if self.bandwidth_gb_s is not None:
            parts.append(f"{self.bandwidth_gb_s:.2f} GB/s achieved")
        return " | ".join(parts) + f" ({self.device})"

    def as_dict(self) -> dict:
        return asdict(self)


class Meter:
    """Clock and byte counter of one generation; `snapshot()` gives its GenerationMetrics so far."""

    def __init__(
        self,
        device: str,
        prompt_lens: list[int],
        weight_bytes: int,
        kv_bytes_per_token: int,
        kv_cap: int | None = None,
    ) -> None:
        self.start = time.perf_counter()
        self.device = device
        self.prompt_lens = prompt_lens
        self.weight_bytes, self.kv_bytes_per_token = weight_bytes, kv_bytes_per_token
        self.kv_cap = kv_cap  # a rotating cache reads at most this many keys per sequence
        self.reused = 0
        self.first: float | None = None
        self.latest: float | None = None
        self.steps = 0
        self.kv_tokens_read = 0
        self.new_tokens = [0] * len(prompt_lens)

    def first_token(self) -> None:
        self.first = self.latest = time.perf_counter()

    def decode_step(self) -> None:
        """A decode step's token reached the host: every sequence read its valid keys plus one."""
        self.latest = time.perf_counter()
        self.steps += 1
        cap = self.kv_cap or float("inf")
        self.kv_tokens_read += int(sum(min(n + self.steps, cap) for n in self.prompt_lens))

    def snapshot(self) -> GenerationMetrics:
        metrics = GenerationMetrics(self.device, list(self.prompt_lens), self.reused, list(self.new_tokens))
        if self.first is None:
            return metrics
        metrics.ttft_s = self.first - self.start
        metrics.decode_s = self.latest - self.first
        metrics.decode_steps = self.steps
        if self.steps and metrics.decode_s > 0:
            metrics.decode_tok_s = self.steps / metrics.decode_s
            metrics.total_tok_s = metrics.decode_tok_s * len(self.prompt_lens)
            total_bytes = self.steps * self.weight_bytes + self.kv_tokens_read * self.kv_bytes_per_token
            metrics.bytes_per_step = total_bytes / self.steps
            metrics.bandwidth_gb_s = total_bytes / metrics.decode_s / 1e9
        return metrics
