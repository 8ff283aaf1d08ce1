"""Programmatic dependent launch (Hopper): the device-side calls and the launch options, in one place.

A kernel launched with PDL may start while the kernel before it in the stream still runs. Every attnforge
kernel that is launched so calls `gdc_wait()` before it touches anything the previous kernel may write, and
calls `gdc_launch_dependents()` early so that the next one can start launching too (it waits in turn).
Before its wait, a kernel may ask L2 for what it will read (`prefetch_l2`): a hint, never a read of data the
previous kernel may still write (L2 is where every SM's writes land, so a line it holds is never stale).
"""

from __future__ import annotations

import triton
import triton.language as tl

from attnforge.environment import pdl_supported

try:  # grid dependency control, Hopper and later; newer Tritons only (pdl_supported() is False without it)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - depends on the installed Triton
    gdc_launch_dependents = gdc_wait = None

__all__ = ["gdc_launch_dependents", "gdc_wait", "pdl_options", "pdl_supported", "prefetch_l2"]


def pdl_options(on: bool) -> dict:
    """A kernel's launch keywords: its USE_PDL constant and, when on, Triton's `launch_pdl` option (callers
    decide with `pdl_supported(device)`)."""
    return {"USE_PDL": True, "launch_pdl": True} if on else {"USE_PDL": False}


@triton.jit
def prefetch_l2(ptr, nbytes, THREADS: tl.constexpr):
    """Ask L2 for the `nbytes` bytes at `ptr` (an int8 pointer; both 16-byte aligned, `nbytes` a multiple of
    16; <= 0 asks for nothing), spread over THREADS threads (one each: THREADS = 32 x num_warps), one bulk
    prefetch a thread (`cp.async.bulk.prefetch.L2`, sm_90 PTX: GPU only). Nothing is waited for."""
    piece = tl.cdiv(tl.cdiv(nbytes, THREADS), 16) * 16
    start = tl.arange(0, THREADS) * piece
    size = tl.minimum(start + piece, nbytes) - start  # <= 0: this thread asks for nothing
    tl.inline_asm_elementwise(
        asm="""{
        .reg .pred p;
        setp.gt.s32 p, $2, 0;
        @p cp.async.bulk.prefetch.L2.global [$1], $2;
        mov.u32 $0, 0;
        }""",
        constraints="=r,l,r",
        args=[ptr + start, size],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )
