"""Issues 10 / 11 (scratch, kept with its output): the decode kernels' prefetch before the PDL wait
(`split_kv.prefetch_split`), compiled offline for sm_90 with Triton 3.6's bundled ptxas on a machine without a
GPU: registers and spills with PREFETCH_KEYS 0 and 256, and the PTX offsets of the bulk L2 prefetches against
`griddepcontrol.wait` (each prefetch must come before the wait). 32:8 d128 bf16, 16 splits, 128-key tiles,
3 stages, 4 warps. Run from the repository root:

    PYTHONPATH=src:<triton 3.6 site> python benchmarks/results/cpu/decode-prefetch/bulk_prefetch_ptx.py
"""

import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "gemv-packed"))
from compile_packed import compile_sm90, registers  # noqa: E402

from attnforge.kernels import decode, decode_step  # noqa: E402

DECODE_TYPES = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "Out": "*bf16", "KvLens": "*i32",
                "KvStarts": "*i32", "PartO": "*fp32", "Counters": "*i32", "scale_log2": "fp32"}  # fmt: skip
STEP_TYPES = {"QKV": "*bf16", "Cos": "*bf16", "Sin": "*bf16", "Positions": "*i64", "QGain": "*bf16",
              "KGain": "*bf16", "CacheK": "*bf16", "CacheV": "*bf16", "Out": "*bf16", "PartO": "*fp32",
              "Counters": "*i32", "eps": "fp32", "scale_log2": "fp32"}  # fmt: skip
SHARED = dict(GROUP=4, HEAD_DIM=128, D_BLOCK=128, BLOCK_M=16, NUM_M_BLOCKS=1, BLOCK_N=128, SPLIT=True,
              SPLITS_P2=16, PART_ROWS=4, S_CHUNK=16, FP32_DOT=False, USE_PDL=True, ALONE_TILES=2,
              PREFETCH_THREADS=128)  # fmt: skip
OPTIONS = {"num_warps": 4, "num_stages": 3, "launch_pdl": True}


def report(name, kernel, constants, types):
    compiled = compile_sm90(kernel, constants, types, OPTIONS)
    ptx = compiled.asm["ptx"]
    prefetches = [m.start() for m in re.finditer(r"cp\.async\.bulk\.prefetch\.L2", ptx)]
    waits = [m.start() for m in re.finditer(r"griddepcontrol\.wait", ptx)]
    print(f"{name} PREFETCH_KEYS={constants['PREFETCH_KEYS']}: {registers(compiled)}; bulk prefetches at PTX "
          f"offsets {prefetches}, griddepcontrol.wait at {waits}")  # fmt: skip


def main():
    for keys in (0, 256):
        decode_constants = dict(SHARED, Q_LEN=1, HAS_KV_LENS=False, HAS_KV_STARTS=False, MERGE_LAST=True,
                                PREFETCH_KEYS=keys, stride_qd=1, stride_kd=1, stride_vd=1,
                                stride_od=1)  # fmt: skip
        report("decode", decode._decode_kernel, decode_constants, DECODE_TYPES)
        step_constants = dict(SHARED, NUM_HEADS=32, Q_NORM=False, K_NORM=False, PREFETCH_KEYS=keys)
        report("decode step", decode_step._decode_step_kernel, step_constants, STEP_TYPES)


if __name__ == "__main__":
    main()
