"""Issues 10/11 (scratch, kept with its output): compile the decode kernels for sm_90 on a machine without a
GPU (Triton's bundled ptxas) with PDL and the L2 prefetch on, and show the order of the prefetches, the
grid-dependency wait and the loads in the PTX, and the registers each kernel takes with and without it.
Run from the repository root:

    PYTHONPATH=src:<triton 3.6 site> python benchmarks/results/cpu/decode-prefetch/ptx_prefetch.py

The prefetch lost on the GPU and was removed from the kernels after c61d822: this script runs against
that commit only.
"""

import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from attnforge.kernels import decode, decode_params, decode_step

BIN = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin")
POINTERS = {
    "Q": "*bf16", "K": "*bf16", "V": "*bf16", "Out": "*bf16", "KvLens": "*i32", "KvStarts": "*i32",
    "PartO": "*fp32", "Counters": "*i32", "QKV": "*bf16", "Cos": "*bf16", "Sin": "*bf16", "Positions": "*i64",
    "QGain": "*bf16", "KGain": "*bf16", "CacheK": "*bf16", "CacheV": "*bf16",
}  # fmt: skip
MARKS = ("prefetch.global.L2", "griddepcontrol.wait", "griddepcontrol.launch", "ld.volatile.global",
         "ld.global", "cp.async")  # fmt: skip
FLOATS = ("scale_log2", "eps")


def launch_constants(prefetch: int) -> dict:
    """The launch a Qwen3-0.6B decode call (16:8, d128, 4k valid keys in a 4360-key cache) gets, with PDL."""
    p = decode_params.complete_params({"BLOCK_N": 64, "num_splits": 16, "num_warps": 4, "num_stages": 4,
                                       "prefetch_tiles": prefetch}, rows=2, kv_len=4360)  # fmt: skip
    launch = decode.DecodeLaunch(p, (1, 16, 1, 128), 8, torch.bfloat16, "cpu", True, False)
    # a launch specializes integer arguments equal to 1 (the head dims' strides) as constants
    unit_strides = {"stride_qd": 1, "stride_kd": 1, "stride_vd": 1, "stride_od": 1}
    return {**launch.constants, **unit_strides, "USE_PDL": True, "PREFETCH_TILES": prefetch}


def compile_kernel(kernel, constants: dict):
    constants = {k: v for k, v in constants.items() if k in kernel.arg_names}
    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constants:
            signature[name] = "constexpr"
        else:
            signature[name] = POINTERS.get(name, "fp32" if name in FLOATS else "i32")
        if signature[name].startswith("*") or name.startswith("stride_"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs)
    options = {"num_warps": 4, "num_stages": 4, "launch_pdl": True}
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def registers(compiled) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as file:
        file.write(compiled.asm["cubin"])
    out = subprocess.run([os.path.join(BIN, "cuobjdump"), "-res-usage", file.name], capture_output=True,
                         text=True).stdout  # fmt: skip
    return " ".join(re.findall(r"REG:\d+|SHARED:\d+|LOCAL:\d+", out))


def order(ptx: str, limit: int = 14) -> list[str]:
    """The first prefetches, waits and global loads, in program order (collapsed runs)."""
    marks, last = [], None
    for line in ptx.splitlines():
        line = line.strip()
        kind = next((k for k in MARKS if k in line), None)
        if kind and kind != last:
            marks.append(f"{kind}  ({line[:60]})")
            last = kind
    return marks[:limit]


def main():
    step_fixed = ("Q_LEN", "HAS_KV_LENS", "HAS_KV_STARTS", "MERGE_LAST")
    for prefetch in (0, 1, 2):
        constants = launch_constants(prefetch)
        plain = compile_kernel(decode._decode_kernel, {**constants, "HAS_KV_LENS": True})
        step_constants = {k: v for k, v in constants.items() if k not in step_fixed}
        norms = {"NUM_HEADS": 16, "Q_NORM": True, "K_NORM": True}
        step = compile_kernel(decode_step._decode_step_kernel, {**step_constants, **norms})
        usage = f"decode_attention {registers(plain)}; decode_step {registers(step)}"
        print(f"prefetch_tiles={prefetch}: {usage}")
        if prefetch == 1:
            for name, compiled in (("decode_attention", plain), ("decode_step", step)):
                print(f"  {name}, PTX order:")
                for mark in order(compiled.asm["ptx"]):
                    print("    " + mark)


if __name__ == "__main__":
    main()
