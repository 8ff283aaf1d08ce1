"""Use an evolved decode kernel in this process, only after it passed the evaluator on this machine.

`adopt_decode_kernel(program, num_heads=, num_kv_heads=, head_dim=, dtype=)` copies the program's bytes into
a private file, runs the evaluator's correctness stages on that copy at the model's attention shapes (in a
child process), and only if every case passed imports that same copy (its hash checked again) and hands its
`attention` to the optimizer, which then runs it wherever it would run attnforge's decode kernel.
`integrations.transformers.load_and_patch_model(..., evolved_program=)` calls it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
from pathlib import Path

import torch

from attnforge.evolve.evaluator import EvaluationResult, evaluate
from attnforge.evolve.tasks import ENTRY_POINT, model_task


class EvolvedProgramRejected(ValueError):
    """An evolved program failed the evaluator's correctness stages on this machine; `result` says where."""

    def __init__(self, message: str, result: EvaluationResult) -> None:
        super().__init__(message)
        self.result = result


def adopt_decode_kernel(program: str | os.PathLike, *, num_heads: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype, cuda: bool | None = None) -> str:  # fmt: skip
    """Verify `program` at these attention shapes, then make the process-wide optimizer run it for decode.

    Returns:
        The label decisions carry ("evolved program NAME (sha256 0123abcd4567)").

    Raises:
        FileNotFoundError: no such program.
        EvolvedProgramRejected: a case failed; the message names it and the reason.
    """
    from attnforge.optimizer import get_optimizer

    source = Path(program).read_bytes()
    digest = hashlib.sha256(source).hexdigest()
    cuda = torch.cuda.is_available() if cuda is None else cuda
    folder = Path(tempfile.mkdtemp(prefix="attnforge-evolved-"))
    private = folder / f"evolved_{digest[:16]}.py"
    private.write_bytes(source)
    os.chmod(private, 0o400)
    task = model_task(num_heads, num_kv_heads, head_dim, dtype, cuda=cuda)
    result = evaluate(private, task, stages=2)
    if result.score <= 0:
        failures = result.artifacts.get("failures") or result.artifacts.get("compile_error") or ""
        where = f"{task.dtype}, {num_heads}:{num_kv_heads} heads, head_dim {head_dim}"
        message = (
            f"{program} failed the evaluator's correctness stages on this machine ({where}): {result.reason}"
        )
        raise EvolvedProgramRejected(f"{message}\n{failures}".rstrip(), result)
    if hashlib.sha256(private.read_bytes()).hexdigest() != digest:
        raise EvolvedProgramRejected(
            f"{private} changed while it was being evaluated; not loading it", result
        )
    spec = importlib.util.spec_from_file_location(private.stem, private)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    label = f"evolved program {Path(program).name} (sha256 {digest[:12]})"
    get_optimizer().use_kernel("decode", getattr(module, ENTRY_POINT), label)
    return label
