"""Benchmark suite on the CPU: statistics, grid, correctness-before-timing, report writers, e2e scenarios."""

import json
import math
import types

import pytest
import torch
from typer.testing import CliRunner

from attnforge import verify
from attnforge.bench import e2e, kernels, presets, report, stats, timing
from attnforge.bench.optimization import benchmark_optimization
from attnforge.bench.providers import BenchConfig, Provider, default_providers, select

TINY_MODEL = dict(
    num_hidden_layers=2,
    hidden_size=256,
    intermediate_size=512,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
)


# ----------------------------------------------------------------------------------------------------------
# Statistics


def test_median_interval_and_summary():
    samples = [float(x) for x in range(1, 101)]
    low, high = stats.median_interval(samples)
    assert low < 50.5 < high and high - low < 25  # ~ median -+ 1.96 sqrt(n)/2 ranks
    summary = stats.summarize_samples(samples)
    assert summary.median == 50.5 and summary.mean == 50.5 and summary.n == 100
    assert (summary.min, summary.max) == (1.0, 100.0)
    assert stats.median_interval([3.0, 1.0, 2.0]) == (1.0, 3.0)  # few samples: the whole range
    assert timing.summarize(samples)["ci95_us"] == [low, high]


def test_speedup_summary_counts_wins_losses_and_ties():
    result = stats.speedup_summary([2.0, 1.04, 0.5, 1.2, None])
    assert result["count"] == 4 and (result["wins"], result["losses"], result["ties"]) == (2, 1, 1)
    assert result["min"] == 0.5 and result["max"] == 2.0
    assert result["geomean"] == pytest.approx((2.0 * 1.04 * 0.5 * 1.2) ** 0.25)
    assert stats.speedup_summary([]) == {"count": 0}


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: stats.summarize_samples([]), "needs at least one sample, got none"),
        (lambda: stats.summarize_samples([1.0, math.nan]), "non-finite samples"),
        (lambda: stats.geometric_mean([1.0, -2.0]), "needs positive values"),
        (lambda: stats.speedup_summary([1.0], tie_band=1.5), r"tie_band=1.5 must lie in \[0, 1\)"),
        (lambda: timing.summarize([]), "needs at least one sample"),
    ],
)
def test_statistics_reject_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ----------------------------------------------------------------------------------------------------------
# Grid and configs


def test_full_grid_covers_the_issue():
    grid = presets.build_grid("grid")
    decode = [c for c in grid if c.phase == "decode"]
    prefill = [c for c in grid if c.phase == "prefill"]
    assert max(c.kv_len for c in decode) == 131072 and min(c.kv_len for c in decode) <= 1024
    assert min(c.q_len for c in prefill) == 32 and max(c.q_len for c in prefill) == 16384
    assert {c.head_dim for c in grid} >= {64, 80, 128}
    assert {c.num_heads // c.num_kv_heads for c in grid} >= {1, 2, 4, 5, 8}
    assert any(c.num_kv_heads == 1 for c in grid)  # MQA
    assert {c.mask for c in grid} == {"none", "causal", "bool", "additive"}
    assert any(c.ragged for c in decode) and any(c.ragged for c in prefill)
    assert any(c.padded for c in prefill)
    assert len({c.label for c in grid}) == len(grid)


def test_bad_grid_and_config_inputs():
    with pytest.raises(
        ValueError, match=r"preset='huge' is not known; accepted: \['decode', 'prefill', 'grid'"
    ):
        presets.build_grid("huge")
    with pytest.raises(ValueError, match=r"padded=True needs q_len == kv_len"):
        BenchConfig(2, 8, 2, 4, 8, 64, padded=True)
    with pytest.raises(ValueError, match=r"mask='sliding' is not supported"):
        BenchConfig(1, 8, 2, 1, 64, 64, mask="sliding")
    with pytest.raises(ValueError, match=r"seq_len=9 exceeds kv_len=8"):
        BenchConfig(1, 8, 2, 9, 8, 64)
    with pytest.raises(ValueError, match=r"dtype='int8' is not supported"):
        BenchConfig(1, 8, 2, 1, 8, 64, dtype="int8")
    with pytest.raises(ValueError, match=r"batch_size=0 must be a positive integer"):
        BenchConfig(0, 8, 2, 1, 8, 64)
    with pytest.raises(ValueError, match=r"unknown providers \['bogus'\]"):
        select(default_providers(), ["bogus"])


def test_floor_work_counts_visible_pairs():
    square = BenchConfig(1, 4, 2, 8, 8, 64, dtype="float32")
    assert kernels.visible_pairs(square) == 8 * 9 // 2  # causal: half the square plus the diagonal
    chunk = BenchConfig(2, 4, 2, 2, 10, 64, mask="causal")
    assert kernels.visible_pairs(chunk, [10, 4]) == (9 + 10) + (3 + 4)
    padded = BenchConfig(2, 4, 2, 8, 8, 64, padded=True)
    assert kernels.visible_pairs(padded, [8, 3], [8, 3]) == 8 * 9 // 2 + 3 * 4 // 2  # valid queries only
    work = kernels.row_work(BenchConfig(1, 32, 8, 1, 4096, 128))
    assert work["bytes"] == 2 * 32 * 128 * 2 + 2 * 8 * 4096 * 128 * 2
    floor, bound = kernels.floor_us(work, {"read_gbps": 3000.0, "bf16_tflops": 700.0})
    assert bound == "memory" and floor == pytest.approx(work["bytes"] / 3000e9 * 1e6)
    assert kernels.floor_us(work, None) == (None, "no ceilings (no GPU)")


def test_chunked_oracle_matches_the_oracle():
    cfg = BenchConfig(2, 4, 2, 9, 21, 16, dtype="float32", mask="causal", ragged=True)
    case = kernels.row_cases(cfg, torch.device("cpu"), kinds=("random",))[0]
    case.attn_mask = torch.rand(2, 1, 9, 21) > 0.2
    case.attn_mask[..., 0] = True
    expected = verify.reference_attention(case.q, case.k, case.v, **case.kwargs())
    torch.testing.assert_close(kernels.chunked_reference(case, max_elements=40), expected)


# ----------------------------------------------------------------------------------------------------------
# Correctness before timing


def _planted(name: str) -> Provider:
    bug = verify.PLANTED_BUGS[name]

    def make(q, k, v, *, causal=False, scale=None, kv_lens=None, attn_mask=None, out=None):
        return lambda: bug(q, k, v, causal=causal, scale=scale, kv_lens=kv_lens, attn_mask=attn_mask)

    return Provider(
        f"planted-{name}", "candidate", "a known-wrong kernel", make, lambda cfg, device: (True, "")
    )


def _providers_with(*planted: str) -> dict[str, Provider]:
    providers = select(default_providers(), ["sdpa-math", "hf-repeat_kv"])
    return {**providers, **{p.name: p for p in map(_planted, planted)}}


def test_broken_providers_are_reported_incorrect_not_timed_on_cpu():
    providers = _providers_with("returns-zeros", "drops-last-10%-of-keys")
    cfg = BenchConfig(1, 4, 2, 1, 300, 64, dtype="float32")
    doc = kernels.run_sweep([cfg], providers=providers, device="cpu")
    cells = doc["rows"][0]["providers"]
    assert cells["planted-returns-zeros"]["status"] == "incorrect"
    assert "max relative L2" in cells["planted-returns-zeros"]["reason"]
    assert cells["planted-drops-last-10%-of-keys"]["status"] == "incorrect"
    assert "max relative L2" in cells["planted-drops-last-10%-of-keys"]["reason"]
    assert cells["sdpa-math"]["status"] == "correct" and cells["hf-repeat_kv"]["status"] == "correct"
    assert not any("median_us" in cell for cell in cells.values())
    assert doc["note"] == kernels.NO_GPU_NOTE and doc["ceilings"] is None
    assert {item["provider"] for item in doc["summary"]["incorrect"]} == {
        "planted-returns-zeros",
        "planted-drops-last-10%-of-keys",
    }


def test_timing_only_ever_sees_correct_providers(monkeypatch):
    """On a GPU the row is timed after the check: an incorrect provider must not reach the timer."""
    providers = _providers_with("returns-zeros")
    cfg = BenchConfig(1, 4, 2, 1, 65, 64, dtype="float32")
    cases = kernels.row_cases(cfg, torch.device("cpu"))
    cells = {name: kernels.check_provider(p, cases) for name, p in providers.items()}
    row = {
        "providers": cells,
        "floor_us": 1.0,
        "kernel": "attnforge-decode",
        "config": cfg.as_dict(),
        "work": kernels.row_work(cfg),
    }
    timed = []

    def fake_timer(calls, **options):
        timed.extend(calls)
        return {name: [2.0, 2.0, 3.0] for name in calls}

    def fake_graph_timer(make_layer_call, *, layers, reps):
        outputs = [make_layer_call(i)() for i in range(layers)]  # distinct buffers per layer
        assert not torch.equal(outputs[0], outputs[1])
        return [1.0, 1.5]

    monkeypatch.setattr(timing, "time_interleaved", fake_timer)
    monkeypatch.setattr(timing, "time_graph_per_call", fake_graph_timer)
    kernels._time_row(row, providers, cases[0], reps=3, warmup=1)
    assert sorted(timed) == ["hf-repeat_kv", "sdpa-math"]
    assert cells["hf-repeat_kv"]["graph_median_us"] == 1.25 and "graph_median_us" not in cells["sdpa-math"]
    assert (
        cells["planted-returns-zeros"]["status"] == "incorrect"
        and "median_us" not in cells["planted-returns-zeros"]
    )
    assert cells["sdpa-math"]["median_us"] == 2.0 and cells["sdpa-math"]["pct_of_floor"] == 50.0


def test_several_graphs_are_replayed_in_turn_and_one_that_fails_to_capture_is_reported(monkeypatch):
    """`time_graphs_per_call`: every graph captured first, then one replay of each per round (a, b, a, b,
    ...), so that no launch is timed under other clocks or another L2 than the rest; a capture that raises
    gives its reason, and the others still get their samples."""
    replays = []

    def fake_graph(make, layers):
        label = make(0)
        if label == "broken":
            raise RuntimeError("operation not permitted when stream is capturing")
        return ("graph", label)

    def fake_replay(graph, layers):
        replays.append(graph[1])
        return float(len(replays))

    monkeypatch.setattr(timing, "_layer_graph", fake_graph)
    monkeypatch.setattr(timing, "_replay_us", fake_replay)
    makers = {name: (lambda i, name=name: name) for name in ("a", "broken", "b")}
    samples = timing.time_graphs_per_call(makers, layers=2, reps=3)
    assert replays == ["a", "b"] * 3
    assert samples["a"] == [1.0, 3.0, 5.0] and samples["b"] == [2.0, 4.0, 6.0]
    assert samples["broken"] == "RuntimeError: operation not permitted when stream is capturing"


class _FakeGraph:
    def replay(self):
        pass


def test_a_layer_graph_keeps_what_its_calls_own_alive(monkeypatch):
    """The memory a captured call owns (its output, a baseline's copies of K/V) must outlive the calls list:
    the graph holds the calls, so those tensors die with the graph, not before (freed, a later capture's
    cache flush returned them to the driver and a replay faulted)."""
    import contextlib
    import gc
    import weakref

    class Owned:  # what a call's closure owns (a tensor on the GPU)
        pass

    owned = [Owned() for _ in range(3)]
    alive = [weakref.ref(o) for o in owned]
    makers = [lambda o=o: o for o in owned]
    del owned
    stream = types.SimpleNamespace(wait_stream=lambda other: None)
    monkeypatch.setattr(torch.cuda, "Stream", lambda: stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "graph", lambda g: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _FakeGraph)
    graph = timing._layer_graph(makers.__getitem__, 3)
    del makers
    gc.collect()
    assert all(ref() is not None for ref in alive)
    del graph
    gc.collect()
    assert all(ref() is None for ref in alive)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graphs_replay_after_later_captures_read_what_their_calls_own():
    """Each call reads a 64 MiB tensor only its closure owns (as torch's static-cache path owns its copies
    of K/V): capturing the second graph empties the allocator's cache, and the first graph's replays must
    still find that memory (they faulted when the calls list died with the capture)."""

    def maker(i):
        owned = torch.full((1 << 24,), float(i), device="cuda")
        return lambda: owned.sum()

    samples = timing.time_graphs_per_call({"a": maker, "b": maker}, layers=2, reps=3)
    torch.cuda.synchronize()
    assert all(len(samples[name]) == 3 for name in ("a", "b"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graphs_timed_in_turn_on_a_gpu_give_positive_per_call_times():
    x = torch.randn(1 << 20, device="cuda")

    def refuses_capture():
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("not capturable")
        return x.add(1)

    makers = {"add": lambda i: lambda: x.add(i), "refuses": lambda i: refuses_capture}
    samples = timing.time_graphs_per_call(makers, layers=3, reps=4)
    assert len(samples["add"]) == 4 and all(us > 0 for us in samples["add"])
    assert samples["refuses"] == "RuntimeError: not capturable"


def test_the_optimizer_row_is_correct_on_a_ragged_batch_with_poisoned_padding():
    """Its torch fallback is torch's masked path: it gets the zeroed padding torch's rows get (on an H100 the
    fallback read the NaN-poisoned padding: every output element non-finite)."""
    providers = select(default_providers(), ["optimizer", "sdpa-math"])
    cfg = BenchConfig(3, 4, 2, 1, 40, 16, dtype="float32", mask="causal", ragged=True)
    row = kernels.run_row(cfg, providers, torch.device("cpu"), ceilings=None)
    assert row["kv_lens"] is not None and min(row["kv_lens"]) < 40
    assert [cell["status"] for cell in row["providers"].values()] == ["correct", "correct"], row["providers"]


def test_unsupported_rows_are_na_with_a_reason():
    providers = select(default_providers(), ["attnforge-decode", "sdpa-flash", "sdpa-cudnn"])
    cfg = BenchConfig(1, 4, 4, 40, 40, 64, dtype="float32", mask="bool")
    row = kernels.run_row(cfg, providers, torch.device("cpu"), ceilings=None)
    cells = row["providers"]
    assert cells["attnforge-decode"] == {
        "status": "n/a",
        "reason": "prefill row (q_len > 16): the prefill kernel's",
    }
    assert "takes no explicit mask" in cells["sdpa-flash"]["reason"]
    assert "needs a CUDA GPU" in cells["sdpa-cudnn"]["reason"]


def test_row_speedups_against_each_baseline_and_the_best():
    providers = default_providers()
    cells = {
        "attnforge-decode": {"status": "correct", "median_us": 10.0},
        "sdpa-auto": {"status": "correct", "median_us": 15.0},
        "hf-repeat_kv": {"status": "correct", "median_us": 40.0},
        "sdpa-flash": {"status": "incorrect", "reason": "x"},
    }
    speedups = kernels.row_speedups({"providers": cells, "kernel": "attnforge-decode"}, providers)
    assert speedups == {
        "attnforge-decode": {
            "sdpa-auto": 1.5,
            "hf-repeat_kv": 4.0,
            "best-torch": 1.5,
            "best-torch-name": "sdpa-auto",
        }
    }


# ----------------------------------------------------------------------------------------------------------
# Reports


def _kernel_doc() -> dict:
    cfg = BenchConfig(1, 32, 8, 1, 4096, 128)
    samples = [10.0, 11.0, 12.0, 10.5]
    row = {
        "config": cfg.as_dict(),
        "label": cfg.label,
        "kv_lens": None,
        "work": kernels.row_work(cfg),
        "floor_us": 5.5,
        "bound": "memory",
        "kernel": "attnforge-decode",
        "providers": {
            "attnforge-decode": {
                "status": "correct",
                "samples_us": samples,
                **timing.summarize(samples),
                "pct_of_floor": 50.0,
            },
            "sdpa-auto": {"status": "correct", "samples_us": [20.0] * 4, **timing.summarize([20.0] * 4)},
            "planted": {"status": "incorrect", "reason": "needle: max relative L2 9e-01 > 1e-02"},
            "sdpa-flash": {"status": "n/a", "reason": "torch's flash backend takes no explicit mask"},
        },
        "speedups": {
            "attnforge-decode": {
                "sdpa-auto": 20 / 10.75,
                "best-torch": 20 / 10.75,
                "best-torch-name": "sdpa-auto",
            }
        },
    }
    doc = {
        "what": "kernels",
        "created": "2026-11-22T00:00:00+00:00",
        "environment": {"gpu": "NVIDIA H100"},
        "ceilings": {"read_gbps": 3060.0, "bf16_tflops": 750.0},
        "method": "m",
        "note": None,
        "providers": {n: {} for n in row["providers"]},
        "rows": [row],
        "not_run": ["decode B=1 ..."],
    }
    doc["summary"] = kernels.sweep_summary(doc["rows"])
    return doc


def _e2e_doc() -> dict:
    runs = [
        {
            "ttft_ms": 20.0 + i,
            "prefill_tok_s": 5000.0,
            "decode_tok_s": 30.0 + i,
            "total_s": 3.0,
            "peak_mem_gib": 1.5,
        }
        for i in range(3)
    ]
    sides = {
        side: {"n": 3, "runs": runs, "summary": e2e.summarize_runs(runs), "optimizer_stats": {}}
        for side in ("baseline", "attnforge")
    }
    scenario = {
        "name": "context-short",
        "category": "context length",
        "prompt_tokens": 128,
        "new_tokens": 100,
        "sides": sides,
        "improvement": e2e.improvement(sides["baseline"], sides["attnforge"]),
    }
    return {
        "what": "e2e",
        "model": "qwen3-0.6b",
        "mode": "compare",
        "created": "now",
        "environment": {},
        "tokenization": e2e.TOKENIZATION,
        "scenarios": [scenario],
        "overall": {"decode_tok_s": 1.0},
    }


def _have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize(
    "make_doc, stem", [(_kernel_doc, "kernels-20261122"), (_e2e_doc, "e2e-qwen3-0.6b-20261122")]
)
def test_report_writers(tmp_path, make_doc, stem):
    doc = make_doc()
    paths, messages = report.save(doc, tmp_path, stem)
    names = {p.name for p in paths}
    assert {f"{stem}.json", f"{stem}.csv", f"{stem}.md"} <= names
    loaded = json.loads((tmp_path / f"{stem}.json").read_text())
    assert loaded["what"] == doc["what"]
    csv_lines = (tmp_path / f"{stem}.csv").read_text().strip().splitlines()
    markdown = (tmp_path / f"{stem}.md").read_text()
    if doc["what"] == "kernels":
        assert loaded["rows"][0]["providers"]["attnforge-decode"]["samples_us"] == [10.0, 11.0, 12.0, 10.5]
        assert len(csv_lines) == 1 + 4 and "speedup_vs_best_torch" in csv_lines[0]
        assert "**INCORRECT**" in markdown and "1.86x (sdpa-auto)" in markdown and "n/a reasons" in markdown
        assert "Not run (time budget)" in markdown
    else:
        assert loaded["scenarios"][0]["sides"]["baseline"]["runs"][0]["ttft_ms"] == 20.0
        assert len(csv_lines) == 1 + 2 and "decode_tok_s_median" in csv_lines[0]
        assert "31.0 [30.0, 32.0]" in markdown and "Random weights" in markdown
    if _have_matplotlib():
        assert f"{stem}.png" in names and (tmp_path / f"{stem}.png").stat().st_size > 0
    else:
        assert messages == ["plots skipped: matplotlib is not installed (pip install 'attnforge[plots]')"]


def test_json_has_no_nan(tmp_path):
    doc = _kernel_doc()
    doc["rows"][0]["providers"]["planted"]["max_rel_l2"] = math.inf
    path = report.write_json(doc, tmp_path / "x.json")
    assert "Infinity" not in path.read_text() and json.loads(path.read_text())


def test_report_command_regenerates_docs_from_result_files(tmp_path):
    results = tmp_path / "results"
    report.save(_kernel_doc(), results / "h100", "kernels-20261122")
    report.save(_e2e_doc(), results / "h100", "e2e-qwen3-0.6b-20261122")
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.README_START}\nold numbers\n{report.README_END}\nrest\n")
    out = tmp_path / "docs" / "performance.md"
    from attnforge.bench.cli import bench_app

    result = CliRunner().invoke(
        bench_app, ["report", "--results", str(results), "--out", str(out), "--readme", str(readme)]
    )
    assert result.exit_code == 0, result.output
    section = out.read_text()
    assert (
        "Generated by `attnforge bench report`" in section
        and "1.86x" in section
        and "context-short" in section
    )
    text = readme.read_text()
    assert (
        "old numbers" not in text
        and "h100/kernels-20261122.json" in text
        and text.startswith("intro")
        and text.endswith("rest\n")
    )
    empty = CliRunner().invoke(bench_app, ["report", "--results", str(tmp_path / "none"), "--out", str(out)])
    assert empty.exit_code == 1 and "no result files" in empty.output


@pytest.mark.parametrize(
    "doc, stem, message",
    [
        ({"what": "tuning"}, "x", r"doc\['what'\]='tuning' is not a result document"),
        ({"what": "kernels"}, "../escape", r"stem='../escape' must be a plain file name"),
    ],
)
def test_save_rejects_bad_input(tmp_path, doc, stem, message):
    with pytest.raises(ValueError, match=message):
        report.save(doc, tmp_path, stem)


# ----------------------------------------------------------------------------------------------------------
# CLI on the CPU


def test_cli_kernels_on_cpu_says_timings_need_a_gpu(tmp_path):
    from attnforge.bench.cli import bench_app

    result = CliRunner().invoke(
        bench_app,
        ["kernels", "--out", str(tmp_path), "--providers", "attnforge-decode,sdpa-math", "--stem", "k"],
    )
    assert result.exit_code == 0, result.output
    assert "timings need a CUDA GPU" in result.output
    doc = json.loads((tmp_path / "k.json").read_text())
    assert doc["note"] == kernels.NO_GPU_NOTE and doc["rows"]
    bad = CliRunner().invoke(bench_app, ["kernels", "--providers", "bogus", "--out", str(tmp_path)])
    assert bad.exit_code != 0 and "unknown providers" in bad.output
    bad_mode = CliRunner().invoke(bench_app, ["e2e", "--mode", "fastest"])
    assert bad_mode.exit_code != 0 and "fastest" in bad_mode.output


# ----------------------------------------------------------------------------------------------------------
# End-to-end scenarios


def test_scenarios():
    assert len(e2e.SCENARIOS) == 20 and len({s.name for s in e2e.SCENARIOS}) == 20
    assert [s.name for s in e2e.scenarios_for("quick")] == [s for s in e2e.QUICK if s in e2e.QUICK]
    assert len(e2e.scenarios_for("quick")) == 5 and len(e2e.scenarios_for("full")) == 20
    assert len(e2e.scenarios_for("compare", all_scenarios=True)) == 20
    assert {s.new_tokens for s in e2e.SCENARIOS} >= {10, 100, 1000, 2000, 5000}
    assert {s.category for s in e2e.SCENARIOS} == {
        "context length",
        "generation length",
        "use case",
        "memory pressure",
    }
    with pytest.raises(ValueError, match=r"mode='fast' is not known"):
        e2e.scenarios_for("fast")


def test_prompt_token_ids_are_deterministic_and_exact():
    ids = e2e.prompt_token_ids("Hello, world! Hello again.", 50, 1000)
    assert len(ids) == 50 and ids == e2e.prompt_token_ids("Hello, world! Hello again.", 50, 1000)
    assert all(100 <= i < 900 for i in ids) and ids[0] == ids[4]  # "Hello" twice
    with pytest.raises(ValueError, match="length=0 must be a positive"):
        e2e.prompt_token_ids("x", 0, 1000)
    with pytest.raises(ValueError, match="no words"):
        e2e.prompt_token_ids("   ", 3, 1000)


def test_e2e_on_cpu_checks_agreement_and_that_kernels_ran():
    doc = e2e.run("qwen3-0.6b", mode="compare", **TINY_MODEL)
    assert doc["note"] == e2e.NO_GPU_NOTE and len(doc["scenarios"]) == 1
    sides = doc["scenarios"][0]["sides"]
    assert sides["baseline"]["optimizer_stats"]["calls"] == 0
    assert sides["attnforge"]["optimizer_stats"]["optimized"] > 0
    assert doc["tokens_match"] and "failure" not in doc
    assert "runs" not in sides["attnforge"]  # nothing timed on the CPU
    assert "Greedy tokens of plain transformers and attnforge: identical" in report.e2e_markdown(doc)


def test_compare_fails_when_attnforge_kernels_did_not_run():
    stats_none = {
        "calls": 10,
        "optimized": 0,
        "fallbacks": 10,
        "by_kernel": {},
        "fallback_reasons": {"not measured": 10},
    }
    doc = {
        "scenarios": [
            {"sides": {"baseline": {"optimizer_stats": {}}, "attnforge": {"optimizer_stats": stats_none}}}
        ]
    }
    e2e._finish(doc, on_gpu=True)
    assert "attnforge kernels did not run" in doc["failure"] and "not measured" in doc["failure"]


def test_e2e_improvement_is_oriented_so_bigger_is_better():
    base = {"summary": {"ttft_ms": {"median": 20.0}, "decode_tok_s": {"median": 30.0}}}
    fast = {"summary": {"ttft_ms": {"median": 10.0}, "decode_tok_s": {"median": 45.0}}}
    assert e2e.improvement(base, fast) == {"ttft_ms": 2.0, "decode_tok_s": 1.5}


# ----------------------------------------------------------------------------------------------------------
# benchmark_optimization


def test_benchmark_optimization_on_cpu_checks_and_says_timings_need_a_gpu(tmp_path):
    results = benchmark_optimization("qwen3-0.6b", seq_lengths=[20], benchmark_runs=2, out_dir=tmp_path)
    assert [(r.seq_length, r.phase) for r in results] == [(20, "prefill"), (20, "decode")]
    for result in results:
        assert result.correct and result.speedup is None and "timings need a CUDA GPU" in result.note
        assert result.config["num_heads"] == 16 and result.config["num_kv_heads"] == 8
    assert list(tmp_path.glob("kernels-optimization-qwen3-0.6b-*.json"))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"seq_lengths": [0]}, r"must be a non-empty list of positive integers \(bad: \[0\]\)"),
        ({"seq_lengths": []}, "must be a non-empty list"),
        ({"benchmark_runs": 0}, "benchmark_runs=0 must be an integer >= 1"),
        ({"model_name": "gpt-17"}, r"model='gpt-17' is not a bundled architecture \("),
    ],
)
def test_benchmark_optimization_rejects_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        benchmark_optimization(save_results=False, **kwargs)


def test_sdpa_backend_refusing_gqa_gets_kv_expanded_once_and_says_so(monkeypatch):
    from attnforge.bench import providers as providers_module

    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def refuses_gqa(q, k, v, **kwargs):
        if kwargs.get("enable_gqa") and q.shape[1] != k.shape[1]:
            raise RuntimeError("No available kernel. Aborting execution.")
        return real_sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(providers_module.F, "scaled_dot_product_attention", refuses_gqa)
    provider = default_providers()["sdpa-math"]
    case = kernels.row_cases(BenchConfig(1, 4, 2, 1, 33, 64, dtype="float32"), torch.device("cpu"))[0]
    call = provider.make_call(case.q, case.k, case.v, causal=True)
    assert "refused enable_gqa" in call.note
    assert verify.check(provider.checkable(), case).passed


def test_e2e_rejects_unknown_kernel_policy():
    accepted = r"accepted: \('measured', 'all', 'none'\)"
    with pytest.raises(ValueError, match=r"kernels='some' is not known; " + accepted):
        e2e.run("qwen3-0.6b", kernels="some", **TINY_MODEL)


@pytest.mark.parametrize("ragged, mask", [(True, "causal"), (False, "bool"), (False, "causal")])
def test_optimizer_decision_describes_the_rows_lengths_and_mask(monkeypatch, ragged, mask):
    """The optimizer column looks up the bucket of the call the row makes (kv_lens, masks)."""
    from attnforge import optimizer
    from attnforge.bench.providers import optimizer_decision

    seen = {}

    def fake_should_optimize(self, cfg, *, device=None, features=None):
        seen["features"] = features
        return False, "recorded"

    monkeypatch.setattr(optimizer.AttentionOptimizer, "should_optimize", fake_should_optimize)
    cfg = BenchConfig(2, 8, 2, 1, 64, 64, mask=mask, ragged=ragged)
    assert optimizer_decision(cfg, torch.device("cpu")) == "recorded"
    assert seen["features"].has_kv_lens is ragged
    assert seen["features"].has_mask is (mask == "bool")


def test_overhead_benchmark_times_the_hook_hot_and_cold(monkeypatch):
    from attnforge.bench.overhead import fallback_overhead
    from attnforge.integrations import transformers as integration
    from attnforge.optimizer import get_optimizer

    general = []  # the timed decode calls take the path generate() gives them: planned by the mask hook
    monkeypatch.setattr(integration, "sdpa_attention_forward", lambda *a, **kw: general.append(a))
    kernels = get_optimizer().settings.kernels
    doc = fallback_overhead(calls=20, repeats=2, cold_calls=5)
    assert general == []
    for key in ("transformers_sdpa_us", "attnforge_hook_us", "transformers_sdpa_cold_us",
                "attnforge_hook_cold_us"):  # fmt: skip
        assert math.isfinite(doc[key]) and doc[key] > 0, key
    assert doc["overhead_cold_us"] == doc["attnforge_hook_cold_us"] - doc["transformers_sdpa_cold_us"]
    assert "cache sweep" in doc["method"] and "CPU tensors" in doc["method"]
    assert get_optimizer().settings.kernels == kernels  # the benchmark gives the optimizer its kernels back
