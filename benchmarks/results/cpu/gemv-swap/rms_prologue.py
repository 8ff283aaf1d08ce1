"""Issue 11 (scratch, kept with its output): the swapped product's prologue where it fuses RMSNorm, as sm_90
SASS compiled on a machine without a GPU (Triton's bundled ptxas), at 8 rows for the normed products of the
batch-8 step (Qwen3-0.6B's and Llama-3-8B's q/k/v and gate/up, as `gemv.default_params` launches them): the
norm's pass over the rows (`gemv.rms_scale`, BLOCK_K-wide slices) between the PDL wait (ACQBULK) and the
first wgmma. Each step of its loop waits on its loads (one round trip to L2 a step; the weight's TMA loads
of the main loop start after it, but for `early`'s first slice); the slices a step are counted from the
loop body's loads (16 rows x the pass's slice of bf16 features, 16 bytes a load). As stored (slices of
block_k) and with `GemvParams.rms_block` 512 and 1024. Run from the
repository root:

    PYTHONPATH=<triton 3.6 site>:src python benchmarks/results/cpu/gemv-swap/rms_prologue.py
"""

import dataclasses
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "gemv-packed"))
from compile_packed import BIN, registers  # noqa: E402

from attnforge.kernels import gemv, offline  # noqa: E402

# name -> (weight rows, K, glu)
PRODUCTS = {"qwen3-0.6b q/k/v": (4096, 1024, False), "qwen3-0.6b gate/up": (6144, 1024, True),
            "llama3-8b q/k/v": (6144, 4096, False), "llama3-8b gate/up": (28672, 4096, True)}  # fmt: skip


def prologue(n: int, k: int, glu: bool, rms_block: int) -> str:
    p = gemv.default_params(8, n // 2 if glu else n, k, glu=glu, norm=True, tma=True, sms=132)
    p = dataclasses.replace(p, rms_block=rms_block)
    compiled = offline.swap_kernel_sm90(n, k, p, glu, True, residual=False)
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as file:
        file.write(compiled.asm["cubin"])
    sass = subprocess.run([os.path.join(BIN, "cuobjdump"), "-sass", file.name], capture_output=True,
                          text=True).stdout  # fmt: skip
    lines = [line for line in sass.splitlines() if re.search(r"/\*[0-9a-f]{4}\*/", line)]
    wait = next(i for i, line in enumerate(lines) if "ACQBULK" in line)
    mma = next(i for i, line in enumerate(lines) if "HGMMA" in line or "WARPGROUP" in line)
    branch = re.compile(r"/\*([0-9a-f]{4})\*/.*BRA 0x([0-9a-f]+)")
    addr = [int(re.search(r"/\*([0-9a-f]{4})\*/", line).group(1), 16) for line in lines]
    found = [(i, branch.search(line)) for i, line in enumerate(lines) if wait <= i < mma]
    back = [(i, int(m.group(2), 16)) for i, m in found if m and int(m.group(2), 16) < int(m.group(1), 16)]
    i, target = back[0]
    body = sum("LDG" in line for a, line in zip(addr, lines, strict=True) if target <= a <= addr[i])
    width = rms_block or p.block_k
    per_slice = max(1, 16 * width // (32 * p.num_warps) // 8)
    slices = -(-k // width)
    per_step = max(1, body // per_slice)
    steps = -(-slices // per_step)
    return (f"early={p.early}, {slices} slices of {width} features, {per_step} a loop step ({body} loads): "
            f"{steps} steps between the wait and the first wgmma; {registers(compiled)}")  # fmt: skip


def main():
    for rms_block in (0, 512, 1024):
        print("as stored (slices of block_k)" if not rms_block else f"rms_block={rms_block}")
        for name, (n, k, glu) in PRODUCTS.items():
            print(f"  {name}: {prologue(n, k, glu, rms_block)}")


if __name__ == "__main__":
    main()
