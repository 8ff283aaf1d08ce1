"""What the accelerator is measured against, on the same model in the same process.

  - `transformers_generate`: plain `model.generate()`, greedy, with transformers' dynamic cache or its
    static cache (on a GPU generate() then compiles the decode step itself);
  - `TightLoop`: a gpt-fast style loop over the model's own forward with transformers' StaticCache, the decode
    step torch.compile'd with CUDA graphs (mode "reduce-overhead"), optionally with inductor's coordinate-
    descent tuning: the best one can do with the model's own modules and no custom kernels.
Each returns a `Timed`: the new tokens, the time to the first one and the decode time after it (device
synchronized at both ends).
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass

import torch


@dataclass
class Timed:
    """One timed generation: `tokens` per sequence, seconds to the first new token, seconds after it."""

    tokens: list[list[int]]
    ttft_s: float
    decode_s: float

    @property
    def decode_tok_s(self) -> float | None:
        """New tokens per second per sequence after the first one."""
        steps = len(self.tokens[0]) - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Clock:
    """A generate() streamer: the time of the first new token (the first `put` is the prompt)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.puts, self.first = device, 0, None

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2:
            _sync(self.device)
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def transformers_generate(
    model, ids: torch.Tensor, new_tokens: int, *, cache: str = "dynamic", mask=None, ignore_eos: bool = True
) -> Timed:
    """Greedy `model.generate()` of `new_tokens` (exactly, with `ignore_eos`; else up to EOS) for `ids`
    `[B, L]` (left-padded rows need `mask`). cache: "dynamic" or "static"."""
    if cache not in ("dynamic", "static"):
        raise ValueError(f"cache={cache!r} is not one of: dynamic, static")
    options = {"cache_implementation": "static"} if cache == "static" else {}
    if ignore_eos:
        options["min_new_tokens"] = new_tokens
    clock = _Clock(ids.device)
    _sync(ids.device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            ids, attention_mask=mask if mask is not None else torch.ones_like(ids), max_new_tokens=new_tokens,
            do_sample=False, pad_token_id=_pad_id(model), streamer=clock,
            **options,
        )  # fmt: skip
    _sync(ids.device)
    end = time.perf_counter()
    tokens = [row.tolist() for row in out[:, ids.shape[1] :]]
    if not ignore_eos:
        tokens = [_until_eos(row, model) for row in tokens]
    first = clock.first if clock.first is not None else end
    return Timed(tokens, first - start, end - first)


def _pad_id(model) -> int:
    config = getattr(model, "generation_config", None)
    pad = getattr(config, "pad_token_id", None)
    return pad if isinstance(pad, int) else 0


def _until_eos(tokens: list[int], model) -> list[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    eos = {eos} if isinstance(eos, int) else set(eos or [])
    for index, token in enumerate(tokens):
        if token in eos:
            return tokens[: index + 1]
    return tokens


def cache_argument(model) -> str:
    """The forward's name for the cache: `cache` (transformers >= 5.24) or `past_key_values` (before)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class TightLoop:
    """Greedy decoding with transformers' StaticCache and the model's own forward, the decode step compiled
    with CUDA graphs (gpt-fast style); `tune` adds inductor's coordinate-descent tuning; `compile=False` runs
    the same loop eagerly (to check it on CPU)."""

    def __init__(self, model, max_seq_len: int, *, tune: bool = False, compile: bool = True) -> None:
        from transformers import StaticCache

        self.model = model
        self.cache = StaticCache(config=model.config, max_cache_len=max_seq_len)
        self.argument = cache_argument(model)
        self.decode = self._step
        if compile:
            options = {"triton.cudagraphs": True, "coordinate_descent_tuning": True} if tune else None
            mode = None if tune else "reduce-overhead"
            self.decode = torch.compile(self._step, mode=mode, options=options, fullgraph=True)

    def _step(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        out = self.model(
            input_ids=token, position_ids=position, use_cache=True, **{self.argument: self.cache}
        )
        return out.logits[:, -1].argmax(dim=-1, keepdim=True)

    def generate(self, ids: torch.Tensor, new_tokens: int) -> Timed:
        """`new_tokens` greedy tokens for `ids` `[B, L]` (no padding)."""
        device, length = ids.device, ids.shape[1]
        _sync(device)
        start = time.perf_counter()
        with torch.inference_mode():
            self.cache.reset()  # its tensors are made in inference mode: reset them there
            positions = torch.arange(length, device=device).expand_as(ids)
            out = self.model(
                input_ids=ids, position_ids=positions, use_cache=True, **{self.argument: self.cache}
            )
            token = out.logits[:, -1].argmax(dim=-1, keepdim=True)
            tokens = [token]
            _sync(device)
            first = time.perf_counter()
            for step in range(new_tokens - 1):
                position = torch.full_like(token, length + step)
                torch.compiler.cudagraph_mark_step_begin()
                token = self.decode(token, position).clone()
                tokens.append(token)
        _sync(device)
        rows = torch.cat(tokens, dim=1).tolist()
        return Timed(rows, first - start, time.perf_counter() - first)
