"""Score a candidate attention program so that a search can trust the score: `evaluate(program, task)`.

The candidate (a Python file defining `attention(q, k, v, *, scale=None, causal=True, kv_lens=None)`, free to
contain `@triton.jit` kernels) runs in its own process (`_runner.py`): a scratch directory, its own process
group, a wall-clock limit, an address-space cap without CUDA. That process only sends back outputs and timing
samples; this one judges them against the float64 oracle, on inputs it draws itself from the evaluation's seed
(a new one every call). Nothing the candidate wrote is imported here. A crash, hang, CUDA fault or timeout
scores 0 with the reason in the artifacts.

Cascade: stage 1 imports the program and runs one small case (compiler errors land here); stage 2 runs the
whole correctness protocol of verify.py at every check shape plus probes for caching tricks; stage 3 times it
interleaved with attnforge's kernel and torch's paths, a new query for every timed call, default stream only,
then checks timed outputs chosen after the timing. `combined_score` is the geometric-mean speed-up over the
fastest baseline if every check passed, else 0; on a CPU without timing a correct program scores 1.0.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from attnforge import verify
from attnforge.evolve import tasks
from attnforge.evolve.tasks import Task, default_task

ROOT = Path(__file__).resolve().parents[2]  # the directory holding the attnforge package
# The runner's first lines: the scratch directory off sys.path (a file the candidate writes there cannot
# shadow a module; not `python -I`, which would also drop a user site-packages holding torch), its limits
# (hard, so the candidate cannot lift them; set here, not in a preexec_fn, which is unsafe in a threaded
# parent such as OpenEvolve's evaluation threads), then the runner. argv: package root, scratch directory,
# address-space cap (0: none).
BOOT = """
import os, resource, sys
sys.path[:] = [p for p in sys.path if p not in ("", ".", os.getcwd())]  # nothing in the scratch directory
def cap(kind, value):
    hard = resource.getrlimit(kind)[1]
    value = value if hard == resource.RLIM_INFINITY else min(value, hard)
    resource.setrlimit(kind, (value, value))
cap(resource.RLIMIT_CORE, 0)
cap(resource.RLIMIT_FSIZE, 2**31)
if int(sys.argv[3]):
    cap(resource.RLIMIT_AS, int(sys.argv[3]))
sys.path.insert(0, sys.argv[1])
from attnforge.evolve._runner import main
main(sys.argv[2])
"""
# Timed outputs checked after the timing, per shape (chosen then, at random), besides the stream check.
TIMED_CHECKS = 4
# A decode call timed below this fraction of the memory-read floor did not do the work it claims.
FLOOR_FRACTION = 0.9
# No GPU here does more bf16 tensor-core work than this (H100/H200 SXM: 989 TFLOP/s dense): a prefill call
# timed faster than its FLOPs at this rate did not do them.
PEAK_FLOPS = 1.0e15
SUSPICIOUS_SPEEDUP = 10.0


@dataclass
class EvaluationResult:
    """`metrics`: numbers only (combined_score, stage, correct, cases, worst_rel_l2, speed-ups, seconds);
    `artifacts`: text (reason, failures, compile errors, timing method, runner log tail)."""

    metrics: dict = field(default_factory=dict)
    artifacts: dict = field(default_factory=dict)

    @property
    def score(self) -> float:
        return float(self.metrics.get("combined_score", 0.0))

    @property
    def reason(self) -> str:
        return str(self.artifacts.get("reason", ""))


class _Rejected(Exception):
    """The candidate failed; the message is the reason."""


def evaluate(program_path: str | os.PathLike, task: Task | None = None, *, stages: int = 3,
             seed: int | None = None) -> EvaluationResult:  # fmt: skip
    """Run the cascade up to `stages` (1, 2 or 3) on a candidate program and score it.

    Args:
        program_path: a Python file defining `attention(q, k, v, *, scale=None, causal=True, kv_lens=None)`
            with the task kind's semantics (DESIGN.md: bottom-right causal, kv_lens, GQA).
        task: shapes, dtype, timing; default `default_task("decode")` for this machine.
        stages: the last stage to run; 1 and 2 give combined_score 1.0 when passed.
        seed: the inputs' seed; default a new random one (recorded in the artifacts).

    Returns:
        EvaluationResult; never raises for anything the candidate does.
    """
    task = task or default_task("decode")
    if stages not in (1, 2, 3):
        raise ValueError(f"stages={stages} is not one of 1, 2, 3")
    program = Path(program_path)
    if not program.is_file():
        raise FileNotFoundError(f"program {program} does not exist")
    seed = secrets.randbits(62) if seed is None else seed
    mode = task.timing_mode(torch.cuda.is_available())
    run = _Evaluation(task, seed, mode, stages)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="attnforge-eval-", ignore_cleanup_errors=True) as scratch:
        shutil.copyfile(program, Path(scratch) / "candidate.py")
        runner = _Runner(Path(scratch), task, mode, stages if (stages < 3 or mode != "none") else 2)
        try:
            run.cascade(runner)
        except _Rejected as error:
            run.reject(str(error))
        finally:
            runner.stop()
            run.artifacts["runner_log"] = runner.log_tail()
    run.metrics["seconds"] = round(time.monotonic() - started, 2)
    return EvaluationResult(run.metrics, run.artifacts)


# ----------------------------------------------------------------------------------------------------------
# The candidate's process


class _Runner:
    """The runner process: started at once, stopped (its whole process group killed) at the end."""

    def __init__(self, scratch: Path, task: Task, mode: str, stages: int) -> None:
        import json

        self.scratch, self.deadline = scratch, time.monotonic() + task.timeout_s
        request = {
            "task": task.to_dict(),
            "timing": mode,
            "stages": stages,
            "program": str(scratch / "candidate.py"),
        }  # no seed: each stage's comes when it starts
        (scratch / "request.json").write_text(json.dumps(request))
        self.log = open(scratch / "runner.log", "wb")  # noqa: SIM115 - closed in stop()
        cap = 0 if (torch.cuda.is_available() or task.memory_gib is None) else int(task.memory_gib * 2**30)
        self.process = subprocess.Popen(
            [sys.executable, "-c", BOOT, str(ROOT), str(scratch), str(cap)], cwd=scratch,
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    def wait_for(self, name: str, stage: int, *alternatives: str) -> Path:
        """The runner's file `name` (or the first of `alternatives` to appear); _Rejected if the runner dies
        or the time limit passes first."""
        paths = [self.scratch / n for n in (name, *alternatives)]
        while not any(p.exists() for p in paths):
            code = self.process.poll()
            if code is not None and not any(p.exists() for p in paths):
                raise _Rejected(f"stage {stage}: the candidate's process {_exit_text(code)}")
            if time.monotonic() > self.deadline:
                raise _Rejected(f"stage {stage}: timed out (the candidate's process ran past its limit)")
            time.sleep(0.01)
        return next(p for p in paths if p.exists())

    def send(self, name: str, text: str = "") -> None:
        (self.scratch / f"{name}.tmp").write_text(text)
        os.replace(self.scratch / f"{name}.tmp", self.scratch / name)

    def stop(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self.log.close()

    def log_tail(self, limit: int = 4000) -> str:
        text = (self.scratch / "runner.log").read_bytes().decode(errors="replace")
        return text if len(text) <= limit else "..." + text[-limit:]


def _exit_text(code: int) -> str:
    if code < 0:
        return f"died from signal {signal.Signals(-code).name}"
    return f"exited with status {code} before finishing"


# ----------------------------------------------------------------------------------------------------------
# Judging


class _Evaluation:
    """The verdict as it builds up, stage by stage."""

    def __init__(self, task: Task, seed: int, mode: str, stages: int) -> None:
        self.task, self.seed, self.mode, self.stages = task, seed, mode, stages
        self.metrics = {"combined_score": 0.0, "stage": 0, "correct": 0, "cases_passed": 0, "cases_total": 0,
                        "worst_rel_l2": 0.0, "timed": 0}  # fmt: skip
        self.artifacts = {"seed": str(seed), "task": f"{task.kind} {task.dtype}", "reason": ""}
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def reject(self, reason: str) -> None:
        self.metrics["combined_score"] = 0.0
        self.metrics["correct"] = 0
        self.artifacts["reason"] = reason

    def stage_seed(self, stage: int) -> int:
        """The seed of stage N's inputs, sent to the runner only when the stage starts."""
        return tasks.seed_for(self.seed, "stage-seed", stage)

    def cascade(self, runner: _Runner) -> None:
        if runner.wait_for("loaded", 1, "stage1.json").name == "loaded":
            runner.send("go1", str(self.stage_seed(1)))
        for stage in range(1, min(self.stages, 2) + 1):
            if stage > 1:
                runner.send(f"go{stage}", str(self.stage_seed(stage)))
            self._correctness(stage, runner)
            self.metrics["stage"] = stage
        self.metrics["correct"] = 1
        if self.stages < 3:
            self.metrics["combined_score"] = 1.0
            self.artifacts["reason"] = f"passed stages 1-{self.stages} (no timing asked for)"
            return
        if self.mode == "none":
            self.metrics["combined_score"] = 1.0
            why = self._why_untimed()
            self.artifacts["timing"] = f"no timing: {why} (correctness only; a correct program scores 1.0)"
            self.artifacts["reason"] = "correct; not timed"
            return
        runner.send("go3", str(self.stage_seed(3)))
        self._timing(runner)

    def _why_untimed(self) -> str:
        if not self.task.time_shapes:
            return "the task has no timed shapes"
        if self.task.timing == "none":
            return "the task asks for none (timing='none')"
        return "no CUDA device"

    def _correctness(self, stage: int, runner: _Runner) -> None:
        import json

        info = json.loads(runner.wait_for(f"stage{stage}.json", stage).read_text())
        if info.get("load_error"):
            self.artifacts["compile_error"] = info["load_error"]
            raise _Rejected(f"stage 1: {info['load_error'].splitlines()[0]}")
        if info.get("tampered"):
            raise _Rejected(f"stage {stage}: the program replaced {', '.join(info['tampered'][:5])}")
        results = _load(runner.scratch / f"stage{stage}.pt")
        calls = tasks.stage_calls(self.task, self.stage_seed(stage), stage)
        if len(results) != len(calls):
            raise _Rejected(f"stage {stage}: {len(results)} results for {len(calls)} calls")
        failures, worst = [], 0.0
        for call, result in zip(calls, results, strict=True):
            verdict = self._judge_call(call, result)
            if verdict.passed:
                worst = max(worst, verdict.max_rel_l2)
            else:
                failures.append(f"{call.name} ({call.case.describe()}): {verdict.reason}")
                if stage == 1 and "raised" in verdict.reason:
                    self.artifacts["compile_error"] = verdict.reason
        self.metrics["cases_total"] += len(calls)
        self.metrics["cases_passed"] += len(calls) - len(failures)
        self.metrics["worst_rel_l2"] = max(self.metrics["worst_rel_l2"], worst)
        if failures:
            self.artifacts["failures"] = "\n".join(failures[:20])
            raise _Rejected(
                f"stage {stage}: {len(failures)} of {len(calls)} cases failed; first: {failures[0]}"
            )

    def _judge_call(self, call: tasks.Call, result: dict) -> verify.Report:
        case = call.case
        if result.get("error"):
            return verify.Report(case.describe(), False, math.inf, 0.0, reason=result["error"])
        if result.get("mutated"):
            written = ", ".join(result["mutated"])
            return verify.Report(
                case.describe(), False, math.inf, 0.0, reason=f"wrote into its inputs ({written})"
            )
        verdict = verify.judge(_case_on(case, self.device), _to(result.get("output"), self.device))
        if result.get("changed_after_return"):  # the cause, whether or not the early copy was right
            why = "the output changed after the call returned (work left running: side stream or thread)"
            return verify.Report(case.describe(), False, math.inf, verdict.tolerance, reason=why)
        return verdict

    def _timing(self, runner: _Runner) -> None:
        import json

        info = json.loads(runner.wait_for("stage3.json", 3).read_text())
        if info.get("tampered"):
            raise _Rejected(f"stage 3: the program replaced {', '.join(info['tampered'][:5])}")
        if info.get("error"):
            raise _Rejected(f"stage 3: {info['error']}")
        chosen = [
            (i, r)
            for i in range(len(info["shapes"]))
            for r in random.Random(secrets.randbits(64)).sample(
                range(self.task.reps), min(TIMED_CHECKS, self.task.reps)
            )
        ]
        chosen += [(i, self.task.reps) for i in range(len(info["shapes"]))]  # the stream check
        runner.send("select.json", json.dumps(chosen))
        runner.wait_for("stage3.done", 3)
        self._check_timed_outputs(_load(runner.scratch / "stage3.pt"), len(chosen))
        self._score(info)

    def _check_timed_outputs(self, sent: list[dict], expected: int) -> None:
        if len(sent) != expected:
            raise _Rejected(f"stage 3: {len(sent)} of {expected} chosen timed outputs came back")
        pointers = [(item["shape"], item["data_ptr"]) for item in sent if item.get("data_ptr")]
        if len(set(pointers)) < len(pointers):
            raise _Rejected("stage 3: returned the same output buffer for different timed calls")
        drawn: dict[int, verify.Case] = {}
        for item in sent:
            index, rep = item["shape"], item["rep"]
            seed = self.stage_seed(3)
            kv = drawn.get(index) or drawn.setdefault(index, tasks.timed_kv(self.task, seed, index))
            q = tasks.timed_query(self.task, seed, index, rep)
            case = verify.Case(f"timed rep {rep}", q, kv.k, kv.v, causal=True, kv_lens=kv.kv_lens)
            what = "the stream check" if rep == self.task.reps else f"timed call {rep}"
            verdict = self._judge_call(tasks.Call(what, case), item)
            if not verdict.passed:
                self.artifacts["failures"] = (
                    f"{what} at {self.task.time_shapes[index].label}: {verdict.reason}"
                )
                raise _Rejected(f"stage 3: after timing, {what} at {self.task.time_shapes[index].label} "
                                f"was wrong: {verdict.reason}")  # fmt: skip

    def _score(self, info: dict) -> None:
        from statistics import median

        speedups, versus_attnforge, lines = [], [], []
        for shape in info["shapes"]:
            times = {name: median(values) for name, values in shape["samples"].items()}
            mine = times.pop("candidate")
            baselines = {n: t for n, t in times.items() if n.startswith("torch:")} or times
            best = min(baselines, key=baselines.get)
            self._check_floor(shape, mine, info.get("bandwidth_gbps"))
            speedup = baselines[best] / mine
            speedups.append(speedup)
            versus_attnforge.append(times["attnforge"] / mine)
            self.metrics[f"speedup_{shape['label']}"] = round(speedup, 4)
            lines.append(f"{shape['label']}: candidate {mine:.1f} us, {best} {baselines[best]:.1f} us, "
                         f"attnforge {times['attnforge']:.1f} us -> {speedup:.3f}x")  # fmt: skip
        geomean = math.exp(sum(map(math.log, speedups)) / len(speedups))
        versus = math.exp(sum(map(math.log, versus_attnforge)) / len(versus_attnforge))
        self.metrics.update(
            combined_score=round(geomean, 4), stage=3, timed=1, speedup_geomean=round(geomean, 4),
            speedup_vs_attnforge=round(versus, 4),
        )  # fmt: skip
        self.artifacts["speedups"] = "\n".join(lines)
        self.artifacts["timing"] = _method(self.mode, self.task.reps)
        suspicious = [s for s in speedups if s > SUSPICIOUS_SPEEDUP]
        self.artifacts["reason"] = "correct and timed" + (
            f"; speed-ups over {SUSPICIOUS_SPEEDUP:.0f}x against torch: treat as a bug until explained"
            if suspicious and self.mode == "cuda" else "")  # fmt: skip

    def _check_floor(self, shape: dict, mine_us: float, bandwidth_gbps: float | None) -> None:
        """A decode call cannot beat reading its keys and values once from memory; a prefill call cannot beat
        its FLOPs at the fastest tensor-core rate of any GPU here."""
        if self.mode != "cuda":
            return
        s = self.task.time_shapes[shape["index"]]
        ends = s.valid if s.valid is not None else (s.kv_len,) * s.batch
        if self.task.kind == "decode":
            if not bandwidth_gbps:
                return
            element = torch.empty((), dtype=self.task.torch_dtype).element_size()
            floor_us, what = (
                element * 2 * s.num_kv_heads * sum(ends) * s.head_dim / (bandwidth_gbps * 1e3),
                "memory-read",
            )
        else:  # causal: query i sees min(end, end - Lq + i + 1) keys
            pairs = sum(max(0, min(end, end - s.q_len + i + 1)) for end in ends for i in range(s.q_len))
            floor_us, what = 4 * s.num_heads * s.head_dim * pairs / PEAK_FLOPS * 1e6, "tensor-core"
        if mine_us < FLOOR_FRACTION * floor_us:
            raise _Rejected(f"stage 3: {shape['label']} timed at {mine_us:.1f} us, below the {what} floor "
                            f"{floor_us:.1f} us: the timed work is not the whole call (side stream, or "
                            "returned before the work was done)")  # fmt: skip


def _method(mode: str, reps: int) -> str:
    if mode == "cuda":
        return (f"CUDA events on the default stream, {reps} samples per provider interleaved with "
                "attnforge's kernel and torch's paths, 256 MiB L2 flush before each, a new query for every "
                "candidate call; medians; speed-up = fastest torch path / candidate")  # fmt: skip
    return (
        f"wall-clock of the Triton interpreter on the CPU, {reps} samples interleaved with attnforge's own "
        "kernel (not GPU time: for testing a search loop); speed-up = attnforge / candidate"
    )


def _load(path: Path):
    """Tensors and plain values written by the runner (weights_only: no code is unpickled)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def _to(t, device):
    return t.to(device) if isinstance(t, torch.Tensor) else t


def _case_on(case: verify.Case, device: torch.device) -> verify.Case:
    if device.type == "cpu":
        return case
    return verify.Case(case.name, case.q.to(device), case.k.to(device), case.v.to(device), case.scale,
                       case.causal, _to(case.kv_lens, device))  # fmt: skip
