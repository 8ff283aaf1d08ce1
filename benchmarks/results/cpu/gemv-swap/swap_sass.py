"""The library's swapped product (`gemv._swap_kernel`) compiled for sm_90 (Triton 3.6's ptxas, no GPU) at
the launches `default_params` gives Qwen3-0.6B's products at 8 rows (through TMA): each launch's SASS,
registers, spills, shared memory and tensor-core / prefetch instruction counts, the SASS written to DIR to
compare two commits' files; `all=1` compiles every variant `gpu/gemv-swap/swap_ab.py` times too (early,
prefetch, narrow tiles, ...). N, K, the split's K and the strides are 16-divisible, as the JIT specialises
Qwen3's (from the twentieth session; the files of earlier sessions were compiled without it: x's loads then
came out 2 bytes wide). Run from the repository root:

    PYTHONPATH=<triton 3.6>:src python benchmarks/results/cpu/gemv-swap/swap_sass.py DIR [all=1]
"""

import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "gemv-packed"))
from compile_packed import registers  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "gpu", "gemv-swap"))
import swap_ab  # noqa: E402  (its narrow tiles)

from attnforge.kernels import gemv, offline  # noqa: E402

# name: (outputs, K, glu, norm), as the accelerator's step calls them
CASES = {"qkv": (4096, 1024, False, True), "o": (1024, 2048, False, False),
         "gate_up": (3072, 1024, True, True), "down": (1024, 3072, False, False)}  # fmt: skip


def compile_case(outputs, k, glu, norm, p: gemv.GemvParams):
    """The launch as the step makes it: the norm fused, or the residual where there is none."""
    return offline.swap_kernel_sm90(2 * outputs if glu else outputs, k, p, glu, norm, residual=not norm)


def main(out: str, every: bool) -> None:
    for name, (outputs, k, glu, norm) in CASES.items():
        launches = swap_ab.variants(2 * outputs if glu else outputs, k, glu, norm, True, 132)
        for label, p in launches.items() if every else [("default", launches["default"])]:
            kernel = compile_case(outputs, k, glu, norm, p)
            suffix = "" if label == "default" else "-" + label
            with open(os.path.join(out, name + suffix + ".sass"), "w") as fh:
                fh.write(kernel.asm["sass"])
            ops = re.findall(r"\b(HGMMA|HMMA|UBLKPF)\b", kernel.asm["sass"])
            counts = " ".join(f"{op}:{ops.count(op)}" for op in ("HGMMA", "HMMA", "UBLKPF"))
            print(name + suffix, registers(kernel), f"shared {kernel.metadata.shared}", counts)


if __name__ == "__main__":
    main(sys.argv[1], "all=1" in sys.argv[2:])
