"""The accelerator's static KV cache: preallocated keys and values for every layer, written in place.

Each layer owns one K and one V tensor `[max_batch, Hkv, max_seq_len, D]` (zeros at first, so the torch
fallback, which masks but still reads the padding, never meets NaN). They are separate tensors rather than
views of one `[layers, ...]` buffer on purpose: torch.compile treats views of one base that a graph mutates as
one aliased input and may copy the whole base, while separate tensors are updated in place (as transformers'
StaticCache does). Nothing is allocated after set-up: a write is one `index_put_` at each sequence's own
positions (a ragged batch writes each sequence at its own length), which a CUDA graph can capture.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

GIB = 2**30


class CacheTooLargeError(MemoryError):
    """The KV cache (or the model with it) does not fit in the device's memory."""


@dataclass(frozen=True)
class CacheShape:
    """What the cache holds: `layers` x (K, V) x `[batch, kv_heads, max_seq_len, head_dim]` of `dtype`.

    With `keep` set the cache rotates (ring.py): `max_seq_len` is then its slot count, max_kv_size.
    """

    layers: int
    batch: int
    kv_heads: int
    max_seq_len: int
    head_dim: int
    dtype: torch.dtype
    keep: int | None = None

    @property
    def length_name(self) -> str:
        """The accelerate() argument that sets the slot count."""
        return "max_seq_len" if self.keep is None else "max_kv_size"

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def nbytes(self) -> int:
        return (
            2
            * self.layers
            * self.batch
            * self.kv_heads
            * self.max_seq_len
            * self.head_dim
            * self.element_size
        )

    def bytes_per_token(self) -> int:
        """K and V bytes of one token of one sequence, over all layers."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.element_size

    def describe(self) -> str:
        return (
            f"{self.nbytes / GIB:.2f} GiB = {self.layers} layers x 2 (K and V) x batch {self.batch} x "
            f"{self.kv_heads} kv heads x {self.length_name} {self.max_seq_len}{self._ring()} x head_dim "
            f"{self.head_dim} x {self.element_size} bytes ({str(self.dtype).removeprefix('torch.')})"
        )

    def _ring(self) -> str:
        if self.keep is None:
            return ""
        return f" (rotating: {self.keep} kept + a ring of {self.max_seq_len - self.keep})"

    def fitting_seq_len(self, free_bytes: int) -> int:
        """The largest slot count (a multiple of 256) whose cache fits in `free_bytes`, or 0."""
        per_position = self.nbytes // self.max_seq_len
        return int(free_bytes // per_position) // 256 * 256


def free_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on `device` (CUDA: free memory; CPU: MemAvailable), or None."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def too_large_message(shape: CacheShape, free_bytes: int | None, device: torch.device) -> str:
    """What was asked, what is free, and the two ways to make it fit."""
    free = "unknown" if free_bytes is None else f"{free_bytes / GIB:.2f} GiB"
    fits = shape.fitting_seq_len(free_bytes) if free_bytes else 0
    name = shape.length_name
    hint = f"{name}={fits} would fit" if fits else f"no {name} fits at this batch size"
    return (
        f"the KV cache needs {shape.describe()}, but {free} is free on {device}: reduce {name} "
        f"({hint}) or max_batch_size={shape.batch}"
    )


class StaticKVCache:
    """Keys and values of `shape.batch` sequences for every layer, preallocated on `device`.

    Attributes:
        keys, values: per layer, `[batch, kv_heads, max_seq_len, head_dim]`.
        shape: the CacheShape.
    """

    def __init__(self, shape: CacheShape, device: torch.device | str) -> None:
        self.shape = shape
        self.device = torch.device(device)
        free = free_memory(self.device)
        if free is not None and shape.nbytes > free:
            raise CacheTooLargeError(too_large_message(shape, free, self.device))
        size = (shape.batch, shape.kv_heads, shape.max_seq_len, shape.head_dim)
        try:
            self.keys = [
                torch.zeros(size, dtype=shape.dtype, device=self.device) for _ in range(shape.layers)
            ]
            self.values = [
                torch.zeros(size, dtype=shape.dtype, device=self.device) for _ in range(shape.layers)
            ]
        except (torch.OutOfMemoryError, RuntimeError) as error:
            if isinstance(error, RuntimeError) and not _is_out_of_memory(error):
                raise
            self.keys = self.values = []
            raise CacheTooLargeError(
                too_large_message(shape, free_memory(self.device), self.device)
            ) from error
        batch_index = torch.arange(shape.batch, device=self.device)
        head_index = torch.arange(shape.kv_heads, device=self.device)
        self._batch_index = batch_index[:, None, None]  # [B, 1, 1]
        self._head_index = head_index[None, :, None]  # [1, Hkv, 1]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        """Store new keys/values `[b, Hkv, L, D]` (b <= batch: the first b sequences) at `positions` `[b, L]`
        (int64, each sequence its own positions; every position < max_seq_len, checked by the caller)."""
        batch = k.shape[0]
        index = (self._batch_index[:batch], self._head_index, positions[:, None, :])
        self.keys[layer].index_put_(index, k)
        self.values[layer].index_put_(index, v)

    def valid_lengths(self, ends: torch.Tensor) -> torch.Tensor:
        """Keys to read `[b]` after `ends [b]` tokens: all of them (a rotating cache caps them)."""
        return ends

    def mark_static(self) -> None:
        """Tell torch.compile the buffers never move (no recompilation or copies when they are mutated)."""
        for tensor in (*self.keys, *self.values):
            torch._dynamo.mark_static_address(tensor)


def _is_out_of_memory(error: RuntimeError) -> bool:
    text = str(error).lower()
    return "out of memory" in text or "can't allocate memory" in text or "not enough memory" in text
