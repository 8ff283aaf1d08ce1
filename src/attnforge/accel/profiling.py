"""What users of MLX acceleration layers expect: `profile_model`, `benchmark_operation`, `device_info`.

Timing is the project's protocol in small: warm-up calls first, then the median of timed calls (CUDA events
on a GPU, after a synchronize; `time.perf_counter` on CPU), under `torch.inference_mode()`.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence

import torch

from attnforge.environment import device_info as gpu_info
from attnforge.environment import package_version, triton_status


def device_info() -> dict:
    """The machine the work runs on.

    Returns:
        device ("cuda" or "cpu"), name, memory_gib (total), cpu_count, bf16 (supported), triton_kernels (can
        run here) and why, torch / triton / transformers versions; on a GPU also sm_count,
        compute_capability, cuda and driver versions and free_memory_gib.
    """
    cuda = torch.cuda.is_available()
    triton_ok, triton_reason = triton_status()
    info = {
        "device": "cuda" if cuda else "cpu",
        "name": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "bf16": torch.cuda.is_bf16_supported() if cuda else True,
        "triton_kernels": triton_ok,
        "triton_reason": triton_reason,
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "transformers": package_version("transformers"),
    }
    if cuda:
        gpu = gpu_info()
        free, _ = torch.cuda.mem_get_info()
        info.update(name=gpu.pop("gpu"), free_memory_gib=round(free / 2**30, 1), **gpu)
    else:
        pages = os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
        info["memory_gib"] = round(pages * os.sysconf("SC_PAGE_SIZE") / 2**30, 1) if pages else None
    return info


def benchmark_operation(
    fn: Callable,
    inputs,
    num_iterations: int = 100,
    flops: float | None = None,
    *,
    warmup: int = 3,
) -> dict:
    """Time `fn(*inputs)` and, from a FLOP count, its achieved rate.

    Args:
        fn: the operation. inputs: its positional arguments (a tuple/list) or a single tensor.
        num_iterations: timed calls. warmup: untimed calls before them.
        flops: floating-point operations of one call; None: counted by torch's FlopCounterMode (matmul,
            conv, attention: 2 per multiply-add), which counts nothing for elementwise ops.

    Returns:
        time_ms (median), mean_ms, min_ms, iterations, flops, flops_source ("given" or "counted"), tflops
        (achieved TFLOP/s; None when the count is 0, with the reason in flops_note), device.
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    _check_count("num_iterations", num_iterations, 1)
    _check_count("warmup", warmup, 0)
    args = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    if flops is not None and (
        isinstance(flops, bool) or not isinstance(flops, (int, float)) or not flops >= 0
    ):
        raise ValueError(f"flops={flops!r} must be a number >= 0 (None: count them)")
    source = "given"
    if flops is None:
        flops, source = _count_flops(fn, args), "counted"
    times = _time_calls(lambda: fn(*args), num_iterations, warmup, _device_of(args))
    result = {**times, "flops": flops, "flops_source": source, "tflops": None}
    if flops:
        result["tflops"] = flops / (times["time_ms"] * 1e-3) / 1e12
    else:
        result["flops_note"] = "no FLOPs counted (FlopCounterMode counts matmul/conv/attention): pass flops="
    return result


def profile_model(
    model: torch.nn.Module,
    input_shape: Sequence[int] = (1, 512),
    num_iterations: int = 10,
    *,
    warmup: int = 2,
) -> dict:
    """Time a model's forward pass on random input of `input_shape`.

    A token model (a transformers model, or any model with an `nn.Embedding` as input embeddings) gets token
    ids `[batch, seq]` drawn from its vocabulary; any other model gets a float tensor of `input_shape` in its
    dtype. Both on the model's device.

    Returns:
        time_ms (median), mean_ms, min_ms, iterations, tokens_per_s (token models: batch x seq / time),
        parameters (count), dtype, device, input ("token ids" or "float tensor"), input_shape.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    shape = tuple(input_shape)
    if not shape or any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in shape):
        raise ValueError(f"input_shape={input_shape!r} must be positive integers, e.g. (1, 512)")
    _check_count("num_iterations", num_iterations, 1)
    parameter = next(model.parameters(), None)
    dtype = parameter.dtype if parameter is not None else torch.float32
    device = parameter.device if parameter is not None else torch.device("cpu")
    vocab = _vocab_size(model)
    if vocab is not None:
        if len(shape) != 2:
            raise ValueError(f"input_shape={input_shape!r}: a token model takes (batch, seq)")
        inputs = torch.randint(0, vocab, shape, device=device)
    else:
        inputs = torch.randn(shape, dtype=dtype, device=device)
    times = _time_calls(lambda: model(inputs), num_iterations, warmup, device)
    return {
        **times,
        "tokens_per_s": shape[0] * shape[1] / (times["time_ms"] * 1e-3) if vocab is not None else None,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(dtype).removeprefix("torch."),
        "device": str(device),
        "input": "token ids" if vocab is not None else "float tensor",
        "input_shape": list(shape),
    }


def _vocab_size(model: torch.nn.Module) -> int | None:
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    if isinstance(embeddings, torch.nn.Embedding):
        return embeddings.num_embeddings
    return None


def _check_count(name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")


def _device_of(args: tuple) -> torch.device:
    for arg in args:
        if isinstance(arg, torch.Tensor):
            return arg.device
    return torch.device("cpu")


def _count_flops(fn: Callable, args: tuple) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops()


def _time_calls(call: Callable, iterations: int, warmup: int, device: torch.device) -> dict:
    """Median, mean and minimum milliseconds of `iterations` calls after `warmup` untimed ones."""
    cuda = device.type == "cuda"
    samples = []
    with torch.inference_mode():
        for _ in range(warmup):
            call()
        if cuda:
            torch.cuda.synchronize(device)
        for _ in range(iterations):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                call()
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end))
            else:
                begin = time.perf_counter()
                call()
                samples.append((time.perf_counter() - begin) * 1e3)
    return {
        "time_ms": statistics.median(samples),
        "mean_ms": statistics.fmean(samples),
        "min_ms": min(samples),
        "iterations": iterations,
        "device": str(device),
    }
