"""Issue 10 (scratch, kept with its output): the split-KV decode kernel compiled for sm_90 on a machine
without a GPU (Triton 3.6's ptxas), K/V read through pointers and through TMA descriptors (`USE_TMA`), at
the H100's stored 32:8 launches: registers, shared memory and the loop's instruction mix. Run from the
repository root:

    PYTHONPATH=src:<triton 3.6 site> python benchmarks/results/cpu/decode-tma/compile_tma.py
"""

import os
import sys

import torch
from triton.backends.compiler import BaseBackend

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "gemv-packed"))
from compile_packed import compile_sm90, registers  # noqa: E402
from sass_loop import loop_counts  # noqa: E402
from triton._C.libtriton import native_specialize_impl  # noqa: E402

from attnforge.kernels import decode  # noqa: E402
from attnforge.kernels.tma import TensorDescriptor  # noqa: E402

TYPES = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "Out": "*bf16", "KvLens": "*i32", "KvStarts": "*i32",
         "PartO": "*fp32", "Counters": "*i32", "scale_log2": "fp32"}  # fmt: skip
# (label, BLOCK_N, stages, warps, kv_lens, tma)
CASES = [
    ("32:8 m16-n128-s16-w4-st3", 128, 3, 4, False, False),
    ("32:8 m16-n128-s16-w4-st3-tma", 128, 3, 4, False, True),
    ("32:8 m16-n128-s16-w4-st3-tma, kv_lens", 128, 3, 4, True, True),
    ("32:8 m16-n64-s16-w4-st4-tma", 64, 4, 4, False, True),
]


def compile_case(block_n, stages, warps, lens, tma):
    kernel = decode._decode_kernel
    constants = dict(GROUP=4, Q_LEN=1, HEAD_DIM=128, D_BLOCK=128, BLOCK_M=16, NUM_M_BLOCKS=1, BLOCK_N=block_n,
                     SPLIT=True, SPLITS_P2=16, PART_ROWS=4, S_CHUNK=4, HAS_KV_LENS=lens, HAS_KV_STARTS=False,
                     FP32_DOT=False, MERGE_LAST=True, USE_PDL=False, ALONE_TILES=1, USE_TMA=tma,
                     stride_qd=1, stride_kd=1, stride_vd=1, stride_od=1)  # fmt: skip
    types = dict(TYPES)
    if tma:
        cache = torch.zeros(1, 8, 4096, 128, dtype=torch.bfloat16)
        desc = TensorDescriptor(cache, list(cache.shape), list(cache.stride()), [1, 1, block_n, 128])
        types["K"] = types["V"] = native_specialize_impl(BaseBackend, desc, False, True, True)[0]
    return compile_sm90(kernel, constants, types, {"num_warps": warps, "num_stages": stages})


def main():
    for label, *case in CASES:
        compiled = compile_case(*case)
        print(f"{label}: {registers(compiled)} shared {compiled.metadata.shared} B")
        for count, ops in loop_counts(compiled):
            print(f"  loop {count} instr.: {', '.join(f'{op} {n}' for op, n in ops.most_common(12))}")
        if len(sys.argv) > 1:
            name = label.replace(" ", "_").replace(",", "") + ".sass"
            with open(os.path.join(sys.argv[1], name), "w") as f:
                f.write(compiled.asm["sass"])


if __name__ == "__main__":
    main()
