"""Issue 11 probe (scratch): what one persistent kernel a layer would buy the batch-8 step over one kernel a
product chained with PDL, measured on the synchronisation alone.

The batch-8 step's products each run 2-4.5 us above their read floor (h100/swap-ab-20261207, st-fit-20261207):
each is its own kernel, whose weights start to stream only once its programs are resident and whose result
is read only once it has drained. One persistent program an SM could ask the L2 for every phase's weights
at once and pass from phase to phase through a grid barrier (an arrival counter) instead of a kernel edge.
This probe times that structure with the products' work replaced by reads: each program sums its share of
a phase's buffer (the share of the weight it would multiply), scaled by the previous phase's total (the
dependency a norm or a product has on the whole previous output), and stores one partial. Same read code,
same shares, two ways:
  - `chain`: one kernel a phase, launched with PDL; with `warm`, each program asks the L2 for its share
    before `gdc_wait` (what the library's `prefetch` does), then reads it after;
  - `persistent`: one kernel of one program an SM for all phases, a grid barrier between phases; with
    `warm`, each program asks the L2 for all its shares at the start.
Phases (MiB, bf16, Qwen3-0.6B at batch 8): `mlp` o 4, gate/up 12, down 6; `layer` q/k/v 8, attention's K/V 6,
then the MLP's. Beside them the library's three MLP products as the step calls them (`fused_linear`, 8 rows:
o with the residual, gate/up with its norm and glu, down with the residual). Per call in graphs of 28 calls
on distinct buffers (`timing.time_graphs_per_call`), the read floor measured in the same run.

    PYTHONPATH=src:<wheels> python probe.py check            (GPU: every variant against float64)
    PYTHONPATH=src:<wheels> python probe.py time OUT.json    (GPU: check, then time; about 1 minute)
    PYTHONPATH=src:<wheels> python probe.py sweep OUT.json   (GPU: the chained phases at 132-1056 programs)
    PYTHONPATH=<triton 3.6>:src python probe.py compile      (no GPU: both kernels for sm_90, registers)
"""

import json
import statistics
import sys
from functools import partial

import torch
import triton
import triton.language as tl

from attnforge.bench import timing
from attnforge.environment import environment_report
from attnforge.kernels import gemv
from attnforge.kernels.pdl import gdc_launch_dependents, gdc_wait, warm_l2

PHASES = {"mlp": (4, 12, 6), "layer": (8, 6, 4, 12, 6)}  # MiB a phase
LAYERS = 28
BLOCK = 4096  # elements a load
UNROLL = 8  # loads in flight a loop step (64 KB a program)
CHUNK = 4096  # bytes a bulk L2 prefetch
MAX_CHUNKS = 64  # a share of at most 256 KB
PB = 256  # partials a phase (at least the programs)
WARPS = 8


@triton.jit
def _share(ph: tl.constexpr, B0, B1, B2, B3, B4, N0, N1, N2, N3, N4, S0, S1, S2, S3, S4):
    """Phase `ph`'s buffer, its elements and the elements a program reads."""
    buf, n, share = B0, N0, S0
    if ph == 1:
        buf, n, share = B1, N1, S1
    if ph == 2:
        buf, n, share = B2, N2, S2
    if ph == 3:
        buf, n, share = B3, N3, S3
    if ph == 4:
        buf, n, share = B4, N4, S4
    return buf, n, share


@triton.jit
def _share_sum(buf, n, share, pid, BLOCK: tl.constexpr, UNROLL: tl.constexpr):
    """float32 sum of elements [pid * share, (pid + 1) * share) of `buf` (n elements), UNROLL loads a step."""
    lo = pid * share
    hi = tl.minimum(lo + share, n)
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], tl.float32)
    for i in range(lo, hi, BLOCK * UNROLL):
        for u in tl.static_range(UNROLL):
            idx = i + u * BLOCK + offs
            acc += tl.load(buf + idx, mask=idx < hi, other=0.0).to(tl.float32)
    return tl.sum(acc)


@triton.jit
def _warm(buf, n, share, pid, CHUNK: tl.constexpr, MAX_CHUNKS: tl.constexpr):
    """This program's share of `buf` asked of the L2 (bulk prefetches of CHUNK bytes)."""
    lo = pid * share * 2
    hi = tl.minimum(lo + share * 2, n * 2)
    starts = lo + tl.arange(0, MAX_CHUNKS) * CHUNK
    warm_l2(buf.to(tl.pointer_type(tl.int8)) + starts, tl.minimum(hi - starts, CHUNK), starts < hi)


@triton.jit
def _scale(Part, ph, P, PB: tl.constexpr):
    """1 + 1e-9 x phase ph's total (its partials summed in program order): the next phase's dependency."""
    offs = tl.arange(0, PB)
    total = tl.sum(tl.load(Part + ph * PB + offs, mask=offs < P, other=0.0, cache_modifier=".cg"))
    return 1.0 + total * 1e-9


@triton.jit
def _grid_barrier(Sync, target, ATOM_SPIN: tl.constexpr):
    """Wait until `target` arrivals are counted in Sync[0], this program's included (release / acquire).
    The wait polls with every thread's volatile load, or with ATOM_SPIN one atomic a program a poll (a
    scalar atomic is issued by one thread: 132 pollers instead of 132 x 256)."""
    tl.debug_barrier()  # every thread's stores are issued before the arrival
    tl.atomic_add(Sync, 1, sem="release", scope="gpu")
    if ATOM_SPIN:
        seen = tl.atomic_add(Sync, 0, sem="acquire", scope="gpu")
        while seen < target:
            seen = tl.atomic_add(Sync, 0, sem="acquire", scope="gpu")
    else:
        seen = tl.load(Sync, volatile=True)
        while seen < target:
            seen = tl.load(Sync, volatile=True)
        tl.atomic_add(Sync, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _persistent_kernel(B0, B1, B2, B3, B4, N0, N1, N2, N3, N4, S0, S1, S2, S3, S4, Part, Sync, P,
                       NPH: tl.constexpr, WARM: tl.constexpr, ATOM_SPIN: tl.constexpr, BLOCK: tl.constexpr,
                       UNROLL: tl.constexpr,
                       CHUNK: tl.constexpr, MAX_CHUNKS: tl.constexpr, PB: tl.constexpr):  # fmt: skip
    pid = tl.program_id(0)
    if WARM:
        for ph in tl.static_range(NPH):
            buf, n, share = _share(ph, B0, B1, B2, B3, B4, N0, N1, N2, N3, N4, S0, S1, S2, S3, S4)
            _warm(buf, n, share, pid, CHUNK, MAX_CHUNKS)
    scale = 1.0
    for ph in tl.static_range(NPH):
        buf, n, share = _share(ph, B0, B1, B2, B3, B4, N0, N1, N2, N3, N4, S0, S1, S2, S3, S4)
        tl.store(Part + ph * PB + pid, _share_sum(buf, n, share, pid, BLOCK, UNROLL) * scale)
        if ph + 1 < NPH:
            _grid_barrier(Sync, (ph + 1) * P, ATOM_SPIN)
            scale = _scale(Part, ph, P, PB)
    done = tl.atomic_add(Sync + 1, 1, sem="acq_rel", scope="gpu")
    if done == P - 1:  # every program is past every barrier: the counters back to 0 for the next launch
        tl.store(Sync, 0)
        tl.store(Sync + 1, 0)


@triton.jit
def _phase_kernel(Buf, N, S, Part, P, PH, HAS_PREV: tl.constexpr, WARM: tl.constexpr, USE_PDL: tl.constexpr,
                  BLOCK: tl.constexpr, UNROLL: tl.constexpr, CHUNK: tl.constexpr, MAX_CHUNKS: tl.constexpr,
                  PB: tl.constexpr):  # fmt: skip
    pid = tl.program_id(0)
    if USE_PDL:
        gdc_launch_dependents()
        if WARM:
            _warm(Buf, N, S, pid, CHUNK, MAX_CHUNKS)
        gdc_wait()
    scale = 1.0
    if HAS_PREV:
        scale = _scale(Part, PH - 1, P, PB)
    tl.store(Part + PH * PB + pid, _share_sum(Buf, N, S, pid, BLOCK, UNROLL) * scale)


def shares(sizes: list[int], programs: int) -> list[int]:
    """Elements a program reads of each phase: whole loads, every element covered."""
    return [triton.cdiv(triton.cdiv(n, programs), BLOCK) * BLOCK for n in sizes]


def launcher(bufs: list[torch.Tensor], part: torch.Tensor, sync: torch.Tensor, way: str, warm: bool,
             programs: int, pb: int = PB):  # fmt: skip
    """A call running every phase over `bufs` (the partials into `part`, `pb` a phase), one way: "chain",
    or persistent with the barrier polled by "volatile" loads or by one "atom" a program."""
    sizes = [b.numel() for b in bufs]
    share = shares(sizes, programs)
    consts = dict(WARM=warm, BLOCK=BLOCK, UNROLL=UNROLL, CHUNK=CHUNK, MAX_CHUNKS=MAX_CHUNKS, PB=pb,
                  num_warps=WARPS)  # fmt: skip
    if way != "chain":
        pad = 5 - len(bufs)
        args = [*bufs, *bufs[:1] * pad, *sizes, *sizes[:1] * pad, *share, *share[:1] * pad]
        return lambda: _persistent_kernel[(programs,)](*args, part, sync, programs, NPH=len(bufs),
                                                       ATOM_SPIN=way == "atom", **consts)  # fmt: skip

    def call():
        for ph, (b, n, s) in enumerate(zip(bufs, sizes, share, strict=True)):
            _phase_kernel[(programs,)](b, n, s, part, programs, ph, HAS_PREV=ph > 0, USE_PDL=True,
                                       launch_pdl=True, **consts)  # fmt: skip

    return call


def expected(bufs: list[torch.Tensor]) -> float:
    """The last phase's total in float64 (each partial scaled by 1 + 1e-9 x the previous total)."""
    total = 0.0
    for ph, b in enumerate(bufs):
        total = b.double().sum().item() * (1.0 + total * 1e-9 if ph else 1.0)
    return total


def make_bufs(mib: tuple, layers: int) -> list[list[torch.Tensor]]:
    """`layers` sets of phase buffers (bf16 in [0, 1): no cancellation in the sums)."""
    return [[torch.rand(m << 19, device="cuda", dtype=torch.bfloat16) for m in mib] for _ in range(layers)]


# label -> (way, warm): how `launcher` runs the phases, and whether shares are asked of the L2 first
VARIANTS = {"chain": ("chain", False), "chain-warm": ("chain", True), "persistent": ("volatile", False),
            "persistent-warm": ("volatile", True), "persistent-atom": ("atom", False),
            "persistent-atom-warm": ("atom", True)}  # fmt: skip


def check(programs: int) -> dict:
    """Every variant's last total against float64, twice (the counters reset between launches)."""
    out = {}
    for name, mib in PHASES.items():
        bufs = make_bufs(mib, 1)[0]
        want = expected(bufs)
        for label, (way, warm) in VARIANTS.items():
            part = torch.full((len(mib), PB), float("nan"), device="cuda")
            sync = torch.zeros(2, device="cuda", dtype=torch.int32)
            call = launcher(bufs, part, sync, way, warm, programs)
            got = []
            for _ in range(2):
                call()
                torch.cuda.synchronize()
                got.append(part[len(mib) - 1, :programs].double().sum().item())
            rel = max(abs(g - want) / abs(want) for g in got)
            ok = rel < 1e-5 and sync.tolist() == [0, 0]
            out[f"{name} {label}"] = {"rel": rel, "ok": ok, "sync": sync.tolist()}
            print(f"{name:6s} {label:16s} rel {rel:.2e} sync {sync.tolist()} {'ok' if ok else 'WRONG'}",
                  flush=True)  # fmt: skip
    return out


def mlp_makers(layers: int) -> dict:
    """The library's MLP products at 8 rows as the batch-8 step calls them, on `layers` weight sets."""
    dev, dt = "cuda", torch.bfloat16
    a = torch.randn(8, 2048, device=dev, dtype=dt)
    res = torch.randn(8, 1024, device=dev, dtype=dt)
    gain = torch.rand(1024, device=dev, dtype=dt) + 0.5
    ws = [(torch.randn(1024, 2048, device=dev, dtype=dt) * 0.02, torch.randn(6144, 1024, device=dev, dtype=dt)
           * 0.03, torch.randn(1024, 3072, device=dev, dtype=dt) * 0.02) for _ in range(layers)]  # fmt: skip

    def mlp(i):
        wo, wgu, wd = ws[i]
        y1 = gemv.fused_linear(a, wo, residual=res)
        h = gemv.fused_linear(y1, wgu, norm=(gain, 1e-6), glu=True)
        return gemv.fused_linear(h, wd, residual=y1)

    return {"library mlp": lambda i: lambda: mlp(i)}


def layer_call(sets, parts, syncs, way: str, warm: bool, programs: int, i: int):
    """Layer i's call of one variant (for `timing.time_graphs_per_call`)."""
    return launcher(sets[i], parts[i], syncs[i], way, warm, programs)


def save(path: str, result: dict) -> None:
    with open(path, "w") as file:
        json.dump(result, file, indent=1)


def time_all(path: str, programs: int) -> None:
    result = {"environment": environment_report(), "programs": programs, "layers": LAYERS,
              "check": check(programs), "rows": {}}  # fmt: skip

    def makers_for(mib: tuple, sets: list) -> dict:
        parts = [torch.zeros(len(mib), PB, device="cuda") for _ in range(LAYERS)]
        syncs = [torch.zeros(2, device="cuda", dtype=torch.int32) for _ in range(LAYERS)]
        return {label: partial(layer_call, sets, parts, syncs, p, w, programs)
                for label, (p, w) in VARIANTS.items()}  # fmt: skip

    time_phases(path, result, makers_for, f"{programs} programs")


def time_phases(path: str, result: dict, makers_for, what: str) -> None:
    """If every variant of `result["check"]` is right: each phase set's makers (`makers_for(mib, sets)`, and
    the library's MLP products beside the MLP), per call in 28-call graphs, into `result["rows"]` and `path`
    after each; the table last."""
    if not all(c["ok"] for c in result["check"].values()):
        print("a variant is wrong: not timed", result["check"])
        save(path, result)
        return
    read = timing.measure_read_bandwidth()
    result["read_gbps"] = read / 1e9
    for name, mib in PHASES.items():
        makers = makers_for(mib, make_bufs(mib, LAYERS))
        if name == "mlp":
            makers.update(mlp_makers(LAYERS))
        times = timing.time_graphs_per_call(makers, layers=LAYERS, reps=30)
        us = {k: statistics.median(t) if isinstance(t, list) else t for k, t in times.items()}
        result["rows"][name] = {"mib": mib, "floor_us": sum(mib) * 2**20 / read * 1e6, "us": us}
        save(path, result)
    print_rows(result, f"read {read / 1e9:.0f} GB/s, {what}; us a call (28 calls a graph):")


def print_rows(result: dict, header: str) -> None:
    print(header)
    for name, row in result["rows"].items():
        cells = "  ".join(
            f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in row["us"].items()
        )
        print(f"{name:6s} floor {row['floor_us']:.2f}  {cells}")


# `sweep` (twenty-third session): the chained phases at more programs than SMs (a program's share shrinks;
# several programs an SM keep more reads in flight), all with room for 2048 partials a phase
SWEEP_PROGRAMS = (132, 264, 528, 1056)
SWEEP_PB = 2048


def sweep_call(sets, parts, warm: bool, programs: int, i: int):
    """Layer i's chained phases at `programs` programs (for `timing.time_graphs_per_call`)."""
    return launcher(sets[i], parts[i], None, "chain", warm, programs, SWEEP_PB)


def sweep_check() -> dict:
    """The chained phases' last total against float64 at every program count."""
    out = {}
    for name, mib in PHASES.items():
        bufs = make_bufs(mib, 1)[0]
        want = expected(bufs)
        for programs in SWEEP_PROGRAMS:
            for warm in (False, True):
                part = torch.full((len(mib), SWEEP_PB), float("nan"), device="cuda")
                launcher(bufs, part, None, "chain", warm, programs, SWEEP_PB)()
                torch.cuda.synchronize()
                rel = abs(part[len(mib) - 1, :programs].double().sum().item() - want) / abs(want)
                out[f"{name} chain{'-warm' if warm else ''}-p{programs}"] = {"rel": rel, "ok": rel < 1e-5}
    return out


def sweep(path: str) -> None:
    """Chained phases (with and without warming the L2) at each of SWEEP_PROGRAMS, beside the library's
    three MLP products, per call in 28-call graphs, interleaved."""
    result = {"environment": environment_report(), "layers": LAYERS, "check": sweep_check(), "rows": {}}

    def makers_for(mib: tuple, sets: list) -> dict:
        makers = {}
        for programs in SWEEP_PROGRAMS:
            parts = [torch.zeros(len(mib), SWEEP_PB, device="cuda") for _ in range(LAYERS)]
            for warm in (False, True):
                label = f"chain{'-warm' if warm else ''}-p{programs}"
                makers[label] = partial(sweep_call, sets, parts, warm, programs)
        return makers

    time_phases(path, result, makers_for, "chained at 132-1056 programs")


def compile_offline() -> None:
    import os
    import re
    import subprocess
    import tempfile

    from attnforge.kernels.offline import compile_sm90

    tools = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin")
    consts = dict(WARM=True, BLOCK=BLOCK, UNROLL=UNROLL, CHUNK=CHUNK, MAX_CHUNKS=MAX_CHUNKS, PB=PB)
    ptrs = {f"B{i}": "*bf16" for i in range(5)} | {"Buf": "*bf16", "Part": "*fp32", "Sync": "*i32"}
    opts = {"num_warps": WARPS, "num_stages": 1}
    for name, kernel, extra in (("persistent", _persistent_kernel, {"NPH": 5, "ATOM_SPIN": True}),
                                ("phase", _phase_kernel, {"HAS_PREV": True, "USE_PDL": True})):  # fmt: skip
        k = compile_sm90(kernel, consts | extra, ptrs, opts | {"launch_pdl": name == "phase"})
        with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as file:
            file.write(k.asm["cubin"])
        use = subprocess.run([os.path.join(tools, "cuobjdump"), "-res-usage", file.name], capture_output=True,
                             text=True).stdout  # fmt: skip
        ptx, res = k.asm["ptx"], " ".join(re.findall(r"REG:\d+|STACK:\d+|LOCAL:\d+|SHARED:\d+", use))
        print(f"{name}: {res}; PTX "
              f"ld.global {ptx.count('ld.global')}, atom {ptx.count('atom.')}, prefetch "
              f"{ptx.count('prefetch.L2')}, griddepcontrol {ptx.count('griddepcontrol')}")  # fmt: skip


def main() -> None:
    mode = sys.argv[1] if len(sys.argv) > 1 else "check"
    if mode == "compile":
        compile_offline()
        return
    if mode == "sweep":
        sweep(sys.argv[2])
        return
    from attnforge.kernels.tuning import sm_count

    programs = sm_count("cuda")
    if mode == "check":
        check(programs)
    else:
        time_all(sys.argv[2], programs)


if __name__ == "__main__":
    main()
