"""What attnforge costs the host per attention call when the call goes to torch: a CPU micro-benchmark.

Generation with a dynamic cache is bound by the host (Python and launches), so every microsecond attnforge
adds per call shows up in tokens per second. This times transformers' attention hook as attnforge installs
it, with every call routed to torch, against transformers' own `sdpa_attention_forward` called directly, both
with torch's SDPA replaced by a stub that returns at once: the difference is what a call costs more through
attnforge (negative where a decode step's call, planned by the mask hook, skips transformers' own wrapper).
"""

from __future__ import annotations

import datetime
import platform
import statistics
import time
from collections.abc import Callable
from unittest import mock

import torch


def _per_call_us(fns: dict[str, Callable[[], object]], calls: int, repeats: int) -> dict[str, float]:
    """Per function: the fastest of `repeats` rounds of the mean time per call over `calls` calls, in
    microseconds; the functions take turns round by round, so interference hits them alike (the fastest
    round is the least disturbed one: host overhead has no fast outliers)."""
    for fn in fns.values():
        for _ in range(calls // 10):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            samples[name].append((time.perf_counter() - start) / calls * 1e6)
    return {name: min(values) for name, values in samples.items()}


COLD_SWEEP_BYTES = 16 * 2**20  # more than the last-level cache of a share of a server CPU
KV = 300  # keys in the cache of the timed decode step


def _per_call_cold_us(fns: dict[str, Callable[[], object]], calls: int) -> dict[str, float]:
    """Per function: the median of `calls` single calls, each after a sweep through COLD_SWEEP_BYTES (not
    timed), the functions taking turns call by call. In a model, ~1 ms of other layer work runs between two
    attention calls: what a call touches is no longer in the caches, and a hot loop hides that cost."""
    sweep = torch.zeros(COLD_SWEEP_BYTES // 4)
    samples: dict[str, list[int]] = {name: [] for name in fns}
    for _ in range(calls):
        for name, fn in fns.items():
            sweep.add_(1.0)
            start = time.perf_counter_ns()
            fn()
            samples[name].append(time.perf_counter_ns() - start)
    return {name: statistics.median(values) / 1e3 for name, values in samples.items()}


def _decode_call() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A Llama attention layer (16:8 heads, d128) and one decode step's q `[1, 16, 1, 128]` (a transposed
    view, as the layer makes it) and k/v `[1, 8, KV, 128]` (contiguous, as a DynamicCache holds them)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention

    config = LlamaConfig(hidden_size=2048, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                         num_hidden_layers=1, vocab_size=8)  # fmt: skip
    module = LlamaAttention(config, layer_idx=0).to("meta")
    q = torch.randn(1, 1, 16, 128).transpose(1, 2)
    return module, q, torch.randn(1, 8, KV, 128), torch.randn(1, 8, KV, 128)


def fallback_overhead(calls: int = 2000, repeats: int = 15, cold_calls: int = 400) -> dict:
    """Host microseconds per call: transformers' sdpa path alone, and via attnforge's hook (torch chosen),
    in a hot loop and with the caches swept between calls (`_per_call_cold_us`)."""
    from transformers.integrations import sdpa_attention

    from attnforge.integrations import transformers as integration
    from attnforge.optimizer import get_optimizer

    module, q, k, v = _decode_call()
    stub = mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", lambda *a, **kw: q)
    optimizer = get_optimizer()
    previous = optimizer.settings.kernels
    optimizer.configure(kernels=())
    try:
        # The mask hook runs once per forward: for a decode step it plans this step's calls (see
        # integrations/transformers_plan.py), as it would in generate().
        integration.attnforge_mask(batch_size=1, q_length=1, kv_length=KV, q_offset=KV - 1,
                                   config=module.config, dtype=q.dtype, device=q.device)  # fmt: skip
        with stub:
            plain = lambda: sdpa_attention.sdpa_attention_forward(module, q, k, v, None)  # noqa: E731
            through = lambda: integration.attnforge_attention(module, q, k, v, None)  # noqa: E731
            times = _per_call_us({"sdpa": plain, "attnforge": through}, calls, repeats)
            cold = _per_call_cold_us({"sdpa": plain, "attnforge": through}, cold_calls)
    finally:
        optimizer.configure(kernels=previous)
    return {
        "what": "overhead",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "method": f"hot: fastest of {repeats} interleaved rounds of {calls} calls; cold: median of "
        f"{cold_calls} single calls each after a {COLD_SWEEP_BYTES >> 20} MiB cache sweep; torch SDPA "
        "stubbed out; one decode-shaped call of a Llama attention layer (q [1, 16, 1, 128] a transposed "
        f"view, k/v [1, 8, {KV}, 128], planned by the mask hook as in generate(), CPU tensors: the "
        "alignment check CUDA tensors get is not included)",
        "transformers_sdpa_us": times["sdpa"],
        "attnforge_hook_us": times["attnforge"],
        "overhead_us": times["attnforge"] - times["sdpa"],
        "transformers_sdpa_cold_us": cold["sdpa"],
        "attnforge_hook_cold_us": cold["attnforge"],
        "overhead_cold_us": cold["attnforge"] - cold["sdpa"],
    }
