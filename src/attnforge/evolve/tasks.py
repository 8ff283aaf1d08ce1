"""What a candidate kernel is judged on: the task, and the calls of each stage drawn from one seed.

A `Task` names the kernel kind (decode or prefill: the candidate's entry point has that kernel's
signature), the dtype, the shapes checked for correctness and the shapes timed. `stage_calls(task, seed,
stage)` and `timed_query(task, seed, shape, rep)` build the inputs on the CPU from the seed alone, so the
process that runs the candidate (the runner) and the process that judges its outputs (the evaluator) build
bit-identical inputs without sharing any memory: the candidate never sees the oracle, and the judge never
runs candidate code.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field

import torch

from attnforge import verify
from attnforge.config import MAX_DECODE_QUERY_LEN, AttentionConfig

KINDS = ("decode", "prefill")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TIMING_MODES = ("auto", "cuda", "interpreter", "none")
# The candidate's entry point: attention(q, k, v, *, scale=None, causal=True, kv_lens=None) -> [B, Hq, Lq, D].
ENTRY_POINT = "attention"


@dataclass(frozen=True)
class TaskShape:
    """q `[B, Hq, Lq, D]`, k/v `[B, Hkv, Lkv, D]`; `valid`: kv_lens per sequence (None: every key valid)."""

    batch: int
    num_heads: int
    num_kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    valid: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        self.attention_config(torch.float32)  # refuses sizes no call can have
        if self.valid is not None:
            object.__setattr__(self, "valid", tuple(int(n) for n in self.valid))
            if len(self.valid) != self.batch or not all(self.q_len <= n <= self.kv_len for n in self.valid):
                raise ValueError(f"valid={self.valid} needs {self.batch} lengths in [{self.q_len}, "
                                 f"{self.kv_len}] (one per sequence)")  # fmt: skip

    def attention_config(self, dtype: torch.dtype, *, causal: bool = True) -> AttentionConfig:
        """The call of these sizes in `dtype`."""
        sizes = (self.batch, self.num_heads, self.num_kv_heads, self.q_len, self.kv_len, self.head_dim)
        return AttentionConfig.from_sizes(*sizes, dtype=dtype, causal=causal)

    @property
    def label(self) -> str:
        valid = "" if self.valid is None else f"-valid{min(self.valid)}"
        return (f"B{self.batch}-{self.num_heads}:{self.num_kv_heads}-Lq{self.q_len}-Lkv{self.kv_len}"
                f"-d{self.head_dim}{valid}")  # fmt: skip


@dataclass(frozen=True)
class Task:
    """What `evaluate` checks and times.

    Args:
        kind: "decode" (Lq 1..16, causal, bottom-right aligned to the cache) or "prefill".
        dtype: "float32", "bfloat16" or "float16".
        check_shapes: shapes of the correctness stages (every protocol case kind at each).
        time_shapes: shapes of the timing stage (default: none; then the score is correctness only).
        timing: "auto" (CUDA events on a GPU, none without one), "cuda", "interpreter" (wall-clock of the
            Triton interpreter against attnforge's own kernel on the CPU: only for testing a search loop),
            or "none".
        reps: timed samples per provider and shape.
        timeout_s: wall-clock limit of the candidate's process (all stages together).
        memory_gib: address-space cap of the candidate's process; applied only without CUDA (a CUDA process
            reserves far more virtual memory than it uses), None for no cap.
    """

    kind: str
    dtype: str = "float32"
    check_shapes: tuple[TaskShape, ...] = ()
    time_shapes: tuple[TaskShape, ...] = ()
    timing: str = "auto"
    reps: int = 30
    timeout_s: float = 600.0
    memory_gib: float | None = 16.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r} is not one of {KINDS}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not one of {tuple(DTYPES)}")
        if self.timing not in TIMING_MODES:
            raise ValueError(f"timing={self.timing!r} is not one of {TIMING_MODES}")
        if not self.check_shapes:
            raise ValueError("a task needs at least one check shape")
        if self.reps < 1 or self.timeout_s <= 0:
            raise ValueError(f"reps={self.reps} must be >= 1 and timeout_s={self.timeout_s} > 0")
        object.__setattr__(self, "check_shapes", tuple(_as_shape(s) for s in self.check_shapes))
        object.__setattr__(self, "time_shapes", tuple(_as_shape(s) for s in self.time_shapes))
        if self.kind == "decode":
            for shape in self.check_shapes + self.time_shapes:
                if shape.q_len > MAX_DECODE_QUERY_LEN:
                    raise ValueError(f"decode shape {shape.label}: q_len={shape.q_len} is not in "
                                     f"1..{MAX_DECODE_QUERY_LEN}")  # fmt: skip

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def timing_mode(self, cuda: bool) -> str:
        """The timing this task gets where CUDA is (not) available: "cuda", "interpreter" or "none"."""
        if self.timing == "auto":
            return "cuda" if cuda and self.time_shapes else "none"
        if self.timing == "cuda" and not cuda:
            return "none"
        return self.timing if self.time_shapes else "none"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Task:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ValueError(f"unknown task fields {unknown}; accepted: {sorted(fields)}")
        return cls(**data)


def _as_shape(value) -> TaskShape:
    if isinstance(value, TaskShape):
        return value
    if isinstance(value, dict):
        return TaskShape(**value)
    return TaskShape(*value)


def default_task(kind: str = "decode", *, cuda: bool | None = None, timing: str = "auto") -> Task:
    """The standard task of `kind` for this machine: bf16 GQA/MQA/MHA shapes at odd lengths on a GPU (timed at
    KV 4k and 16k, and a static cache of 4k valid keys in 32k for decode); small fp32 shapes on the CPU."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not one of {KINDS}")
    if kind == "decode":
        if cuda:
            check = [(2, 32, 8, 1, 4097, 128), (1, 16, 2, 4, 1000, 64), (1, 32, 8, 16, 63, 128),
                     (3, 8, 1, 1, 65, 128), (1, 8, 8, 1, 7, 128), (1, 8, 1, 1, 1, 128)]  # fmt: skip
            timed = [(1, 32, 8, 1, 4096, 128), (1, 32, 8, 1, 16384, 128), (1, 32, 8, 1, 32768, 128, (4096,))]
            return Task("decode", "bfloat16", check, timed, timing, memory_gib=None)
        check = [(2, 4, 2, 1, 65, 64), (1, 6, 2, 4, 63, 64), (1, 2, 1, 16, 33, 64), (1, 4, 4, 1, 7, 64),
                 (1, 2, 1, 2, 300, 64), (1, 4, 1, 1, 1, 64)]  # fmt: skip
        return Task("decode", "float32", check, [(1, 4, 2, 1, 512, 64)], timing, reps=3)
    if cuda:
        check = [(1, 32, 8, 1000, 1000, 128), (2, 16, 4, 63, 4097, 64), (1, 8, 1, 65, 65, 128)]
        timed = [(1, 32, 8, 2048, 2048, 128), (1, 32, 8, 512, 4096, 128)]
        return Task("prefill", "bfloat16", check, timed, timing, reps=20, memory_gib=None)
    check = [(1, 4, 2, 33, 33, 64), (2, 4, 1, 7, 65, 64)]
    return Task("prefill", "float32", check, [(1, 4, 2, 64, 64, 64)], timing, reps=3)


# ----------------------------------------------------------------------------------------------------------
# Calls of the correctness stages


@dataclass
class Call:
    """One call of the candidate: a protocol case; `reuse`: index of an earlier call whose buffers the runner
    fills with this call's values before calling (same pointers, new values: defeats caching by data_ptr)."""

    name: str
    case: verify.Case = field(repr=False)
    reuse: int | None = None


def seed_for(*parts) -> int:
    """A 63-bit seed derived from `parts` (the evaluation's seed, a stage, a shape, a repetition)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def stage_calls(task: Task, seed: int, stage: int) -> list[Call]:
    """The calls of stage 1 (one random case) or stage 2 (the whole protocol at every check shape, then the
    probes), drawn on the CPU from `seed`: the same list, bit for bit, in every process."""
    generator = torch.Generator().manual_seed(seed_for(seed, "stage", stage))
    options = {"generator": generator}
    if stage == 1:
        return [
            Call(
                "smoke",
                verify.random_case(task.check_shapes[0].attention_config(task.torch_dtype), **options),
            )
        ]
    if stage != 2:
        raise ValueError(f"stage={stage} has no correctness calls (1 or 2)")
    calls = []
    for index, task_shape in enumerate(task.check_shapes):
        shape = task_shape.attention_config(task.torch_dtype)
        for case in verify.protocol_cases(shape, **options):
            calls.append(Call(f"{case.name}@{index}", case))
        calls.append(Call(f"needle-random@{index}", verify.needle_case(shape, position="random", **options)))
        scaled = verify.random_case(shape, **options)
        scaled.scale = 0.5 / shape.head_dim**0.5
        calls.append(Call(f"scale@{index}", scaled))
        if task.kind == "prefill":
            calls.append(
                Call(
                    f"non-causal@{index}",
                    verify.random_case(dataclasses.replace(shape, causal=False), **options),
                )
            )
    return resolve_reuse(calls + _probes(task.check_shapes[0].attention_config(task.torch_dtype), options))


def _probes(shape: AttentionConfig, options: dict) -> list[Call]:
    """Calls aimed at caching and call-count tricks (see docs/evolve.md)."""
    first = verify.random_case(shape, **options)
    refill = verify.random_case(shape, **options)
    twin = verify.random_case(shape, **options)
    # Same multiset of values per row (same sums, norms, extremes), different answer: defeats fingerprints.
    stats_twin = verify.Case("same-statistics", twin.q.roll(1, dims=-1).contiguous(), twin.k.clone(),
                             twin.v.flip(-1).contiguous(), causal=twin.causal)  # fmt: skip
    repeats = [verify.random_case(shape, **options) for _ in range(3)]
    calls = [Call("buffers-first", first), Call("same-buffers-new-values", refill, reuse=-1),
             Call("statistics-first", twin), Call("same-statistics", stats_twin)]  # fmt: skip
    calls += [Call(f"repeat-{i}", case) for i, case in enumerate(repeats)]
    return calls


def resolve_reuse(calls: list[Call]) -> list[Call]:
    """Relative `reuse` indices (-1: the previous call) made absolute."""
    for index, call in enumerate(calls):
        if call.reuse is not None and call.reuse < 0:
            call.reuse = index + call.reuse
    return calls


# ----------------------------------------------------------------------------------------------------------
# Inputs of the timing stage


def timed_kv(task: Task, seed: int, index: int) -> verify.Case:
    """The keys and values (and valid lengths) of timed shape `index`, drawn on the CPU; zeros beyond the
    valid lengths (a real static cache, and torch's masked paths read them)."""
    task_shape = task.time_shapes[index]
    generator = torch.Generator().manual_seed(seed_for(seed, "time", index))
    lens = None if task_shape.valid is None else list(task_shape.valid)
    cfg = task_shape.attention_config(task.torch_dtype)
    case = verify.random_case(cfg, kv_lens=lens, generator=generator, name=f"timed@{index}")
    if case.kv_lens is not None:
        for b, end in enumerate(case.kv_lens.tolist()):
            case.k[b, :, end:] = 0
            case.v[b, :, end:] = 0
    return case


def timed_query(task: Task, seed: int, index: int, rep: int) -> torch.Tensor:
    """The query of repetition `rep` at timed shape `index` (a new one for every timed call), on the CPU."""
    s = task.time_shapes[index]
    generator = torch.Generator().manual_seed(seed_for(seed, "query", index, rep))
    q = torch.randn((s.batch, s.num_heads, s.q_len, s.head_dim), generator=generator)
    return q.to(task.torch_dtype)


def model_task(num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, *, cuda: bool) -> Task:
    """Correctness only, at a model's attention shapes: what an evolved decode kernel must pass before
    `load_and_patch_model` lets the model use it (one query token against a cache, a few new tokens, padding,
    odd lengths)."""
    names = {value: name for name, value in DTYPES.items()}
    if dtype not in names:
        raise ValueError(f"dtype={dtype} is not one of {tuple(DTYPES)}")
    shape = (num_heads, num_kv_heads)
    check = [(2, *shape, 1, 65, head_dim), (1, *shape, 4, 33, head_dim)]
    if cuda:
        check += [(1, *shape, 16, 1000, head_dim), (2, *shape, 1, 4097, head_dim)]
    return Task("decode", names[dtype], check, (), timing="none", memory_gib=None if cuda else 16.0)


def full_task(kind: str = "decode", *, cuda: bool | None = None) -> Task:
    """The standard task with more shapes: every odd length of the protocol (up to 4097 on a GPU), and on a
    GPU the decode grid's contiguous, static-cache and batched rows as timed shapes."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    base = default_task(kind, cuda=cuda)
    head = (32, 8, 128) if cuda else (4, 2, 64)
    lengths = [n for n in verify.ODD_LENGTHS if n <= (4097 if cuda else 1000)]
    q_len = (lambda n: min(n, 4)) if kind == "decode" else (lambda n: n if n <= 1000 else 512)
    extra = [(1, head[0], head[1], q_len(n), n, head[2]) for n in lengths]
    timed = list(base.time_shapes)
    if cuda and kind == "decode":
        timed += [(1, 32, 8, 1, 1024, 128), (1, 32, 8, 1, 65536, 128), (8, 32, 8, 1, 4096, 128),
                  (8, 32, 8, 1, 16384, 128, tuple(1024 + 2048 * i for i in range(8)))]  # fmt: skip
    return dataclasses.replace(base, check_shapes=base.check_shapes + tuple(extra), time_shapes=tuple(timed))
