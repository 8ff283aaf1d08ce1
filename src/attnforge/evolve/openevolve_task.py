"""`attnforge evolve openevolve`: an OpenEvolve task for attnforge's kernels, and a run of it.

`write_task` writes a directory that OpenEvolve (the `openevolve` package, an extra: `pip install
attnforge[evolve]`) runs as it is:
  initial_program.py  the self-contained kernel (evolve/programs/), its kernels, launch parameters and host
                      code between `# EVOLVE-BLOCK-START` and `# EVOLVE-BLOCK-END`
  evaluator.py        evaluate and evaluate_stage1/2/3, each calling attnforge's evaluator (a child process
                      per candidate, judged against the float64 oracle; see evolve/evaluator.py)
  task.json           the evaluator's task (shapes, dtype, timing)
  config.yaml         OpenEvolve's configuration for an OpenAI-compatible endpoint (api_base set on every
                      model, the API key read from an environment variable)
`run_task` runs OpenEvolve in a child process (it installs signal and root-logger handlers) and reads the
outcome back from its files: its exit status is 0 even when every LLM call failed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from attnforge.evolve.programs import initial_program
from attnforge.evolve.tasks import Task

OUTPUT = "openevolve_output"
SYSTEM_MESSAGE = """You optimize a Triton {kind} attention kernel for NVIDIA Hopper GPUs (H100/H200).
The program defines attention(q, k, v, *, scale=None, causal=True, kv_lens=None) -> [B, Hq, Lq, D]:
q [B, Hq, Lq, D], k/v [B, Hkv, Lkv, D] (GQA: Hq % Hkv == 0), causal alignment bottom-right (query i sees
keys <= kv_lens[b] - Lq + i), keys at or beyond kv_lens[b] must never be read (they hold NaN).
Every candidate is checked against a float64 oracle on fresh random inputs (needles at the last visible key,
NaN padding, odd sizes, strided inputs, repeated calls with new values in the same buffers) before it is
timed; any wrong output scores 0. Timing uses CUDA events on the default stream with a cold L2 and a new
query for every call, and checks timed outputs afterwards: caching, skipping work, side streams, lower
precision or changing the inputs all score 0. Improve speed: tile sizes, split counts, warps, pipeline
stages, how query heads are packed, how partial results are merged. Reply with SEARCH/REPLACE diffs."""


def task_config(kind: str, *, api_base: str, model: str, api_key_env: str, iterations: int, seed: int,
                islands: int, timeout_s: float) -> dict:  # fmt: skip
    """OpenEvolve's configuration: every model carries api_base and api_key (a model without them falls back
    to OPENAI_BASE_URL or the public endpoint), retries and timeouts set, attnforge's cascade thresholds."""
    key = "${" + api_key_env + "}"
    endpoint = {"api_base": api_base, "api_key": key, "timeout": 300, "retries": 2, "retry_delay": 5}
    return {
        "max_iterations": iterations,
        "random_seed": seed,
        "checkpoint_interval": 1,
        "diff_based_evolution": True,
        "max_code_length": 40000,
        "language": "python",
        "llm": {
            **endpoint,
            "temperature": 0.7,
            "max_tokens": 8192,
            "models": [{"name": model, "weight": 1.0, **endpoint}],
        },  # fmt: skip
        "prompt": {"system_message": SYSTEM_MESSAGE.format(kind=kind), "include_artifacts": True},
        "database": {"population_size": 200, "archive_size": 20, "num_islands": islands, "random_seed": seed},
        "evaluator": {
            "timeout": int(timeout_s) + 120,
            "cascade_evaluation": True,
            "cascade_thresholds": [0.5, 0.75],
            "parallel_evaluations": 1,
            "max_retries": 0,
            "enable_artifacts": True,
        },  # fmt: skip
    }


EVALUATOR = '''"""OpenEvolve evaluator for attnforge's {kind} task (written by `attnforge evolve openevolve`).

Every function runs attnforge's evaluator: the candidate in its own process under a hard time limit, its
outputs judged in this one against a float64 oracle on inputs drawn after it was loaded. evaluate_stage1:
import, compile, one case; evaluate_stage2: and the whole correctness protocol; evaluate_stage3 (and
evaluate): and the timing (combined_score = geometric-mean speed-up, 0 if anything was wrong).
"""

import json
from pathlib import Path

from openevolve.evaluation_result import EvaluationResult

from attnforge.evolve.evaluator import evaluate as attnforge_evaluate
from attnforge.evolve.tasks import Task

TASK = Task.from_dict(json.loads(Path(__file__).with_name("task.json").read_text()))


def _run(program_path, stages):
    result = attnforge_evaluate(program_path, TASK, stages=stages)
    return EvaluationResult(metrics=result.metrics, artifacts=result.artifacts)


def evaluate(program_path):
    return _run(program_path, 3)


def evaluate_stage1(program_path):
    return _run(program_path, 1)


def evaluate_stage2(program_path):
    return _run(program_path, 2)


def evaluate_stage3(program_path):
    return _run(program_path, 3)
'''


def write_task(kind: str, out_dir: str | os.PathLike, task: Task, *, api_base: str, model: str,
               api_key_env: str = "OPENAI_API_KEY", iterations: int = 50, seed: int = 42,
               islands: int = 2) -> Path:  # fmt: skip
    """Write the task directory (see the module docstring); returns it."""
    import yaml

    if task.kind != kind:
        raise ValueError(f"task kind {task.kind!r} does not match kind={kind!r}")
    if iterations < 1 or islands < 1:
        raise ValueError(f"iterations={iterations} and islands={islands} must be >= 1")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", api_key_env):
        raise ValueError(f"api_key_env={api_key_env!r} is not an environment variable name")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "initial_program.py").write_text(initial_program(kind))
    (out / "evaluator.py").write_text(EVALUATOR.format(kind=kind))
    (out / "task.json").write_text(json.dumps(task.to_dict(), indent=1) + "\n")
    config = task_config(kind, api_base=api_base, model=model, api_key_env=api_key_env, iterations=iterations,
                         seed=seed, islands=islands, timeout_s=task.timeout_s)  # fmt: skip
    (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False, width=110))
    return out


def run_task(task_dir: str | os.PathLike, *, iterations: int | None = None, timeout_s: float | None = None,
             api_key_env: str = "OPENAI_API_KEY") -> dict:  # fmt: skip
    """Run OpenEvolve on a task directory in a child process; the outcome read back from its output files:
    {best_score, best_program, initial_score, programs: [{iteration, score, reason}], llm_failures, error}."""
    task_dir = Path(task_dir).resolve()
    output = task_dir / OUTPUT
    env = dict(os.environ)
    env.setdefault(api_key_env, "unused")  # a local server takes any key; OpenEvolve insists on one
    code = "import sys; from attnforge.evolve.openevolve_task import _child; _child(*sys.argv[1:])"
    args = [sys.executable, "-c", code, str(task_dir), str(output), str(iterations or 0)]
    with open(task_dir / "openevolve-run.log", "wb") as log:
        process = subprocess.Popen(args, cwd=task_dir, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return {**summarize(output), "error": f"OpenEvolve ran past {timeout_s:.0f} s and was stopped"}
    summary = summarize(output)
    if process.returncode != 0 and not summary.get("error"):
        summary["error"] = f"OpenEvolve's process exited with status {process.returncode}"
    return summary


def _child(task_dir: str, output: str, iterations: str) -> None:
    """In the child process: run OpenEvolve and write summary.json. Its worker processes are spawned, not
    forked: the evaluator may have initialized CUDA here (the initial program is judged in this process)."""
    import multiprocessing

    from openevolve.api import run_evolution

    multiprocessing.set_start_method("spawn", force=True)
    from openevolve.config import Config

    folder = Path(task_dir)
    Path(output).mkdir(parents=True, exist_ok=True)
    config = Config.from_yaml(folder / "config.yaml")
    try:
        result = run_evolution(
            initial_program=str(folder / "initial_program.py"), evaluator=str(folder / "evaluator.py"),
            config=config, iterations=int(iterations) or None, output_dir=output, cleanup=False,
        )  # fmt: skip
        summary = {"best_score": result.best_score}
    except Exception as error:  # noqa: BLE001 - reported through the summary, read by the parent
        summary = {"error": f"{type(error).__name__}: {error}"}
    (Path(output) / "summary.json").write_text(json.dumps(summary))


def summarize(output: str | os.PathLike) -> dict:
    """An OpenEvolve output directory's outcome: the best program and score, each program's score and why."""
    output = Path(output)
    summary = json.loads((output / "summary.json").read_text()) if (output / "summary.json").exists() else {}
    checkpoints = sorted(
        (output / "checkpoints").glob("checkpoint_*"), key=lambda p: int(p.name.split("_")[-1])
    )
    programs = []
    if checkpoints:
        for path in (checkpoints[-1] / "programs").glob("*.json"):
            program = json.loads(path.read_text())
            artifacts = json.loads(program.get("artifacts_json") or "{}")
            programs.append({"iteration": program.get("iteration_found", 0), "id": program["id"],
                             "score": program.get("metrics", {}).get("combined_score", 0.0),
                             "reason": artifacts.get("reason", ""), "code": program["code"]})  # fmt: skip
    programs.sort(key=lambda p: p["iteration"])
    best = output / "best" / "best_program.py"
    logs = (
        "".join(p.read_text(errors="replace") for p in (output / "logs").glob("*.log"))
        if (output / "logs").exists()
        else ""
    )
    return {**summary, "best_program": str(best) if best.exists() else None,
            "initial_score": next((p["score"] for p in programs if p["iteration"] == 0), None),
            "programs": programs, "llm_failures": logs.count("LLM generation failed")}  # fmt: skip
