"""`attnforge bench kernels --preset decode|prefill|grid|sweep` on the CPU, and the prefill providers."""

import inspect
import json

import pytest
import torch
from typer.testing import CliRunner

from attnforge import verify
from attnforge.bench import kernels, prefill_providers, presets, targets
from attnforge.bench.cli import bench_app
from attnforge.bench.providers import BenchConfig, Provider, default_providers, select
from attnforge.kernels import reference

# The grid preset (every row kind) with attnforge's kernels, the optimizer and two torch paths.
PRESET_PROVIDERS = {"grid": "attnforge-decode,attnforge-prefill,optimizer,sdpa-math,flash-per-sequence"}
STATUSES = {"correct", "n/a", "incorrect", "error"}


@pytest.fixture(scope="module")
def preset_runs(tmp_path_factory):
    """Each preset run once through the CLI at tiny CPU sizes: {preset: (results directory, document)}."""
    cache = {}

    def run(preset: str) -> tuple:
        if preset not in cache:
            results = tmp_path_factory.mktemp(preset) / "results"
            args = [
                "kernels",
                "--preset",
                preset,
                "--out",
                str(results / "cpu"),
                "--stem",
                f"{preset}-20261127",
            ]
            if preset in PRESET_PROVIDERS:
                args += ["--providers", PRESET_PROVIDERS[preset]]
            result = CliRunner().invoke(bench_app, args)
            assert result.exit_code == 0, result.output
            assert "timings need a CUDA GPU" in result.output
            cache[preset] = results, json.loads((results / "cpu" / f"{preset}-20261127.json").read_text())
        return cache[preset]

    return run


def _assert_every_cell_has_a_verdict(doc: dict) -> None:
    for row in doc["rows"]:
        for name, cell in row["providers"].items():
            assert cell["status"] in STATUSES, (row["label"], name, cell)
            if cell["status"] != "correct":
                assert cell.get("reason"), (row["label"], name, cell)
        assert row["providers"][row["kernel"]]["status"] == "correct", (row["label"], row["providers"])
    assert not doc["summary"]["incorrect"], doc["summary"]["incorrect"]


@pytest.mark.parametrize("preset", presets.PRESETS)
def test_preset_runs_on_cpu_and_bench_report_reads_it(tmp_path, preset_runs, preset):
    results, doc = preset_runs(preset)
    grid = presets.build_grid(preset, on_gpu=False)
    assert doc["preset"] == preset and doc["note"] == kernels.NO_GPU_NOTE
    assert [row["label"] for row in doc["rows"]] == [cfg.label for cfg in grid] and doc["rows"]
    _assert_every_cell_has_a_verdict(doc)
    readme = tmp_path / "README.md"
    result = CliRunner().invoke(
        bench_app,
        ["report", "--results", str(results), "--out", str(tmp_path / "perf.md"),
         "--readme", str(readme)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    section = (tmp_path / "perf.md").read_text()
    assert f"### `cpu/{preset}-20261127.json`" in section and grid[-1].label in section


def test_prefill_preset_covers_issue_14_and_reports_varlen_unsupported_on_cpu(preset_runs):
    gpu = presets.build_grid("prefill")
    causal = {(c.num_heads, c.num_kv_heads, c.head_dim, c.q_len) for c in gpu if c.q_len == c.kv_len}
    for heads in ((32, 8, 128), (16, 8, 128), (32, 32, 64)):
        assert {n for h, kv, d, n in causal if (h, kv, d) == heads} == {512, 1024, 2048, 4096, 8192, 16384}
    assert {(c.q_len, c.kv_len - c.q_len) for c in gpu if c.q_len < c.kv_len} == {
        (n, m) for n in (512, 2048) for m in (4096, 16384, 32768)
    }
    assert {(c.batch, c.q_len) for c in gpu if c.padded} == {(8, 2048), (16, 1024)}
    assert gpu[0].label.startswith("prefill B=32 32:8 Lq=512")  # the targets' series first

    _, doc = preset_runs("prefill")
    by_kind = {("padded" if r["config"]["padded"] else "chunk" if r["config"]["q_len"] < r["config"]["kv_len"]
                else "causal"): r for r in doc["rows"]}  # fmt: skip
    padded, chunk = by_kind["padded"]["providers"], by_kind["chunk"]["providers"]
    for name in (
        "attnforge-prefill",
        "attnforge-prefill-mask",
        "optimizer",
        "flash-per-sequence",
        "sdpa-math",
    ):
        assert padded[name]["status"] == "correct", (name, padded[name])
    assert (
        by_kind["padded"]["q_lens"] == by_kind["padded"]["kv_lens"] and by_kind["padded"]["q_lens"][0] == 40
    )
    assert chunk["sdpa-lower-right"]["status"] == "correct"
    for row in doc["rows"]:
        cell = row["providers"]["torch-varlen"]
        assert cell["status"] == "n/a" and cell["reason"].startswith("unsupported: "), cell
    assert "varlen_attn runs torch's CUDA flash kernel" in padded["torch-varlen"]["reason"]


def test_sweep_preset_checks_each_launch_parameter_set(preset_runs):
    _, doc = preset_runs("sweep")
    names = [p.name for p in prefill_providers.launch_providers()]
    assert "attnforge-prefill[m128-n64-w8-st3]" in names and "attnforge-prefill[m64-n64-w4-st3-tma]" in names
    for row in doc["rows"]:
        for name in names:
            cell = row["providers"][name]
            expected = ("n/a", "TMA loads need a Hopper") if "tma" in name else ("correct", None)
            assert cell["status"] == expected[0] and (expected[1] or "") in cell.get("reason", ""), (
                name,
                cell,
            )


def test_bad_preset_is_refused(tmp_path):
    result = CliRunner().invoke(bench_app, ["kernels", "--preset", "huge", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "huge" in result.output and "--preset" in result.output


def _older_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    """The form of earlier torch releases: `is_causal`, no `scale`, no `enable_gqa`."""


def _windowed_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                     window_size=(-1, -1)):  # fmt: skip
    """torch 2.11's form (as the H100 run found it): `window_size` and `scale`, but no `enable_gqa`."""


def _fake_varlen(signature: inspect.Signature):
    """varlen_attn with `signature` (a wrong call form raises TypeError, as torch's does), computing each
    packed sequence with the float64 oracle (the real one needs a CUDA GPU)."""

    def fake(*args, **kwargs):
        arguments = signature.bind(*args, **kwargs).arguments
        q, k, v = arguments["query"], arguments["key"], arguments["value"]
        cu_q, cu_k = arguments["cu_seq_q"].tolist(), arguments["cu_seq_k"].tolist()
        if "enable_gqa" in signature.parameters:
            assert arguments["enable_gqa"] is True
        else:
            assert k.shape[1] == q.shape[1], "no enable_gqa: K/V must come with Hq heads"
        if "window_size" in signature.parameters:
            assert arguments["window_size"] in ((-1, 0), (-1, -1))
            causal = arguments["window_size"] == (-1, 0)
        else:
            causal = arguments.get("is_causal", False)
        out = torch.empty_like(q)
        for i in range(len(cu_q) - 1):
            rows, keys = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
            qs, ks, vs = (t[part].transpose(0, 1)[None] for t, part in ((q, rows), (k, keys), (v, keys)))
            ref = verify.reference_attention(qs, ks, vs, causal=causal, scale=arguments.get("scale"))
            out[rows] = ref[0].transpose(0, 1).to(q.dtype)
        return out

    fake.__signature__ = signature
    return fake


@pytest.mark.parametrize("form", ["installed", "windowed", "older"])
def test_varlen_provider_uses_the_installed_call_form(monkeypatch, form):
    varlen = pytest.importorskip("torch.nn.attention.varlen")
    forms = {"installed": varlen.varlen_attn, "windowed": _windowed_varlen, "older": _older_varlen}
    signature = inspect.signature(forms[form])
    monkeypatch.setattr(varlen, "varlen_attn", _fake_varlen(signature))
    monkeypatch.setattr(prefill_providers, "varlen_status", lambda device: (True, ""))
    providers = select(default_providers(), ["torch-varlen"])
    for cfg in (BenchConfig(3, 4, 2, 20, 20, 64, dtype="float32", padded=True),
                BenchConfig(2, 4, 1, 7, 30, 64, dtype="float32")):  # fmt: skip
        row = kernels.run_row(cfg, providers, torch.device("cpu"), ceilings=None)
        assert row["providers"]["torch-varlen"]["status"] == "correct", row["providers"]
    q, k = torch.randn(1, 4, 5, 64), torch.randn(1, 2, 9, 64)
    call = prefill_providers._varlen_call(q, k, k.clone(), causal=True)  # the note the timed cell keeps
    assert ("repeated to Hq heads" in getattr(call, "note", "")) is (form != "installed")


def test_chunked_oracle_handles_padded_queries():
    cfg = BenchConfig(3, 4, 2, 20, 20, 64, dtype="float32", padded=True)
    case = kernels.row_cases(cfg, torch.device("cpu"), seed=1, kinds=("random",))[0]
    assert case.q_lens is not None and case.q_lens.tolist() == case.kv_lens.tolist()
    expected = verify.reference_attention(case.q, case.k, case.v, **case.kwargs())
    torch.testing.assert_close(kernels.chunked_reference(case, max_elements=64), expected)


def test_tune_prefill_preset_targets_the_prefill_presets_buckets():
    grid = targets.PRESETS["prefill-grid"]()
    rows = presets.build_grid("prefill")
    fields = ("batch", "num_heads", "num_kv_heads", "q_len", "kv_len", "head_dim", "padded")
    assert [[getattr(t, f) for f in fields] for t in grid] == [[getattr(c, f) for f in fields] for c in rows]
    buckets = {t.bucket for t in grid}
    assert any(b.endswith("-chunk") for b in buckets) and len(buckets) == len(grid) > 10
    assert sum(b.endswith("-lens") for b in buckets) == 2  # the padded batches


def test_only_picks_rows_by_label_and_each_row_is_checkpointed(tmp_path):
    args = [
        "kernels",
        "--preset",
        "prefill",
        "--only",
        "padded",
        "--providers",
        "sdpa-math,flash-per-sequence",
    ]
    result = CliRunner().invoke(bench_app, [*args, "--out", str(tmp_path), "--stem", "p"])
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "p.json").read_text())
    assert [row["config"]["padded"] for row in doc["rows"]] == [True] and doc["preset"] == "prefill"
    none = CliRunner().invoke(bench_app, ["kernels", "--preset", "decode", "--only", "padded"])
    assert none.exit_code == 2 and "--only" in none.output
    saved = []
    grid = presets.build_grid("decode", on_gpu=False)[:2]
    providers = select(default_providers(), ["sdpa-math"])
    doc = kernels.run_sweep(
        grid,
        providers=providers,
        device="cpu",
        checkpoint=lambda d: saved.append((len(d["rows"]), d["not_run"])),
    )
    assert saved == [(1, [grid[1].label]), (2, [])] and len(doc["rows"]) == 2


def test_padding_is_poisoned_and_a_provider_reading_it_is_incorrect():
    cfg = BenchConfig(3, 4, 2, 20, 20, 64, dtype="float32", padded=True)
    case = kernels.row_cases(cfg, torch.device("cpu"), seed=3, kinds=("random",))[0]
    b, end = min(enumerate(case.kv_lens.tolist()), key=lambda item: item[1])
    assert end < 20 and torch.isnan(case.k[b, :, end]).all() and torch.isfinite(case.k[b, :, :end]).all()

    def make(q, k, v, *, causal, scale, kv_lens, q_lens, attn_mask):  # the mask, but no zeroed copy
        mask = reference.visibility_mask(3, 20, 20, causal=True, kv_lens=kv_lens, q_lens=q_lens)
        keys, values = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
        return lambda: torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask)

    reads = Provider(
        "reads-padding", "candidate", "masked SDPA on poisoned keys", make, lambda c, d: (True, "")
    )
    providers = {"reads-padding": reads, **select(default_providers(), ["sdpa-math"])}
    cells = kernels.run_row(cfg, providers, torch.device("cpu"), ceilings=None, seed=3)["providers"]
    assert (
        cells["reads-padding"]["status"] == "incorrect" and "non-finite" in cells["reads-padding"]["reason"]
    )
    assert cells["sdpa-math"]["status"] == "correct"


def test_launch_variants_get_speedups_and_their_own_summary_line():
    providers = presets.preset_providers("sweep")
    variant = "attnforge-prefill[m64-n64-w4-st3]"
    cells = {
        "attnforge-prefill": {"status": "correct", "median_us": 10.0},
        variant: {"status": "correct", "median_us": 8.0},
        "sdpa-cudnn": {"status": "correct", "median_us": 12.0},
    }
    row = {"providers": cells, "kernel": "attnforge-prefill", "label": "r"}
    row["speedups"] = kernels.row_speedups(row, providers)
    assert row["speedups"][variant] == {"sdpa-cudnn": 1.5, "best-torch": 1.5, "best-torch-name": "sdpa-cudnn"}
    summary = kernels.sweep_summary([row])["speedups"]
    assert set(summary) == {"attnforge", variant} and summary["attnforge"]["best-torch"]["count"] == 1


def test_padded_rows_needle_is_key_0_which_every_valid_query_sees():
    cfg = BenchConfig(3, 4, 2, 20, 20, 64, dtype="float32", padded=True)
    case = kernels.row_cases(cfg, torch.device("cpu"), seed=3, kinds=("needle",))[0]
    assert case.kv_lens.tolist() == case.q_lens.tolist() and min(case.kv_lens.tolist()) < 20
    norms = case.k.float().norm(dim=-1).nan_to_num(posinf=0.0)  # [B, Hkv, Lkv]; padding is poisoned
    assert (norms.argmax(dim=-1) == 0).all()
