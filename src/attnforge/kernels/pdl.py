"""Programmatic dependent launch (Hopper): the device-side calls and the launch options, in one place.

A kernel launched with PDL may start while the kernel before it in the stream still runs. Every attnforge
kernel that is launched so calls `gdc_wait()` before it touches anything the previous kernel may write, and
calls `gdc_launch_dependents()` early so that the next one can start launching too (it waits in turn).
"""

from __future__ import annotations

import triton
import triton.language as tl

from attnforge.environment import pdl_supported

try:  # grid dependency control, Hopper and later; newer Tritons only (pdl_supported() is False without it)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - depends on the installed Triton
    gdc_launch_dependents = gdc_wait = None

__all__ = ["gdc_launch_dependents", "gdc_wait", "pdl_options", "pdl_supported", "warm_l2"]


def pdl_options(on: bool) -> dict:
    """A kernel's launch keywords: its USE_PDL constant and, when on, Triton's `launch_pdl` option (callers
    decide with `pdl_supported(device)`)."""
    return {"USE_PDL": True, "launch_pdl": True} if on else {"USE_PDL": False}


@triton.jit
def warm_l2(ptrs, nbytes, mask):
    """Ask the L2 for `nbytes` (a multiple of 16) from each of `ptrs` (16-byte aligned) where `mask`: Hopper's
    bulk prefetch (`cp.async.bulk.prefetch.L2`), which no thread waits for. Issued before `gdc_wait()` for
    what the kernel before cannot write (weights), the DRAM reads run under that kernel's tail and the reads
    after the wait find the L2. Compiled code only (no interpreter)."""
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.b32 p, $3, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; "
        "mov.u32 $0, 0; }",
        "=r,l,r,r", [ptrs, nbytes, mask.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1,
    )  # fmt: skip
