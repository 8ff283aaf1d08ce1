"""One timed `model.generate` call: every new token timestamped (after a device sync).

`generate_once` times one implementation. `generate_alternating` times two in the same call, switching the
model's attention implementation after every new token: the host's speed on these machines changes by up
to 2x for seconds at a time, and two sides that alternate token by token live through the same changes, so
their ratio is measured where whole runs, even interleaved, leave it to chance.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable

import torch


class TokenClock:
    """A generate() streamer that timestamps the prompt and every new token (after a device sync).

    `on_token(count)`, if given, runs after the timestamp of the count-th new token and before the next
    step; `starts[i]` is when step i began (its timestamp, or the time after `on_token` returned), so what
    `on_token` does is not timed.
    """

    def __init__(self, sync: Callable[[], None], on_token: Callable[[int], None] | None = None) -> None:
        self.sync, self.on_token = sync, on_token
        self.times: list[float] = []
        self.starts: list[float] = []
        self.tokens: list[int] = []

    def put(self, value: torch.Tensor) -> None:
        self.sync()
        self.times.append(time.perf_counter())
        if len(self.times) > 1:  # the first put is the prompt
            self.tokens.extend(value.reshape(-1).tolist())
            if self.on_token is not None:
                self.on_token(len(self.times) - 1)
        self.starts.append(time.perf_counter() if self.on_token is not None else self.times[-1])

    def end(self) -> None:
        self.sync()
        self.end_time = time.perf_counter()

    def step_ms(self) -> list[float]:
        """Milliseconds of each decode step (new token i + 1 after new token i), as timed."""
        return [(self.times[i + 1] - self.starts[i]) * 1e3 for i in range(1, len(self.times) - 1)]


def _timed_generate(model, input_ids: torch.Tensor, new_tokens: int, clock: TokenClock, cache: str) -> float:
    """Greedy generation of exactly `new_tokens` tokens through `clock`; returns the start time."""
    options = {"cache_implementation": "static"} if cache == "static" else {}
    if input_ids.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    clock.sync()
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, streamer=clock, pad_token_id=0,
                       **options)  # fmt: skip
    return start


def _sync_for(input_ids: torch.Tensor) -> Callable[[], None]:
    return torch.cuda.synchronize if input_ids.device.type == "cuda" else (lambda: None)


def _decode_metrics(step_ms: list[float]) -> dict:
    """decode tok/s (steps / their time), the median step's rate, and the steps' milliseconds."""
    total = sum(step_ms)
    return {
        "decode_tok_s": len(step_ms) / total * 1e3 if step_ms and total > 0 else None,
        "median_token_tok_s": 1e3 / statistics.median(step_ms) if step_ms else None,
        "token_ms": [round(ms, 3) for ms in step_ms],
    }


def _peak_gib(input_ids: torch.Tensor) -> dict:
    if input_ids.device.type != "cuda":
        return {}
    return {"peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30}


def generate_once(model, input_ids: torch.Tensor, new_tokens: int, cache: str = "dynamic") -> dict:
    """Greedy generation of exactly `new_tokens` tokens; times and peak memory of this one run.

    input_ids `[1, prompt]`. cache: "dynamic" or "static" (transformers' StaticCache; on a GPU generate()
    compiles the decode step).
    """
    clock = TokenClock(_sync_for(input_ids))
    start = _timed_generate(model, input_ids, new_tokens, clock, cache)
    first_token = clock.times[1] - start
    return {
        "ttft_ms": first_token * 1e3,
        "prefill_tok_s": input_ids.shape[1] / first_token,
        **_decode_metrics(clock.step_ms()),
        "total_s": clock.end_time - start,
        "new_tokens": len(clock.tokens),
        "tokens": clock.tokens,
        **_peak_gib(input_ids),
    }


def generate_alternating(
    model, input_ids: torch.Tensor, new_tokens: int, switch: Callable[[str], None], sides: tuple[str, str]
) -> dict:
    """One greedy generation (dynamic cache) in which two sides take turns, token by token.

    input_ids `[1, prompt]`. `switch(side)` makes the model run as `side` from the next forward on (not
    timed). sides[0] runs the prefill and then every second decode step, sides[1] the steps between (the
    first decode step is its). Returns {"tokens": [...], side: metrics}: both sides get decode tok/s over
    their own steps, the median step's rate and their steps' milliseconds; sides[0] also gets TTFT, prefill
    tok/s and total_s (TTFT + new - 1 of its own mean steps), so that alternating which side goes first
    between runs gives each side half of the prefill measurements.
    """
    turns = itertools.cycle(sides)
    switch(next(turns))
    clock = TokenClock(_sync_for(input_ids), on_token=lambda _: switch(next(turns)))
    start = _timed_generate(model, input_ids, new_tokens, clock, "dynamic")
    steps = clock.step_ms()
    first_token = clock.times[1] - start
    result: dict = {"tokens": clock.tokens, "new_tokens": len(clock.tokens)}
    own_steps = {sides[0]: steps[1::2], sides[1]: steps[0::2]}
    for side in sides:
        result[side] = {**_decode_metrics(own_steps[side]), **_peak_gib(input_ids)}
    lead = result[sides[0]]
    mean_step_s = sum(own_steps[sides[0]]) / max(len(own_steps[sides[0]]), 1) / 1e3
    lead.update(ttft_ms=first_token * 1e3, prefill_tok_s=input_ids.shape[1] / first_token,
                total_s=first_token + (new_tokens - 1) * mean_step_s)  # fmt: skip
    return result
