"""Timed generation (bench/generation.py) and the e2e comparison whose sides take turns token by token."""

import itertools

import pytest
import torch

from attnforge.bench import e2e, generation
from attnforge.models import load_model
from attnforge.optimizer import get_optimizer

TINY = dict(num_hidden_layers=2, hidden_size=128, intermediate_size=256, num_attention_heads=4,
            num_key_value_heads=2, head_dim=64, vocab_size=512)  # fmt: skip


@pytest.fixture(scope="module")
def model():
    return load_model("qwen3-0.6b", dtype=torch.float32, device="cpu", **TINY)


@pytest.fixture
def sides(model):
    sides = e2e._Sides(model)
    previous = sides.optimizer.settings.kernels
    sides.optimizer.configure(kernels=())  # every call to torch: the tokens cannot differ between the sides
    yield sides
    sides.use("baseline")
    sides.optimizer.configure(kernels=previous)


def test_the_clock_leaves_what_runs_between_tokens_out_of_the_steps(monkeypatch):
    ticks = itertools.count(0.0, 1.0)  # every perf_counter() call: one more second
    monkeypatch.setattr(generation.time, "perf_counter", lambda: next(ticks))
    switched = []
    clock = generation.TokenClock(lambda: None, on_token=switched.append)
    for token in range(4):  # the prompt, then 3 new tokens
        clock.put(torch.tensor([token]))
    # prompt at t=0 (start 1); token 1 at 2 (switch, start 3); token 2 at 4 (start 5); token 3 at 6
    assert switched == [1, 2, 3] and clock.tokens == [1, 2, 3]
    assert clock.step_ms() == [1000.0, 1000.0]  # 4 - 3 and 6 - 5: the switches are not timed
    plain = generation.TokenClock(lambda: None)
    for token in range(3):
        plain.put(torch.tensor([token]))
    assert plain.step_ms() == [1000.0]  # without on_token a step runs from one timestamp to the next


@pytest.mark.parametrize("new_tokens", [2, 6, 7])
def test_alternating_generation_gives_each_side_its_own_steps(model, sides, new_tokens):
    ids = torch.randint(3, 500, (1, 9))
    plain = generation.generate_once(model, ids, new_tokens)
    sides.use("attnforge")
    order = []

    def switch(side):
        order.append(side)
        sides.switch(side)

    run = generation.generate_alternating(model, ids, new_tokens, switch, ("attnforge", "baseline"))
    assert run["tokens"] == plain["tokens"] and run["new_tokens"] == new_tokens
    assert order[:3] == ["attnforge", "baseline", "attnforge"][: len(order[:3])]
    steps = new_tokens - 1  # the prefill is the lead side's; then baseline, attnforge, baseline, ...
    assert len(run["baseline"]["token_ms"]) == (steps + 1) // 2
    assert len(run["attnforge"]["token_ms"]) == steps // 2
    assert run["attnforge"]["ttft_ms"] > 0 and "ttft_ms" not in run["baseline"]
    forwards = 1 + steps // 2  # attnforge's: the prefill and its decode steps, one call per layer each
    assert get_optimizer().get_stats()["calls"] == forwards * TINY["num_hidden_layers"]


def test_compare_taking_turns_token_by_token(model, sides):
    scenario = e2e.scenarios_for("quick")[0]
    result = e2e.run_scenario(model, sides, scenario, ["baseline", "attnforge"], runs=2, warmup=1,
                              vocab_size=TINY["vocab_size"], device="cpu", prompt_tokens=8, new_tokens=5,
                              interleave="tokens")  # fmt: skip
    base, forged = result["sides"]["baseline"], result["sides"]["attnforge"]
    assert base["n"] == forged["n"] == 2 and base["first_tokens"] == forged["first_tokens"]
    assert [run["turn"][0] for run in base["runs"]] == ["attnforge", "baseline"]  # who goes first alternates
    assert [("ttft_ms" in run) for run in base["runs"]] == [False, True]
    assert all(len(run["token_ms"]) == 2 for run in base["runs"] + forged["runs"])
    assert base["optimizer_stats"] == {} and forged["optimizer_stats"]["calls"] > 0
    assert {"decode_tok_s", "median_token_tok_s", "paired_step_tok_s"} <= set(result["improvement"])
    assert sides.model.config._attn_implementation == "sdpa"  # left as plain transformers


def test_the_paired_step_ratio_compares_adjacent_steps():
    """A host that halves its speed for a while moves both sides' steps alike: each pair keeps the ratio."""
    from attnforge.bench import report

    def sides(base, ours, turn=("baseline", "attnforge")):
        return {"baseline": {"runs": [{"token_ms": ms, "turn": list(turn)} for ms in base]},
                "attnforge": {"runs": [{"token_ms": ms, "turn": list(turn)} for ms in ours]}}  # fmt: skip

    timed = sides([[10.0, 20.0, 10.0], [20.0, 20.0]], [[11.0, 22.0], [22.0, 22.0, 44.0]])  # 10% slower
    assert report.paired_step_ratio(timed) == pytest.approx(1 / 1.1)
    assert report.paired_step_ratio(sides([[]], [[]])) is None
    untimed_turns = {side: {"runs": [{"token_ms": [1.0]}]} for side in ("baseline", "attnforge")}
    assert report.paired_step_ratio(untimed_turns) is None  # whole runs in turn: no adjacent steps


@pytest.mark.parametrize(
    "options, message",
    [
        ({"interleave": "sideways"}, r"interleave='sideways' is not known; accepted: \('runs', 'tokens'\)"),
        ({"interleave": "tokens", "cache": "static"}, r"needs mode='compare' and cache='dynamic' \(got "),
        ({"interleave": "tokens", "mode": "quick"}, r"got mode='quick', cache='dynamic'\)"),
    ],
)
def test_e2e_rejects_bad_interleave(options, message):
    with pytest.raises(ValueError, match=message):
        e2e.run("qwen3-0.6b", **{"mode": "compare", **options}, **TINY)


def test_the_method_line_says_how_the_sides_shared_the_time():
    order = ["baseline", "attnforge"]
    assert "token by token" in e2e._method(True, 4, 1, order, "dynamic", "tokens")
    assert "paired step" in e2e._method(True, 4, 1, order, "dynamic", "tokens")
    assert "paired step" not in e2e._method(True, 4, 1, order, "dynamic", "runs")
    assert "interleaved A B / B A" in e2e._method(True, 4, 1, order, "dynamic", "runs")
    assert "one side after the other" in e2e._method(True, 4, 1, order, "static", "runs")


def test_cli_interleave_is_refused_where_it_cannot_apply():
    from typer.testing import CliRunner

    from attnforge.bench.cli import bench_app

    def said(arguments: list[str]) -> tuple[int, str]:
        result = CliRunner().invoke(bench_app, ["e2e", *arguments])
        return result.exit_code, " ".join(result.output.split())

    code, output = said(["--backend", "mlx", "--interleave", "tokens"])
    assert code != 0 and "mlx runs take turns by whole runs only" in output
    code, output = said(["--mode", "compare", "--cache", "static", "--interleave", "tokens"])
    assert code == 1 and "needs mode='compare' and cache='dynamic'" in output
