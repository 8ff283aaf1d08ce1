"""attnforge's attention kernels (Triton) and torch baselines (reference.py)."""

from __future__ import annotations

from collections.abc import Callable

from attnforge.environment import triton_status


def available_kernels() -> dict[str, Callable]:
    """attnforge kernels that can run on this machine, by name (empty without a GPU or TRITON_INTERPRET=1)."""
    ok, _ = triton_status()
    if not ok:
        return {}
    return {}
