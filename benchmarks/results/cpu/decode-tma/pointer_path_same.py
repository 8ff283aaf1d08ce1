"""Issue 10 (scratch, kept with its output): the decode kernels' pointer path (USE_TMA off) compiles for sm_90
to the same instruction sequence before and after the TMA option (19c5ebc against later commits): the plain
decode kernel with and without kv_lens and the decode step, at a stored 32:8 launch (64-key tiles, 4 stages,
PDL). Run from a checkout's root with that checkout's package and Triton 3.6 on PYTHONPATH:

    PYTHONPATH=src:<triton 3.6 site> python <this file>
"""

import hashlib
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "gemv-packed"))
from compile_packed import compile_sm90, registers  # noqa: E402

from attnforge.kernels import decode, decode_step  # noqa: E402

TYPES = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "Out": "*bf16", "KvLens": "*i32", "KvStarts": "*i32",
         "PartO": "*fp32", "Counters": "*i32", "scale_log2": "fp32", "QKV": "*bf16", "Cos": "*bf16",
         "Sin": "*bf16", "Positions": "*i64", "QGain": "*bf16", "KGain": "*bf16", "CacheK": "*bf16",
         "CacheV": "*bf16", "KSrc": "*bf16", "VSrc": "*bf16", "eps": "fp32"}  # fmt: skip
OPTIONS = {"num_warps": 4, "num_stages": 4, "launch_pdl": True}
SHARED = dict(GROUP=4, HEAD_DIM=128, D_BLOCK=128, BLOCK_M=16, NUM_M_BLOCKS=1, BLOCK_N=64, SPLIT=True,
              SPLITS_P2=16, PART_ROWS=4, S_CHUNK=4, FP32_DOT=False, USE_PDL=True, ALONE_TILES=1)  # fmt: skip


def opcodes(compiled) -> tuple[int, str]:
    """(instruction count, a hash of the opcode sequence) of the SASS."""
    seq = []
    for line in compiled.asm["sass"].splitlines():
        fields = line.split("\t")
        if len(fields) < 2:
            continue
        ins = fields[1].strip()
        if ins.startswith("@") and " " in ins:
            ins = ins.split(None, 1)[1]
        op = ins.split(" ")[0].rstrip(";")
        if op[:1].isupper():
            seq.append(op)
    return len(seq), hashlib.md5(" ".join(seq).encode()).hexdigest()[:10]


def compile_kernel(kernel, constants):
    if "USE_TMA" in kernel.arg_names:
        constants = {**constants, "USE_TMA": False}
    return compile_sm90(kernel, constants, TYPES, OPTIONS)


def main():
    for lens in (False, True):
        constants = dict(SHARED, Q_LEN=1, HAS_KV_LENS=lens, HAS_KV_STARTS=False, MERGE_LAST=True, stride_qd=1,
                         stride_kd=1, stride_vd=1, stride_od=1)  # fmt: skip
        compiled = compile_kernel(decode._decode_kernel, constants)
        print(f"decode kv_lens={lens}: {registers(compiled)} opcodes {opcodes(compiled)}")
    constants = dict(SHARED, NUM_HEADS=32, Q_NORM=True, K_NORM=True)
    compiled = compile_kernel(decode_step._decode_step_kernel, constants)
    print(f"decode step: {registers(compiled)} opcodes {opcodes(compiled)}")


if __name__ == "__main__":
    main()
