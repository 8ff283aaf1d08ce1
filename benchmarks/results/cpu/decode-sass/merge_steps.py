"""Issue 10 (scratch, kept with its output): the merge by the program that arrives last, as sm_90 SASS
compiled on a machine without a GPU (Triton's bundled ptxas), for GQA 2:1 / 4:1 / 5:1 d128 with 16 splits (the
4k tuning entries' launch m16-n64-s16-w4-st4): after the arrival counter's atomic, each instruction as one
letter (L global load, E exp2, F float add/multiply, B barrier, . other). Each run of L before a run of F is
one round trip to L2; `S_CHUNK` splits load per run. Run from the repository root:

    PYTHONPATH=src:<triton 3.6 site> python benchmarks/results/cpu/decode-sass/merge_steps.py
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "gemv-packed"))
from compile_packed import compile_sm90, registers, sass_ops  # noqa: E402

from attnforge.kernels import decode  # noqa: E402
from attnforge.kernels.decode_params import MERGE_CHUNK  # noqa: E402

TYPES = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "Out": "*bf16", "KvLens": "*i32", "KvStarts": "*i32",
         "PartO": "*fp32", "Counters": "*i32", "scale_log2": "fp32"}  # fmt: skip
LETTERS = (("LDG", "L"), ("MUFU", "E"), ("FFMA", "F"), ("FMUL", "F"), ("FADD", "F"), ("BAR", "B"))


def merge_letters(group: int, part_rows: int, s_chunk: int) -> tuple[str, str]:
    constants = dict(GROUP=group, Q_LEN=1, HEAD_DIM=128, D_BLOCK=128, BLOCK_M=16, NUM_M_BLOCKS=1, BLOCK_N=64,
                     SPLIT=True, SPLITS_P2=16, PART_ROWS=part_rows, S_CHUNK=s_chunk, HAS_KV_LENS=False,
                     HAS_KV_STARTS=False, FP32_DOT=False, MERGE_LAST=True, USE_PDL=True, ALONE_TILES=2,
                     USE_TMA=False, stride_qd=1, stride_kd=1, stride_vd=1, stride_od=1)  # fmt: skip
    compiled = compile_sm90(decode._decode_kernel, constants, TYPES,
                            {"num_warps": 4, "num_stages": 4, "launch_pdl": True})  # fmt: skip
    ops = sass_ops(compiled)
    tail = ops[next(i for i, op in enumerate(ops) if op.startswith("ATOMG")) :]
    letters = "".join(next((c for prefix, c in LETTERS if op.startswith(prefix)), ".") for op in tail)
    return registers(compiled), letters


def main():
    for label, group, part_rows in (("2:1", 2, 2), ("4:1", 4, 4), ("5:1", 5, 8)):
        s_chunk = max(1, min(16, MERGE_CHUNK, 16384 // (part_rows * 128)))  # as decode.DecodeLaunch
        regs, letters = merge_letters(group, part_rows, s_chunk)
        print(f"GQA {label}: {part_rows} partial rows, S_CHUNK {s_chunk} (16 splits: "
              f"{-(-16 // s_chunk)} round trips), {regs}")  # fmt: skip
        print("  " + letters)


if __name__ == "__main__":
    main()
