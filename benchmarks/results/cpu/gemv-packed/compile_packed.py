"""Issue 15 (scratch, kept with its output): compile `kernels/gemv.py`'s kernel for sm_90 on a machine without
a GPU (Triton's bundled ptxas) for weights as stored (bf16) and packed at 4, 5 and 8 bits (group 64), one row,
the launch the accelerator makes (4 columns a program, 1024-wide slices, PDL); print the registers, the
global loads per program's slice and the SASS count of the instructions that turn codes into floats (I2F,
quarter rate on Hopper; LOP3/FADD, full rate). Run from the repository root:

    PYTHONPATH=src:<triton 3.6 site> python benchmarks/results/cpu/gemv-packed/compile_packed.py
"""

import os
import re
import subprocess
import tempfile

import triton

from attnforge.kernels import gemv, offline

BIN = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin")


# the offline compile moved into the package (tests check default launches with it); kept importable here
compile_sm90 = offline.compile_sm90


def compile_kernel(bits: int, norm: bool):
    kernel = gemv._gemv_kernel
    constants = dict(ROWS=1, BLOCK_N=4, BLOCK_K=1024, NORM=norm, HAS_BIAS=False, HAS_RES=False,
                     USE_PDL=True, DOT=False, FP32_DOT=False, GLU=False, AHEAD=False, BITS=bits,
                     GROUP=64 if bits != 16 else 1, SPAN=64 if bits != 16 else 1)  # fmt: skip
    weight = "*bf16" if bits == 16 else "*u8"
    types = {"X": "*bf16", "W": weight, "Bias": "*bf16", "Gain": "*bf16", "Res": "*bf16", "Y": "*bf16",
             "Scales": "*bf16", "Zeros": "*u8" if bits != 16 else "*bf16", "eps": "fp32"}  # fmt: skip
    return offline.compile_sm90(kernel, constants, types, {"num_warps": 4, "launch_pdl": True},
                                divisible=("N", "K"))  # fmt: skip


def registers(compiled) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as file:
        file.write(compiled.asm["cubin"])
    out = subprocess.run([os.path.join(BIN, "cuobjdump"), "-res-usage", file.name], capture_output=True,
                         text=True).stdout  # fmt: skip
    return " ".join(re.findall(r"REG:\d+|STACK:\d+|LOCAL:\d+", out))


def sass_counts(compiled, ops=("I2F", "LOP3", "FADD", "FFMA", "BAR")) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as file:
        file.write(compiled.asm["cubin"])
    sass = subprocess.run([os.path.join(BIN, "cuobjdump"), "-sass", file.name], capture_output=True,
                          text=True).stdout  # fmt: skip
    opcodes = re.findall(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass)
    return " ".join(f"{op}:{opcodes.count(op)}" for op in ops)


def main():
    for bits in (16, 4, 5, 8):
        for norm in (False, True):
            compiled = compile_kernel(bits, norm)
            loads = re.findall(r"ld\.global[\.\w]*", compiled.asm["ptx"])
            kinds = {kind: loads.count(kind) for kind in sorted(set(loads))}
            label = "bf16 as stored" if bits == 16 else f"{bits}-bit codes"
            print(f"{label:15s} norm={norm!s:5s} {registers(compiled)}  global loads in the PTX: {kinds}")
            print(f"{'':15s} SASS {sass_counts(compiled)}")


def sass_ops(compiled) -> list[str]:
    """The opcodes of a compiled kernel's SASS in order (predicates dropped)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as file:
        file.write(compiled.asm["cubin"])
    sass = subprocess.run([os.path.join(BIN, "cuobjdump"), "-sass", file.name], capture_output=True,
                          text=True).stdout  # fmt: skip
    return re.findall(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass)


def load_runs_after_atomic(compiled) -> list[int]:
    """After the kernel's first ATOMG (a split merge's arrival), its global loads in runs: a run ends where
    float work that may wait on it starts (each run one round trip to L2 at least)."""
    ops = sass_ops(compiled)
    runs, loads = [], 0
    for op in ops[next(i for i, op in enumerate(ops) if op.startswith("ATOMG")) :]:
        if op.startswith("LDG"):
            loads += 1
        elif op[:4] in ("FFMA", "FMUL", "FADD", "MUFU", "FMNM") and loads:
            runs.append(loads)
            loads = 0
    return runs + ([loads] if loads else [])


if __name__ == "__main__":
    main()
