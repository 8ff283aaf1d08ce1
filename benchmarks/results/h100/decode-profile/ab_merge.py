"""Issue 10 (scratch, for the GPU): the decode kernel's merge in one pass (online) against the committed
two-pass merge, interleaved in one process; then, for a static cache early in a generation (few valid keys
in a long buffer), sequences read by split 0 alone (`alone_tiles`, default 2) against every split merging.
The online variant is this repository's decode.py with `_merge_rows` replaced by ONLINE_MERGE below,
imported as a second module; both use the tuning table's parameters. Run from the repository root with
PYTHONPATH=src:

    python ab_merge.py OUT.json

Its sm_90 SASS (offline, `benchmarks/results/cpu/decode-sass/`): after the arrival atomic, one round trip of
loads and 3 barriers instead of two round trips and 11 barriers; interpreter: tests/test_decode.py passes
with it (64 tests).
"""

import importlib.util
import json
import os
import sys
import tempfile

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from key_groups import graph, inputs, plain, rel_l2  # noqa: E402

from attnforge.bench import timing  # noqa: E402
from attnforge.kernels import decode  # noqa: E402

SHAPES = [(hq, hkv, n) for hq, hkv in ((32, 8), (40, 8), (16, 8), (32, 32)) for n in (1024, 4096, 16384)]
ONLINE_MERGE = r'''@triton.jit
def _merge_rows(PartO, PartML, base, num_splits, r, ROWS: tl.constexpr, SPLITS_P2: tl.constexpr,
                PART_ROWS: tl.constexpr, D_BLOCK: tl.constexpr, S_CHUNK: tl.constexpr):  # fmt: skip
    """Combine partial rows `r` of the splits at `base` in one pass (running max, sum and output per element):
    no split's loads wait for another's arithmetic, so all of a chunk's loads are in flight together, and
    there is no reduction across threads (the two-pass merge first reduces the maxima over the splits)."""
    d = tl.arange(0, D_BLOCK)
    row = r[:, None] * (2 * D_BLOCK) + d[None, :]
    acc = tl.zeros([ROWS, D_BLOCK], tl.float32)
    l_run = tl.zeros([ROWS, 1], tl.float32)
    m_run = tl.full([ROWS, 1], float("-inf"), tl.float32)
    for s0 in range(0, num_splits, S_CHUNK):
        for i in tl.static_range(S_CHUNK):
            ok = ((r < PART_ROWS) & (r * 0 + s0 + i < num_splits))[:, None]
            part = base + s0 + i
            o_ptrs = PartO + part * (PART_ROWS * 2 * D_BLOCK) + row
            o_s = tl.load(o_ptrs, mask=ok, other=0.0, cache_modifier=".cg")
            ml = PartML + part * 2 * PART_ROWS + r[:, None]
            m_s = tl.load(ml, mask=ok, other=float("-inf"), cache_modifier=".cg")
            l_s = tl.load(ml + PART_ROWS, mask=ok, other=0.0, cache_modifier=".cg")
            m_new = tl.maximum(m_run, m_s)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            old, new = tl.exp2(m_run - m_safe), tl.exp2(m_s - m_safe)
            acc = acc * old + o_s * new
            l_run = l_run * old + l_s * new
            m_run = m_new
    return acc / tl.where(l_run == 0.0, 1.0, l_run)
'''


def online_module():
    """decode.py with the one-pass merge, as its own module (Triton reads the kernels' source from a file)."""
    with open(decode.__file__) as f:
        source = f.read()
    start = source.index("@triton.jit\ndef _merge_rows(")
    end = source.index("# -----", start)
    path = os.path.join(tempfile.mkdtemp(), "decode_online.py")
    with open(path, "w") as f:
        f.write(source[:start] + ONLINE_MERGE + "\n\n" + source[end:])
    spec = importlib.util.spec_from_file_location("decode_online", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def call_of(module):
    def call(q, k, v, out, workspace=None):
        module.launch_decode(q, k, v, out, scale=128**-0.5, workspace=workspace)

    return call


SHORT = [(hq, hkv, 4352, valid) for hq, hkv in ((16, 8), (32, 8)) for valid in (128, 256, 384, 1024)]
ALONE = {"alone-0": 0, "alone-2": 2, "alone-4": 4}


def short_call(valid, alone_tiles):
    """Calls with `valid` keys of the buffer: the accelerator's decode call, the buffer's split count."""
    lens = torch.tensor([valid], dtype=torch.int32, device="cuda")

    def call(q, k, v, out, workspace=None):
        params = {**decode.decode_launch(tuple(q.shape), k.shape[1], k.shape[2], True, False, q.dtype,
                                         q.device).params, "alone_tiles": alone_tiles}  # fmt: skip
        decode.launch_decode(q, k, v, out, scale=128**-0.5, kv_lens=lens, params=params, workspace=workspace)

    return call


def short_rows(rows, doc, path):
    for hq, hkv, n, valid in SHORT:
        q, k, v = inputs(hq, hkv, n)
        ref = F.scaled_dot_product_attention(q.double(), k[:, :, :valid].double(), v[:, :, :valid].double(),
                                             enable_gqa=True)  # fmt: skip
        calls = {name: short_call(valid, tiles) for name, tiles in ALONE.items()}
        plain_us = plain(calls, q, k, v, False)
        for name, c in calls.items():
            out = torch.full_like(q, float("nan"))
            c(q, k, v, out)
            error = ((out.double() - ref).norm() / ref.norm()).item()
            rows.append({"shape": f"{hq}:{hkv} {valid} of {n}", "variant": name, "rel_l2": error,
                         "plain_us": plain_us[name], "graph_us": graph(c, hq, hkv, n),
                         "floor_us": 2 * hkv * valid * 128 * 2 / (doc["read_gbps"] * 1e3)})  # fmt: skip
            with open(path, "w") as f:
                json.dump(doc, f, indent=1)


def main(path):
    variants = {"two-pass": call_of(decode), "online": call_of(online_module())}
    rows, read_gbps = [], timing.measure_read_bandwidth() / 1e9
    for hq, hkv, n in SHAPES:
        q, k, v = inputs(hq, hkv, n)
        errors = {name: rel_l2(c, q, k, v) for name, c in variants.items()}
        plain_us = plain(variants, q, k, v, False)  # the flush reads (timing.L2Flusher)
        floor = 2 * hkv * n * 128 * 2 / (read_gbps * 1e3)
        launch = decode.decode_launch((1, hq, 1, 128), hkv, n, False, False, torch.bfloat16, q.device)
        for name, c in variants.items():
            rows.append({"shape": f"{hq}:{hkv} {n // 1024}k", "variant": name, "rel_l2": errors[name],
                         "plain_us": plain_us[name], "graph_us": graph(c, hq, hkv, n), "floor_us": floor,
                         "params": dict(launch.params)})  # fmt: skip
            doc = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "read_gbps": read_gbps,
                   "commit": os.environ.get("ATTNFORGE_GIT_COMMIT"), "rows": rows}  # fmt: skip
            with open(path, "w") as f:
                json.dump(doc, f, indent=1)
    short_rows(rows, doc, path)
    print(f"{'shape':18} {'variant':9} {'relL2':>7} {'plain':>6} {'graph':>6} {'floor':>5}")
    for r in rows:
        print(f"{r['shape']:18} {r['variant']:9} {r['rel_l2']:7.1e} {r['plain_us']:6.1f} "
              f"{r['graph_us']:6.1f} {r['floor_us']:5.1f}")  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1])
