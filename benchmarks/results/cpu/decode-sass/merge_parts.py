"""Issue 10 (scratch, kept with its output): the last program's merge as sm_90 SASS, compiled on a machine
without a GPU (Triton's bundled ptxas), for GQA 2:1 .. 16:1 d128 with 16 splits and the launch the 4k / 16k
tuning entries store (m16-n128-s16-w4-st3, lengths on, PDL), as stored (one part, steps of MERGE_FLOATS)
and with "merge_parts" (`decode_params.merge_lo_rows` / `merge_chunk`). After the arrival counter's atomic:
the registers, the global loads, and the loads in runs, a run ending where float work that may wait on it
starts (each run one round trip to L2 at least; a step of a loop over the splits shows once). GQA 5:1 was
0.5-0.8 us slower than 4:1 at the same launch in every tuning run (H100 and H200), with the same keys read:
its 5 rows sit in 8-row partials. Run from the repository root:

    PYTHONPATH=<triton 3.6 site>:src python benchmarks/results/cpu/decode-sass/merge_parts.py
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "gemv-packed"))
from compile_packed import compile_sm90, load_runs_after_atomic, registers  # noqa: E402

from attnforge.kernels import decode  # noqa: E402
from attnforge.kernels.decode_params import merge_chunk, merge_lo_rows, partial_rows  # noqa: E402

TYPES = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "Out": "*bf16", "KvLens": "*i32", "KvStarts": "*i32",
         "PartO": "*fp32", "Counters": "*i32", "scale_log2": "fp32"}  # fmt: skip


def merge_runs(group: int, parts: bool) -> tuple[str, int, int, list[int]]:
    part_rows = partial_rows(16, group)
    lo = merge_lo_rows(group, part_rows) if parts else 0
    s_chunk = merge_chunk(16, part_rows, lo, 128, parts)
    constants = dict(GROUP=group, Q_LEN=1, HEAD_DIM=128, D_BLOCK=128, BLOCK_M=16, NUM_M_BLOCKS=1, BLOCK_N=128,
                     SPLIT=True, SPLITS_P2=16, PART_ROWS=part_rows, S_CHUNK=s_chunk, MERGE_LO=lo,
                     HAS_KV_LENS=True, HAS_KV_STARTS=False, FP32_DOT=False, MERGE_LAST=True, USE_PDL=True,
                     ALONE_TILES=2, USE_TMA=False, stride_qd=1, stride_kd=1, stride_vd=1,
                     stride_od=1)  # fmt: skip
    compiled = compile_sm90(decode._decode_kernel, constants, TYPES,
                            {"num_warps": 4, "num_stages": 3, "launch_pdl": True})  # fmt: skip
    runs = load_runs_after_atomic(compiled)
    return registers(compiled), lo, s_chunk, runs


def main():
    for parts in (False, True):
        print("with merge_parts" if parts else "as stored")
        for group in (2, 3, 4, 5, 6, 7, 8, 16):
            regs, lo, s_chunk, runs = merge_runs(group, parts)
            steps = -(-16 // s_chunk)
            print(f"  GQA {group}:1, parts {partial_rows(16, group) // 2 if lo else partial_rows(16, group)}"
                  f"{f' + {lo}' if lo else ''}, {steps} step(s) of {s_chunk} splits: {regs}; loads a step in "
                  f"runs {runs}")  # fmt: skip


if __name__ == "__main__":
    main()
