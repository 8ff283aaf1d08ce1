"""A generation's evaluations fanned out over this host's devices: one worker process per GPU, pinned.

`LocalPool(fitness, ["cuda:0", "cuda:1"])` starts one worker process per device (spawned, so no CUDA state is
inherited). A worker for `cuda:I` sees only that GPU (`CUDA_VISIBLE_DEVICES`, set before its first CUDA call,
and inherited by the evaluator's runner processes it starts); every worker finds its assignment in
`ATTNFORGE_WORKER_DEVICE` (`cuda:1`, `cpu:0`). Without GPUs the same pool runs N CPU workers (`cpu:0`..).
Candidates wait in a queue in the parent and go to whichever worker is idle; results are collected by the
candidate's position, so the caller sees them in its own order whatever order they finished in. A worker that
dies (crash, `os._exit`, killed) is replaced on the same device and its candidate retried once; a second death
scores it 0 with the reason. Anything with `evaluate(target, genomes, on_result)` can stand in for the pool
(`Dispatcher`): `InlineDispatcher` evaluates in this process; `ray_pool.RayPool` spreads the candidates over
the GPUs of a Ray cluster's hosts (`open_pool` picks it for `--devices ray`).
"""

from __future__ import annotations

import collections
import contextlib
import multiprocessing
import os
import pickle
import signal
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from typing import Any, Protocol

DEVICE_ENV = "ATTNFORGE_WORKER_DEVICE"
MAX_ATTEMPTS = 2  # a candidate whose worker died is retried once

Fitness = Callable[[Any, dict], dict]
OnResult = Callable[[int, dict], None]


class Dispatcher(Protocol):
    def evaluate(self, target: Any, genomes: list[dict], on_result: OnResult | None = None) -> list[dict]:
        """The fitness of every genome at `target`, in the order of `genomes`; `on_result(index, result)` as
        each one finishes (in completion order: for progress display only)."""
        ...


class InlineDispatcher:
    """Evaluations one after another in this process (the single-device search)."""

    def __init__(self, fitness: Fitness) -> None:
        self.fitness = fitness

    def evaluate(self, target: Any, genomes: list[dict], on_result: OnResult | None = None) -> list[dict]:
        """The fitness of every genome, in order."""
        results = []
        for index, genome in enumerate(genomes):
            results.append(self.fitness(target, genome))
            if on_result is not None:
                on_result(index, results[-1])
        return results


def parse_devices(spec: str, gpu_count: int) -> list[str]:
    """Worker devices from `--devices`: `auto` (every GPU when there are two or more, else [] = evaluate in
    this process), `cuda` (every GPU), `cuda:0,2` (these GPUs), `cpu:N` (N CPU workers, only without GPUs),
    `ray` (one actor per GPU of a Ray cluster) or `ray:N` (N CPU actors on it): ["ray"] / ["ray:N"]."""
    text = spec.strip().lower()
    if text == "auto":
        return [f"cuda:{i}" for i in range(gpu_count)] if gpu_count >= 2 else []
    kind, _, rest = text.partition(":")
    if kind == "ray":
        if rest and (not rest.isdigit() or int(rest) < 1):
            raise ValueError(f"--devices {spec!r}: ray:N needs a CPU actor count N >= 1")
        return [text]
    if kind == "cuda":
        if gpu_count == 0:
            raise ValueError(f"--devices {spec!r}: this machine has no CUDA GPU (use cpu:N or auto)")
        indices = _integers(spec, rest) if rest else list(range(gpu_count))
        bad = [i for i in indices if not 0 <= i < gpu_count]
        if bad or len(set(indices)) != len(indices):
            raise ValueError(f"--devices {spec!r}: GPU indices must be distinct and in 0..{gpu_count - 1} "
                             f"(this machine has {gpu_count})")  # fmt: skip
        return [f"cuda:{i}" for i in indices]
    if kind == "cpu" and rest:
        counts = _integers(spec, rest)
        if len(counts) != 1 or counts[0] < 1:
            raise ValueError(f"--devices {spec!r}: cpu:N needs a worker count N >= 1")
        if gpu_count:
            raise ValueError(f"--devices {spec!r}: CPU workers are for machines without a GPU (this one has "
                             f"{gpu_count}); use cuda or cuda:0,1")  # fmt: skip
        return [f"cpu:{i}" for i in range(counts[0])]
    raise ValueError(f"--devices {spec!r} is not one of auto, cuda, cuda:I[,J...], cpu:N, ray, ray:N")


def _integers(spec: str, text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"--devices {spec!r}: {text!r} is not a comma-separated list of integers") from None


def _pinned_environment(device: str) -> dict[str, str]:
    """The variables a worker for `device` sets before anything touches CUDA. An index counts among the GPUs
    this process sees, so it maps through an existing CUDA_VISIBLE_DEVICES."""
    kind, _, index = device.partition(":")
    if kind != "cuda":
        return {DEVICE_ENV: device}
    visible = [v for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    physical = visible[int(index)] if visible else index
    return {DEVICE_ENV: device, "CUDA_VISIBLE_DEVICES": physical.strip()}


def _worker(environment: dict[str, str], fitness_bytes: bytes, conn: Connection) -> None:
    """A worker's loop: pin, then evaluate (index, target, genome) jobs until None or the pipe closes."""
    os.environ.update(environment)
    fitness = pickle.loads(fitness_bytes)  # after pinning: unpickling may import torch
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        if job is None:
            return
        index, target, genome = job
        try:
            conn.send((index, "ok", fitness(target, genome)))
        except Exception:
            conn.send((index, "error", traceback.format_exc()))


def exit_text(code: int | None) -> str:
    """How a process ended, in words: `exited with status 3`, `died from signal SIGKILL`."""
    if code is None:
        return "did not exit"
    if code < 0:
        try:
            return f"died from signal {signal.Signals(-code).name}"
        except ValueError:
            return f"died from signal {-code}"
    return f"exited with status {code}"


class _Worker:
    def __init__(self, context, device: str, fitness_bytes: bytes) -> None:
        self.device = device
        self.conn, child = context.Pipe()
        args = (_pinned_environment(device), fitness_bytes, child)
        self.process = context.Process(target=_worker, args=args, name=f"attnforge-evaluate-{device}",
                                       daemon=True)  # fmt: skip
        self.process.start()
        child.close()  # the parent keeps one end, so a dead worker reads as EOF
        self.job: int | None = None

    def stop(self, timeout: float = 5.0) -> None:
        with contextlib.suppress(OSError, ValueError):  # already dead
            self.conn.send(None)
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


class LocalPool:
    """One worker process per device in `devices` (`cuda:I` or `cpu:I`), each running `fitness` (picklable: a
    module-level function or a functools.partial of one). Use as a context manager, or call close()."""

    def __init__(self, fitness: Fitness, devices: list[str], *, start_method: str = "spawn") -> None:
        if not devices:
            raise ValueError("LocalPool needs at least one device, e.g. ['cpu:0'] or ['cuda:0', 'cuda:1']")
        self.context = multiprocessing.get_context(start_method)
        self.devices = list(devices)
        self.fitness_bytes = pickle.dumps(fitness)
        self.workers = [_Worker(self.context, device, self.fitness_bytes) for device in devices]
        self.replaced = 0  # workers that died and were started again
        self.last_exit = ""

    def __enter__(self) -> LocalPool:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Stop every worker (asked first, killed after 5 s)."""
        for worker in self.workers:
            worker.stop()

    def evaluate(self, target: Any, genomes: list[dict], on_result: OnResult | None = None) -> list[dict]:
        """The fitness of every genome at `target`, in the order of `genomes` (whatever order they finish in).
        A fitness that raises in a worker raises RuntimeError here, with the worker's traceback, once the
        jobs already running have finished (so the pool stays usable)."""
        queue, outcomes = collections.deque(range(len(genomes))), Outcomes(len(genomes), on_result)
        while queue or any(w.job is not None for w in self.workers):
            for slot, worker in enumerate(self.workers):
                if worker.job is None and queue:
                    self._dispatch(slot, queue.popleft(), target, genomes, queue)
            busy = [w for w in self.workers if w.job is not None]
            if busy:
                wait([w.conn for w in busy] + [w.process.sentinel for w in busy])
            for slot, worker in enumerate(self.workers):
                if worker.job is None or not (worker.conn.poll() or not worker.process.is_alive()):
                    continue
                index = worker.job
                status, outcome = self._receive(slot)
                if status == "error":
                    outcomes.errors.append(f"the fitness raised in the worker on {worker.device} (candidate "
                                           f"{index}):\n{outcome}")  # fmt: skip
                    queue.clear()
                elif status == "died" and outcomes.retry(index):
                    queue.appendleft(index)
                elif status == "died":
                    outcomes.record(
                        index, failed_result(worker.device, outcomes.deaths[index], self.last_exit)
                    )
                else:
                    outcomes.record(index, outcome)
        return outcomes.finish()

    def _dispatch(self, slot: int, index: int, target: Any, genomes: list[dict], queue) -> None:
        """Send a job to the worker in `slot`, replacing it first if it died while idle."""
        if not self.workers[slot].process.is_alive():
            self._replace(slot)
        try:
            self.workers[slot].conn.send((index, target, genomes[index]))
            self.workers[slot].job = index
        except (OSError, ValueError):  # it died between the check and the send: start again, keep the job
            self._replace(slot)
            queue.appendleft(index)

    def _receive(self, slot: int) -> tuple[str, Any]:
        """The finished job: ("ok", result), ("error", traceback) or ("died", None) (the worker is then
        replaced)."""
        worker = self.workers[slot]
        try:
            _, status, payload = worker.conn.recv()
        except (EOFError, OSError):
            self._replace(slot)
            return "died", None
        worker.job = None
        return status, payload

    def _replace(self, slot: int) -> None:
        old = self.workers[slot]
        old.process.join(5.0)
        self.last_exit = exit_text(old.process.exitcode)
        old.stop(timeout=0.0)
        self.workers[slot] = _Worker(self.context, old.device, self.fitness_bytes)
        self.replaced += 1


class Outcomes:
    """A generation's results by candidate position, the deaths of their evaluators and the fitness errors:
    the bookkeeping every pool shares."""

    def __init__(self, count: int, on_result: OnResult | None) -> None:
        self.results: list[dict | None] = [None] * count
        self.deaths, self.errors, self.on_result = [0] * count, [], on_result

    def retry(self, index: int) -> bool:
        """One more death of candidate `index`'s evaluator: whether it is evaluated again (MAX_ATTEMPTS)."""
        self.deaths[index] += 1
        return self.deaths[index] < MAX_ATTEMPTS

    def record(self, index: int, outcome: dict) -> None:
        self.results[index] = outcome
        if self.on_result is not None:
            self.on_result(index, outcome)

    def finish(self) -> list[dict]:
        """The results in the candidates' order; the first fitness error raised as RuntimeError."""
        if self.errors:
            raise RuntimeError(self.errors[0])
        return [r for r in self.results if r is not None]


def failed_result(device: str, deaths: int, how: str) -> dict:
    """The score of a candidate whose evaluation worker died `deaths` times (the last one: `how`)."""
    return {"score": 0.0, "timed": False,
            "reason": f"the evaluation worker on {device} died {deaths} times evaluating this candidate "
                      f"(last: {how}); the worker was replaced each time"}  # fmt: skip


def open_pool(fitness: Fitness, devices: list[str]):
    """The dispatcher `parse_devices`' answer asks for (not empty): a `ray_pool.RayPool` for ["ray"] (one
    actor per GPU of the cluster) or ["ray:N"] (N CPU actors), else a LocalPool over the devices."""
    kind, _, count = devices[0].partition(":")
    if kind == "ray":
        from attnforge.evolve.ray_pool import RayPool

        return RayPool(fitness, cpus=int(count) if count else None)
    return LocalPool(fitness, devices)


__all__ = ["DEVICE_ENV", "Dispatcher", "InlineDispatcher", "LocalPool", "Outcomes", "exit_text",
           "failed_result", "open_pool", "parse_devices"]  # fmt: skip
