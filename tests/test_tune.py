"""`attnforge tune` and the tuning store: targets, candidates, correctness before timing, entries, lookup by
GPU then by architecture. On the CPU nothing is timed; the kernels run under the Triton interpreter."""

import json

import pytest
import torch
from typer.testing import CliRunner

from attnforge import cli as cli_module
from attnforge.bench import targets, tune
from attnforge.cli import app
from attnforge.kernels import decode_params, tuning

CPU = torch.device("cpu")
# Where the kernels run: the GPU when there is one (the interpreter takes CPU tensors only without one).
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def torch_paths_correct(row: dict) -> bool:
    """Every torch path of a tuned row checked correct; on a GPU a path may not apply to the dtype ("n/a":
    flash kernels take no float32), never "incorrect"."""
    statuses = {c["status"] for c in row["torch"].values()}
    if DEVICE.type == "cpu":
        return statuses == {"correct"}
    return "correct" in statuses and statuses <= {"correct", "n/a"}


@pytest.fixture
def store(monkeypatch, tmp_path):
    """An empty user table in a temporary cache directory; the packaged table stays as it is."""
    monkeypatch.setenv("ATTNFORGE_CACHE_DIR", str(tmp_path))
    tuning.reload()
    yield tmp_path / "tuning.json"
    monkeypatch.delenv("ATTNFORGE_CACHE_DIR")
    tuning.reload()


def test_model_targets_are_the_buckets_its_generation_hits():
    found = targets.model_targets("qwen3-0.6b", contexts=(1024, 4096), prompts=(128,))
    assert [t.bucket for t in found] == [
        "d128-m2-b1-kv1k", "d128-m2-b1-kv1k-lens", "d128-m2-b1-kv4k", "d128-m2-b1-kv4k-lens",
        "d128-rows2k-kv128",
    ]  # fmt: skip
    assert found[1].valid == (512,) and found[0].valid is None
    assert [t.kind for t in targets.model_targets("llama3-8b", kinds=("prefill",))] == ["prefill"] * 3


def test_a_batchs_static_cache_target_is_ragged_as_the_accelerators_batches():
    """At batch 8 the sequences hold 1/8 to all of the half-full buffer (prompts spread as `bench accel
    --batch` spreads them); its candidates also split short sequences (`alone_tiles=0`), the plain
    cache's do not."""
    plain, static = targets.model_targets("qwen3-0.6b", batch=8, contexts=(1024,), kinds=("decode",))
    assert static.valid == (64, 128, 192, 256, 320, 384, 448, 512) and static.bucket == "d128-m2-b8-kv1k-lens"
    alone = [tune.params_name(c) for c in tune.candidates_for(static, CPU, quick=True) if "alone_tiles" in c]
    assert alone and all(name.endswith("-alone0") for name in alone)
    assert not any("alone_tiles" in c for c in tune.candidates_for(plain, CPU, quick=False))


def test_the_decode_grid_covers_the_issue():
    grid = targets.decode_grid()
    labels = {t.label for t in grid}
    assert "decode B=1 32:8 Lq=1 Lkv=65536 d128 bfloat16" in labels
    assert "decode B=1 32:8 Lq=1 Lkv=32768 d128 bfloat16 valid=4096" in labels
    assert {t.head_dim for t in grid} == {64, 80, 128, 256} and {t.q_len for t in grid} == {1, 2, 4, 8, 16}
    assert {t.batch for t in grid} == {1, 8, 32}


@pytest.mark.parametrize("units, tiles, expected", [(8, 8, 8), (8, 128, 16), (256, 32, 1), (32, 64, 4)])
def test_heuristic_splits_fill_waves_without_exceeding_the_tiles(units, tiles, expected):
    assert decode_params.heuristic_splits(units, tiles, 132) == expected


def test_candidates_start_with_the_heuristic_and_are_unique():
    target = targets.Target("decode", 1, 32, 8, 1, 4096, 128)
    quick, full = (tune.candidates_for(target, CPU, q) for q in (True, False))
    for candidates in (quick, full):
        names = [tune.params_name(c) for c in candidates]
        assert names[0] == "m16-n128-s16-w4-st2" and len(set(names)) == len(names)
    assert len(quick) < len(full)
    assert {c.get("combine", "last") for c in quick} == {"last", "kernel", "kernel-pdl"}
    # 5-6 stages of the half tile, where 220 KB of shared memory holds them (64 keys x d128 x bf16 x K and V)
    assert {c["num_stages"] for c in quick if c["BLOCK_N"] == 64 and c["num_stages"] > 4} == {5, 6}


def test_prefill_candidates_on_hopper_each_also_read_k_and_v_through_tma(monkeypatch):
    """A full sweep pairs every launch with its TMA twin on sm_90 (a quick one, the first three launches');
    without Hopper none reads through TMA."""
    monkeypatch.setattr(tuning, "sm_count", lambda device=None: 132)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    target = targets.Target("prefill", 1, 32, 8, 2048, 2048, 128)
    full = [tune.params_name(c) for c in tune.candidates_for(target, torch.device("cuda"), quick=False)]
    ws = [n for n in full if n.endswith("-ws")]
    assert ws == ["m128-n128-w4-st2-ws"]  # prefill.WS_TILES
    gluon = [n for n in full if "-gluon" in n]  # prefill_gluon.SCHEDULES
    assert gluon == ["m128-n128-w4-st2-gluon", "m128-n128-w4-st3-gluon", "m128-n128-w4-st2-gluon-pp",
                     "m128-n128-w4-st3-gluon-pp", "m128-n128-w4-st3-gluon-pp-ps"]  # fmt: skip
    full = [n for n in full if n not in ws + gluon]
    plain = [n for n in full if not n.endswith("-tma")]
    assert len(set(full)) == len(full) and sorted(full) == sorted(plain + [n + "-tma" for n in plain])
    assert "m128-n128-w8-st3" in plain
    quick = [tune.params_name(c) for c in tune.candidates_for(target, torch.device("cuda"), quick=True)]
    # the heuristic's launch is also the grid's first: two distinct twins
    assert [n for n in quick if n.endswith("-tma")] == ["m128-n64-w8-st3-tma", "m128-n128-w8-st2-tma"]
    assert not any(c.get("tma") or c.get("ws") or c.get("gluon") for c in tune.candidates_for(target, CPU))


@pytest.mark.parametrize(
    "target, tma",
    [
        (targets.Target("decode", 1, 32, 8, 1, 16384, 128), True),
        (targets.Target("decode", 1, 32, 32, 1, 4096, 64), True),
        (targets.Target("decode", 1, 32, 8, 1, 4096, 80), False),  # a head_dim TMA does not take here
        (targets.Target("decode", 1, 32, 8, 1, 4096, 128, "float32"), False),
    ],
)
def test_decode_candidates_on_hopper_also_read_k_and_v_through_tma(target, tma, monkeypatch):
    """On sm_90, where the calls can take it, every decode launch of a full sweep has its TMA twin (a quick
    sweep, the first three launches'); elsewhere, and on CPU, none."""
    monkeypatch.setattr(tuning, "sm_count", lambda device=None: 132)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    full = [tune.params_name(c) for c in tune.candidates_for(target, torch.device("cuda"), quick=False)]
    plain = [n for n in full if not n.endswith("-tma")]
    assert len(set(full)) == len(full)
    assert sorted(full) == sorted(plain + [n + "-tma" for n in plain] if tma else plain)
    quick = [tune.params_name(c) for c in tune.candidates_for(target, torch.device("cuda"), quick=True)]
    assert [n for n in quick if n.endswith("-tma")] == ([n + "-tma" for n in quick[:3]] if tma else [])
    assert not any(c.get("tma") for c in tune.candidates_for(target, CPU))


@pytest.mark.parametrize(
    "target, twins",
    [
        (targets.Target("decode", 1, 40, 8, 1, 4096, 128), True),  # 5 rows of 8: two parts
        (targets.Target("decode", 1, 64, 8, 1, 16384, 128), True),  # 8 rows: 8 splits a step, not 16
        (targets.Target("decode", 1, 32, 8, 1, 4096, 128), False),  # 4 rows: the same merge either way
        (targets.Target("decode", 1, 16, 8, 1, 16384, 128), False),
    ],
)
def test_decode_candidates_merging_otherwise_with_merge_parts_have_their_twin(target, twins):
    """A full sweep times "merge_parts" (`-mp`) beside each launch whose last-program merge it changes, and
    only those; a quick sweep none."""
    candidates = tune.candidates_for(target, CPU, quick=False)
    names = [tune.params_name(c) for c in candidates]
    merged = [n[: -len("-mp")] for n in names if n.endswith("-mp")]
    assert len(set(names)) == len(names) and bool(merged) == twins and set(merged) <= set(names)
    parts = [c for c in candidates if c.get("merge_parts")]
    assert all(c["num_splits"] > 1 and c.get("combine", "last") == "last" for c in parts)
    assert not any(c.get("merge_parts") for c in tune.candidates_for(target, CPU, quick=True))


@pytest.mark.parametrize(
    "target, device_major, expected",
    [
        (targets.Target("prefill", 1, 32, 32, 1024, 1024, 64), 9, 1),
        (targets.Target("prefill", 8, 32, 8, 2048, 2048, 128, padded=True), 9, 1),  # kv_lens and q_lens
        (targets.Target("prefill", 1, 32, 8, 512, 4608, 128, "float32"), 9, 0),
        (targets.Target("prefill", 1, 32, 8, 2048, 2048, 96), 9, 0),  # head_dim not a power of two
        (targets.Target("prefill", 1, 32, 8, 2048, 2048, 128), 10, 0),  # Triton partitions it on sm_90 only
    ],
)
def test_warp_specialized_candidates_only_where_the_calls_take_them(target, device_major, expected,
                                                                     monkeypatch):  # fmt: skip
    monkeypatch.setattr(tuning, "sm_count", lambda device=None: 132)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (device_major, 0))
    full = tune.candidates_for(target, torch.device("cuda"), quick=False)
    assert sum(bool(c.get("ws")) for c in full) == expected
    assert not any(c.get("ws") for c in tune.candidates_for(target, torch.device("cuda"), quick=True))


@pytest.mark.parametrize("kv_len, splits", [(4096, 32), (16384, 66)])
def test_mqa_splits_fill_the_gpu_and_a_second_kernel_merges_them(kv_len, splits):
    # 32 query rows of one KV head: 8 splits (what the last program may merge) left 124 SMs idle (0.34x SDPA);
    # two blocks of 16 rows, each with the splits that fill the GPU, merged by a second kernel
    p = decode_params.heuristic_params(1, kv_len, 1, 32, 128, 2, 132)
    assert (p["BLOCK_M"], p["num_splits"], p["combine"]) == (16, splits, "kernel-pdl")
    assert "combine" not in decode_params.heuristic_params(1, kv_len, 8, 4, 128, 2, 132)  # GQA 32:8: last


def test_mqa_candidates_merge_many_splits_in_a_second_kernel():
    target = targets.Target("decode", 1, 32, 1, 1, 16384, 128)
    candidates = tune.candidates_for(target, CPU, quick=False)
    names = [tune.params_name(c) for c in candidates]
    assert len(set(names)) == len(names) and names[0] == "m16-n128-s66-w4-st2-kernel-pdl"
    long = [c for c in candidates if c["num_splits"] * min(c["BLOCK_M"], 32) > decode_params.MERGE_ROWS]
    assert {c.get("combine") for c in long} >= {None, "kernel-pdl"}  # both, timed against each other
    assert "m32-n128-s64-w4-st2-kernel-pdl" in names and "m32-n128-s64-w4-st2" in names


def test_tune_target_checks_every_candidate_against_the_oracle():
    target = targets.Target("decode", 2, 8, 2, 1, 300, 64, "float32", valid=(100, 300))
    broken = {"BLOCK_N": 48, "num_splits": 2, "num_warps": 4, "num_stages": 2}  # tiles must be powers of 2
    candidates = tune.candidates_for(target, DEVICE, quick=True)[:3] + [broken]
    row = tune.tune_target(target, candidates, DEVICE)
    statuses = [c["status"] for c in row["candidates"].values()]
    assert statuses == ["correct"] * 3 + ["error"]
    assert torch_paths_correct(row)  # run on zeroed padding
    assert ("speedup" in row) == (DEVICE.type == "cuda")  # nothing is timed without a GPU


def test_a_padded_batch_of_prompts_is_tuned_with_its_lengths_and_torchs_paths_for_it():
    """Padded prompts (q_lens = kv_lens, drawn as the bench draws them; poisoned padding): the kernel and
    torch's paths checked on them, the padded rows torch leaves undefined zeroed for its check."""
    grid = [t for t in targets.prefill_grid() if t.padded]
    assert {t.bucket for t in grid} == {"d128-rows512k-kv2k-lens", "d128-rows512k-kv1k-lens"}
    target = targets.Target("prefill", 3, 4, 2, 40, 40, 64, "float32", padded=True)
    case = targets.make_case(target, CPU, 0)
    assert case.q_lens.tolist() == case.kv_lens.tolist() and case.q_lens[0] == 40 and min(case.q_lens) < 40
    assert target.bucket.endswith("-lens") and target.label.endswith("padded")
    assert torch.isnan(case.k[1, :, case.kv_lens[1] :]).any()  # poisoned beyond the valid keys
    row = tune.tune_target(target, tune.candidates_for(target, DEVICE, quick=True)[:1], DEVICE)
    assert [c["status"] for c in row["candidates"].values()] == ["correct"]
    assert torch_paths_correct(row)
    assert "flash-per-sequence" in row["torch"]
    zeros = targets.zero_case(target, CPU)
    assert zeros.q_lens.tolist() == zeros.kv_lens.tolist() == [40] * 3


def test_the_graph_timing_covers_the_winner_its_merges_and_the_runners_up(monkeypatch):
    """`_time_in_graph` (GPU-only) with the graph timing faked on the CPU: each launch's median lands where
    `graph_choice` reads it, and a runner-up that cannot be captured is reported, not fatal."""
    target = targets.Target("decode", 1, 8, 2, 1, 300, 64, "bfloat16")
    case = targets.make_case(target, CPU, 0)
    candidates = tune.candidates_for(target, CPU, quick=True)
    names = [tune.params_name(p) for p in candidates]
    cells = {
        name: {"params": p, "median_us": 10.0 + i}
        for i, (name, p) in enumerate(zip(names, candidates, strict=True))
    }
    row = {"best": names[0], "best_torch": "sdpa", "torch": {"sdpa": {"median_us": 9.0}}, "candidates": cells}
    per_call = {names[0]: 10.0, names[1]: 8.0}  # the first runner-up is faster in the graph

    def fake_call(target, case, params, out):
        return tune.params_name(params) + ("/" + params["combine"] if "combine" in params else "")

    rounds = []

    def fake_graphs(makers, layers, reps):  # one interleaved timing of every launch and torch's
        rounds.append(len(makers))
        labels = {key: make(0) for key, make in makers.items()}
        return {key: "RuntimeError: capture failed" if label == names[2]
                else [per_call.get(label, 11.0 if "/" in str(label) else 12.0)] * reps
                for key, label in labels.items()}  # fmt: skip

    monkeypatch.setattr(tune, "kernel_call", fake_call)
    monkeypatch.setattr(tune, "torch_calls", lambda case: {"sdpa": "sdpa"})
    monkeypatch.setattr(tune.timing, "time_graphs_per_call", fake_graphs)
    tune._time_in_graph(row, target, case, layers=2)
    # the winner, torch, the winner's 3 merges, 3 runners-up and a half-SM launch, in one timing
    assert rounds == [2 + len(decode_params.COMBINE_MODES) + tune.GRAPH_RUNNERS_UP + 1]
    assert (
        row["candidates"][names[0]]["graph_median_us"] == 10.0
        and row["torch"]["sdpa"]["graph_median_us"] == 12.0
    )
    assert row["graph_runners_up_us"][names[1]] == 8.0
    assert row["graph_runners_up_us"][names[2]].startswith("RuntimeError: capture failed")
    # the three next plain candidates, then the fastest other whose tiles fit twice on an SM
    extra = [name for name in row["graph_runners_up_us"] if names.index(name) > tune.GRAPH_RUNNERS_UP]
    half = [n for n in names[4:] if tune.pipeline_bytes(cells[n]["params"], target) <= tune.HALF_SM_BYTES]
    assert len(row["graph_runners_up_us"]) == tune.GRAPH_RUNNERS_UP + 1 and extra == half[:1] != []
    assert set(row["graph_combine_us"]) == set(decode_params.COMBINE_MODES)  # the winner splits its keys
    assert tune.graph_choice(row) == {"graph_params": candidates[1], "graph_speedup": 1.5}
    tune._time_in_graph(row, target, case, layers=2, runners_up=5)  # `tune --graph-candidates 5`
    first = [name for name in row["graph_runners_up_us"] if names.index(name) <= 5]
    assert first == names[1:6] and len(row["graph_runners_up_us"]) <= 6 + 1


def test_tune_passes_graph_candidates_to_the_run(monkeypatch):
    seen = {}

    def fake_run(targets, **options):
        seen.update(options, labels=[t.label for t in targets])
        return {"rows": [], "not_run": [], "created": "2026-12-07T00:00:00+00:00"}

    monkeypatch.setattr(tune, "run", fake_run)
    monkeypatch.setattr(tune, "store", lambda doc, source, table: "the table")  # on a GPU: nothing written
    monkeypatch.setattr(cli_module, "_tune_table", lambda doc: "")
    only = "32:1 ,B=1 16:8 Lq=1 Lkv=1024 "  # any of the parts
    args = ["--preset", "decode-grid", "--only", only, "--graph-layers", "4", "--graph-candidates", "9"]
    result = CliRunner().invoke(app, ["tune", *args])
    assert result.exit_code == 0, result.output
    assert seen["graph_layers"] == 4 and seen["graph_runners_up"] == 9
    assert [label.split()[2] for label in seen["labels"]] == ["16:8", "32:1", "32:1", "32:1"]


def _doc(rows):
    env = {"device": "cuda", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    return {"what": "tuning", "environment": env, "rows": rows}


def _row(bucket, speedup, params, kind="decode"):
    return {"target": {"kind": kind}, "bucket": bucket, "speedup": speedup, "best": "b",
            "candidates": {"b": {"params": params}}}  # fmt: skip


def test_entries_keep_the_most_conservative_speedup_of_a_bucket():
    doc = _doc([_row("d128-m4-b1-kv4k", 1.3, {"x": 1}), _row("d128-m4-b1-kv4k", 1.1, {"x": 2}),
                {"target": {"kind": "decode"}, "bucket": "untimed"}])  # fmt: skip
    assert tune.entries(doc, "src") == {
        "decode": {"d128-m4-b1-kv4k": {"params": {"x": 2}, "speedup": 1.1, "source": "src"}}
    }


def test_a_disturbed_row_gives_no_entry():
    steady = {"median_us": 10.0, "ci95_us": [9.8, 10.3]}
    scattered = {"median_us": 50.0, "ci95_us": [39.0, 71.0]}
    row = _row("d128-m2-b1-kv1k", 1.3, {"x": 1}) | {"best_torch": "sdpa", "torch": {"sdpa": dict(steady)}}
    row["candidates"]["b"].update(steady)
    assert tune.disturbed(row) is None and tune.entries(_doc([row]), "src")["decode"]
    row["torch"]["sdpa"] = scattered
    assert tune.disturbed(row) == "torch median 50.0 us with a 95% interval of 39.0-71.0 us"
    assert tune.entries(_doc([row]), "src") == {}


def _graph_row(combine_us: dict, torch_us: float = 12.0) -> dict:
    row = _row("d128-m8-b1-kv4k", 1.12, {"BLOCK_N": 128, "num_splits": 16, "combine": "kernel-pdl"})
    row |= {"best_torch": "sdpa", "torch": {"sdpa": {"graph_median_us": torch_us}},
            "graph_combine_us": combine_us}  # fmt: skip
    row["candidates"]["b"]["graph_median_us"] = combine_us.get("kernel-pdl", 13.0)
    return row


@pytest.mark.parametrize(
    "combine_us, expected",
    [
        (
            {"last": 11.0, "kernel": 14.0, "kernel-pdl": 13.0},
            {"graph_combine": "last", "graph_speedup": 1.091},
        ),
        ({"last": 12.9, "kernel": 14.0, "kernel-pdl": 13.0}, {"graph_speedup": 0.923}),  # within the margin
        ({"last": "RuntimeError: capture failed", "kernel-pdl": 12.0}, {"graph_speedup": 1.0}),
        ({}, {"graph_speedup": 0.923}),  # one split: the winner alone was timed in the graph
    ],
)
def test_captured_calls_merge_the_way_that_was_fastest_in_a_cuda_graph(combine_us, expected):
    assert tune.graph_choice(_graph_row(combine_us)) == expected
    entry = tune.entries(_doc([_graph_row(combine_us)]), "src")["decode"]["d128-m8-b1-kv4k"]
    assert {k: v for k, v in entry.items() if k.startswith("graph")} == expected


@pytest.mark.parametrize(
    "combine_us, expected",
    [
        ({"last": 11.0, "kernel": 14.0, "kernel-pdl": 13.0}, ("11.0 / 12.0", "1.09x (last)")),
        ({"last": 12.9, "kernel": 14.0, "kernel-pdl": 13.0}, ("13.0 / 12.0", "0.92x")),
    ],
)
def test_the_tables_show_the_graph_time_captured_calls_get(combine_us, expected):
    """The Markdown's graph columns are the merge captured calls use (the entry's), not the plain winner's."""
    row = _graph_row(combine_us)
    assert tune.graph_columns(row) == expected
    assert tune.graph_columns(_row("d128-m4-b1-kv4k", 1.3, {"x": 1})) == ("-", "-")


RUNNER = {"BLOCK_M": 16, "BLOCK_N": 64, "num_splits": 16, "num_warps": 4, "num_stages": 4}


@pytest.mark.parametrize(
    "runners_us, expected, columns",
    [
        (
            {"r": 10.0},
            {"graph_params": RUNNER, "graph_speedup": 1.2},
            ("10.0 / 12.0", "1.20x (m16-n64-s16-w4-st4)"),
        ),
        ({"r": 11.5}, {"graph_combine": "last", "graph_speedup": 1.091}, ("11.0 / 12.0", "1.09x (last)")),
        ({"r": "RuntimeError: capture failed"}, {"graph_combine": "last", "graph_speedup": 1.091}, None),
    ],
)
def test_captured_calls_take_a_runner_up_launch_fastest_in_a_cuda_graph(runners_us, expected, columns):
    """The plain runners-up timed in the graph compete with the winner's merges: the fastest of all wins
    (by GRAPH_MARGIN over the winner as it is); a runner-up that failed to capture is not a choice."""
    row = _graph_row({"last": 11.0, "kernel": 14.0, "kernel-pdl": 13.0})
    row["candidates"]["r"] = {"params": RUNNER}
    row["graph_runners_up_us"] = runners_us
    assert tune.graph_choice(row) == expected
    if columns:
        assert tune.graph_columns(row) == columns
    entry = tune.entries(_doc([row]), "src")["decode"]["d128-m8-b1-kv4k"]
    assert {k: v for k, v in entry.items() if k.startswith("graph")} == expected


def test_launch_params_of_captured_calls_take_the_graph_launch(store, monkeypatch):
    monkeypatch.setattr(tuning, "_device_keys", lambda device: ("h100", "sm90"))
    params = {"BLOCK_N": 128, "num_splits": 16}
    entry = {"params": params, "speedup": 1.1, "graph_params": RUNNER, "graph_speedup": 1.2}
    tuning.write_entries("h100", "sm90", "decode", {"d128-m8-b1-kv4k": entry})
    assert tuning.launch_params("decode", "cuda", "d128-m8-b1-kv4k") == params
    assert tuning.launch_params("decode", "cuda", "d128-m8-b1-kv4k", captured=True) == RUNNER
    assert tuning.lookup("decode", "cuda", "d128-m8-b1-kv4k").graph_params == RUNNER


def test_a_row_without_graph_timing_has_no_graph_fields():
    assert tune.graph_choice(_row("d128-m4-b1-kv4k", 1.3, {"x": 1})) == {}


def test_launch_params_of_captured_calls_take_the_graph_merge(store, monkeypatch):
    monkeypatch.setattr(tuning, "_device_keys", lambda device: ("h100", "sm90"))
    params = {"BLOCK_N": 128, "num_splits": 16, "combine": "kernel-pdl"}
    entry = {"params": params, "speedup": 1.12, "graph_combine": "last", "graph_speedup": 1.09}
    tuning.write_entries("h100", "sm90", "decode", {"d128-m8-b1-kv4k": entry})
    assert tuning.launch_params("decode", "cuda", "d128-m8-b1-kv4k") == params
    captured = tuning.launch_params("decode", "cuda", "d128-m8-b1-kv4k", captured=True)
    assert captured == {**params, "combine": "last"}
    found = tuning.lookup("decode", "cuda", "d128-m8-b1-kv4k")
    assert (found.graph_combine, found.graph_speedup) == ("last", 1.09)


def test_store_and_lookup_by_gpu_then_by_architecture(store, monkeypatch):
    tune.store(_doc([_row("d128-m4-b1-kv4k", 1.25, {"BLOCK_N": 64})]), "sweep.json")
    table = json.loads(store.read_text())
    assert table["h100"]["arch"] == "sm90" and table["h100"]["decode"]["d128-m4-b1-kv4k"]["speedup"] == 1.25
    monkeypatch.setattr(tuning, "_device_keys", lambda device: ("gh200", "sm90"))  # no entries of its own
    entry = tuning.lookup("decode", "cuda", "d128-m4-b1-kv4k")
    assert entry.speedup == 1.25 and entry.origin == "architecture sm90 (measured on h100)" and entry.user
    assert tuning.lookup("decode", "cuda", "d128-m4-b1-kv4k", architecture=False) is None
    monkeypatch.setattr(tuning, "_device_keys", lambda device: ("h100", "sm90"))
    assert tuning.lookup("decode", "cuda", "d128-m4-b1-kv4k").origin == "this GPU"
    assert tuning.launch_params("decode", "cuda", "d128-m4-b1-kv4k") == {"BLOCK_N": 64}


def test_the_users_entries_win_over_the_packaged_ones(store, monkeypatch):
    packaged = tuning.load_table()
    gpu, section = next((g, s) for g, s in packaged.items() if s.get("decode"))
    bucket = next(iter(section["decode"]))
    monkeypatch.setattr(tuning, "_device_keys", lambda device: (gpu, section["arch"]))
    assert not tuning.lookup("decode", "cuda", bucket).user
    tuning.write_entries(gpu, section["arch"], "decode", {bucket: {"params": None, "speedup": 9.0}})
    assert tuning.lookup("decode", "cuda", bucket).speedup == 9.0


def test_tune_from_results_stores_a_saved_run(store, tmp_path):
    saved = tmp_path / "tuning-h100.json"
    saved.write_text(json.dumps(_doc([_row("d64-m2-b1-kv1k", 1.5, None)])))
    table = tmp_path / "t.json"
    result = CliRunner().invoke(app, ["tune", "--from-results", str(saved), "--table", str(table)])
    assert result.exit_code == 0, result.output
    assert json.loads(table.read_text())["h100"]["decode"]["d64-m2-b1-kv1k"]["speedup"] == 1.5


def test_tune_only_keeps_the_targets_whose_label_contains_the_text():
    from attnforge import cli

    kept = cli._only(targets.decode_grid(), "32:1 ")
    found = [(t.num_kv_heads, t.head_dim, t.kv_len) for t in kept]
    assert found == [(1, 128, 4096), (1, 128, 16384), (1, 64, 4096)]
    assert cli._only(kept, None) == kept


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "give exactly one of --model NAME or --preset NAME"),
        (["--model", "qwen3-0.6b", "--preset", "decode-grid"], "give exactly one"),
        (["--preset", "everything"], "--preset 'everything' is not one of"),
        (["--model", "qwen3-0.6b", "--kernels", "flash"], "accepted kinds are decode, prefill"),
        (["--preset", "decode-grid", "--only", "99:1"], "--only '99:1' matches none of the"),
    ],
)
def test_tune_refuses_bad_arguments_with_a_reason(args, message):
    result = CliRunner().invoke(app, ["tune", *args])
    assert result.exit_code != 0 and message in result.output


def test_a_warp_specialized_candidate_the_call_cannot_take_is_an_error_not_the_heuristics_timing():
    # on the CPU no call can take it (the guard asks for an sm_90 GPU)
    target = targets.Target("prefill", 1, 2, 1, 16, 16, 64)
    params = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 2, "ws": True}
    row = tune.tune_target(target, [params], CPU)
    cell = row["candidates"]["m16-n16-w4-st2-ws"]
    assert cell["status"] == "error" and "warp-specialized launch cannot take this call" in cell["reason"]


@pytest.mark.parametrize(
    "target, device_major, expected",
    [
        (targets.Target("prefill", 1, 32, 32, 1024, 1024, 64), 9, 5),
        (targets.Target("prefill", 8, 32, 8, 2048, 2048, 128, padded=True), 9, 5),  # kv_lens and q_lens
        (targets.Target("prefill", 1, 32, 8, 512, 4608, 128), 9, 5),  # a chunk against a cache
        (targets.Target("prefill", 1, 32, 8, 512, 4608, 128, "float32"), 9, 0),
        (targets.Target("prefill", 1, 32, 8, 2048, 2048, 96), 9, 0),  # head_dim 64 and 128 only
        (targets.Target("prefill", 1, 32, 8, 2048, 2048, 256), 9, 0),
        (targets.Target("prefill", 1, 32, 8, 2048, 2048, 128), 10, 0),  # wgmma and its layouts: sm_90
    ],
)
def test_gluon_candidates_only_where_the_calls_take_them(target, device_major, expected, monkeypatch):
    """A full sweep on sm_90 tries each of the Gluon launch's schedules where its calls can take it; a quick
    one none."""
    monkeypatch.setattr(tuning, "sm_count", lambda device=None: 132)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (device_major, 0))
    full = tune.candidates_for(target, torch.device("cuda"), quick=False)
    assert sum(bool(c.get("gluon")) for c in full) == expected
    assert not any(c.get("gluon") for c in tune.candidates_for(target, torch.device("cuda"), quick=True))
