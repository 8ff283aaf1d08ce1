"""The evaluation pool (evolve/pool.py) on CPU workers: a search with 1 or 2 workers equals the in-process
one for the same seed and budget, whatever order evaluations finish in; a worker that dies is replaced and
its candidate retried once, a second death scores it 0 with the reason; each worker sees its own device
(with 2+ GPUs: only its own GPU); bad --devices values are refused with the value named."""

import functools
import json
import os
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from attnforge.bench.targets import Target
from attnforge.evolve import pool, tuner
from attnforge.evolve.cli import evolve_app

CPU = torch.device("cpu")
TARGET = Target("decode", 1, 32, 8, 1, 4096, 128)


def stand_in(target, genome, *, marker_dir=None):
    """A cheap fitness that sleeps a little (longer for fewer splits, so completion order differs from
    dispatch order), says where it ran, and dies (os._exit(3)) on request: once per marker, or always."""
    if genome.get("die") == "always":
        os._exit(3)
    if genome.get("die") == "once":
        marker = Path(marker_dir) / f"died-{genome['n']}"
        if not marker.exists():
            marker.write_text(str(os.getpid()))
            os._exit(3)
    if genome.get("raise"):
        raise KeyError("a bug in the fitness")
    splits = genome.get("num_splits", 1)
    time.sleep(0.01 * max(0, 9 - splits.bit_length()))
    score = 2.0 - 0.1 * abs(splits.bit_length() - 6) - 0.05 * abs(genome.get("num_stages", 3) - 3)
    return {"score": round(score, 6), "reason": "stand-in", "timed": True,
            "device": os.environ.get(pool.DEVICE_ENV), "pid": os.getpid()}  # fmt: skip


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    fitness = functools.partial(stand_in, marker_dir=str(tmp_path_factory.mktemp("markers")))
    with pool.LocalPool(fitness, ["cpu:0", "cpu:1"]) as workers:
        yield workers


def _outcome(state):
    """What a search decided, without where each evaluation ran."""
    scores = [(k, v["score"]) for k, v in state["scores"].items()]
    return scores, state["history"], state["population"], state["evaluations"]


def test_one_or_two_workers_give_the_in_process_search(two_workers):
    settings = tuner.Settings(population=6, budget=15, seed=3)
    alone = tuner.search(TARGET, stand_in, settings, device=CPU)
    with pool.LocalPool(stand_in, ["cpu:0"]) as one:
        single = tuner.search(TARGET, stand_in, settings, device=CPU, dispatcher=one)
    events = []
    double = tuner.search(
        TARGET, stand_in, settings, device=CPU, dispatcher=two_workers, progress=events.append
    )
    assert _outcome(alone) == _outcome(single) == _outcome(double)
    assert alone["evaluations"] == 15 and len(events) == 15
    assert {s["device"] for s in double["scores"].values()} == {"cpu:0", "cpu:1"}
    assert sorted(e["evaluations"] for e in events) == list(range(1, 16))


def test_results_come_back_in_the_callers_order_not_the_completion_order(two_workers):
    genomes = [{"n": 30, "num_splits": 1}, {"n": 31, "num_splits": 128}, {"n": 32, "num_splits": 64}]
    finished = []
    results = two_workers.evaluate(None, genomes, lambda index, result: finished.append(index))
    assert finished[-1] == 0  # the slow first candidate (80 ms) finished after the two quick ones
    assert [r["score"] for r in results] == [stand_in(None, g)["score"] for g in genomes]


def test_each_worker_sees_its_own_device(two_workers):
    results = two_workers.evaluate(None, [{"n": i, "num_splits": 1} for i in range(6)])
    devices_by_pid = {}
    for result in results:
        devices_by_pid.setdefault(result["pid"], set()).add(result["device"])
    assert all(len(devices) == 1 for devices in devices_by_pid.values())
    assert {d for devices in devices_by_pid.values() for d in devices} == {"cpu:0", "cpu:1"}
    assert os.getpid() not in devices_by_pid


def test_a_cuda_worker_is_pinned_through_cuda_visible_devices(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert pool._pinned_environment("cuda:1") == {pool.DEVICE_ENV: "cuda:1", "CUDA_VISIBLE_DEVICES": "1"}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")  # index 1 among the GPUs this process sees
    assert pool._pinned_environment("cuda:1")["CUDA_VISIBLE_DEVICES"] == "3"
    assert pool._pinned_environment("cpu:1") == {pool.DEVICE_ENV: "cpu:1"}


def test_a_dead_worker_is_replaced_and_its_candidate_retried_once(two_workers, tmp_path):
    replaced = two_workers.replaced
    genomes = [{"n": 0}, {"n": 1, "die": "once"}, {"n": 2}]
    results = two_workers.evaluate(None, genomes)
    assert [r["reason"] for r in results] == ["stand-in"] * 3
    assert two_workers.replaced == replaced + 1
    marker = Path(_marker_dir(two_workers)) / "died-1"
    assert int(marker.read_text()) != results[1]["pid"]  # the retry ran in another process


def test_a_second_death_scores_the_candidate_failed_with_the_reason(two_workers):
    replaced = two_workers.replaced
    results = two_workers.evaluate(None, [{"n": 10}, {"n": 11, "die": "always"}, {"n": 12}])
    assert results[1]["score"] == 0.0 and not results[1]["timed"]
    assert "died 2 times" in results[1]["reason"] and "exited with status 3" in results[1]["reason"]
    assert [r["score"] > 0 for r in (results[0], results[2])] == [True, True]
    assert two_workers.replaced == replaced + 2
    assert two_workers.evaluate(None, [{"n": 13}])[0]["reason"] == "stand-in"  # the pool goes on


def test_a_fitness_that_raises_raises_here_with_its_traceback(two_workers):
    with pytest.raises(RuntimeError, match="KeyError: 'a bug in the fitness'"):
        two_workers.evaluate(None, [{"n": 20, "raise": True}, {"n": 21, "num_splits": 1}, {"n": 22}])
    again = two_workers.evaluate(None, [{"n": 23}, {"n": 24}, {"n": 25}])  # nothing stale left in a pipe
    assert [r["reason"] for r in again] == ["stand-in"] * 3


def _marker_dir(workers):
    return pool.pickle.loads(workers.fitness_bytes).keywords["marker_dir"]


@pytest.mark.parametrize(
    ("spec", "gpus", "message"),
    [
        ("cpu:0", 0, "cpu:N needs a worker count N >= 1"),
        ("cpu:two", 0, "'two' is not a comma-separated list of integers"),
        ("cpu:2", 2, "CPU workers are for machines without a GPU"),
        ("cuda", 0, "no CUDA GPU"),
        ("cuda:0,2", 2, "GPU indices must be distinct and in 0..1"),
        ("cuda:1,1", 2, "GPU indices must be distinct"),
        ("gpu:2", 2, "'gpu:2' is not one of auto, cuda"),
    ],
)
def test_bad_devices_are_refused_with_the_value(spec, gpus, message):
    with pytest.raises(ValueError, match=message) as error:
        pool.parse_devices(spec, gpus)
    assert repr(spec) in str(error.value)


def test_good_devices():
    assert pool.parse_devices("auto", 0) == pool.parse_devices("auto", 1) == []
    assert pool.parse_devices("auto", 2) == pool.parse_devices("cuda", 2) == ["cuda:0", "cuda:1"]
    assert pool.parse_devices("cuda:3,1", 4) == ["cuda:3", "cuda:1"]
    assert pool.parse_devices("cpu:2", 0) == ["cpu:0", "cpu:1"]


def test_the_cli_refuses_bad_devices_naming_them():
    if torch.cuda.is_available():
        pytest.skip("the message differs with GPUs")
    result = CliRunner().invoke(evolve_app, ["tune", "--shapes", "1x8x8x1x64x64", "--devices", "cpu:0"])
    assert result.exit_code == 2 and "cpu:0" in result.output and "N >= 1" in result.output


def test_the_cli_runs_the_real_evaluator_on_two_cpu_workers(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CPU workers are refused on a GPU machine")
    options = ["--shapes", "1x4x2x1x65x64", "--dtype", "float32", "--budget", "2", "--population", "2",
               "--elite", "1", "--devices", "cpu:2", "--out", str(tmp_path)]  # fmt: skip
    result = CliRunner().invoke(evolve_app, ["tune", *options])
    assert result.exit_code == 0, result.output
    assert "2 pinned worker processes: cpu:0, cpu:1" in result.output
    (written,) = tmp_path.glob("evolve-tuning-*.json")
    doc = json.loads(written.read_text())
    assert doc["evaluation_workers"] == {"devices": ["cpu:0", "cpu:1"], "replaced": 0}
    assert doc["evaluations_per_minute"] > 0 and "per minute of search on cpu:0, cpu:1" in doc_md(written)
    row = doc["rows"][0]
    assert row["evaluations"] == 2 and row["best_score"] == 1.0 and not row["timed"], row


def doc_md(written: Path) -> str:
    return written.with_suffix(".md").read_text()


def gpu_identity(target, genome):
    """Which GPU a worker sees: how many, and the first one's UUID."""
    return {"device": os.environ.get(pool.DEVICE_ENV), "count": torch.cuda.device_count(),
            "uuid": str(torch.cuda.get_device_properties(0).uuid)}  # fmt: skip


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_each_gpu_worker_sees_only_its_own_gpu():
    devices = pool.parse_devices("cuda", torch.cuda.device_count())
    with pool.LocalPool(gpu_identity, devices) as workers:
        results = workers.evaluate(None, [{"n": i} for i in range(4 * len(devices))])
    assert all(r["count"] == 1 for r in results)
    uuids = {}
    for result in results:
        uuids.setdefault(result["device"], set()).add(result["uuid"])
    assert sorted(uuids) == sorted(devices) and all(len(seen) == 1 for seen in uuids.values())
    assert len(set.union(*uuids.values())) == len(devices)  # a different GPU for every worker
