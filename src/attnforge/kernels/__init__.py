"""attnforge's attention kernels (Triton) and torch baselines (reference.py)."""

from __future__ import annotations

from collections.abc import Callable

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
