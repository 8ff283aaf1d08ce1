"""The timing protocol (DESIGN.md): CUDA events, warm-up, median, cold L2, interleaved providers, ceilings.

Everything here needs a CUDA GPU; the statistics (`summarize`) do not.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch

from attnforge.bench.stats import median_interval

L2_FLUSH_BYTES = 256 * 2**20
SLEEP_CYCLES = 200_000  # ~100 us at 1.98 GHz: longer than any provider's host-side launch path


def summarize(samples_us: list[float]) -> dict:
    """Median, spread and a distribution-free 95% interval of the median, in microseconds."""
    if not samples_us:
        raise ValueError("summarize needs at least one sample, got none")
    ordered = sorted(samples_us)
    n = len(ordered)
    return {
        "median_us": statistics.median(ordered),
        "mean_us": statistics.fmean(ordered),
        "min_us": ordered[0],
        "p10_us": ordered[int(0.1 * (n - 1))],
        "p90_us": ordered[int(0.9 * (n - 1))],
        "ci95_us": list(median_interval(ordered)),
        "n": n,
    }


class L2Flusher:
    """Reads a 256 MiB buffer so the next kernel starts with a cold L2 (50 MB on an H100) holding clean lines.

    A flush that writes leaves L2 full of dirty lines, and the timed call then pays for writing them back:
    measured on an H100 (benchmarks/results/h100/decode-profile/key-groups-20261128.json), ~2 us at 4k keys
    and ~10 us at 64k for every provider alike - the flush's cost, not the call's."""

    def __init__(self, device: str = "cuda") -> None:
        self.buffer = torch.zeros(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device)

    def __call__(self) -> None:
        self.buffer.sum()


def time_interleaved(
    providers: dict[str, Callable[[], object]], *, reps: int = 100, warmup: int = 10, cold_l2: bool = True,
    prepare: Callable[[str, int], None] | None = None,
) -> dict[str, list[float]]:  # fmt: skip
    """Time each provider `reps` times, rotating A B C A B C so drift hits all alike; samples in us.

    Each sample is one call between CUDA events, after an L2 flush when `cold_l2`. A short GPU sleep before
    each start event keeps the GPU queue ahead of the host, so samples are GPU time, not launch overhead
    (`host_overhead_us` measures that separately). `prepare(name, rep)`, if given, runs before each sample's
    flush, outside the timed region (the evolve evaluator re-draws the inputs there).
    """
    flush = L2Flusher() if cold_l2 else None
    for fn in providers.values():
        for _ in range(warmup):
            fn()
    torch.cuda.synchronize()
    names = list(providers)
    events = {name: [(torch.cuda.Event(True), torch.cuda.Event(True)) for _ in range(reps)] for name in names}
    for rep in range(reps):
        for offset in range(len(names)):
            name = names[(rep + offset) % len(names)]
            if prepare is not None:
                prepare(name, rep)
            if flush is not None:
                flush()
            torch.cuda._sleep(SLEEP_CYCLES)
            start, end = events[name][rep]
            start.record()
            providers[name]()
            end.record()
    torch.cuda.synchronize()
    return {name: [s.elapsed_time(e) * 1e3 for s, e in events[name]] for name in names}


def host_overhead_us(fn: Callable[[], object], calls: int = 200) -> float:
    """Host time per call (us) with the GPU kept busy: what an eager loop pays before the GPU sees work."""
    import time

    fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(50_000_000)  # ~25 ms of GPU work ahead, so the host never waits for the GPU
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def time_graph_per_call(
    make_layer_call: Callable[[int], Callable[[], object]], *, layers: int = 28, reps: int = 50
) -> list[float]:
    """Per-call time (us) inside a captured CUDA graph that runs one call per layer, `layers` calls.

    `make_layer_call(i)` returns the call for layer i over that layer's own buffers, so L2 does not hold the
    cache across calls (what a graph-captured decode loop sees).
    """
    graph = _layer_graph(make_layer_call, layers)
    return [_replay_us(graph, layers) for _ in range(reps)]


def time_graphs_per_call(
    makers: dict[str, Callable[[int], Callable[[], object]]], *, layers: int = 28, reps: int = 20
) -> dict[str, list[float] | str]:
    """`time_graph_per_call` for several launches at once: each graph captured first, then one replay of each
    per round, so that clocks and the L2 treat them alike (timed one after the other, the first graph of a
    tuning run read 5-6% faster than the same graph timed again: `h100/tuning-decode-grid-20261207b.json`,
    `h200/tuning-decode-grid-20261207.json`). A graph that cannot be captured gets the reason (a string)
    instead of samples."""
    graphs: dict[str, torch.cuda.CUDAGraph | str] = {}
    for name, make in makers.items():
        try:
            graphs[name] = _layer_graph(make, layers)
        except Exception as exc:  # noqa: BLE001 - a call that cannot be captured is reported, not fatal
            graphs[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    samples: dict[str, list[float] | str] = {
        name: graph if isinstance(graph, str) else [] for name, graph in graphs.items()
    }
    for _ in range(reps):
        for name, graph in graphs.items():
            if not isinstance(graph, str):
                samples[name].append(_replay_us(graph, layers))
    return samples


def _layer_graph(make_layer_call: Callable[[int], Callable[[], object]], layers: int) -> torch.cuda.CUDAGraph:
    """A CUDA graph of the `layers` calls `make_layer_call(i)`, warmed up (run once eagerly before capture,
    then replayed 3 times). The graph holds its calls (`graph.calls`): their closures own memory the graph
    reads and writes (a call's output, a baseline's mask or its copies of K/V), which must live as long as
    the graph. Freed with the calls, a large block goes back to the driver at the next capture (which
    empties the allocator's cache) and a replay then touches unmapped memory: the illegal address of
    `attnforge tune` on the static-cache target, whose torch path holds 2 x 67 MB of K/V copies a layer
    (`benchmarks/results/h100/decode-tma/graph-crash-20261207-323c2ea/`)."""
    calls = [make_layer_call(i) for i in range(layers)]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:  # warm-up compiles and autotunes outside the capture
            call()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.calls = calls
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    return graph


def _replay_us(graph: torch.cuda.CUDAGraph, layers: int) -> float:
    """One replay of `graph` between CUDA events: us per call of its `layers` calls."""
    start, end = torch.cuda.Event(True), torch.cuda.Event(True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / layers


def measure_read_bandwidth(gib: float = 4.0, reps: int = 20) -> float:
    """HBM read bandwidth in bytes/s: median time of summing a `gib` GiB bf16 tensor."""
    x = torch.randn(int(gib * 2**30) // 2, device="cuda", dtype=torch.bfloat16)
    samples = time_interleaved(
        {"sum": lambda: x.sum(dtype=torch.float32)}, reps=reps, warmup=3, cold_l2=False
    )
    return x.numel() * 2 / (statistics.median(samples["sum"]) * 1e-6)


def measure_matmul_flops(n: int = 8192, reps: int = 20) -> float:
    """bf16 tensor-core rate in FLOP/s: median time of an n^3 matmul on random data."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    samples = time_interleaved({"mm": lambda: a @ b}, reps=reps, warmup=3, cold_l2=False)
    return 2 * n**3 / (statistics.median(samples["mm"]) * 1e-6)


def ceilings() -> dict:
    """The two ceilings measured in this run: read GB/s and bf16 TFLOP/s."""
    return {"read_gbps": measure_read_bandwidth() / 1e9, "bf16_tflops": measure_matmul_flops() / 1e12}
