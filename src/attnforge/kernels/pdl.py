"""Programmatic dependent launch (Hopper): the device-side calls and the launch options, in one place.

A kernel launched with PDL may start while the kernel before it in the stream still runs. Every attnforge
kernel that is launched so calls `gdc_wait()` before it touches anything the previous kernel may write, and
calls `gdc_launch_dependents()` early so that the next one can start launching too (it waits in turn).
"""

from __future__ import annotations

from attnforge.environment import pdl_supported

try:  # grid dependency control, Hopper and later; newer Tritons only (pdl_supported() is False without it)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - depends on the installed Triton
    gdc_launch_dependents = gdc_wait = None

__all__ = ["gdc_launch_dependents", "gdc_wait", "pdl_options", "pdl_supported"]


def pdl_options(on: bool) -> dict:
    """A kernel's launch keywords: its USE_PDL constant and, when on, Triton's `launch_pdl` option (callers
    decide with `pdl_supported(device)`)."""
    return {"USE_PDL": True, "launch_pdl": True} if on else {"USE_PDL": False}
