"""Kernels compiled for Hopper (sm_90) on a machine without a GPU, through Triton's ahead-of-time path and its
bundled ptxas: what a launch will need there (shared memory, registers) is known, and checked, on a CPU.

A launch whose programs need more shared memory than an SM has fails on the GPU only, when it is first
compiled; tests compile the library's default launches here so that such a default cannot land.
"""

from __future__ import annotations

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from attnforge.kernels.tma import TensorDescriptor

# Shared memory one program may take on an H100 / H200 (227 KB of the SM's 228)
HOPPER_SHARED_BYTES = 232448


def compile_sm90(kernel, constants: dict, types: dict, options: dict, divisible: tuple = ()):
    """`kernel` (a `triton.jit` function) compiled for sm_90 with `constants` (its constexprs; defaults where
    left out) and `options` (num_warps, num_stages, launch_pdl, ...); the other arguments typed from `types`
    (name -> "*bf16", "fp32", a descriptor's type from `descriptor_type`...; else "i32"). Pointers, the
    strides that are not constants and the integers named in `divisible` are taken as 16-divisible, as
    Triton's JIT specialises them where their values are. Returns Triton's compiled kernel
    (`.metadata.shared`, `.asm["sass"]`, ...)."""
    signature, attrs = {}, {}
    # constexprs the caller leaves out take their defaults, as a launch binds them
    defaults = {p.name: p.default for p in kernel.params if p.is_constexpr and p.has_default}
    constants = {**{k: v for k, v in defaults.items() if k not in constants}, **constants}
    for i, name in enumerate(kernel.arg_names):
        signature[name] = "constexpr" if name in constants else types.get(name, "i32")
        stride = name.startswith("stride_") and name not in constants
        if signature[name].startswith("*") or stride or name in divisible:
            attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def descriptor_type(shape: tuple[int, ...], block: list[int], dtype: torch.dtype = torch.bfloat16) -> str:
    """The signature type of a TMA descriptor of a `shape` tensor (contiguous, `dtype`) read in `block`
    tiles, as Triton's JIT specialises it."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    t = torch.empty(shape, dtype=dtype, device="meta")
    desc = TensorDescriptor(t, list(t.shape), list(t.stride()), block)
    return native_specialize_impl(BaseBackend, desc, False, True, True)[0]


def swap_kernel_sm90(n_weight: int, k: int, p, glu: bool = False, norm: bool = False, residual: bool = False,
                     rows: int = 8):  # fmt: skip
    """`gemv._swap_kernel` compiled as `fused_linear` launches it on Hopper for launch `p` (a `GemvParams`
    with swap=True) on `rows` rows against a bf16 weight `[n_weight, k]` (`[gate; up]` with `glu`): through
    TMA, with PDL, the fused RMSNorm where `norm`, the residual add where `residual`."""
    from attnforge.kernels import gemv  # the kernels' module sits above this one

    split = gemv.swap_split(k, p.block_k, p.split_k)[1]
    constants = gemv.swap_constants(p, split, norm, False, residual, glu, True, True, False, rows)
    constants["USE_PDL"] = True
    types = {"X": "*bf16", "WRaw": "*bf16", "Bias": "*bf16", "Gain": "*bf16", "Res": "*bf16", "Y": "*bf16",
             "Part": "*fp32", "Counters": "*i32", "eps": "fp32",
             "W": descriptor_type((n_weight, k), [p.block_n, p.block_k])}  # fmt: skip
    options = {"num_warps": p.num_warps, "num_stages": p.num_stages, "launch_pdl": True}
    return compile_sm90(gemv._swap_kernel, constants, types, options, divisible=("N", "K", "k_per_split"))
