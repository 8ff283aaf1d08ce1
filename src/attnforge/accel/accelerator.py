"""`accelerate(model)`: a transformers causal LM as a fast generator, same weights, same greedy tokens.

What it does (the pieces live next to this file):
  - a static KV cache preallocated for `max_batch_size` sequences of `max_seq_len` tokens (cache.py), or
    with `max_kv_size` a rotating one: `keep` attention sinks and a ring of the most recent tokens (ring.py);
  - prefill of the prompts (right-padded, ragged lengths) through the prefill kernel, and a decode step
    through the decode kernel with per-sequence `kv_lens` (only valid keys are read), over the model's own
    modules with q/k/v and gate/up fused (layout.py, forward.py);
  - on a GPU the decode step is torch.compile'd and captured once in a CUDA graph per (batch size, sampling
    plan), then replayed per token (graph.py); the next token is chosen on the device (sampling.py) and read
    by the host a step behind, so the GPU never waits for Python;
  - a conversation continued with batch 1 reuses the cache: the prompt's prefix already in it (the last
    prompt and answer) is not prefilled again;
  - `generate()` and `stream()` report TTFT, decode tok/s and achieved bandwidth (metrics.py).
Without a CUDA device the same step runs eagerly (graph: "skipped: no CUDA device"); that is the path the
CPU tests check against `model.generate()`.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from attnforge.accel.cache import CacheShape, StaticKVCache
from attnforge.accel.forward import KernelAttention, Walk, choose_attention
from attnforge.accel.graph import DecodeStep
from attnforge.accel.layout import DTYPES, FAMILIES, attention_shape, check_model, plan_model
from attnforge.accel.metrics import GenerationMetrics, Meter
from attnforge.accel.projections import choose_projections
from attnforge.accel.ring import RotatingKVCache, prefill_logits, resolve_ring
from attnforge.accel.sampling import SamplerState, SamplingParams
from attnforge.accel.text import TextStream, prompt_token_lists

DEFAULT_MAX_SEQ_LEN = 4096
NO_CUDA = "skipped: no CUDA device"


@dataclass
class StreamEvent:
    """One new token of one sequence: its text piece and the metrics so far.

    Attributes:
        sequence: index of the prompt. token_id: the token. text: the new text ('' while held back, e.g. half
            of a UTF-8 character or of a stop string; always '' without a tokenizer).
        finish_reason: None, or why the sequence ended with this token: "eos", "stop" (a stop string; the text
            ends before it) or "length" (max_new_tokens).
    """

    sequence: int
    token_id: int
    text: str
    finish_reason: str | None
    metrics: GenerationMetrics


@dataclass
class Generation:
    """What `generate()` returns: per sequence, the new tokens (an EOS token included), the text (None
    without a tokenizer) and why it ended; and the metrics of the call."""

    tokens: list[list[int]]
    texts: list[str] | None
    finish_reasons: list[str]
    metrics: GenerationMetrics

    @property
    def text(self) -> str | None:
        """The first sequence's text."""
        return None if self.texts is None else self.texts[0]


def accelerate(
    model,
    tokenizer=None,
    *,
    max_batch_size: int = 1,
    max_seq_len: int | None = None,
    dtype: torch.dtype | None = None,
    attention: str = "auto",
    projections: str = "auto",
    cuda_graph: bool | None = None,
    compile: bool | None = None,
    tune: bool = False,
    max_kv_size: int | None = None,
    keep: int | None = None,
) -> Accelerator:
    """Turn a transformers causal LM into a fast generator (see `Accelerator`).

    Args:
        model: a model of a family in `attnforge.accel.layout.FAMILIES` (llama, mistral, qwen2, qwen3, gemma,
            phi3), on the device it should run on. Its q/k/v and gate/up weights are re-pointed into fused
            tensors (same values, no copy); do not cast or move it afterwards.
        tokenizer: for text prompts, chat templates, stop strings and text output (optional).
        max_batch_size: sequences generated together at most.
        max_seq_len: prompt + new tokens per sequence at most; sizes the cache (default: the model's
            max_position_embeddings, at most 4096).
        dtype: run (and cache) in this dtype, casting the model in place first (default: the model's).
        attention: "auto" (attnforge's kernels where Triton runs: a CUDA GPU, or TRITON_INTERPRET=1),
            "kernels" or "torch" (SDPA with a length mask).
        projections: "auto" (with attnforge's attention kernels, decode steps' products run through
            `kernels.gemv.fused_linear`, the norms, silu * up and residual adds fused in), "kernels" or
            "torch" (the model's own modules).
        cuda_graph: capture the decode step in a CUDA graph (default: on a CUDA device).
        compile: torch.compile the decode step's forward (default: on a CUDA device).
        tune: with compile, let inductor tune its kernels (coordinate descent; slower to compile).
        max_kv_size: a rotating cache of this many tokens per sequence (2 <= max_kv_size <= max_seq_len):
            the first `keep` tokens (attention sinks) and a ring of the most recent max_kv_size - keep; each
            token attends to exactly those, so generation goes on past max_kv_size with bounded memory.
            max_seq_len then bounds positions (prompt + new tokens, and the RoPE table), not memory.
        keep: attention sinks of the rotating cache, 0 <= keep < max_kv_size (default 4; needs max_kv_size).

    Raises:
        UnsupportedModelError: the model's family or a feature of it is not supported (the reason is given).
        CacheTooLargeError: the cache does not fit (the message gives its size and what would fit).
        ValueError: a bad argument (the message names it and the accepted values).
    """
    return Accelerator(
        model, tokenizer, max_batch_size=max_batch_size, max_seq_len=max_seq_len, dtype=dtype,
        attention=attention, projections=projections, cuda_graph=cuda_graph, compile=compile, tune=tune,
        max_kv_size=max_kv_size, keep=keep,
    )  # fmt: skip


class Accelerator:
    """A model with its static cache, decode step and sampler; see `accelerate` for the arguments."""

    def __init__(self, model, tokenizer=None, *, max_batch_size=1, max_seq_len=None, dtype=None,
                 attention="auto", projections="auto", cuda_graph=None, compile=None, tune=False,
                 max_kv_size=None, keep=None) -> None:  # fmt: skip
        _check_positive_int("max_batch_size", max_batch_size)
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size = max_batch_size
        self.max_seq_len = _resolve_max_seq_len(model, max_seq_len)
        self.max_kv_size, self.keep = resolve_ring(max_kv_size, keep, self.max_seq_len)
        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"dtype={dtype} is not supported; accepted: {', '.join(map(str, DTYPES))}")
        check_model(model, self.max_seq_len, dtype)  # everything checked before the model is touched
        device = next(model.parameters()).device
        self.cuda_graph, self.compile = _resolve_gpu_options(device, cuda_graph, compile, tune)
        attention_backend = choose_attention(attention, device)
        layers, kv_heads, head_dim = attention_shape(model)
        shape = CacheShape(layers, max_batch_size, kv_heads, self.max_kv_size or self.max_seq_len, head_dim,
                           dtype or next(model.parameters()).dtype, keep=self.keep)  # fmt: skip
        self.cache = (RotatingKVCache if self.keep is not None else StaticKVCache)(shape, device)
        if dtype is not None:
            model.to(dtype)
        self.plan = plan_model(model, self.max_seq_len)
        self.device, self.dtype = self.plan.device, self.plan.dtype
        self.tune = tune
        if self.compile:
            self.cache.mark_static()
        rope = self.plan.rope_table(self.max_seq_len)
        kernels = isinstance(attention_backend, KernelAttention)
        project = choose_projections(projections, self.plan, kernels, rope)
        self.walk = Walk(self.plan, self.cache, attention_backend, rope, project)
        self.sampler = SamplerState(max_batch_size, self.plan.vocab_size, self.device)
        self.weight_bytes = self.plan.weight_bytes_per_step()
        self._steps: dict[tuple, DecodeStep] = {}
        self._resident: list[int] | None = None  # tokens whose keys/values are in cache row 0 (batch 1)
        self.graph_status, self.compile_status = _initial_status(
            self.device, self.cuda_graph, self.compile, tune
        )

    @property
    def info(self) -> dict:
        """How this accelerator runs: device, dtype, attention backend, graph, compile, cache and weights."""
        return {
            "model": f"{type(self.model).__name__} ({self.plan.model_type})",
            "family": FAMILIES[self.plan.model_type],
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "attention": self.walk.attention.name,
            "projections": self.walk.projections.name,
            "graph": self.graph_status,
            "compile": self.compile_status,
            "cache": self.cache.shape.describe(),
            "weights_gb_per_step": self.weight_bytes / 1e9,
        }

    # ------------------------------------------------------------------------------------------------------
    # Public generation API

    def generate(self, prompts, **options) -> Generation:
        """Generate for one prompt or a batch (ragged lengths); the options are `stream`'s."""
        tokens: list[list[int]] = []
        pieces: list[list[str]] = []
        reasons: list[str | None] = []
        metrics = None
        for event in self.stream(prompts, **options):
            while len(tokens) <= event.sequence:
                tokens.append([]), pieces.append([]), reasons.append(None)
            tokens[event.sequence].append(event.token_id)
            pieces[event.sequence].append(event.text)
            reasons[event.sequence] = event.finish_reason or reasons[event.sequence]
            metrics = event.metrics
        texts = ["".join(p) for p in pieces] if self.tokenizer is not None else None
        return Generation(tokens, texts, reasons, metrics)

    def stream(
        self,
        prompts,
        *,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop: str | list[str] | None = None,
        eos_token_id: int | list[int] | None = None,
        ignore_eos: bool = False,
        chat: bool = False,
    ) -> Iterator[StreamEvent]:
        """Yield one StreamEvent per new token per sequence, as the tokens reach the host.

        Args:
            prompts: a string, chat messages, token ids, or a list of these / a tensor `[B, L]` (B <=
                max_batch_size; lengths may differ). See `attnforge.accel.text.prompt_token_lists`.
            max_new_tokens: per sequence. temperature, top_k, top_p, repetition_penalty, seed: see
                SamplingParams (temperature 0: greedy).
            stop: stop string(s): a sequence ends when its text contains one (the text ends before it).
            eos_token_id: end-of-sequence token(s) (default: the model's generation config's and the
                tokenizer's).
            ignore_eos: generate exactly max_new_tokens (benchmarks).
            chat: wrap string prompts as a user message of the tokenizer's chat template.
        """
        params = SamplingParams(temperature, top_k, top_p, repetition_penalty, seed)
        _check_positive_int("max_new_tokens", max_new_tokens)
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        if stops and self.tokenizer is None:
            raise ValueError(f"stop={stop!r} needs a tokenizer: accelerate(model, tokenizer=...)")
        if any(not isinstance(s, str) or not s for s in stops):
            raise ValueError(f"stop={stop!r} must be a non-empty string or a list of them")
        prompt_lists = prompt_token_lists(prompts, self.tokenizer, chat=chat, vocab_size=self.plan.vocab_size)
        self._check_sizes(prompt_lists, max_new_tokens)
        eos = set() if ignore_eos else self._eos_ids(eos_token_id)
        return self._generate(prompt_lists, params, max_new_tokens, stops, eos)

    def reset(self) -> None:
        """Forget the cached conversation (the next prompt is prefilled whole)."""
        self._resident = None

    # ------------------------------------------------------------------------------------------------------
    # The generation

    def _generate(self, prompts, params, max_new_tokens, stops, eos) -> Iterator[StreamEvent]:
        batch = len(prompts)
        with torch.inference_mode():
            resident, self._resident = self._resident, None
            if (batch, params.plan) not in self._steps:
                resident = None  # capturing warms up on the last cache positions: forget the conversation
            step = self._decode_step(batch, params.plan)  # captured before seeding: its warm-up draws
            meter = Meter(str(self.device), [len(p) for p in prompts], self.weight_bytes,
                          self.cache.shape.bytes_per_token(), kv_cap=self.max_kv_size)  # fmt: skip
            texts = [
                TextStream(self.tokenizer, stops) if self.tokenizer is not None else None for _ in prompts
            ]
            with _seeded(params.seed, self.device):
                reused = _reusable_prefix(resident, prompts, self.max_kv_size)
                meter.reused = reused
                first, positions = self._prefill(prompts, reused, params)
                step.load(first, positions)
                run = _Run(prompts, texts, eos, max_new_tokens, meter)
                yield from run.take(first.tolist(), first_token=True)
                fed = yield from self._decode(step, run, max_new_tokens)
            if batch == 1:
                self._resident = prompts[0] + run.generated[0][:fed]

    def _prefill(self, prompts, reused: int, params) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values of the prompt tokens after the reused prefix into the cache; the first new tokens and
        their positions `[b]`."""
        logits = self._prefill_logits(prompts, reused)
        self.sampler.load(params, prompts)
        positions = torch.tensor([len(p) for p in prompts], device=self.device)
        return self.sampler.next_token(logits, params.plan), positions

    def _prefill_logits(self, prompts: list[list[int]], reused: int) -> torch.Tensor:
        """Write the keys/values of the prompts' tokens after `reused` into the cache; logits `[b, vocab]` of
        each prompt's last token."""
        new = [p[reused:] for p in prompts]
        length = max(len(n) for n in new)
        if isinstance(self.cache, RotatingKVCache) and self.cache.wraps(reused + length):
            return prefill_logits(self.walk, new, reused)
        device = self.device
        ids = torch.tensor([n + [0] * (length - len(n)) for n in new], device=device)
        positions = (reused + torch.arange(length, device=device)).expand(len(new), length).contiguous()
        q_lens = torch.tensor([len(n) for n in new], device=device)
        kv_lens = q_lens + reused
        # nothing evicted (or a static cache): a rotating cache's slots are the positions here
        return self.walk.logits(ids, positions, kv_lens, q_lens, reused + length, last_rows=q_lens - 1)

    def _decode(self, step: DecodeStep, run: _Run, max_new_tokens: int):
        """Replay decode steps, reading each step's tokens `lag` steps later; returns the steps run."""
        reader = _TokenReader(step.token, self.device)
        pending: deque = deque()
        launched = 0
        while launched < max_new_tokens - 1 and not run.done:
            step.run()
            launched += 1
            pending.append(reader.copy())
            if len(pending) > reader.lag:
                yield from run.take(reader.read(pending.popleft()))
        while pending:
            yield from run.take(reader.read(pending.popleft()))
        return launched

    def _decode_step(self, batch: int, plan: tuple[bool, bool]) -> DecodeStep:
        """The step for this batch size and sampling plan, captured in a CUDA graph on first use."""
        key = (batch, plan)
        if key not in self._steps:
            self._steps[key] = self._build_step(batch, plan)
        return self._steps[key]

    def _build_step(self, batch: int, plan: tuple[bool, bool]) -> DecodeStep:
        """A failed compile is reported (compile_status) and the step captured without it; a failed capture is
        reported (graph_status) and the step runs eagerly."""
        options = {"coordinate_descent_tuning": self.tune} if self.compile else None
        step = DecodeStep(self.walk, self.sampler, batch, plan, compile_options=options)
        if not self.cuda_graph:
            return step
        try:
            step.capture()
        except Exception as error:  # noqa: BLE001 - reported in the status, and the step still runs
            reason = f"failed: {type(error).__name__}: {(str(error).splitlines() or [''])[0]}"
            if not self.compile:
                self.graph_status = reason
                return DecodeStep(self.walk, self.sampler, batch, plan, compile_options=None)
            self.compile_status, self.compile = reason, False
            return self._build_step(batch, plan)
        self.graph_status = "captured (replayed per token)"
        return step

    # ------------------------------------------------------------------------------------------------------
    # Checks

    def _check_sizes(self, prompts: list[list[int]], max_new_tokens: int) -> None:
        if len(prompts) > self.max_batch_size:
            raise ValueError(f"{len(prompts)} prompts exceed max_batch_size={self.max_batch_size}")
        longest = max(len(p) for p in prompts)
        if longest + max_new_tokens > self.max_seq_len:
            rotating = self.keep is not None
            ring = " (with a rotating cache max_seq_len bounds positions, not memory)" if rotating else ""
            raise ValueError(
                f"the longest prompt ({longest} tokens) + max_new_tokens={max_new_tokens} exceeds "
                f"max_seq_len={self.max_seq_len}; pass a larger max_seq_len to accelerate() or ask for fewer "
                f"new tokens{ring}"
            )

    def _eos_ids(self, eos_token_id) -> set[int]:
        if eos_token_id is not None:
            ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
            if any(not isinstance(i, int) or isinstance(i, bool) for i in ids):
                raise ValueError(f"eos_token_id={eos_token_id!r} must be an int or a list of ints")
            return set(ids)
        found: set[int] = set()
        config = getattr(self.model, "generation_config", None)
        for value in (getattr(config, "eos_token_id", None), getattr(self.tokenizer, "eos_token_id", None)):
            found.update([value] if isinstance(value, int) else (value or []))
        return found


class _Run:
    """Host-side state of one generation: tokens so far, text streams, which sequences are done."""

    def __init__(self, prompts, texts, eos: set[int], max_new_tokens: int, meter: Meter) -> None:
        self.texts, self.eos, self.max_new, self.meter = texts, eos, max_new_tokens, meter
        self.generated: list[list[int]] = [[] for _ in prompts]
        self.finished = [False] * len(prompts)

    @property
    def done(self) -> bool:
        return all(self.finished)

    def take(self, tokens: list[int], first_token: bool = False) -> Iterator[StreamEvent]:
        """One decode step's tokens reached the host: record them and yield an event per live sequence."""
        if self.done:
            for row, token in enumerate(tokens):  # computed after the end: kept only as cache contents
                self.generated[row].append(token)
            return
        self.meter.first_token() if first_token else self.meter.decode_step()
        events = []
        for row, token in enumerate(tokens):
            self.generated[row].append(token)
            if self.finished[row]:
                continue
            events.append(self._event(row, token))
        snapshot = self.meter.snapshot()
        for event in events:
            event.metrics = snapshot
            yield event

    def _event(self, row: int, token: int) -> StreamEvent:
        text_stream = self.texts[row]
        reason = None
        if token in self.eos:
            reason = "eos"
            piece = text_stream.flush() if text_stream is not None else ""
        else:
            piece = text_stream.push(token) if text_stream is not None else ""
            if text_stream is not None and text_stream.stopped:
                reason = "stop"
        self.meter.new_tokens[row] += 1
        if reason is None and self.meter.new_tokens[row] >= self.max_new:
            reason = "length"
            piece += text_stream.flush() if text_stream is not None else ""
        self.finished[row] = reason is not None
        return StreamEvent(row, token, piece, reason, None)


class _TokenReader:
    """Copies each step's tokens to the host without stalling the device: on CUDA into a pinned ring buffer
    with an event per slot, read `lag` steps later; elsewhere at once."""

    def __init__(self, token: torch.Tensor, device: torch.device) -> None:
        self.token = token
        self.cuda = device.type == "cuda"
        self.lag = 2 if self.cuda else 0
        if self.cuda:
            slots = self.lag + 1
            self.ring = torch.empty((slots, token.numel()), dtype=token.dtype, pin_memory=True)
            self.events = [torch.cuda.Event() for _ in range(slots)]
        self.count = 0

    def copy(self):
        if not self.cuda:
            return self.token.tolist()
        slot = self.count % len(self.events)
        self.count += 1
        self.ring[slot].copy_(self.token, non_blocking=True)
        self.events[slot].record()
        return slot

    def read(self, handle) -> list[int]:
        if not self.cuda:
            return handle
        self.events[handle].synchronize()
        return self.ring[handle].tolist()


def _reusable_prefix(resident: list[int] | None, prompts: list[list[int]], max_kv_size: int | None) -> int:
    """Tokens at the start of the (single) prompt whose keys/values are already in the cache; at least one
    prompt token is always prefilled again (its logits give the first new token). A rotating cache that has
    evicted tokens cannot go back to an earlier state: it is reused only to continue exactly where it is."""
    if resident is None or len(prompts) != 1:
        return 0
    prompt = prompts[0]
    if max_kv_size is not None and len(resident) > max_kv_size:
        extends = len(prompt) > len(resident) and prompt[: len(resident)] == resident
        return len(resident) if extends else 0
    common = 0
    for a, b in zip(resident, prompt, strict=False):
        if a != b:
            break
        common += 1
    return min(common, len(prompt) - 1)


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device):
    """Seed torch's generators for the block, leaving the caller's random state as it was after."""
    if seed is None:
        yield
        return
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if (
        device.type == "cuda") else []  # fmt: skip
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _check_positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r} must be an integer >= 1")


def _resolve_max_seq_len(model, max_seq_len: int | None) -> int:
    if max_seq_len is None:
        limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        return min(limit or DEFAULT_MAX_SEQ_LEN, DEFAULT_MAX_SEQ_LEN)
    _check_positive_int("max_seq_len", max_seq_len)
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len={max_seq_len} must be >= 2 (a prompt token and a new one)")
    return max_seq_len


def _resolve_gpu_options(device: torch.device, cuda_graph, compile, tune) -> tuple[bool, bool]:
    on_cuda = device.type == "cuda"
    for name, value in (("cuda_graph", cuda_graph), ("compile", compile)):
        if value is not None and not isinstance(value, bool):
            raise ValueError(f"{name}={value!r} must be True, False or None (None: on with a CUDA device)")
        if value and not on_cuda:
            raise ValueError(f"{name}=True needs the model on a CUDA device; it is on {device}")
    if not isinstance(tune, bool):
        raise ValueError(f"tune={tune!r} must be True or False")
    graph = on_cuda if cuda_graph is None else cuda_graph
    compiled = on_cuda if compile is None else compile
    if tune and not compiled:
        raise ValueError("tune=True tunes the compiled decode step: it needs compile (a CUDA device)")
    return graph, compiled


def _initial_status(device: torch.device, graph: bool, compiled: bool, tune: bool) -> tuple[str, str]:
    """What `info` says about the CUDA graph and torch.compile before the first generation."""
    off = NO_CUDA if device.type != "cuda" else None
    graph_status = "captured on first use per (batch size, sampling plan)" if graph else (
        off or "off (cuda_graph=False)")  # fmt: skip
    compile_status = ("on: inductor" + (", coordinate-descent tuning" if tune else "")) if compiled else (
        off or "off (compile=False)")  # fmt: skip
    return graph_status, compile_status
