"""Issue 14 diagnosis (scratch, kept with its output): compile the prefill kernel for sm_90 on a machine
without a GPU (Triton's bundled ptxas), pointer path (no TMA), causal, bf16, d128, GQA 4:1, for the launch
sets the tuner tries, and count per kernel the registers, spills, Hopper's asynchronous tensor-core
instructions (HGMMA, what wgmma compiles to) against the older synchronous ones (HMMA), and the shared-memory
barriers. With `ws`, the warp-specialized launch (Q/K/V through TMA descriptors made on the device, one
loop; with `lens`, kv_lens and q_lens too): whether Triton partitioned it (the warps it launches, the
registers each partition asks for, SETMAXNREG in the SASS). Run from the repository root:

    PYTHONPATH=src:<triton 3.6 site> python benchmarks/results/cpu/prefill-sass/sass_prefill.py
"""

import collections
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from attnforge.kernels import prefill

BIN = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin")
SASS_LINE = re.compile(r"\s+/\*[0-9a-f]{4,}\*/\s")


def compile_kernel(block_m, block_n, warps, stages, ws=False, lens=False):
    kernel = prefill._prefill_kernel
    constants = dict(GROUP=4, HEAD_DIM=128, D_BLOCK=128, BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=True,
                     HAS_KV_LENS=lens, HAS_Q_LENS=lens, MASK_KIND=prefill.MASK_NONE, USE_TMA=False,
                     FP32_DOT=False, WARP_SPEC=ws)  # fmt: skip
    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constants or (name.startswith("stride_") and name.endswith("d")):
            constants.setdefault(name, 1)
            signature[name] = "constexpr"
        elif name in ("Q", "K", "V", "Out"):
            signature[name] = "*bf16"
        elif name in ("KvLens", "QLens"):
            signature[name] = "*i32"
        elif name == "Mask":
            signature[name] = "*bf16"  # unread: no mask
        else:
            signature[name] = "fp32" if name == "scale_log2" else "i32"
        if signature[name].startswith("*") or name.startswith("stride_") or name in ("q_len", "kv_len"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": warps, "num_stages": stages})  # fmt: skip


def report(compiled) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as file:
        file.write(compiled.asm["cubin"])
    sass = subprocess.run([f"{BIN}/cuobjdump", "-sass", file.name], capture_output=True, text=True).stdout
    usage = subprocess.run([f"{BIN}/cuobjdump", "--dump-resource-usage", file.name], capture_output=True,
                           text=True).stdout  # fmt: skip
    ops = collections.Counter(
        re.sub(r"^\s+/\*[0-9a-f]+\*/\s+", "", line).split(";")[0].strip().lstrip("@!P0123456789 ").split()[0]
        .split(".")[0]
        for line in sass.splitlines() if SASS_LINE.match(line)
    )  # fmt: skip
    usage_match = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    regs, stack, shared, local = usage_match.groups() if usage_match else ("?",) * 4
    partitions = re.findall(r"requestedRegisters = array<i32: ([^>]*)>", compiled.asm["ttgir"])
    return (f"REG {regs} STACK {stack} LOCAL {local} SHARED {shared}; {sum(ops.values())} instructions, "
            f"HGMMA {ops['HGMMA']}, HMMA {ops['HMMA']}, BAR {ops['BAR']}, LDS {ops['LDS'] + ops['LDSM']}, "
            f"STL/LDL {ops['STL'] + ops['LDL']}; warps launched {compiled.metadata.num_warps}, partitions' "
            f"registers {partitions or 'none'}, SETMAXNREG {ops['USETMAXREG'] + ops['SETMAXNREG']}, "
            f"shared memory {compiled.metadata.shared} B")  # fmt: skip


if __name__ == "__main__":
    print(f"triton {triton.__version__}, sm_90, prefill causal bf16 d128 GQA 4:1, pointer path")
    for block_m, block_n, warps, stages in [(64, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2),
                                            (128, 64, 4, 3), (128, 64, 8, 4), (64, 128, 4, 2)]:  # fmt: skip
        print(
            f"BLOCK_M {block_m} BLOCK_N {block_n} warps {warps} stages {stages}: "
            f"{report(compile_kernel(block_m, block_n, warps, stages))}"
        )
    print("warp-specialized launch (ws): Q/K/V through descriptors made on the device, one loop")
    for block_m, block_n, warps, stages, lens in [(128, 128, 4, 2, False), (128, 64, 4, 2, False),
                                                  (128, 64, 4, 3, False), (128, 64, 8, 3, False),
                                                  (128, 128, 4, 2, True)]:  # fmt: skip
        print(
            f"BLOCK_M {block_m} BLOCK_N {block_n} warps {warps} stages {stages} ws"
            f"{' kv_lens q_lens' * lens}: "
            f"{report(compile_kernel(block_m, block_n, warps, stages, ws=True, lens=lens))}"
        )
