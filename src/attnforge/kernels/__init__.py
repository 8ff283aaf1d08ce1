"""attnforge's attention kernels (Triton) and torch baselines (reference.py)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

from attnforge.environment import package_version, triton_status


def _decode_as_attention(q, k, v, *, causal=True, **kwargs):
    """decode_attention under the protocol's calling convention (decode is always causal)."""
    from attnforge.kernels.decode import decode_attention

    if not causal:
        raise ValueError("decode_attention is causal among the new tokens; causal=False is not supported")
    return decode_attention(q, k, v, **kwargs)


def _prefill_as_attention(q, k, v, **kwargs):
    from attnforge.kernels.prefill import prefill_attention

    return prefill_attention(q, k, v, **kwargs)


def available_kernels(*, interpreter: bool = False) -> dict[str, Callable]:
    """attnforge kernels that can run on this machine, by name: on a CUDA GPU, or on CPU tensors while
    TRITON_INTERPRET=1 is set (empty otherwise).

    Args:
        interpreter: also count kernels that the Triton interpreter could run here once TRITON_INTERPRET=1
            is set before they are imported (as `attnforge demo` and the tests do): all of them wherever
            triton is installed.
    """
    ok, _ = triton_status()
    if ok or (interpreter and package_version("triton") is not None):
        return {"attnforge decode": _decode_as_attention, "attnforge prefill": _prefill_as_attention}
    return {}


class _Scratch(threading.local):
    temporary = False


_SCRATCH = _Scratch()


@contextlib.contextmanager
def temporary_workspaces() -> Iterator[None]:
    """Kernel calls inside (this thread) take scratch memory that lives only for the call, instead of the
    per-stream buffers kept between eager calls. For code torch.compile's CUDA graphs run: they allocate
    in their own memory pool, also while warming up, and refuse allocations that outlive a recording."""
    previous, _SCRATCH.temporary = _SCRATCH.temporary, True
    try:
        yield
    finally:
        _SCRATCH.temporary = previous


def workspaces_are_temporary() -> bool:
    """Whether this thread is inside `temporary_workspaces()`."""
    return _SCRATCH.temporary
