"""Issue 14 (no GPU): the library's Gluon prefill kernels (kernels/prefill_gluon.py) compiled for sm_90 with
Triton 3.6's ptxas, each launch's SASS summary (`fa_gluon._sass_summary`: instruction counts, spills per
setmaxnreg region). Run from this directory with the package and Triton 3.6 on PYTHONPATH:

    python compile_library.py [SASS_DIR]   (SASS_DIR: also write each launch's SASS there)
"""

import sys

import torch
import triton
from fa_gluon import _sass_summary
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource

from attnforge.kernels import prefill_gluon as pg

# (head_dim, stages, pingpong, kv_lens, q_lens, persistent)
LAUNCHES = ((128, 3, True, False, False, False), (128, 3, True, True, True, False),
            (128, 2, False, False, False, False), (64, 3, True, False, False, False),
            (128, 3, True, True, False, True), (128, 3, True, True, True, True),
            (64, 3, True, True, False, True))  # fmt: skip


def compile_launch(head_dim, stages, pingpong, kv_lens, q_lens, persistent):
    q = torch.zeros(2, 4, 256, head_dim, dtype=torch.bfloat16)
    descs = (pg._descriptor(q, pg.ROWS.value), pg._descriptor(q, pg.BLOCK_N.value),
             pg._descriptor(q, pg.BLOCK_N.value))  # fmt: skip
    sig = {name: native_specialize_impl(BaseBackend, d, False, True, True)[0]
           for name, d in zip(("q_desc", "k_desc", "v_desc"), descs, strict=True)}  # fmt: skip
    ints = ["stride_ob", "stride_oh", "stride_om", "stride_od", "num_heads", "group", "q_len", "kv_len"]
    sig.update(
        Out="*bf16", KvLens="*i32", QLens="*i32", qk_scale="fp32", n_bh="i32", **dict.fromkeys(ints, "i32")
    )
    constants = dict(HEAD_DIM=head_dim, STAGES=stages, CAUSAL=True, HAS_KV_LENS=kv_lens, HAS_Q_LENS=q_lens)
    fn = pg._persistent_kernel if persistent else pg._prefill_gluon_kernel
    if not persistent:
        constants["PINGPONG"] = pingpong
    sig.update(dict.fromkeys(constants, "constexpr"))
    sig = {name: sig[name] for name in fn.arg_names}  # the kernel's order (n_bh: the persistent one's)
    src = GluonASTSource(fn=fn, signature=sig, constexprs=constants)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})


def main() -> None:
    for launch in LAUNCHES:
        kernel = compile_launch(*launch)
        head_dim, stages, pingpong, kv_lens, q_lens, persistent = launch
        name = (f"d{head_dim} st{stages}{'-pp' if pingpong else ''}{'-ps' if persistent else ''} "
                f"kv_lens={kv_lens} q_lens={q_lens}")  # fmt: skip
        if len(sys.argv) > 1:
            with open(f"{sys.argv[1]}/{name.replace(' ', '_')}.sass", "w") as fh:
                fh.write(kernel.asm["sass"])
        print(f"{name}: {_sass_summary(kernel)}", flush=True)


if __name__ == "__main__":
    main()
