"""What an attention call looks like: shapes, pattern ("GQA-5:1") and phase (decode or prefill)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

SUPPORTED_HEAD_DIMS = (64, 80, 96, 128, 256)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Query lengths up to this count as decode (one token, or a few speculative ones).
MAX_DECODE_QUERY_LEN = 16


def _require_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive integer")


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise a clear error unless q `[B, Hq, Lq, D]`, k and v `[B, Hkv, Lkv, D]` fit together.

    Meta tensors (no data) are refused; the FakeTensors torch.compile traces with report a real device and
    pass.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device.type == "meta":
            raise ValueError(
                f"{name} is on the meta device: attnforge kernels need real tensors "
                "(CUDA, or CPU under TRITON_INTERPRET=1)"
            )
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dims [B, H, L, D], got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch (dim 0) and head_dim (dim 3)"
        )
    if q.shape[1] % k.shape[1]:
        raise ValueError(
            f"q heads {q.shape[1]} are not a multiple of k/v heads {k.shape[1]} (Hq % Hkv must be 0)"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v devices differ: {q.device}, {k.device}, {v.device}")


def resolve_scale(scale: float | None, head_dim: int) -> float:
    """The softmax scale to use: `scale` as a float, or 1/sqrt(head_dim) for None.

    Raises:
        ValueError: for NaN, infinity, a value <= 0, or anything that is not a real number (bool included).
    """
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    number = isinstance(scale, numbers.Real) and not isinstance(scale, bool)
    if not (number and math.isfinite(scale) and scale > 0):
        raise ValueError(
            f"scale={scale!r} is not accepted: it must be a finite number > 0 (default 1/sqrt(head_dim))"
        )
    return float(scale)


LENGTH_DTYPES = (torch.int32, torch.int64)


def check_lengths(name: str, lens: torch.Tensor | None, batch: int, device: torch.device | str) -> None:
    """Raise a clear error unless `lens` (kv_lens or q_lens) is None or an int32/int64 `[batch]` tensor on
    `device` (q's device).

    Values are not checked here (that would need a host sync): the kernels clamp them on the device.

    Raises:
        TypeError: `lens` is not a tensor, or its dtype is not int32/int64.
        ValueError: its shape is not `(batch,)`, or it is on another device.
    """
    if lens is None:
        return
    device = torch.device(device)
    wanted = f"an integer tensor (int32 or int64) of shape [B]=({batch},) on {device}"
    if not isinstance(lens, torch.Tensor):
        raise TypeError(f"{name} must be {wanted}, got {type(lens).__name__}")
    if tuple(lens.shape) != (batch,):
        raise ValueError(f"{name} must be {wanted}, got shape {tuple(lens.shape)}")
    if lens.dtype not in LENGTH_DTYPES:
        raise TypeError(f"{name} dtype {lens.dtype} is not supported; accepted: int32, int64")
    if lens.device.type != device.type or device.index not in (None, lens.device.index):
        raise ValueError(f"{name} is on {lens.device}: it must be on q's device {device}")


@dataclass(frozen=True)
class AttentionConfig:
    """Shape of one attention call: q `[B, Hq, Lq, D]`, k/v `[B, Hkv, Lkv, D]`, its dtype and masking.

    The one shape type of the project: the optimizer's policy, the correctness protocol (verify.py), the
    benchmarks and the evolve tasks all describe calls with it. It accepts any call attention is defined for;
    whether attnforge's kernels take it (head_dim in SUPPORTED_HEAD_DIMS, dtype in SUPPORTED_DTYPES) is
    `unsupported_by_kernels`'s answer, which the optimizer gives as its reason to fall back.

    Args:
        num_heads: query heads Hq.
        num_kv_heads: key/value heads Hkv; Hq must be a multiple of it.
        head_dim: D.
        seq_len: query length Lq (new tokens), at most kv_len.
        batch_size: B.
        kv_len: key/value length Lkv (the new tokens included); defaults to seq_len (fresh prefill).
        dtype: a floating-point dtype (attnforge's kernels: float16, bfloat16, float32).
        causal: bottom-right aligned causal masking.
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    seq_len: int
    batch_size: int = 1
    kv_len: int | None = None
    dtype: torch.dtype = torch.bfloat16
    causal: bool = True

    def __post_init__(self) -> None:
        for name in ("num_heads", "num_kv_heads", "head_dim", "seq_len", "batch_size"):
            _require_positive(name, getattr(self, name))
        if self.kv_len is None:
            object.__setattr__(self, "kv_len", self.seq_len)
        _require_positive("kv_len", self.kv_len)
        if self.seq_len > self.kv_len:
            raise ValueError(
                f"seq_len={self.seq_len} exceeds kv_len={self.kv_len}: the queries are the last seq_len "
                "positions of the keys, so seq_len <= kv_len is required"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not divisible by num_kv_heads={self.num_kv_heads}: "
                f"num_kv_heads must divide num_heads (e.g. 1, {self.num_heads})"
            )
        if not (isinstance(self.dtype, torch.dtype) and self.dtype.is_floating_point):
            raise ValueError(f"dtype={self.dtype} is not supported: attention needs a floating-point dtype")

    @property
    def gqa_ratio(self) -> int:
        """Query heads per key/value head (1 for MHA)."""
        return self.num_heads // self.num_kv_heads

    @property
    def attention_pattern(self) -> str:
        """'MHA', 'MQA' or 'GQA-{ratio}:1'."""
        if self.num_kv_heads == self.num_heads:
            return "MHA"
        if self.num_kv_heads == 1:
            return "MQA"
        return f"GQA-{self.gqa_ratio}:1"

    @property
    def phase(self) -> str:
        """'decode' for up to MAX_DECODE_QUERY_LEN new tokens, else 'prefill'."""
        return "decode" if self.seq_len <= MAX_DECODE_QUERY_LEN else "prefill"

    @classmethod
    def from_sizes(
        cls,
        batch: int,
        num_heads: int,
        num_kv_heads: int,
        q_len: int,
        kv_len: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.bfloat16,
        causal: bool = True,
    ) -> AttentionConfig:
        """The config of q `[batch, num_heads, q_len, head_dim]`, k/v `[batch, num_kv_heads, kv_len,
        head_dim]` (the sizes in the tensors' order)."""
        return cls(num_heads, num_kv_heads, head_dim, q_len, batch, kv_len, dtype, causal)

    @property
    def q_shape(self) -> tuple[int, int, int, int]:
        """`[B, Hq, Lq, D]`."""
        return (self.batch_size, self.num_heads, self.seq_len, self.head_dim)

    @property
    def kv_shape(self) -> tuple[int, int, int, int]:
        """`[B, Hkv, Lkv, D]`."""
        return (self.batch_size, self.num_kv_heads, self.kv_len, self.head_dim)

    @classmethod
    def from_tensors(
        cls, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True
    ) -> AttentionConfig:
        """Build a config from q `[B, Hq, Lq, D]`, k and v `[B, Hkv, Lkv, D]`."""
        check_qkv(q, k, v)
        batch, num_heads, seq_len, head_dim = q.shape
        return cls(
            num_heads=num_heads,
            num_kv_heads=k.shape[1],
            head_dim=head_dim,
            seq_len=seq_len,
            batch_size=batch,
            kv_len=k.shape[2],
            dtype=q.dtype,
            causal=causal,
        )


def unsupported_by_kernels(head_dim: int, dtype: torch.dtype) -> str | None:
    """Why attnforge's kernels cannot take calls of this head_dim and dtype (None: they can)."""
    if head_dim not in SUPPORTED_HEAD_DIMS:
        return f"head_dim unsupported: head_dim={head_dim} is not one of {SUPPORTED_HEAD_DIMS}"
    if dtype not in SUPPORTED_DTYPES:
        return f"dtype unsupported: dtype={dtype} is not one of {SUPPORTED_DTYPES}"
    return None


KERNEL_KINDS = ("decode", "prefill")


def _require_optional_positive(name: str, value: int | None) -> None:
    if value is not None:
        _require_positive(name, value)


@dataclass(frozen=True)
class OptimizerSettings:
    """When the optimizer may use attnforge's kernels instead of torch SDPA.

    The default decision comes from the tuning table (kernels/tuning.py): a kernel runs where it was measured
    at least `min_speedup` times faster than torch SDPA on this GPU. The other thresholds only narrow that
    down; None means "no limit beyond the table".

    Args:
        enable_debug: log each new dispatch decision once (logging, logger "attnforge.optimizer").
        min_seq_len: use kernels only when the key/value length is at least this (with a static cache: the
            length of the cache buffer, as valid lengths live on the GPU).
        max_seq_len: use kernels only when the key/value length is at most this.
        gqa_ratio_min: use kernels only when Hq / Hkv is at least this (1 admits MHA).
        min_heads: use kernels only with at least this many query heads.
        kernels: which attnforge kernels may run, a subset of ("decode", "prefill").
        min_speedup: the measured speed-up over torch SDPA a kernel needs to be chosen (> 0).
        require_measurement: with False, a kernel the tuning table has no measurement for runs anyway
            (a new GPU, tests on a GPU); measured kernels still need `min_speedup`.
        architecture_entries: a GPU without tuning entries of its own uses those measured on another GPU of
            its architecture (an H200 those of an H100: both sm90); False uses this GPU's entries only.
    """

    enable_debug: bool = False
    min_seq_len: int | None = None
    max_seq_len: int | None = None
    gqa_ratio_min: int = 1
    min_heads: int = 1
    kernels: tuple[str, ...] = KERNEL_KINDS
    min_speedup: float = 1.0
    require_measurement: bool = True
    architecture_entries: bool = True

    def __post_init__(self) -> None:
        for name in ("enable_debug", "require_measurement", "architecture_entries"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be True or False")
        _require_optional_positive("min_seq_len", self.min_seq_len)
        _require_optional_positive("max_seq_len", self.max_seq_len)
        _require_positive("gqa_ratio_min", self.gqa_ratio_min)
        _require_positive("min_heads", self.min_heads)
        if (
            self.min_seq_len is not None
            and self.max_seq_len is not None
            and self.min_seq_len > self.max_seq_len
        ):
            raise ValueError(
                f"min_seq_len={self.min_seq_len} exceeds max_seq_len={self.max_seq_len}: "
                "the accepted range is min_seq_len <= max_seq_len"
            )
        kernels = (self.kernels,) if isinstance(self.kernels, str) else tuple(self.kernels)
        unknown = [kind for kind in kernels if kind not in KERNEL_KINDS]
        if unknown:
            raise ValueError(f"kernels={kernels!r} names unknown kernels {unknown}; accepted: {KERNEL_KINDS}")
        object.__setattr__(self, "kernels", kernels)
        speedup_ok = isinstance(self.min_speedup, (int, float)) and not isinstance(self.min_speedup, bool)
        if not speedup_ok or not 0 < self.min_speedup < float("inf"):
            raise ValueError(f"min_speedup={self.min_speedup!r} must be a finite number > 0 (e.g. 1.0, 1.1)")
