"""The GPU scripts' CPU-side logic: which rows run, and how results become tuning-table entries."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_decode  # noqa: E402
import decode_tuning  # noqa: E402

from attnforge.kernels import decode, tuning  # noqa: E402

SWEEP = {
    "sweep": [
        {
            "bucket": "d128-m4-b1-kv4k",
            "best": "n64-s16-w4-st3",
            "best_params": {"BLOCK_N": 64, "num_splits": 16, "num_warps": 4, "num_stages": 3},
            "medians_us": {"sdpa_gqa": 20.0, "n64-s16-w4-st3": 40.0},
        }
    ]
}
LOG_ROW = (
    "[21/122] 323s | static-cache | 1 | 32:8 | 32768 | 128 | 5.5 | 149.2 (4%) | 459.7 | 975.2 | 754.0 "
    "| 3.08x "
    "| 82.5 / 92.6 |"
)


def test_grid_covers_the_issue_and_batches_select_rows():
    grid = bench_decode.select_configs("grid")
    assert len(grid) == 3 * 4 * 5 * 2 + 2
    assert {c["group"] for c in grid} == {"grid", "static-cache", "ragged"}
    assert {c["B"] for c in bench_decode.select_configs("grid", [8, 32])} == {8, 32}
    quick = bench_decode.select_configs("quick", [1])
    assert {(c["group"], c["Hq"], c["Hkv"]) for c in quick} == {("grid", 32, 8), ("static-cache", 32, 8)}


def test_sweep_params_fill_whole_waves_without_exceeding_the_tiles():
    """8 slots on 132 SMs: 16 or 33 splits (1 or 2 programs per SM), but never more splits than tiles."""
    pairs = {(p["BLOCK_N"], p["num_splits"]) for p in bench_decode.sweep_params(4096, slots=8)}
    assert pairs == {(64, 16), (64, 33), (128, 16), (128, 32)}


def test_params_from_installs_the_sweeps_best(monkeypatch):
    table = {}
    monkeypatch.setattr(tuning, "load_table", lambda: table)
    monkeypatch.setattr(tuning, "gpu_key", lambda device=None: "h100")
    bench_decode.install_sweep_params(SWEEP)
    entry = table["h100"]["decode"]["d128-m4-b1-kv4k"]
    assert entry["params"]["num_splits"] == 16 and entry["speedup"] == pytest.approx(0.5)


def test_decode_tuning_reads_the_grid_log_and_json(tmp_path):
    log = tmp_path / "grid.log"
    log.write_text("header line\n" + LOG_ROW + "\n")
    rows = decode_tuning.grid_rows(log)
    assert rows == [
        {"B": 1, "Hq": 32, "Hkv": 8, "Lkv": 32768, "D": 128, "has_kv_lens": True, "speedup": 3.08}
    ]
    grid_json = tmp_path / "grid.json"
    providers = {
        "attnforge": {"median_us": 10.0},
        "sdpa_gqa": {"median_us": 12.0},
        "wrong": {"correct": False},
    }
    grid_json.write_text(json.dumps({"results": [{"B": 1, "Hq": 32, "Hkv": 8, "Lkv": 4096, "D": 128,
                                                  "providers": providers}]}))  # fmt: skip
    (row,) = decode_tuning.grid_rows(grid_json)
    assert row["speedup"] == pytest.approx(1.2) and not row["has_kv_lens"]
    entries = decode_tuning.decode_entries(SWEEP, rows + [row], "test")
    assert entries["d128-m4-b1-kv32k-lens"] == {"params": None, "speedup": 3.08, "source": "test"}
    assert entries["d128-m4-b1-kv4k"]["params"]["num_splits"] == 16  # the grid keeps the sweep's parameters
    assert entries["d128-m4-b1-kv4k"]["speedup"] == 1.2


def test_kv_lens_buckets_are_their_own():
    assert decode.decode_bucket(1, 32768, 4, 1, 128, has_kv_lens=True) == "d128-m4-b1-kv32k-lens"
