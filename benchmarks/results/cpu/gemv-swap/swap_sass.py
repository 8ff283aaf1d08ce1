"""The library's swapped product (`gemv._swap_kernel`) compiled for sm_90 (Triton 3.6's ptxas, no GPU) at
the four launches `default_params` gives Qwen3-0.6B's products at 8 rows (through TMA): each launch's SASS,
registers and spills written to DIR, to compare two commits' files; `early=1` compiles EARLY=True too.
Run from the repository root:

    PYTHONPATH=<triton 3.6 site>:src python benchmarks/results/cpu/gemv-swap/swap_sass.py DIR [early=1]
"""

import os
import sys

import torch
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import BaseBackend

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "gemv-packed"))
from compile_packed import compile_sm90, registers  # noqa: E402

from attnforge.kernels import gemv  # noqa: E402
from attnforge.kernels.tma import TensorDescriptor  # noqa: E402

TYPES = {"X": "*bf16", "Bias": "*bf16", "Gain": "*bf16", "Res": "*bf16", "Y": "*bf16", "Part": "*fp32",
         "Counters": "*i32", "eps": "fp32"}  # fmt: skip
# name: (outputs, K, glu, norm), as the accelerator's step calls them
CASES = {"qkv": (4096, 1024, False, True), "o": (1024, 2048, False, False),
         "gate_up": (3072, 1024, True, True), "down": (1024, 3072, False, False)}  # fmt: skip


def compile_case(outputs, k, glu, norm, early):
    p = gemv.default_params(8, 2 * outputs if glu else outputs, k, glu=glu, tma=True, sms=132)
    constants = dict(ROWS=16, BLOCK_N=p.block_n, BLOCK_K=p.block_k, SPLIT_K=p.split_k, NORM=norm,
                     HAS_BIAS=False, HAS_RES=not norm, GLU=glu, USE_TMA=True, USE_PDL=True,
                     FP32_DOT=False)  # fmt: skip
    if "EARLY" in gemv._swap_kernel.arg_names:
        constants["EARLY"] = early
    w = torch.zeros(2 * outputs if glu else outputs, k, dtype=torch.bfloat16)
    desc = TensorDescriptor(w, list(w.shape), list(w.stride()), [p.block_n, p.block_k])
    types = TYPES | {"W": native_specialize_impl(BaseBackend, desc, False, True, True)[0]}
    options = {"num_warps": p.num_warps, "num_stages": p.num_stages, "launch_pdl": True}
    return compile_sm90(gemv._swap_kernel, constants, types, options)


def main(out: str, early: bool) -> None:
    for name, case in CASES.items():
        for flag in (False, True) if early else (False,):
            kernel = compile_case(*case, flag)
            label = name + ("-early" if flag else "")
            with open(os.path.join(out, label + ".sass"), "w") as fh:
                fh.write(kernel.asm["sass"])
            print(label, registers(kernel), f"shared {kernel.metadata.shared}")


if __name__ == "__main__":
    main(sys.argv[1], "early=1" in sys.argv[2:])
