"""A generation's evaluations fanned out over a Ray cluster: one actor per GPU on every host (issue 17's
optional extra: `pip install "attnforge[ray]"`).

`RayPool(fitness)` joins the cluster at `address` (else RAY_ADDRESS, else it starts one on this host) and
starts one actor per GPU the cluster has free (`num_gpus=1`: Ray gives each its own GPU through
`CUDA_VISIBLE_DEVICES`, which the evaluator's runner processes inherit); `RayPool(fitness, cpus=N)` starts N
actors of one CPU each instead (clusters without GPUs, and the tests); what the cluster cannot place now is
refused, not waited for. It is a `pool.Dispatcher` with
`pool.LocalPool`'s rules: candidates wait here and go to whichever actor is idle, results come back in the
caller's order whatever order they finished in, an actor that dies is replaced and its candidate retried once
(a second death scores it 0 with the reason), and a fitness that raises raises RuntimeError here with the
actor's traceback once the running jobs have finished.
"""

from __future__ import annotations

import collections
import os
import pickle
import traceback
from typing import Any

from attnforge.evolve.pool import DEVICE_ENV, Fitness, OnResult, Outcomes, failed_result


class _Evaluator:
    """One actor: the fitness, unpickled after its device label is set (RayPool makes it a Ray actor)."""

    def __init__(self, fitness_bytes: bytes, device: str) -> None:
        os.environ[DEVICE_ENV] = device
        self.fitness = pickle.loads(fitness_bytes)

    def evaluate(self, index: int, target: Any, genome: dict) -> tuple[int, str, Any]:
        try:
            return index, "ok", self.fitness(target, genome)
        except Exception:
            return index, "error", traceback.format_exc()

    def where(self) -> dict:
        """This actor's process, host and the GPUs it sees (for checks and reports)."""
        import ray

        context = ray.get_runtime_context()
        return {"pid": os.getpid(), "node": context.get_node_id(), "device": os.environ[DEVICE_ENV],
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}  # fmt: skip


def _ray():
    try:
        import ray
    except ImportError:
        raise RuntimeError('the Ray backend needs Ray: pip install "attnforge[ray]"') from None
    return ray


class RayPool:
    """Actors on a Ray cluster evaluating `fitness` (picklable), one per GPU or `cpus` of them. Use as a
    context manager, or call close() (which stops the actors, and the cluster if this pool started it)."""

    def __init__(self, fitness: Fitness, *, cpus: int | None = None, address: str | None = None) -> None:
        ray = _ray()
        if cpus is not None and cpus < 1:
            raise ValueError(f"cpus={cpus}: a Ray pool needs at least one CPU actor")
        self.started_cluster = not ray.is_initialized()
        address = address or os.environ.get("RAY_ADDRESS")
        if self.started_cluster and address:  # a cluster's size is its own
            ray.init(address=address, log_to_driver=False)
        elif self.started_cluster:
            ray.init(num_cpus=cpus, log_to_driver=False, include_dashboard=False)
        free = ray.available_resources()  # actors the cluster cannot place would wait forever
        gpus = int(free.get("GPU", 0))
        if cpus is None and gpus == 0:
            total = int(ray.cluster_resources().get("GPU", 0))
            self.close()
            raise RuntimeError(f"the Ray cluster has no GPU free ({total} in all): use cpus=N (--devices "
                               "ray:N) for CPU actors")  # fmt: skip
        if cpus is not None and free.get("CPU", 0) < cpus:
            self.close()
            raise RuntimeError(f"the Ray cluster has {free.get('CPU', 0):g} CPUs free for {cpus} CPU actors")
        self.options = {"num_cpus": 1} if cpus is not None else {"num_cpus": 1, "num_gpus": 1}
        # labels of the actors (each GPU actor sees its own GPU as cuda:0)
        self.devices = (
            [f"ray:cpu{i}" for i in range(cpus)] if cpus is not None else [f"ray:gpu{i}" for i in range(gpus)]
        )
        self.fitness_bytes = ray.cloudpickle.dumps(fitness)  # what plain pickle loads in the actor
        self.actor_class = ray.remote(_Evaluator)
        self.actors = [self._start(device) for device in self.devices]
        self.replaced = 0
        self.last_exit = ""

    def _start(self, device: str):
        # what the actor's fitness sees as its device: the one GPU Ray gave it is its cuda:0
        label = "cuda:0" if "gpu" in device else "cpu:" + device.removeprefix("ray:cpu")
        return self.actor_class.options(**self.options).remote(self.fitness_bytes, label)

    def __enter__(self) -> RayPool:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Stop the actors (and the cluster this pool started)."""
        ray = _ray()
        for actor in getattr(self, "actors", []):
            ray.kill(actor)
        self.actors = []
        if self.started_cluster and ray.is_initialized():
            ray.shutdown()

    def where(self) -> list[dict]:
        """Each actor's process, host and visible GPUs."""
        ray = _ray()
        return ray.get([actor.where.remote() for actor in self.actors])

    def evaluate(self, target: Any, genomes: list[dict], on_result: OnResult | None = None) -> list[dict]:
        """The fitness of every genome at `target`, in the order of `genomes` (pool.Dispatcher)."""
        ray = _ray()
        queue, idle = collections.deque(range(len(genomes))), list(range(len(self.actors)))[::-1]
        outcomes, running = Outcomes(len(genomes), on_result), {}
        while queue or running:
            while idle and queue and not outcomes.errors:
                slot, index = idle.pop(), queue.popleft()
                running[self.actors[slot].evaluate.remote(index, target, genomes[index])] = (slot, index)
            if not running:
                break
            (ref,), _ = ray.wait(list(running), num_returns=1)
            slot, index = running.pop(ref)
            idle.append(slot)
            try:
                _, status, outcome = ray.get(ref)
            except ray.exceptions.RayActorError as error:
                self._replace(slot, error)
                if outcomes.retry(index):
                    queue.appendleft(index)
                else:
                    outcomes.record(
                        index, failed_result(self.devices[slot], outcomes.deaths[index], self.last_exit)
                    )
                continue
            if status == "error":
                outcomes.errors.append(f"the fitness raised in the actor for {self.devices[slot]} (candidate "
                                       f"{index}):\n{outcome}")  # fmt: skip
                queue.clear()
            else:
                outcomes.record(index, outcome)
        return outcomes.finish()

    def _replace(self, slot: int, error: Exception) -> None:
        _ray().kill(self.actors[slot])
        self.last_exit = (
            str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        )
        self.actors[slot] = self._start(self.devices[slot])
        self.replaced += 1


__all__ = ["RayPool"]
