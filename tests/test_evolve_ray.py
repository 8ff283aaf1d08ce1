"""The evaluation pool over a Ray cluster (evolve/ray_pool.py), on a local cluster of CPU actors: a search
equals the in-process one for the same seed and budget, results come back in the caller's order, an actor that
dies is replaced and its candidate retried once (a second death scores it 0 with the reason), a raising
fitness raises here, and `--devices ray:N` runs the real evaluator. Skipped where Ray is not installed (it is
the optional extra `attnforge[ray]`)."""

import functools
import json
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from attnforge.evolve import pool, tuner
from attnforge.evolve.cli import evolve_app

ray = pytest.importorskip("ray")
import test_evolve_pool  # noqa: E402 - the stand-in fitness, sent to the actors by value
from test_evolve_pool import CPU, TARGET, _outcome, stand_in  # noqa: E402

ray.cloudpickle.register_pickle_by_value(sys.modules["test_evolve_pool"])


def test_the_cli_runs_the_real_evaluator_on_two_ray_actors(tmp_path):
    """`--devices ray:2` starts a local cluster (before the module's pool does: first in the file) and scores
    with the real evaluator."""
    options = ["--shapes", "1x4x2x1x65x64", "--dtype", "float32", "--budget", "2", "--population", "2",
               "--elite", "1", "--devices", "ray:2", "--out", str(tmp_path)]  # fmt: skip
    result = CliRunner().invoke(evolve_app, ["tune", *options])
    assert result.exit_code == 0, result.output
    assert "evaluating on Ray actors (ray:2" in result.output
    doc = json.loads(next(tmp_path.glob("evolve-tuning-*.json")).read_text())
    assert doc["evaluation_workers"] == {"devices": ["ray:cpu0", "ray:cpu1"], "replaced": 0}
    row = doc["rows"][0]
    assert row["evaluations"] == 2 and row["best_score"] == 1.0 and not row["timed"], row


@pytest.fixture(scope="module")
def actors(tmp_path_factory):
    from attnforge.evolve.ray_pool import RayPool

    fitness = functools.partial(stand_in, marker_dir=str(tmp_path_factory.mktemp("markers")))
    with RayPool(fitness, cpus=2) as workers:
        yield workers
    assert not ray.is_initialized()  # the pool started the local cluster, so it stopped it


def test_two_ray_actors_give_the_in_process_search(actors):
    settings = tuner.Settings(population=6, budget=12, seed=3)
    alone = tuner.search(TARGET, stand_in, settings, device=CPU)
    spread = tuner.search(TARGET, stand_in, settings, device=CPU, dispatcher=actors)
    assert _outcome(alone) == _outcome(spread)
    where = actors.where()
    assert sorted(w["device"] for w in where) == ["cpu:0", "cpu:1"] and len({w["pid"] for w in where}) == 2


def test_ray_results_come_back_in_the_callers_order(actors):
    genomes = [{"n": 30, "num_splits": 1}, {"n": 31, "num_splits": 128}, {"n": 32, "num_splits": 64}]
    finished = []
    results = actors.evaluate(None, genomes, lambda index, result: finished.append(index))
    assert finished[-1] == 0
    assert [r["score"] for r in results] == [stand_in(None, g)["score"] for g in genomes]


def test_a_dead_ray_actor_is_replaced_and_its_candidate_retried_once(actors):
    replaced = actors.replaced
    results = actors.evaluate(None, [{"n": 0}, {"n": 1, "die": "once"}, {"n": 2}])
    assert [r["reason"] for r in results] == ["stand-in"] * 3 and actors.replaced == replaced + 1
    marker = Path(test_evolve_pool.pool.pickle.loads(actors.fitness_bytes).keywords["marker_dir"]) / "died-1"
    assert int(marker.read_text()) != results[1]["pid"]  # the retry ran in another actor process


def test_a_second_ray_death_scores_the_candidate_failed_with_the_reason(actors):
    replaced = actors.replaced
    results = actors.evaluate(None, [{"n": 10}, {"n": 11, "die": "always"}, {"n": 12}])
    assert results[1]["score"] == 0.0 and "died 2 times" in results[1]["reason"]
    assert "ray:cpu" in results[1]["reason"] and actors.replaced == replaced + 2
    assert actors.evaluate(None, [{"n": 13}])[0]["reason"] == "stand-in"  # the pool goes on


def test_a_fitness_that_raises_in_a_ray_actor_raises_here(actors):
    with pytest.raises(RuntimeError, match="KeyError: 'a bug in the fitness'"):
        actors.evaluate(None, [{"n": 20, "raise": True}, {"n": 21}, {"n": 22}])
    assert [r["reason"] for r in actors.evaluate(None, [{"n": 23}, {"n": 24}])] == ["stand-in"] * 2


@pytest.mark.parametrize(
    ("spec", "message"),
    [("ray:0", "ray:N needs a CPU actor count N >= 1"), ("ray:x", "ray:N needs a CPU actor count N >= 1")],
)
def test_bad_ray_devices_are_refused_with_the_value(spec, message):
    with pytest.raises(ValueError, match=message):
        pool.parse_devices(spec, 0)
    assert pool.parse_devices("ray:3", 0) == ["ray:3"] and pool.parse_devices("ray", 2) == ["ray"]


def test_a_cluster_without_gpus_refuses_gpu_actors():
    from attnforge.evolve.ray_pool import RayPool

    if torch.cuda.is_available():
        pytest.skip("a GPU machine's local cluster has GPUs")
    running = ray.is_initialized()  # the module's pool may have a local cluster up: the new pool joins it
    with pytest.raises(RuntimeError, match=r"the Ray cluster has no GPU free \(0 in all\): use cpus=N"):
        RayPool(stand_in)
    assert ray.is_initialized() == running  # a cluster it started it stopped, one it joined it left running
    if running:  # the module's two actors hold its two CPUs: two more are refused, not waited for
        with pytest.raises(RuntimeError, match="the Ray cluster has 0 CPUs free for 2 CPU actors"):
            RayPool(stand_in, cpus=2)
