"""The evolutionary tuner: reproducible with a seed, elitism keeps the best, checkpoints resume, entries are
written only where a re-measured configuration beats the heuristic; one real (CPU, correctness-only) run
through the evaluator."""

import json

import pytest
import torch

from attnforge.bench.targets import Target
from attnforge.evolve import tuner
from attnforge.kernels import prefill_gluon

CPU = torch.device("cpu")
TARGET = Target("decode", 1, 32, 8, 1, 4096, 128)  # heuristic on 132 SMs: n128-s16-w4-st2


def peaked(target, params):
    """A smooth made-up fitness with its peak at BLOCK_N 64, 32 splits, 4 warps, 3 stages."""
    distance = (abs(params["BLOCK_N"].bit_length() - 7) + abs(params["num_splits"].bit_length() - 6)
                + abs(params["num_warps"] - 4) / 2 + abs(params["num_stages"] - 3))  # fmt: skip
    return {"score": round(2.0 - 0.1 * distance, 6), "reason": "made up", "timed": True}


def flat(target, params):
    return {"score": 1.0, "reason": "made up", "timed": True}


def test_the_genes_hold_the_heuristic_and_every_genome_fits():
    space = tuner.gene_space(TARGET, CPU)
    heuristic = tuner.heuristic_genome(TARGET, CPU)
    assert heuristic == {"BLOCK_M": 16, "BLOCK_N": 128, "num_splits": 16, "num_warps": 4, "num_stages": 2,
                         "combine": "last", "tma": False}  # fmt: skip
    assert space["tma"] == (False,)  # no Hopper GPU here
    assert all(heuristic[name] in values for name, values in space.items())
    population = tuner.initial_population(TARGET, CPU, tuner.Settings(population=8), space)
    assert population[0] == heuristic and len({tuner.key(g) for g in population}) == 8
    assert all(g[name] in values for g in population for name, values in space.items())
    assert all(tuner.fits(g, TARGET) for g in population)
    assert not tuner.fits({**heuristic, "num_stages": 4}, Target("decode", 1, 8, 8, 1, 4096, 256, "float32"))


def test_mqa_genomes_start_from_the_heuristics_second_kernel_merge():
    mqa = Target("decode", 1, 32, 1, 1, 16384, 128)
    space = tuner.gene_space(mqa, CPU)
    heuristic = tuner.heuristic_genome(mqa, CPU)
    assert (heuristic["BLOCK_M"], heuristic["num_splits"], heuristic["combine"]) == (16, 66, "kernel-pdl")
    assert set(space["combine"]) >= {"last", "kernel-pdl"}
    population = tuner.initial_population(mqa, CPU, tuner.Settings(population=8), space)
    assert population[0] == heuristic and all(set(g) == set(space) for g in population)


@pytest.mark.parametrize("major, head_dim, expected", [(9, 128, (False, True)), (9, 96, (False,)),
                                                       (10, 128, (False,))])  # fmt: skip
def test_the_warp_specialized_gene_only_where_the_calls_take_it(major, head_dim, expected, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, 0))
    monkeypatch.setattr(tuner.tuning, "sm_count", lambda device=None: 132)
    target = Target("prefill", 4, 32, 8, 2048, 2048, head_dim, padded=True)
    space = tuner.gene_space(target, torch.device("cuda"))
    assert space["ws"] == expected and space["tma"] == (False, True)
    assert tuner.gene_space(target, CPU)["ws"] == (False,)


def test_a_warp_specialized_genome_takes_the_measured_tiles(monkeypatch):
    """A "ws" genome from mutation or crossover gets the tiles the launch takes (prefill.WS_TILES): any other
    would run the heuristic's launch under its name."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(tuner.tuning, "sm_count", lambda device=None: 132)
    target = Target("prefill", 4, 32, 8, 2048, 2048, 128)
    space = tuner.gene_space(target, torch.device("cuda"))
    genome = {
        **tuner.heuristic_genome(target, torch.device("cuda")),
        "BLOCK_N": 64,
        "num_stages": 3,
        "ws": True,
    }
    repaired = tuner._repair(genome, target, space)
    assert repaired == {
        **genome,
        "BLOCK_M": 128,
        "BLOCK_N": 128,
        "num_stages": 2,
        "num_warps": 4,
        "tma": False,
    }
    assert all(repaired[name] in values for name, values in space.items())


def test_the_search_is_reproducible_and_elitism_keeps_the_best():
    settings = tuner.Settings(population=6, budget=30, seed=3)
    first = tuner.search(TARGET, peaked, settings, device=CPU)
    again = tuner.search(TARGET, peaked, settings, device=CPU)
    other = tuner.search(TARGET, peaked, tuner.Settings(population=6, budget=30, seed=4), device=CPU)
    assert first["history"] == again["history"] and first["scores"] == again["scores"]
    assert first["scores"] != other["scores"]  # another seed evaluates other genomes
    bests = [h["best"] for h in first["history"]]
    assert bests == sorted(bests) and bests[-1] > peaked(TARGET, tuner.heuristic_genome(TARGET, CPU))["score"]
    assert first["evaluations"] == 30 == len(first["scores"])


def test_a_checkpoint_resumes_without_repeating_work(tmp_path):
    path = tmp_path / "state.json"
    calls = []

    def counted(target, params):
        calls.append(params)
        return peaked(target, params)

    straight = tuner.search(TARGET, peaked, tuner.Settings(population=6, budget=24), device=CPU)
    tuner.search(TARGET, counted, tuner.Settings(population=6, budget=12), device=CPU, checkpoint=path)
    assert len(calls) == 12 and json.loads(path.read_text())["evaluations"] == 12
    resumed = tuner.search(
        TARGET, counted, tuner.Settings(population=6, budget=24), device=CPU, checkpoint=path
    )
    assert len(calls) == 24 and len({tuner.key(p) for p in calls}) == 24  # nothing evaluated twice
    assert (
        resumed["evaluations"] == 24
        and max(s["score"] for s in resumed["scores"].values())
        >= max(s["score"] for s in straight["scores"].values()) - 0.3
    )
    with pytest.raises(ValueError, match="is for .* not decode B=1 16:8"):
        tuner.search(
            Target("decode", 1, 16, 8, 1, 4096, 128), counted, tuner.Settings(), device=CPU, checkpoint=path
        )


def test_entries_change_the_heuristic_only_where_a_remeasured_winner_beats_it(tmp_path):
    other = Target("decode", 1, 16, 8, 1, 1024, 128)
    events = []
    settings = tuner.Settings(population=6, budget=18, seed=1)
    doc = tuner.run([TARGET], settings, fitness=peaked, out_dir=tmp_path, progress=events.append)
    doc["rows"] += tuner.run([other], settings, fitness=flat)["rows"]
    assert len(events) == 18 and (tmp_path / "checkpoints").is_dir()
    tuned, kept = doc["rows"]
    assert tuned["changes_heuristic"] and tuned["candidates"][tuned["best"]]["params"] == tuned["best_params"]
    assert tuned["remeasured"]["best"] > tuned["remeasured"]["heuristic"]
    assert not kept["changes_heuristic"] and kept["speedup"] == 1.0
    doc["environment"] = {"device": "cuda", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    table = tmp_path / "table.json"
    tuner.store(doc, table)
    written = json.loads(table.read_text())["h100"]["decode"]
    assert (
        written[TARGET.bucket]["params"] == tuned["best_params"] and written[other.bucket]["params"] is None
    )
    assert "tuned" in tuner.markdown(doc) and "heuristic" in tuner.markdown(doc)


def test_a_real_run_on_the_cpu_scores_correctness_and_stores_nothing(tmp_path):
    target = Target("decode", 1, 4, 2, 1, 65, 64, "float32")
    doc = tuner.run([target], tuner.Settings(population=2, budget=2, elite=1), out_dir=tmp_path)
    row = doc["rows"][0]
    assert row["evaluations"] == 2 and row["best_score"] == 1.0 and not row["timed"], row
    assert "speedup" not in row and tuner.store(doc) is None
    assert "correctness only (no CUDA GPU)" in (tmp_path / f"{doc['stem']}.md").read_text()


@pytest.mark.parametrize(
    "text, message",
    [
        ("1x32x8x1x4096", "is not BxHqxHkvxLqxLkvxD[@valid]"),
        ("1x32x8x1x4096x128@x", "is not BxHqxHkvxLqxLkvxD[@valid]"),
        ("1x32x0x1x4096x128", "with positive sizes"),
        ("1x32x8x1x4096x128@5000", "valid=(5000,) needs 1 lengths in [1, 4096]"),
        ("1x32x5x1x4096x128", "num_heads=32 is not divisible by num_kv_heads=5"),
    ],
)
def test_bad_shapes_are_refused_with_the_value(text, message):
    with pytest.raises(ValueError) as error:
        tuner.shape_target("decode", text)
    assert message in str(error.value)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"population": 1}, "population=1 must be >= 2"),
        ({"elite": 8}, "elite=8 in [0, population)"),
        ({"budget": 0}, "budget=0 >= 1"),
        ({"mutation": 1.5}, "mutation=1.5 must lie in [0, 1]"),
    ],
)
def test_bad_settings_are_refused_with_the_value(options, message):
    with pytest.raises(ValueError) as error:
        tuner.Settings(**options)
    assert message in str(error.value)


def test_a_finished_run_resumed_costs_nothing_and_a_cut_one_makes_no_entry(tmp_path):
    calls = []

    def counted(target, params):
        calls.append(params)
        return peaked(target, params)

    settings = tuner.Settings(population=4, budget=8, seed=2)
    first = tuner.run([TARGET], settings, fitness=counted, out_dir=tmp_path)
    spent = len(calls)
    assert spent == 8 + 2 and first["rows"][0]["complete"]  # the search, then best and heuristic re-measured
    again = tuner.run([TARGET], settings, fitness=counted, out_dir=tmp_path)
    assert len(calls) == spent and again["rows"][0]["speedup"] == first["rows"][0]["speedup"]
    cut = tuner.run([Target("decode", 1, 8, 8, 1, 2048, 128)], settings, fitness=counted, time_budget_s=0.0)
    assert cut["rows"] == [] and cut["not_run"] == ["decode B=1 8:8 Lq=1 Lkv=2048 d128 bfloat16"]


@pytest.mark.parametrize("major, head_dim, expected", [(9, 128, (False, True)), (9, 64, (False, True)),
                                                       (9, 96, (False,)), (10, 128, (False,))])  # fmt: skip
def test_the_gluon_genes_only_where_the_calls_take_them(major, head_dim, expected, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, 0))
    monkeypatch.setattr(tuner.tuning, "sm_count", lambda device=None: 132)
    target = Target("prefill", 4, 32, 8, 2048, 2048, head_dim, padded=True)
    space = tuner.gene_space(target, torch.device("cuda"))
    assert space["gluon"] == space["pingpong"] == space["persistent"] == expected
    assert tuner.gene_space(target, CPU)["gluon"] == (False,)


@pytest.mark.parametrize("stages, pingpong, persistent, expected", [
    (2, True, False, (2, True)), (4, True, False, (3, True)), (4, False, False, (3, False)),
    (3, True, True, (3, True)), (2, False, True, (3, True)), (4, True, True, (3, True))])  # fmt: skip
def test_a_gluon_genome_takes_the_launchs_tile_and_a_schedule_it_has(stages, pingpong, persistent, expected,
                                                                   monkeypatch):  # fmt: skip
    """A "gluon" genome gets the launch's one tile (128x128, 4 warps asked for), a schedule it has (the
    stages, and ping-pong where the persistent schedule asks for it), and neither "tma" nor "ws"; it fits
    (224 KiB at 3 stages ran). Ping-pong or persistent without Gluon is dropped."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(tuner.tuning, "sm_count", lambda device=None: 132)
    target = Target("prefill", 4, 32, 8, 2048, 2048, 128)
    space = tuner.gene_space(target, torch.device("cuda"))
    base = tuner.heuristic_genome(target, torch.device("cuda"))
    genome = {**base, "BLOCK_N": 64, "num_stages": stages, "tma": True, "ws": True, "gluon": True,
              "pingpong": pingpong, "persistent": persistent}  # fmt: skip
    repaired = tuner._repair(genome, target, space)
    assert (repaired["BLOCK_M"], repaired["BLOCK_N"], repaired["num_warps"]) == (128, 128, 4)
    assert (repaired["num_stages"], repaired["pingpong"]) == expected and repaired["persistent"] == persistent
    assert prefill_gluon.schedule(repaired) in prefill_gluon.SCHEDULES
    assert not repaired["tma"] and not repaired["ws"] and tuner.fits(repaired, target)
    plain = tuner._repair({**base, "pingpong": True, "persistent": True}, target, space)
    assert plain["pingpong"] is False and plain["persistent"] is False
