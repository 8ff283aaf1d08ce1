"""The precompile pool's watchdog (CPU, with stand-in workers): a candidate whose first launch never ends is
reported as hung and its pool killed, the rest compiled by fresh workers; a worker that crashes is no hang;
`attnforge tune` and the evolve tuner never launch a hung candidate."""

import os
import time

import torch

from attnforge.bench import precompile, tune
from attnforge.bench.targets import Target
from attnforge.evolve import tuner

TARGET = Target("prefill", 1, 2, 1, 16, 16, 64)
OTHER = Target("prefill", 1, 4, 2, 32, 32, 64)
NAME = lambda params: params["id"]  # a candidate's name in these tests


def stand_in(behaviour: dict):
    """A compile worker that "launches" each candidate as `behaviour[id]` says: end (default), "hang" or
    "crash"; it reports like `precompile.compile_worker`."""

    def work(chunk, name, messages):
        for fields, params_list in chunk:
            label = precompile._target(fields).label
            for params in params_list:
                messages.put(("start", os.getpid(), (label, name(params))))
                what = behaviour.get(params["id"])
                if what == "hang":
                    time.sleep(3600)
                if what == "crash":
                    os._exit(3)
                messages.put(("end", os.getpid(), (label, name(params))))

    return work


def jobs(*targets_and_ids):
    from dataclasses import asdict

    return [(asdict(t), [{"id": i} for i in ids]) for t, ids in targets_and_ids]


def test_a_candidate_that_never_ends_is_reported_and_its_pool_killed():
    started = time.monotonic()
    finished, stuck = precompile.compile_round(jobs((TARGET, ["a", "b", "c"])), 1, NAME, hang_s=1.0,
                                               worker=stand_in({"b": "hang"}), context="fork")  # fmt: skip
    assert stuck == (TARGET.label, "b") and finished == {(TARGET.label, "a")}
    assert time.monotonic() - started < 30  # the sleeping worker was killed, not waited for


def test_every_round_goes_on_without_what_hung():
    work = stand_in({"b": "hang", "y": "hang"})
    hung = precompile.compile_all(jobs((TARGET, ["a", "b", "c"]), (OTHER, ["x", "y"])), 2, NAME, 1.0,
                                  worker=work, context="fork")  # fmt: skip
    assert hung == {(TARGET.label, "b"), (OTHER.label, "y")}


def test_a_crashed_worker_is_no_hang():
    finished, stuck = precompile.compile_round(jobs((TARGET, ["a", "b"]), (OTHER, ["x"])), 2, NAME, 1.0,
                                               worker=stand_in({"a": "crash"}), context="fork")  # fmt: skip
    assert stuck is None and (OTHER.label, "x") in finished


def test_without_a_gpu_nothing_is_compiled():
    assert precompile.precompile([(TARGET, [{"id": "a"}])], 4, NAME) == (0.0, set())


def test_tune_reports_a_hung_candidate_and_never_launches_it(monkeypatch):
    params = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 2}
    name = tune.params_name(params)
    real = tune.kernel_call

    def guarded(target, case, p, out):
        assert tune.params_name(p) != name, "a hung candidate was launched"
        return real(target, case, p, out)

    monkeypatch.setattr(tune, "kernel_call", guarded)
    row = tune.tune_target(TARGET, [params, dict(params, num_stages=3)], torch.device("cpu"),
                           hung=frozenset({name}))  # fmt: skip
    assert row["candidates"][name] == {"params": params, "status": "hung", "reason": precompile.HUNG}
    assert row["candidates"]["m16-n16-w4-st3"]["status"] == "correct"


def test_the_evolve_search_scores_a_hung_genome_zero_without_evaluating_it():
    target = Target("decode", 1, 32, 8, 1, 4096, 128)
    evaluated = []

    def fitness(t, genome):
        evaluated.append(tuner.key(genome))
        return {"score": 1.0, "reason": "made up", "timed": True}

    hung = []

    def prepare(t, genomes):
        if not hung:  # the first generation's second genome hangs
            hung.append(tuner.key(genomes[1]))
        return set(hung)

    state = tuner.search(target, fitness, tuner.Settings(population=4, budget=4, seed=1),
                         device=torch.device("cpu"), prepare=prepare)  # fmt: skip
    assert state["scores"][hung[0]]["score"] == 0.0 and state["scores"][hung[0]]["reason"] == precompile.HUNG
    assert hung[0] not in evaluated and state["evaluations"] == 4 == len(evaluated) + 1


def test_the_tuning_report_names_what_hung():
    doc = tune.run([TARGET], quick=True)
    assert doc["hung"] == [] and "Hung in the precompile" not in tune.markdown(doc)
    doc["hung"] = [f"{TARGET.label}: m128-n128-w4-st2-ws"]
    assert f"Hung in the precompile (never launched after): {TARGET.label}: m128-n128-w4-st2-ws." in (
        tune.markdown(doc)
    )
