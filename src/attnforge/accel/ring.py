"""The rotating KV cache: `keep` attention sinks and a ring of the most recent tokens, in `max_kv_size` slots.

Semantics (the same as evicting token by token): the token at absolute position t attends to the keys of
positions `j <= t` with `j < keep` (the sinks) or `j > t - window`, where `window = max_kv_size - keep`; that
is, to exactly what the cache holds right after t was written. Keys are stored after RoPE at their true
positions (positions keep increasing past max_kv_size; `max_seq_len` bounds them and sizes the RoPE table),
so attention over the set of cached keys does not depend on where they sit in memory:
  - position p goes to slot `p` if `p < keep`, else `keep + (p - keep) % window`;
  - after n tokens the first `min(n, max_kv_size)` slots are filled, so decode reads the ring through its
    lengths, `kv_lens = min(n, max_kv_size)`, without reordering memory. The slot and the length are computed
    on the device from the position tensor (no host sync: the CUDA-graph decode step captures them).

A prefill chunk that wraps (it evicts keys that its own earlier tokens must still see) cannot be written
first and attended after. It attends, with an explicit mask, over the cache as it was before the chunk
concatenated with the chunk's own keys, and only then writes the chunk's surviving keys into the ring
(RingChunk). Long prompts go through in chunks of `max_kv_size` tokens, so the mask and the concatenated
keys stay bounded.
"""

from __future__ import annotations

import torch

from attnforge.accel.cache import CacheShape, StaticKVCache

DEFAULT_KEEP = 4


def resolve_ring(max_kv_size, keep, max_seq_len: int) -> tuple[int | None, int | None]:
    """Check the rotating-cache arguments; return (max_kv_size, keep), (None, None) for a static cache.

    Raises ValueError naming the bad value: keep without max_kv_size, keep < 0, keep >= max_kv_size,
    max_kv_size < 2 or above max_seq_len.
    """
    if max_kv_size is None:
        if keep is not None:
            raise ValueError(
                f"keep={keep!r} needs max_kv_size (the rotating cache); without it the cache holds "
                "max_seq_len tokens and evicts nothing"
            )
        return None, None
    if not isinstance(max_kv_size, int) or isinstance(max_kv_size, bool) or max_kv_size < 2:
        raise ValueError(
            f"max_kv_size={max_kv_size!r} is too small: it must be an integer >= 2 "
            "(a kept token and the new one)"
        )
    keep = DEFAULT_KEEP if keep is None else keep
    if not isinstance(keep, int) or isinstance(keep, bool) or keep < 0:
        raise ValueError(f"keep={keep!r} must be an integer >= 0 (tokens kept at the start: attention sinks)")
    if keep >= max_kv_size:
        raise ValueError(
            f"keep={keep} must be < max_kv_size={max_kv_size}: the ring of recent tokens needs at least "
            "one slot"
        )
    if max_kv_size > max_seq_len:
        raise ValueError(
            f"max_kv_size={max_kv_size} exceeds max_seq_len={max_seq_len}: max_seq_len bounds every position "
            "of a sequence, so such a cache never rotates; pass max_kv_size <= max_seq_len"
        )
    return max_kv_size, keep


class RotatingKVCache(StaticKVCache):
    """A StaticKVCache of `shape.max_seq_len` (= max_kv_size) slots, written as sinks + a ring.

    Attributes:
        keys, values: per layer, `[batch, kv_heads, max_kv_size, head_dim]`.
        keep: sink slots; window: ring slots (max_kv_size - keep).
    """

    def __init__(self, shape: CacheShape, device: torch.device | str) -> None:
        if shape.keep is None:
            raise ValueError("a RotatingKVCache needs shape.keep (the attention sinks)")
        super().__init__(shape, device)
        self.size, self.keep = shape.max_seq_len, shape.keep
        self.window = self.size - self.keep

    def slots(self, positions: torch.Tensor) -> torch.Tensor:
        """The slot `[...]` (int64) holding each absolute position `[...]`; device ops only."""
        ring = self.keep + torch.remainder(positions - self.keep, self.window)
        return torch.where(positions < self.keep, positions, ring)

    def valid_lengths(self, ends: torch.Tensor) -> torch.Tensor:
        """Filled slots `[b]` after `ends [b]` tokens: min(ends, max_kv_size)."""
        return ends.clamp(max=self.size)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        """Store keys/values `[b, Hkv, L, D]` of absolute `positions [b, L]` in their slots. The L positions
        of a sequence must not share a slot (L <= window, or nothing wraps): RingChunk handles the rest."""
        super().write(layer, k, v, self.slots(positions))

    def held_positions(self, filled: torch.Tensor) -> torch.Tensor:
        """The absolute position `[b, max_kv_size]` in each slot after `filled [b]` tokens, -1 if empty."""
        slot = torch.arange(self.size, device=filled.device)[None, :]
        n = filled.to(torch.int64)[:, None]
        offset = slot - self.keep  # ring slot keep + r holds positions keep + r + k * window: the latest < n
        turns = torch.div(n - 1 - slot, self.window, rounding_mode="floor")
        latest = self.keep + offset + turns * self.window
        held = torch.where(slot < self.keep, slot, latest)
        return torch.where(slot < n, held, torch.full_like(held, -1))

    def wraps(self, end: int) -> bool:
        """Whether writing positions up to `end` (exclusive) evicts anything."""
        return end > self.size


def _sees(query: torch.Tensor, key: torch.Tensor, keep: int, window: int) -> torch.Tensor:
    """Whether the token at position `query` attends to the key at position `key` (broadcast; -1: none)."""
    return (key >= 0) & (key <= query) & ((key < keep) | (key > query - window))


class RingChunk:
    """One prefill chunk over a rotating cache: the mask of what each query sees, and the surviving writes.

    Args:
        cache: the RotatingKVCache. filled: per sequence, tokens in the cache before the chunk.
        start: absolute position of the chunk's first column (the same for every sequence).
        q_lens: per sequence, valid tokens in the chunk (the rest of its L columns are padding).
    """

    def __init__(self, cache: RotatingKVCache, filled: list[int], start: int, q_lens: list[int]) -> None:
        device, length = cache.device, max(q_lens)
        self.cache, self.q_lens = cache, torch.tensor(q_lens, device=device)
        queries = start + torch.arange(length, device=device)  # [L]
        held = cache.held_positions(torch.tensor(filled, device=device))  # [b, N]
        old = _sees(queries[None, :, None], held[:, None, :], cache.keep, cache.window)  # [b, L, N]
        fresh = _sees(queries[:, None], queries[None, :], cache.keep, cache.window)  # [L, L]
        valid = torch.arange(length, device=device)[None, :] < self.q_lens[:, None]  # [b, L]
        fresh = fresh[None] & valid[:, None, :]
        self.mask = torch.cat([old, fresh], dim=-1)[:, None]  # [b, 1, L, N + L]
        rows, cols = [], []
        for row, count in enumerate(q_lens):  # a key survives the chunk if the chunk's last token sees it
            last = start + count - 1
            kept = [c for c in range(count) if start + c < cache.keep or start + c > last - cache.window]
            rows += [row] * len(kept)
            cols += kept
        self.rows = torch.tensor(rows, dtype=torch.int64, device=device)
        self.cols = torch.tensor(cols, dtype=torch.int64, device=device)
        self.slots = cache.slots(start + self.cols)

    def attend(self, attention, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
        """Attention `[b, Hq, L, D]` of the chunk's queries `q [b, Hq, L, D]` over the cache before the chunk
        and the chunk's own keys/values `k, v [b, Hkv, L, D]`; then the surviving keys go into the ring."""
        batch = q.shape[0]
        keys = torch.cat([self.cache.keys[layer][:batch], k], dim=2)
        values = torch.cat([self.cache.values[layer][:batch], v], dim=2)
        out = attention.masked(q, keys, values, scale=scale, q_lens=self.q_lens, mask=self.mask)
        self.cache.keys[layer][self.rows, :, self.slots] = k[self.rows, :, self.cols]
        self.cache.values[layer][self.rows, :, self.slots] = v[self.rows, :, self.cols]
        return out


def prefill_logits(walk, new: list[list[int]], start: int) -> torch.Tensor:
    """Prefill prompts into a rotating cache in chunks of max_kv_size tokens, with ring semantics.

    Args:
        walk: the forward pass (forward.Walk) over a RotatingKVCache.
        new: per sequence, its new tokens (lengths may differ; at least one each).
        start: absolute position of every sequence's first new token (tokens already in the cache).

    Returns:
        `[b, vocab]` float32 logits of each sequence's last new token.
    """
    cache = walk.cache
    device = cache.device
    lengths = [len(n) for n in new]
    out: list[torch.Tensor | None] = [None] * len(new)
    for offset in range(0, max(lengths), cache.size):
        q_lens = [min(max(n - offset, 0), cache.size) for n in lengths]
        length = max(q_lens)
        chunk = RingChunk(cache, [start + min(offset, n) for n in lengths], start + offset, q_lens)
        rows = [n[offset : offset + length] + [0] * (length - q) for n, q in zip(new, q_lens, strict=True)]
        ids = torch.tensor(rows, device=device)
        positions = (start + offset + torch.arange(length, device=device)).expand(len(new), length)
        last_rows = (chunk.q_lens - 1).clamp(min=0)
        logits = walk.logits(ids, positions.contiguous(), None, chunk.q_lens, 0, last_rows, chunk=chunk)
        for row, n in enumerate(lengths):
            if offset < n <= offset + cache.size:
                out[row] = logits[row]
    return torch.stack(out)
