"""Issue 10 diagnosis (scratch, kept with its output): compile the decode kernel for sm_90 on a machine
without a GPU (Triton's bundled ptxas) and count the SASS instructions of the whole kernel and of its merge
(from the arrival atomic on), with registers and spills. Run from the repository root:

    PYTHONPATH=src:<triton 3.6 site> python benchmarks/results/cpu/decode-sass/sass_decode.py [SRC_DIR]

SRC_DIR (default src) is the attnforge source tree whose kernel is compiled (e.g. an older commit's).
"""

import collections
import importlib
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, sys.argv[1] if len(sys.argv) > 1 else "src")
decode = importlib.import_module("attnforge.kernels.decode")
BIN = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin")
SASS_LINE = re.compile(r"\s+/\*[0-9a-f]{4,}\*/\s")


def compile_kernel(group, splits, block_n, stages, s_chunk):
    """The kernel as a launch specializes it: unit strides constant, pointers and other strides 16-aligned."""
    kernel = decode._decode_kernel
    names = kernel.arg_names
    part_rows = triton.next_power_of_2(group)
    constants = dict(GROUP=group, Q_LEN=1, HEAD_DIM=128, D_BLOCK=128, BLOCK_M=16, NUM_M_BLOCKS=1,
                     BLOCK_N=block_n, SPLIT=True, SPLITS_P2=splits, PART_ROWS=part_rows, S_CHUNK=s_chunk,
                     HAS_KV_LENS=False, HAS_KV_STARTS=False, FP32_DOT=False, MERGE_LAST=True,
                     USE_PDL=False, ALONE_TILES=2)  # fmt: skip
    signature, attrs = {}, {}
    for i, name in enumerate(names):
        if name in constants or (name.startswith("stride_") and name.endswith("d")):
            constants.setdefault(name, 1)
            signature[name] = "constexpr"
        elif name in ("Q", "K", "V", "Out"):
            signature[name] = "*bf16"
        elif name in ("PartO", "PartML"):
            signature[name] = "*fp32"
        elif name in ("KvLens", "KvStarts", "Counters"):
            signature[name] = "*i32"
        else:
            signature[name] = "fp32" if name == "scale_log2" else "i32"
        if signature[name].startswith("*") or name.startswith("stride_") or name == "kv_len":
            attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs)
    return triton.compile(
        source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": stages}
    )


def report(compiled) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as file:
        file.write(compiled.asm["cubin"])
    sass = subprocess.run([f"{BIN}/cuobjdump", "-sass", file.name], capture_output=True, text=True).stdout
    usage = subprocess.run([f"{BIN}/cuobjdump", "--dump-resource-usage", file.name], capture_output=True,
                           text=True).stdout  # fmt: skip
    ops = [re.sub(r"^\s+/\*[0-9a-f]+\*/\s+", "", line).split(";")[0].strip()
           for line in sass.splitlines() if SASS_LINE.match(line)]  # fmt: skip
    first_atomic = next(i for i, op in enumerate(ops) if op.split()[0].startswith("ATOM")
                        or (op.startswith("@") and op.split()[1].startswith("ATOM")))  # fmt: skip
    merge = collections.Counter(
        op.lstrip("@!P0123456789 ").split()[0].split(".")[0] for op in ops[first_atomic:]
    )
    registers = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    top = ", ".join(f"{name} {count}" for name, count in merge.most_common(6))
    return (f"{len(ops)} instructions, merge {len(ops) - first_atomic} ({top}); registers {registers[1]}, "
            f"stack {registers[2]}")  # fmt: skip


if __name__ == "__main__":
    print(f"triton {triton.__version__}, sm_90, source {sys.argv[1] if len(sys.argv) > 1 else 'src'}")
    for group, splits, block_n, stages in [(2, 16, 64, 4), (4, 16, 128, 3), (5, 16, 64, 4), (4, 64, 64, 4),
                                           (5, 64, 64, 4)]:  # fmt: skip
        part_rows = triton.next_power_of_2(group)
        old_rule = max(1, min(splits, 4096 // (part_rows * 128)))  # the chunk both versions derive
        chunk = getattr(decode, "MERGE_CHUNK", None)
        s_chunk = old_rule if chunk is None else max(1, min(splits, chunk, 4096 // (part_rows * 128)))
        compiled = compile_kernel(group, splits, block_n, stages, s_chunk)
        print(f"GQA {group}:1 splits {splits} BLOCK_N {block_n} stages {stages}: {report(compiled)}")
