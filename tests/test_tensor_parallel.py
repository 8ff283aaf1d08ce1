"""Tensor-parallel generation on CPU: transformers' TP over 2 gloo ranks (torchrun), attnforge's attention,
against one process with eager attention; the `--tp` checks; the mask hook under split heads.

On CPU conftest.py sets TRITON_INTERPRET=1 and the ranks inherit it: attnforge's Triton kernels run on each
rank through the interpreter (the statistics below say which kernel), not a torch fallback.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers' tensor parallelism needs it
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

import attnforge as af  # noqa: E402
from attnforge import cli  # noqa: E402
from attnforge.integrations import tensor_parallel as tp  # noqa: E402
from attnforge.integrations import transformers as integration  # noqa: E402
from attnforge.optimizer import get_optimizer  # noqa: E402

SRC = Path(__file__).resolve().parents[1] / "src"
NEW_TOKENS = 5
PROMPT = 20  # > 16: the prompt goes to the prefill kernel, each new token to the decode kernel
LOGITS_RTOL = 1e-5
# 4 query heads, 2 key/value heads: 2 and 1 per rank at TP=2; vocab > 300 for the CLI's hashed prompt words
TINY_LLAMA = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, head_dim=64,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
RANK_SCRIPT = """
    import sys, torch, torch.distributed as dist
    import attnforge as af
    from attnforge.integrations import tensor_parallel as tp
    from attnforge.optimizer import get_optimizer

    rank = tp.init_distributed()
    af.configure_optimizer(require_measurement=False)  # kernels for these tiny shapes on CPU too
    model = tp.load_tensor_parallel(sys.argv[1], dtype=torch.float32)
    ids = torch.load(sys.argv[2])
    with torch.no_grad():
        logits = model(ids).logits
    tokens = tp.greedy_generate(model, ids, int(sys.argv[3]))
    counts = dict(get_optimizer().get_stats()["by_kernel"])
    static = tp.greedy_generate(model, ids, int(sys.argv[3]), cache_implementation="static")
    local_q = model.model.layers[0].self_attn.q_proj.weight.to_local().shape[0]
    torch.save({"logits": logits, "tokens": tokens, "static": static, "stats": counts,
                "static_stats": get_optimizer().get_stats(), "local_q": local_q},
               f"{sys.argv[4]}/rank{rank.rank}.pt")
    # then the ranks' part of `attnforge generate --tp 2` (what the launcher starts), in the same group, with
    # the bundled llama3-8b architecture reduced to the tiny sizes: rank 0 builds it, saves it, removes it
    from attnforge import cli, models
    build = models.build_model
    models.build_model = lambda name, **options: build(name, **options, **TINY_LLAMA)
    cli.app(["generate", "--tp", "2", "--model", "llama3-8b", "--max-new-tokens", "3", "--prompt-tokens", "8",
             "--attention", "kernels", "--out", sys.argv[4]], standalone_mode=False)
"""


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).abs().max() / ref.abs().max())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **TINY_LLAMA)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def prompt_ids() -> torch.Tensor:
    return torch.randint(1, TINY_LLAMA["vocab_size"], (1, PROMPT), generator=torch.Generator().manual_seed(1))


def _environment() -> dict:
    paths = [str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "TRITON_INTERPRET": "1"}


@pytest.fixture(scope="module")
def tp2_run(checkpoint, prompt_ids, tmp_path_factory) -> tuple[list[dict], str]:
    """Each rank's logits, greedy tokens and attnforge statistics from a 2-rank gloo run under torchrun, and
    what rank 0 printed for `attnforge generate --tp 2` in the same run."""
    work = tmp_path_factory.mktemp("tp2")
    script = work / "rank.py"
    script.write_text(f"TINY_LLAMA = {TINY_LLAMA!r}\n" + textwrap.dedent(RANK_SCRIPT))
    torch.save(prompt_ids, work / "ids.pt")
    command = [*tp.LAUNCHER, "--nproc-per-node", "2", str(script), str(checkpoint), str(work / "ids.pt"),
               str(NEW_TOKENS), str(work)]  # fmt: skip
    (work / "tmp").mkdir()
    environment = {**_environment(), "COLUMNS": "200", "TMPDIR": str(work / "tmp")}
    done = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [torch.load(work / f"rank{rank}.pt") for rank in range(2)], done.stdout, work


@pytest.fixture(scope="module")
def tp2_ranks(tp2_run) -> list[dict]:
    return tp2_run[0]


def test_tp2_logits_and_greedy_tokens_match_one_process(checkpoint, prompt_ids, tp2_ranks):
    reference = AutoModelForCausalLM.from_pretrained(checkpoint, attn_implementation="eager").eval()
    with torch.no_grad():
        logits = reference(prompt_ids).logits
    tokens = tp.greedy_generate(reference, prompt_ids, NEW_TOKENS)
    for rank in tp2_ranks:
        assert rank["local_q"] == 2 * TINY_LLAMA["head_dim"]  # 2 of the 4 query heads on each rank
        assert relative_error(rank["logits"], logits) <= LOGITS_RTOL
        assert torch.equal(rank["tokens"], tokens)
        assert torch.equal(rank["static"], tokens)  # StaticCache: the kernels get valid lengths (kv_lens)


def test_tp2_attnforge_kernels_ran_on_each_rank(tp2_ranks):
    layers = TINY_LLAMA["num_hidden_layers"]
    for rank in tp2_ranks:
        # logits pass + generate's prefill: prefill kernel; 4 decode steps: decode kernel; per layer
        assert rank["stats"] == {"prefill": 2 * layers, "decode": (NEW_TOKENS - 1) * layers}
        # then with a StaticCache: one more prefill, 4 more decode steps, nothing sent to torch
        static = rank["static_stats"]
        assert static["by_kernel"] == {"prefill": 3 * layers, "decode": 2 * (NEW_TOKENS - 1) * layers}, static
        assert static["fallbacks"] == 0, static


def test_cli_generate_tp2_ranks_print_tokens_timing_and_each_rank(tp2_run):
    out = tp2_run[1]
    assert "llama3-8b (random weights), torch.float32, tensor-parallel over 2 ranks (gloo), " in out
    assert "attn_implementation=attnforge" in out
    assert not list((tp2_run[2] / "tmp").glob("attnforge-tp-*"))  # the temporary checkpoint is gone
    assert "3 tokens | TTFT" in out and "TP=2 on cpu" in out
    assert out.count("attnforge attention calls") == 2  # rank 0 prints, once, a line per rank
    assert "rank 1: attnforge attention calls" in out and "decode" in out
    (result,) = tp2_run[2].glob("tp-llama3-8b-tp2-attnforge-*.json")
    doc = json.loads(result.read_text())
    assert doc["random_weights"] and doc["tp"] == 2 and doc["backend"] == "gloo" and doc["prompt_tokens"] == 8
    assert [len(rank["tokens"]) for rank in doc["ranks"]] == [3, 3]
    assert doc["ranks"][0]["tokens"] == doc["ranks"][1]["tokens"]
    assert all(rank["decode_tok_s"] > 0 and rank["stats"]["by_kernel"]["decode"] > 0 for rank in doc["ranks"])


def test_cli_generate_tp_launches_torchrun_with_its_options(checkpoint, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    calls = []
    monkeypatch.setattr(tp.subprocess, "call", lambda command, env: calls.append((command, env)) or 0)
    result = invoke(["generate", "--tp", "2", "--model", str(checkpoint), "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.output
    ((command, env),) = calls
    assert command[:7] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           "2", "-m"]  # fmt: skip
    assert command[7:11] == ["attnforge.cli", "generate", "--tp", "2"]
    assert "--max-new-tokens" in command and env["NCCL_NVLS_ENABLE"] == "0"


def invoke(args):
    return CliRunner().invoke(cli.app, args)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tp", "0"], "tp_size=0: the tensor-parallel size must be at least 1"),
        (["--tp", "3"], "tp_size=3 does not divide the head counts: num_attention_heads=4, "
                        "num_key_value_heads=2 (sizes that do: [1, 2])"),
        (["--tp", "2", "--temperature", "0.7"], "not supported with --tp: --temperature"),
        (["--tp", "2", "--tune"], "not supported with --tp: --tune"),
        (["--tp", "2", "--attention", "fast"], "--attention 'fast': with --tp one of"),
        (["--out", "results"], "--out records a --tp run"),
    ],
)  # fmt: skip
def test_cli_generate_tp_refuses_bad_requests_before_launching(checkpoint, monkeypatch, args, message):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(tp.subprocess, "call", lambda *a, **k: pytest.fail("launched"))
    result = invoke(["generate", "--model", str(checkpoint), *args])
    assert result.exit_code == 2
    assert message in result.output


def test_cli_generate_tp_refuses_more_ranks_than_gpus(checkpoint, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(tp.subprocess, "call", lambda *a, **k: pytest.fail("launched"))
    result = invoke(["generate", "--model", str(checkpoint), "--tp", "2"])
    assert result.exit_code == 2
    assert "tp_size=2: only 1 CUDA GPU(s) here (one rank per GPU)" in result.output


@pytest.fixture
def clean_optimizer():
    get_optimizer().reset()
    af.configure_optimizer(require_measurement=False)
    yield
    af.configure_optimizer(require_measurement=True, min_heads=1)
    get_optimizer().reset()


def test_mask_hook_decides_for_the_local_heads(clean_optimizer):
    """With min_heads=4 a 4-head model's calls qualify, but its TP=2 ranks see 2 heads each: the mask hook
    must then give transformers' own mask (the attention calls go to torch), not kernel ranges."""
    af.configure_optimizer(min_heads=4)
    config = AutoConfig.for_model("llama", **TINY_LLAMA)
    arguments = dict(batch_size=1, q_length=4, kv_length=32, q_offset=torch.tensor(4), kv_offset=0,
                     dtype=torch.float32, config=config)  # fmt: skip
    assert integration.attnforge_mask(**arguments).dtype == torch.int32  # whole model: kernel ranges
    integration.note_head_shards(config, 2)
    assert integration.head_shards(config) == 2
    assert integration.attnforge_mask(**arguments).dtype == torch.bool  # 2 local heads: sdpa's mask
    integration.note_head_shards(config, 1)
    assert integration.head_shards(config) == 1


def test_attention_learns_the_head_split_from_its_tensors(clean_optimizer):
    """A model sharded some other way: the first call with H/2 query heads records the split for the hook."""
    config = AutoConfig.for_model("llama", **TINY_LLAMA)
    module = torch.nn.Module()
    module.config, module.is_causal = config, True
    q, k, v = torch.randn(1, 2, 3, 64), torch.randn(1, 1, 3, 64), torch.randn(1, 1, 3, 64)
    out, _ = integration.attnforge_attention(module, q, k, v, None)
    assert out.shape == (1, 3, 2, 64)
    assert integration.head_shards(config) == 2
