"""Issue 10 (scratch, kept with its output): the split-KV decode kernel's sm_90 SASS at a launch from the
tuning table, compiled on a machine without a GPU (Triton's bundled ptxas): registers, stack, shared memory,
and the instruction mix of each loop. The head-dim strides are specialised to 1 as Triton's JIT does for
contiguous tensors (without that the loads compile to scalar ones and spill: not what the GPU runs). Run
from the repository root:

    PYTHONPATH=src:<triton 3.6 site> python benchmarks/results/cpu/decode-sass/decode_sass.py
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "gemv-packed"))
from compile_packed import compile_sm90, registers  # noqa: E402
from sass_loop import loop_counts  # noqa: E402

from attnforge.kernels import decode  # noqa: E402

TYPES = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "Out": "*bf16", "KvLens": "*i32", "KvStarts": "*i32",
         "PartO": "*fp32", "Counters": "*i32", "scale_log2": "fp32"}  # fmt: skip
# (label, BLOCK_N, stages, warps, kv_lens): GQA 32:8 d128 bf16 one token, 16 splits (the 4k/16k entries)
CASES = [
    ("32:8 m16-n128-s16-w4-st3", 128, 3, 4, False),
    ("32:8 m16-n128-s16-w4-st3, kv_lens", 128, 3, 4, True),
    ("32:8 m16-n64-s16-w4-st4", 64, 4, 4, False),
]


def compile_case(block_n, stages, warps, lens):
    kernel = decode._decode_kernel
    constants = dict(GROUP=4, Q_LEN=1, HEAD_DIM=128, D_BLOCK=128, BLOCK_M=16, NUM_M_BLOCKS=1, BLOCK_N=block_n,
                     SPLIT=True, SPLITS_P2=16, PART_ROWS=4, S_CHUNK=4, HAS_KV_LENS=lens, HAS_KV_STARTS=False,
                     FP32_DOT=False, MERGE_LAST=True, USE_PDL=False, ALONE_TILES=1, stride_qd=1, stride_kd=1,
                     stride_vd=1, stride_od=1)  # fmt: skip
    return compile_sm90(kernel, constants, TYPES, {"num_warps": warps, "num_stages": stages})


def main():
    for label, block_n, stages, warps, lens in CASES:
        compiled = compile_case(block_n, stages, warps, lens)
        print(f"{label}: {registers(compiled)} shared {compiled.metadata.shared} B")
        for count, ops in loop_counts(compiled):
            print(f"  loop {count} instr.: {', '.join(f'{op} {n}' for op, n in ops.most_common(12))}")


if __name__ == "__main__":
    main()
