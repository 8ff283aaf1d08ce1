"""Issue 11 (scratch, kept with its output): compile `kernels/gemv.py`'s kernel for sm_90 on a machine without
a GPU (Triton's bundled ptxas), with and without programmatic dependent launch, and show where the weight
loads, the grid-dependency wait and the stores fall in the SASS. Run from the repository root:

    PYTHONPATH=src:<triton 3.6 site> python benchmarks/results/cpu/gemv-sass/sass_gemv.py
"""

import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from attnforge.kernels import gemv

BIN = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin")
MARKS = ("LDG", "ACQBULK", "PREEXIT", "STG")  # loads, griddepcontrol.wait / launch_dependents, stores


def compile_kernel(pdl, norm, gated, res, rows=1, block_n=4, block_k=1024):
    """As a launch specializes it: pointers, N, K and strides 16-divisible; bf16."""
    kernel = gemv._gemv_kernel
    constants = dict(ROWS=rows, BLOCK_N=block_n, BLOCK_K=block_k, NORM=norm, GATED=gated, HAS_BIAS=False,
                     HAS_RES=res, USE_PDL=pdl)  # fmt: skip
    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constants:
            signature[name] = "constexpr"
        elif name in ("X", "W", "Bias", "Gain", "Res", "Y"):
            signature[name] = "*bf16"
        else:
            signature[name] = "fp32" if name == "eps" else "i32"
        if signature[name].startswith("*") or name.startswith("stride_") or name in ("N", "K"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs)
    options = {"num_warps": 4, **({"launch_pdl": True} if pdl else {})}
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def tool(name, compiled, *args):
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as file:
        file.write(compiled.asm["cubin"])
    return subprocess.run([os.path.join(BIN, name), *args, file.name], capture_output=True, text=True).stdout


def main():
    for pdl in (False, True):
        for norm, gated, res in ((True, False, False), (False, False, True), (False, True, True)):
            compiled = compile_kernel(pdl, norm, gated, res)
            usage = re.findall(r"REG:\d+|STACK:\d+|LOCAL:\d+", tool("cuobjdump", compiled, "-res-usage"))
            print(f"pdl={pdl} norm={norm} gated={gated} residual={res}: {' '.join(usage)}")
    print("\nSASS order, pdl=True residual=True (o_proj):")
    sass = tool("cuobjdump", compile_kernel(True, False, False, True), "-sass")
    for index, line in enumerate(sass.splitlines()):
        if any(mark in line for mark in MARKS):
            print(index, line.strip()[:70])


if __name__ == "__main__":
    main()
