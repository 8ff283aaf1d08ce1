"""The candidate's process: load the program, call it on each stage's inputs, time it; send back data only.

Started by evaluator.py as `python -c BOOT ...` in its own process group and a scratch directory kept off
sys.path, under a wall-clock limit (and an address-space cap without CUDA). The runner never judges: outputs,
errors and timing samples go back as files (tensors written with torch.save and read back with
weights_only=True, plus JSON), and the evaluator computes the oracle in its own process. Before the candidate
is imported the runner binds what it relies on and records the functions and classes of the modules the
baselines and the timing use; after every stage it reports any that the candidate replaced.

Files: request.json (in); loaded (out: the program imported); go{N} (in: stage N's seed, sent only once the
program is loaded, so nothing it runs at import can know the inputs); stage{N}.pt + stage{N}.json (out, the
JSON written last); select.json (in: which timed outputs to send back, chosen after the timing).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import sys
import time
import traceback
import types
from pathlib import Path

import torch

from attnforge.evolve import tasks

_clone, _equal, _save, _perf, _replace = (
    torch.Tensor.clone,
    torch.equal,
    torch.save,
    time.perf_counter,
    os.replace,
)
_dumps, _sleep = json.dumps, time.sleep
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
# Modules whose functions and classes the candidate must leave alone (baselines, timing, the runner itself).
WATCHED = ("torch", "torch.nn.functional", "torch.cuda", "time", "attnforge.bench.timing",
           "attnforge.bench.providers", "attnforge.bench.tune", "attnforge.kernels.decode",
           "attnforge.kernels.prefill", "attnforge.kernels.reference", "attnforge.optimizer.runtime",
           "attnforge.evolve.tasks", "attnforge.evolve._runner")  # fmt: skip


def main(scratch: str) -> None:
    os.chdir(scratch)
    request = json.loads(Path("request.json").read_text())
    task, mode = tasks.Task.from_dict(request["task"]), request["timing"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _import_watched()
    bandwidth = _read_bandwidth() if mode == "cuda" else None
    watched = _snapshot()
    fn, error = _load(request["program"])
    if fn is None:
        _send(1, {"load_error": error}, [])
        return
    Path("loaded").write_text("")
    for stage in range(1, request["stages"] + 1):
        if not _await(f"go{stage}"):
            return
        seed = int(Path(f"go{stage}").read_text())
        if stage < 3:
            results = _run_calls(fn, tasks.stage_calls(task, seed, stage), device)
            _send(stage, {"tampered": _tampered(watched)}, results)
        else:
            _run_timing(fn, task, seed, mode, device, bandwidth, watched)


def _import_watched() -> None:
    for name in WATCHED:
        __import__(name)


def _read_bandwidth() -> float:
    from attnforge.bench import timing

    return timing.measure_read_bandwidth(gib=1.0, reps=10) / 1e9


def _snapshot() -> dict[tuple[str, str], int]:
    """Identity of every function and class of the watched modules (and of torch.Tensor's methods)."""
    spaces = {name: vars(sys.modules[name]) for name in WATCHED}
    spaces["torch.Tensor"] = vars(torch.Tensor)
    return {(space, key): id(value) for space, names in spaces.items() for key, value in list(names.items())
            if callable(value) and not isinstance(value, types.ModuleType)}  # fmt: skip


def _tampered(before: dict[tuple[str, str], int]) -> list[str]:
    now = _snapshot()
    return [f"{space}.{key}" for (space, key), ident in before.items() if now.get((space, key)) != ident]


def _load(path: str):
    """The program's entry point, or None and why (the error text, compiler messages included)."""
    try:
        spec = importlib.util.spec_from_file_location("attnforge_candidate", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except BaseException as error:  # noqa: BLE001 - a program that cannot load is a verdict
        return None, f"import failed: {type(error).__name__}: {error}\n{_tail(traceback.format_exc())}"
    fn = getattr(module, tasks.ENTRY_POINT, None)
    if not callable(fn):
        return (
            None,
            f"the program defines no callable {tasks.ENTRY_POINT}(q, k, v, *, scale, causal, kv_lens)",
        )
    return fn, ""


def _tail(text: str, limit: int = 4000) -> str:
    return text if len(text) <= limit else "..." + text[-limit:]


# ----------------------------------------------------------------------------------------------------------
# Correctness calls


def _on_device(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """`t` on `device` with its strides kept (a view of a larger buffer stays a view of its moved buffer)."""
    if t is None or t.device == device:
        return t
    if t._base is None:
        return t.to(device)
    return t._base.to(device).as_strided(t.size(), t.stride(), t.storage_offset())


def _buffers(case) -> list[torch.Tensor]:
    tensors = [case.q, case.k, case.v] + ([case.kv_lens] if case.kv_lens is not None else [])
    return [t if t._base is None else t._base for t in tensors]


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype.is_floating_point:
        view = _INT_VIEW[a.element_size()]
        return bool(_equal(a.contiguous().view(view), b.contiguous().view(view)))
    return bool(_equal(a, b))


def _run_calls(fn, calls: list[tasks.Call], device: torch.device) -> list[dict]:
    """Call the candidate on each case; per call its output (copied the moment it returned), error, whether
    the output changed after that, and which inputs it wrote into."""
    results, cases = [], []
    for call in calls:
        moved = {name: _on_device(getattr(call.case, name), device) for name in ("q", "k", "v", "kv_lens")}
        case = dataclasses.replace(call.case, **moved)
        if call.reuse is not None:  # the same buffers as an earlier call, refilled with this call's values
            earlier = cases[call.reuse]
            for mine, theirs in zip((case.q, case.k, case.v), (earlier.q, earlier.k, earlier.v), strict=True):
                theirs.copy_(mine)
            case = dataclasses.replace(case, q=earlier.q, k=earlier.k, v=earlier.v)
        cases.append(case)
        results.append(_one_call(fn, call.name, case))
    return results


def _one_call(fn, name: str, case) -> dict:
    pristine = [_clone(t) for t in _buffers(case)]
    result = {"name": name, "output": None, "error": None, "changed_after_return": False, "mutated": []}
    try:
        out = fn(case.q, case.k, case.v, **case.kwargs())
        snapshot = _clone(out) if isinstance(out, torch.Tensor) else None  # stream-ordered, at once
        if case.q.device.type == "cuda":
            torch.cuda.synchronize()
    except Exception as error:  # noqa: BLE001 - a candidate that raises (or faults) is a verdict
        result["error"] = f"raised {type(error).__name__}: {_tail(str(error), 2000)}"
        return result
    if snapshot is None:
        result["error"] = f"returned {type(out).__name__}, not a tensor"
        return result
    _sleep(0.02)  # a background thread still writing the output shows up now
    result["changed_after_return"] = not _same_bits(snapshot, out)
    result["output"] = snapshot.cpu()
    names = ["q", "k", "v", "kv_lens"]
    result["mutated"] = [
        n for n, a, b in zip(names, pristine, _buffers(case), strict=False) if not _same_bits(a, b)
    ]
    return result


# ----------------------------------------------------------------------------------------------------------
# Files exchanged with the evaluator


def _send(stage: int, info: dict, results: list[dict] | dict) -> None:
    """Write stage N's tensors, then its JSON (the evaluator waits for the JSON)."""
    _save(results, f"stage{stage}.pt.tmp")
    _replace(f"stage{stage}.pt.tmp", f"stage{stage}.pt")
    Path(f"stage{stage}.json.tmp").write_text(_dumps(info))
    _replace(f"stage{stage}.json.tmp", f"stage{stage}.json")


def _await(name: str) -> bool:
    """Wait for the evaluator's file `name` (True) or `stop` (False); the evaluator kills us at its limit."""
    while True:
        if os.path.exists("stop"):
            return False
        if os.path.exists(name):
            return True
        _sleep(0.01)


# ----------------------------------------------------------------------------------------------------------
# Timing (stage 3)


def _run_timing(fn, task: tasks.Task, seed: int, mode: str, device, bandwidth, watched) -> None:
    """Time the candidate interleaved with the baselines at each timed shape; a new query for every timed
    call of the candidate; then, at the evaluator's choice, the outputs of some timed calls."""
    info = {"mode": mode, "bandwidth_gbps": bandwidth, "shapes": [], "tampered": _tampered(watched)}
    outputs: dict[tuple[int, int], dict] = {}
    if not info["tampered"]:
        for index in range(len(task.time_shapes)):
            try:
                samples = _time_shape(fn, task, seed, index, mode, device, outputs)
            except Exception as error:  # noqa: BLE001 - the verdict says where it failed
                info["error"] = f"timing {task.time_shapes[index].label}: {type(error).__name__}: {error}"
                break
            info["shapes"].append(
                {"index": index, "label": task.time_shapes[index].label, "samples": samples}
            )
        info["tampered"] = _tampered(watched)
    Path("stage3.json.tmp").write_text(_dumps(info))
    _replace("stage3.json.tmp", "stage3.json")
    if not _await("select.json"):
        return
    chosen = json.loads(Path("select.json").read_text())
    sent = [{"shape": i, "rep": r, **outputs[(i, r)]} for i, r in chosen if (i, r) in outputs]
    _save(sent, "stage3.pt.tmp")
    _replace("stage3.pt.tmp", "stage3.pt")
    Path("stage3.done").write_text("")


def _time_shape(fn, task, seed, index, mode, device, outputs) -> dict[str, list[float]]:
    from attnforge import verify
    from attnforge.bench import timing

    mine = tasks.timed_kv(task, seed, index)
    k, v, lens = (_on_device(t, device) for t in (mine.k, mine.v, mine.kv_lens))
    q = _on_device(tasks.timed_query(task, seed, index, -1), device)
    options = {"causal": True, **({"kv_lens": lens} if lens is not None else {})}
    theirs = verify.random_case(task.time_shapes[index].attention_config(task.torch_dtype), device=device,
                                kv_lens=None if lens is None else lens.tolist())  # fmt: skip
    current = [-1]

    def candidate():
        out = fn(q, k, v, **options)
        if current[0] >= 0:
            ptr = out.data_ptr() if isinstance(out, torch.Tensor) else 0
            outputs[(index, current[0])] = {"output": out, "data_ptr": ptr}

    def prepare(name: str, rep: int) -> None:
        if name == "candidate":
            current[0] = rep
            q.copy_(tasks.timed_query(task, seed, index, rep).to(device))
        else:
            theirs.q.normal_()

    providers = {"candidate": candidate, **_baselines(task, theirs)}
    if mode == "cuda":
        samples = timing.time_interleaved(providers, reps=task.reps, warmup=3, cold_l2=True, prepare=prepare)
    else:
        samples = _time_wall(providers, task.reps, prepare)
    current[0] = -1
    for out in outputs.values():  # every timed output, as it is now (after all work finished)
        out["output"] = out["output"].cpu() if isinstance(out["output"], torch.Tensor) else None
    _stream_check(fn, task, seed, index, q, k, v, options, outputs)
    return samples


def _baselines(task: tasks.Task, case) -> dict:
    """attnforge's own kernel, and on a GPU torch's paths for the same call (each on its own inputs)."""
    from attnforge.kernels.decode import decode_attention
    from attnforge.kernels.prefill import prefill_attention

    kernel = decode_attention if task.kind == "decode" else prefill_attention
    options = {"kv_lens": case.kv_lens} if case.kv_lens is not None else {}
    calls = {"attnforge": lambda: kernel(case.q, case.k, case.v, **options)}
    if case.q.device.type == "cuda":
        from attnforge.bench.targets import torch_calls

        for name, call in torch_calls(case).items():
            try:
                call()
            except RuntimeError:  # a path torch does not offer for this call
                continue
            calls[f"torch:{name}"] = call
    return calls


def _time_wall(providers: dict, reps: int, prepare) -> dict[str, list[float]]:
    """Wall-clock samples (us), providers interleaved: the Triton interpreter on the CPU (no GPU time)."""
    for call in providers.values():
        call()
    names, samples = list(providers), {name: [] for name in providers}
    for rep in range(reps):
        for offset in range(len(names)):
            name = names[(rep + offset) % len(names)]
            prepare(name, rep)
            start = _perf()
            providers[name]()
            samples[name].append((_perf() - start) * 1e6)
    return samples


def _stream_check(fn, task, seed, index, q, k, v, options, outputs) -> None:
    """One more call with a new query; its output copied on the default stream the moment the call returns
    (work left on a side stream, or still to be done, is not in that copy)."""
    rep = task.reps
    q.copy_(tasks.timed_query(task, seed, index, rep).to(q.device))
    out = fn(q, k, v, **options)
    snapshot = _clone(out)
    if q.device.type == "cuda":
        torch.cuda.synchronize()
    outputs[(index, rep)] = {"output": snapshot.cpu(), "changed_after_return": not _same_bits(snapshot, out)}
