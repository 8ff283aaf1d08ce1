"""Compile tuning candidates ahead of timing, in worker processes, with a watchdog for kernels that never end.

Triton compiles a launch configuration the first time it runs, and compilation dominates a tuning run, so
`attnforge tune` and the evolve tuner first launch every candidate once on zeros in a pool of processes
(Triton's on-disk cache then serves the timing process). A candidate whose first launch does not finish
(a compiler bug can leave a warp-specialized kernel waiting on a barrier forever) would hang the pool and
the run: each worker reports the candidate it starts and ends, and one that runs longer than `hang_s` has
its workers killed (the GPU context goes with the process), is reported as hung, and the rest is compiled
by fresh workers.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import time
from collections.abc import Callable
from dataclasses import asdict

import torch

from attnforge.bench.targets import Target, kernel_call, zero_case

HANG_S = 180.0  # one candidate's first launch, compilation included
HUNG = f"its first launch did not end in {HANG_S:.0f} s (precompile)"  # the reason a hung candidate gets
Job = tuple[dict, list[dict]]  # a target's fields, its candidates' parameters
Key = tuple[str, str]  # (target label, parameters' name)


def precompile(plan: list[tuple[Target, list[dict]]], workers: int, name: Callable[[dict], str],
               hang_s: float = HANG_S) -> tuple[float, set[Key]]:  # fmt: skip
    """Launch every candidate of every target once in `workers` processes (none without a GPU or with one
    worker); returns the seconds spent and the (target label, `name(params)`) of candidates that hung."""
    if workers <= 1 or not torch.cuda.is_available():
        return 0.0, set()
    started = time.monotonic()
    hung = compile_all([(asdict(t), params) for t, params in plan], workers, name, hang_s)
    return time.monotonic() - started, hung


def compile_all(jobs: list[Job], workers: int, name: Callable[[dict], str], hang_s: float,
                **round_options) -> set[Key]:  # fmt: skip
    """Rounds of `compile_round` until every candidate has ended or hung; returns the hung ones."""
    hung = set()
    while jobs:
        finished, stuck = compile_round(jobs, workers, name, hang_s, **round_options)
        if stuck is None:
            break
        hung.add(stuck)
        jobs = _left(jobs, finished | hung, name)
    return hung


def compile_round(
    jobs: list[Job],
    workers: int,
    name: Callable[[dict], str],
    hang_s: float,
    worker: Callable | None = None,
    context: str = "spawn",
) -> tuple[set[Key], Key | None]:
    """One pool of `workers` processes over `jobs` (whole targets per worker, the largest first); returns the
    candidates that finished and the one that ran past `hang_s` (its pool killed), or None."""
    jobs = sorted(jobs, key=lambda job: -len(job[1]))
    chunks = [c for c in (jobs[i::workers] for i in range(workers)) if c]
    ctx = multiprocessing.get_context(context)
    messages = ctx.Queue()
    procs = [ctx.Process(target=worker or compile_worker, args=(chunk, name, messages)) for chunk in chunks]
    for proc in procs:
        proc.start()
    finished, running = set(), {}  # running: pid -> (key, start time)
    try:
        while any(p.is_alive() for p in procs) or not messages.empty():
            try:
                event, pid, key = messages.get(timeout=0.5)
            except queue.Empty:
                alive = {p.pid for p in procs if p.is_alive()}
                running = {pid: run for pid, run in running.items() if pid in alive}  # a crash is no hang
                now = time.monotonic()
                stuck = next((k for k, t0 in running.values() if now - t0 > hang_s), None)
                if stuck is not None:
                    return finished, stuck
                continue
            if event == "start":
                running[pid] = (tuple(key), time.monotonic())
            else:
                finished.add(tuple(key))
                running.pop(pid, None)
        return finished, None
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
            proc.join()


def compile_worker(chunk: list[Job], name: Callable[[dict], str], messages) -> None:
    """In a worker process: launch each candidate once on zeros of its target's shapes (values do not matter
    to compilation; shapes and strides do) and wait for it, reporting ("start" | "end", pid, key)."""
    device = torch.device("cuda")
    for fields, params_list in chunk:
        target = _target(fields)
        case = zero_case(target, device)
        out = torch.empty_like(case.q)
        for params in params_list:
            key = (target.label, name(params))
            messages.put(("start", os.getpid(), key))
            try:
                kernel_call(target, case, params, out)()
                torch.cuda.synchronize()
            except Exception:  # noqa: BLE001 - the timing process reports the error for this candidate
                pass
            messages.put(("end", os.getpid(), key))


def _left(jobs: list[Job], done: set[Key], name: Callable[[dict], str]) -> list[Job]:
    """`jobs` without the candidates in `done`; targets left with none dropped."""
    left = []
    for fields, params_list in jobs:
        label = _target(fields).label
        rest = [p for p in params_list if (label, name(p)) not in done]
        if rest:
            left.append((fields, rest))
    return left


def _target(fields: dict) -> Target:
    """A Target from its `asdict` fields (`valid` back to a tuple)."""
    return Target(**{**fields, "valid": None if fields["valid"] is None else tuple(fields["valid"])})
