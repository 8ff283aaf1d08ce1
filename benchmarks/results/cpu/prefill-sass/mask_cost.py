"""Issue 14 diagnosis (scratch, kept with its output): what the warp-specialized launch's block mask costs.
Compiles prefill's "ws" launch (causal, bf16, d128, GQA 4:1, 128x128 tiles, 2 stages) for sm_90 as it is and
from a copy of `kernels/prefill.py` with the ws branch's mask taken out (wrong results, compiled only), and
counts the SASS instructions of each. Run from the repository root:

    PYTHONPATH=src:<triton 3.6 site>:benchmarks/results/cpu/prefill-sass python \
        benchmarks/results/cpu/prefill-sass/mask_cost.py
"""

import collections
import importlib.util
import os
import re
import subprocess
import sys
import tempfile

import sass_prefill
import triton

from attnforge.kernels import prefill

MASK = """            if CAUSAL:
                qk = tl.where(n[None, :] <= last_visible[:, None], qk, float("-inf"))
            else:
                qk = tl.where((n < end)[None, :], qk, float("-inf"))
"""
OPS = ("FFMA", "FMUL", "FADD", "MUFU", "FMNMX", "FSEL", "ISETP", "F2FP", "HGMMA")


def unmasked_module():
    with open(prefill.__file__) as file:
        source = file.read()
    if MASK not in source:
        sys.exit("the ws branch's mask is not where this script expects it: update MASK")
    path = os.path.join(tempfile.mkdtemp(), "prefill_unmasked.py")
    with open(path, "w") as file:
        file.write(source.replace(MASK, ""))
    spec = importlib.util.spec_from_file_location("prefill_unmasked", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def counts(compiled) -> collections.Counter:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as file:
        file.write(compiled.asm["cubin"])
    sass = subprocess.run([f"{sass_prefill.BIN}/cuobjdump", "-sass", file.name], capture_output=True,
                          text=True).stdout  # fmt: skip
    found = re.findall(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass)
    return collections.Counter(op.split(".")[0] for op in found)


if __name__ == "__main__":
    print(
        f"triton {triton.__version__}, sm_90, prefill ws launch, causal bf16 d128 GQA 4:1, 128x128, 2 stages"
    )
    masked = counts(sass_prefill.compile_kernel(128, 128, 4, 2, ws=True))
    sass_prefill.prefill = unmasked_module()
    unmasked = counts(sass_prefill.compile_kernel(128, 128, 4, 2, ws=True))
    for label, c in (("masked", masked), ("mask taken out", unmasked)):
        print(f"{label}: {sum(c.values())} instructions; " + ", ".join(f"{op} {c[op]}" for op in OPS))
