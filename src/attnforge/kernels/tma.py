"""Host-side TMA descriptors (Hopper): whether tensors can be read through them, and the descriptor itself.

A kernel that reads K/V through TMA takes a 4-d descriptor of `[B, H, L, D]` per tensor instead of a pointer;
the Tensor Memory Accelerator copies whole tiles into shared memory and zero-fills coordinates outside the
tensor. It needs a Hopper GPU, 16-bit elements, the last dim contiguous and the other strides and the base
16-byte aligned.
"""

from __future__ import annotations

import torch

from attnforge.environment import triton_interpret

try:  # host-side TMA descriptors (triton >= 3.4)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - depends on the installed Triton
    TensorDescriptor = None


def tma_capable(device: torch.device, dtype: torch.dtype) -> bool:
    """TMA descriptors of `dtype` tensors on `device`: a Hopper (or later) GPU, not the interpreter,
    16-bit elements."""
    device = torch.device(device)
    if triton_interpret() or TensorDescriptor is None or device.type != "cuda":
        return False
    return dtype in (torch.float16, torch.bfloat16) and torch.cuda.get_device_capability(device)[0] >= 9


def tma_aligned(*tensors: torch.Tensor) -> bool:
    """Each tensor (`[B, H, L, D]` K/V, `[N, K]` weights) has its last dim contiguous, its other strides
    and its base 16-byte aligned (checked on every call of a TMA launch: kept short)."""
    for t in tensors:
        *outer, last = t.stride()
        unit = 16 // t.element_size()  # elements in 16 bytes: a power of two
        if last != 1 or t.data_ptr() % 16 or min(outer, default=1) <= 0 or any(s % unit for s in outer):
            return False
    return True


def tma_supported(*tensors: torch.Tensor) -> bool:
    """The tensors (one device and dtype) can be read through TMA descriptors."""
    return tma_capable(tensors[0].device, tensors[0].dtype) and tma_aligned(*tensors)


def descriptor(t: torch.Tensor, block: list[int]) -> TensorDescriptor:
    """A descriptor of the whole tensor `t` read in `block`-shaped tiles."""
    return TensorDescriptor(t, list(t.shape), list(t.stride()), block)
