"""The evolve evaluator: honest programs pass every stage; each known benchmark cheat scores 0 (and why).

Every program below runs in the evaluator's child process; they are evaluated concurrently (module fixture) so
the suite stays short on two cores. The side-stream cheat needs a CUDA device (skipped without one).
"""

import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from attnforge.evolve import evaluator, tasks
from attnforge.evolve.programs import initial_program

CPU_TASK = tasks.default_task("decode", cuda=False, timing="none")

# A correct attention in float64 (bottom-right causal, kv_lens, GQA by reshaping): the honest part of a cheat.
HONEST = """
import math, os, sys, threading, time
import torch

def parts(q, k, v, scale=None, causal=True, kv_lens=None):
    b, hq, lq, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    scale = d ** -0.5 if scale is None else scale
    end = torch.full((b,), n) if kv_lens is None else kv_lens.long().cpu().clamp(0, n)
    pos, rows = torch.arange(n), torch.arange(lq)
    valid = pos[None, :] < end[:, None]
    allowed = valid[:, None, :].expand(b, lq, n)
    if causal:
        allowed = allowed & (pos[None, None, :] <= end[:, None, None] - lq + rows[None, :, None])
    kk = torch.where(valid[:, None, :, None], k.double().cpu(), 0.0)
    vv = torch.where(valid[:, None, :, None], v.double().cpu(), 0.0)
    logits = torch.einsum("bhgqd,bhkd->bhgqk", q.double().cpu().reshape(b, hkv, hq // hkv, lq, d), kk) * scale
    return logits.masked_fill(~allowed[:, None, None], -math.inf), vv

def finish(logits, vv, q):
    weights = torch.softmax(logits, -1).nan_to_num(0.0)
    out = torch.einsum("bhgqk,bhkd->bhgqd", weights, vv).reshape(q.shape)
    return out.to(device=q.device, dtype=q.dtype)

def honest(q, k, v, **options):
    return finish(*parts(q, k, v, **options), q)
"""

CHEATS = {
    "returns-zeros": ("def attention(q, k, v, **kw):\n    return torch.zeros_like(q)", "max relative L2"),
    "returns-q": ("def attention(q, k, v, **kw):\n    return q.clone()", "max relative L2"),
    "caches-by-data_ptr": (
        """
        CACHE = {}
        def attention(q, k, v, **kw):
            key = (q.data_ptr(), k.data_ptr(), v.data_ptr(), tuple(q.shape), tuple(k.shape))
            if key not in CACHE:
                CACHE[key] = honest(q, k, v, **kw)
            return CACHE[key].clone()""",
        "same-buffers-new-values",
    ),
    "caches-by-fingerprint": (
        """
        CACHE = {}
        def stats(t):
            t = t.double().nan_to_num(0.0)
            return (round(float(t.sum()), 3), round(float(t.norm()), 3))
        def attention(q, k, v, **kw):
            key = (tuple(q.shape), tuple(k.shape), stats(q), stats(k), stats(v))
            if key not in CACHE:
                CACHE[key] = honest(q, k, v, **kw)
            return CACHE[key].clone()""",
        "same-statistics",
    ),
    "skips-the-last-kv-block": (
        """
        def attention(q, k, v, *, kv_lens=None, **kw):
            n = k.shape[2]
            lens = torch.full((q.shape[0],), n) if kv_lens is None else kv_lens.long()
            return honest(q, k, v, kv_lens=(lens - 16).clamp_min(0), **kw)""",
        "max relative L2",
    ),
    "ignores-kv_lens": (
        """
        def attention(q, k, v, *, kv_lens=None, **kw):
            return honest(q, k, v, **kw)""",
        "non-finite",
    ),
    "computes-in-fp8": (
        """
        def attention(q, k, v, **kw):
            low = [t.to(torch.float8_e4m3fn).to(q.dtype) for t in (q, k, v)]
            return honest(*low, **kw)""",
        "max relative L2",
    ),
    "truncated-softmax": (
        """
        def attention(q, k, v, **kw):
            logits, vv = parts(q, k, v, **kw)
            top = logits.topk(min(8, logits.shape[-1]), -1)
            return finish(torch.full_like(logits, -math.inf).scatter(-1, top.indices, top.values), vv, q)""",
        "max relative L2",
    ),
    "returns-before-the-work-is-done": (
        """
        def attention(q, k, v, **kw):
            out = torch.full_like(q, float("nan"))
            def later():
                time.sleep(0.1)  # after the evaluator's look: it reads the NaNs
                out.copy_(honest(q, k, v, **kw))
            threading.Thread(target=later).start()
            return out""",
        "non-finite",
    ),
    "keeps-writing-after-return": (
        """
        def attention(q, k, v, **kw):
            out = honest(q, k, v, **kw)
            def later():
                for _ in range(200):
                    time.sleep(0.001)
                    out.add_(1.0)
            threading.Thread(target=later, daemon=True).start()
            return out""",
        "the output changed after the call returned",
    ),
    "writes-into-its-inputs": (
        """
        def attention(q, k, v, **kw):
            out = honest(q, k, v, **kw)
            q.mul_(0.5)
            return out""",
        "wrote into its inputs (q)",
    ),
    "reads-a-global-left-behind": (
        """
        import gc
        def attention(q, k, v, **kw):
            for obj in gc.get_objects():
                if isinstance(obj, torch.Tensor) and obj is not q and obj.shape == q.shape:
                    return obj.clone().to(q.dtype)
            return honest(q, k, v, **kw)""",
        "max relative L2",
    ),
    "fast-only-after-the-first-calls": (
        """
        SEEN = {}
        def attention(q, k, v, **kw):
            key = (tuple(q.shape), tuple(k.shape))
            SEEN[key] = SEEN.get(key, 0) + 1
            if SEEN[key] > 2:
                return torch.zeros_like(q)
            return honest(q, k, v, **kw)""",
        "max relative L2",
    ),
    "slows-the-baselines": (
        """
        import torch.nn.functional as F
        import attnforge.kernels.decode as decode
        slow_sdpa, slow_decode = F.scaled_dot_product_attention, decode.decode_attention
        F.scaled_dot_product_attention = lambda *a, **k: (time.sleep(0.001), slow_sdpa(*a, **k))[1]
        decode.decode_attention = lambda *a, **k: (time.sleep(0.001), slow_decode(*a, **k))[1]
        def attention(q, k, v, **kw):
            return honest(q, k, v, **kw)""",
        "replaced torch.nn.functional.scaled_dot_product_attention",
    ),
    "patches-the-checker": (
        """
        import attnforge.verify as verify
        verify.judge = lambda *a, **k: verify.Report("x", True, 0.0, 1.0)
        verify.check = verify.judge
        def attention(q, k, v, **kw):
            return torch.zeros_like(q)""",
        "max relative L2",
    ),
    "crashes": ("def attention(q, k, v, **kw):\n    os.abort()", "died from signal SIGABRT"),
    "exits": ("def attention(q, k, v, **kw):\n    os._exit(3)", "exited with status 3"),
    "does-not-compile": (
        """
        import triton
        import triton.language as tl
        @triton.jit
        def _kernel(X):
            tl.store(X, tl.exp3(tl.load(X)))
        def attention(q, k, v, **kw):
            x = torch.zeros(1)
            _kernel[(1,)](x)
            return honest(q, k, v, **kw)""",
        "exp3",
    ),
    "is-not-python": ("def attention(q, k, v, **kw)\n    return q", "SyntaxError"),
    "has-no-entry-point": (
        "def attend(q, k, v, **kw):\n    return honest(q, k, v, **kw)",
        "no callable attention",
    ),
    "grabs-memory": (
        """
        def attention(q, k, v, **kw):
            hoard = torch.empty(64 * 2**30, dtype=torch.uint8)
            return honest(q, k, v, **kw)""",
        "can't allocate memory",
    ),
}
HANGS = ("def attention(q, k, v, **kw):\n    time.sleep(3600)", "timed out")
# Right at every checked shape, cheap (and wrong) at the timed one: caught by outputs judged after timing.
TIMED_SHAPE_ONLY = (
    """
def attention(q, k, v, **kw):
    if k.shape[2] == 512:
        return torch.zeros_like(q)
    return honest(q, k, v, **kw)""",
    "after timing, timed call",
)
# The answer is computed first (honest() syncs: it works on the CPU); what is left on the side stream, a delay
# then the copy into the returned tensor, is not on the default stream the timing and the caller wait on.
SIDE_STREAM = """
def attention(q, k, v, **kw):
    answer = honest(q, k, v, **kw)
    out = torch.empty_like(q)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.cuda._sleep(5_000_000)
        out.copy_(answer)
    answer.record_stream(stream)  # else its memory is reused on the default stream before the copy reads it
    return out"""


def _write(directory: Path, name: str, body: str) -> Path:
    path = directory / f"{name}.py"
    path.write_text(HONEST + textwrap.dedent(body) + "\n")
    return path


@pytest.fixture(scope="module")
def verdicts(tmp_path_factory):
    """Every cheat (and the hang, with a short limit) evaluated on the CPU task, two at a time."""
    directory = tmp_path_factory.mktemp("cheats")
    jobs = {name: (_write(directory, name, body), CPU_TASK) for name, (body, _) in CHEATS.items()}
    hang_task = tasks.Task.from_dict({**CPU_TASK.to_dict(), "timeout_s": 20.0})
    jobs["hangs"] = (_write(directory, "hangs", HANGS[0]), hang_task)
    timed_task = tasks.Task.from_dict({**CPU_TASK.to_dict(), "timing": "interpreter"})
    jobs["fast-only-at-the-timed-shape"] = (_write(directory, "timed", TIMED_SHAPE_ONLY[0]), timed_task)
    with ThreadPoolExecutor(2) as pool:
        futures = {name: pool.submit(evaluator.evaluate, path, task) for name, (path, task) in jobs.items()}
        return {name: future.result() for name, future in futures.items()}


@pytest.mark.parametrize("name", [*CHEATS, "hangs", "fast-only-at-the-timed-shape"])
def test_each_cheat_scores_zero_for_its_reason(verdicts, name):
    result = verdicts[name]
    expected = {"hangs": HANGS[1], "fast-only-at-the-timed-shape": TIMED_SHAPE_ONLY[1]}.get(name) or CHEATS[
        name
    ][1]
    text = " | ".join(str(result.artifacts.get(key, "")) for key in ("reason", "failures", "compile_error"))
    assert result.score == 0.0 and result.metrics["correct"] == 0, result
    assert expected in text, text


def test_a_compiler_error_reaches_the_artifacts(verdicts):
    result = verdicts["does-not-compile"]
    assert result.metrics["stage"] == 0 and "exp3" in result.artifacts["compile_error"]


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="a side stream needs a CUDA device (GPU-only check)"
)
def test_work_on_a_side_stream_scores_zero(tmp_path):
    result = evaluator.evaluate(_write(tmp_path, "side", SIDE_STREAM), tasks.default_task("decode"))
    assert result.score == 0.0 and "side stream" in result.reason + result.artifacts.get("failures", "")


@pytest.mark.parametrize("kind", ["decode", "prefill"])
def test_the_starting_programs_pass_every_stage(tmp_path, kind):
    path = tmp_path / f"{kind}.py"
    path.write_text(initial_program(kind))
    result = evaluator.evaluate(path, tasks.default_task(kind, cuda=False, timing="none"))
    assert result.score == 1.0 and result.metrics["correct"] == 1, result
    assert result.metrics["cases_passed"] == result.metrics["cases_total"] > 20
    assert result.artifacts["timing"].startswith("no timing: the task asks for none (timing='none')")


def test_stage_one_alone_runs_one_case(tmp_path):
    path = _write(tmp_path, "honest", "def attention(q, k, v, **kw):\n    return honest(q, k, v, **kw)")
    result = evaluator.evaluate(path, CPU_TASK, stages=1)
    assert result.score == 1.0 and result.metrics["cases_total"] == 1 and result.metrics["stage"] == 1


def test_both_processes_draw_the_same_inputs():
    first = tasks.stage_calls(CPU_TASK, 7, 2)
    again = tasks.stage_calls(CPU_TASK, 7, 2)
    other = tasks.stage_calls(CPU_TASK, 8, 2)
    assert [c.name for c in first] == [c.name for c in again]
    assert all(torch.equal(a.case.q, b.case.q) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0].case.q, other[0].case.q)
    assert first[-6].reuse == len(first) - 7  # same buffers as the call before it


@pytest.mark.parametrize(
    "change, message",
    [
        ({"kind": "encode"}, "kind='encode' is not one of ('decode', 'prefill')"),
        ({"dtype": "float64"}, "dtype='float64' is not one of"),
        ({"timing": "fast"}, "timing='fast' is not one of ('auto', 'cuda', 'interpreter', 'none')"),
        ({"check_shapes": []}, "a task needs at least one check shape"),
        ({"check_shapes": [(1, 4, 2, 32, 64, 64)]}, "q_len=32 is not in 1..16"),
        ({"check_shapes": [(1, 4, 3, 1, 64, 64)]}, "num_heads=4 is not divisible by num_kv_heads=3"),
        ({"time_shapes": [(2, 4, 2, 1, 64, 64, (70, 3))]}, "valid=(70, 3) needs 2 lengths in [1, 64]"),
        ({"reps": 0}, "reps=0 must be >= 1"),
        ({"colour": "red"}, "unknown task fields ['colour']"),
    ],
)
def test_bad_tasks_are_refused_with_the_value(change, message):
    with pytest.raises(ValueError, match=None) as error:
        tasks.Task.from_dict({**CPU_TASK.to_dict(), **change})
    assert message in str(error.value)


def test_bad_evaluate_arguments_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluator.evaluate(tmp_path / "missing.py", CPU_TASK)
    (tmp_path / "p.py").write_text("")
    with pytest.raises(ValueError, match="stages=4 is not one of 1, 2, 3"):
        evaluator.evaluate(tmp_path / "p.py", CPU_TASK, stages=4)


@pytest.mark.parametrize(
    "kind, shape, fast_us, real_us",
    [
        ("decode", (1, 32, 8, 1, 4096, 128), 1.0, 8.0),  # 16.8 MB of K/V at 3 TB/s: 5.6 us
        ("decode", (1, 32, 8, 1, 32768, 128, (4096,)), 1.0, 8.0),  # only the valid keys count
        ("prefill", (1, 32, 8, 2048, 2048, 128), 20.0, 300.0),  # 70 GFLOP causal at 1 PFLOP/s: 70 us
    ],
)
def test_a_timed_call_faster_than_physics_allows_is_rejected(kind, shape, fast_us, real_us):
    task = tasks.Task(kind, "bfloat16", (shape[:6],), (shape,), timing="cuda")
    judge = evaluator._Evaluation(task, 1, "cuda", 3)
    judge._check_floor({"index": 0, "label": "x"}, real_us, 3000.0)  # passes
    with pytest.raises(evaluator._Rejected, match="below the (memory-read|tensor-core) floor"):
        judge._check_floor({"index": 0, "label": "x"}, fast_us, 3000.0)


def test_the_score_is_the_geometric_mean_speedup_over_the_fastest_torch_path():
    shape, longer = (1, 32, 8, 1, 4096, 128), (1, 32, 8, 1, 16384, 128)
    task = tasks.Task("decode", "bfloat16", (shape,), (shape, longer), timing="cuda")
    judge = evaluator._Evaluation(task, 1, "cuda", 3)
    samples_a = {"candidate": [10, 11, 9], "attnforge": [12] * 3, "torch:sdpa-gqa": [20] * 3,
                 "torch:hf-repeat_kv": [40] * 3}  # fmt: skip
    samples_b = {"candidate": [30] * 3, "attnforge": [30] * 3, "torch:sdpa-gqa": [45] * 3}
    shapes = [
        {"index": 0, "label": "a", "samples": samples_a},
        {"index": 1, "label": "b", "samples": samples_b},
    ]
    judge._score({"bandwidth_gbps": 3000.0, "shapes": shapes})
    assert judge.metrics["speedup_a"] == 2.0 and judge.metrics["speedup_b"] == 1.5
    assert judge.metrics["combined_score"] == round(3.0**0.5, 4) and judge.metrics["timed"] == 1
    assert judge.metrics["speedup_vs_attnforge"] == round(1.2**0.5, 4)
    assert "torch:sdpa-gqa 20.0 us" in judge.artifacts["speedups"]


def test_one_output_buffer_returned_for_every_timed_call_is_rejected():
    shape = (1, 4, 2, 1, 64, 64)
    judge = evaluator._Evaluation(
        tasks.Task("decode", "float32", (shape,), (shape,), timing="cuda"), 1, "cuda", 3
    )
    same = [{"shape": 0, "rep": rep, "data_ptr": 1234, "output": torch.zeros(1, 4, 1, 64)} for rep in (0, 1)]
    with pytest.raises(
        evaluator._Rejected, match="returned the same output buffer for different timed calls"
    ):
        judge._check_timed_outputs(same, 2)
