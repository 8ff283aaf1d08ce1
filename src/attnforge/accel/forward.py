"""The forward pass the accelerator runs: the model's own modules over the static cache (see layout.py).

`forward_tokens` serves both prefill (a prompt, or the new part of one after a reused prefix) and the decode
step (one token per sequence). Each sequence b brings `q_lens[b]` new tokens (right-padded to L) at positions
`starts[b] ...`; their keys and values are written into the cache at those positions, and attention reads
exactly the `kv_lens[b] = starts[b] + q_lens[b]` valid keys (what lies beyond was never written or is a
padded row's garbage, and is never read).

Attention backends: attnforge's kernels (decode_attention for one new token, prefill_attention otherwise),
or torch SDPA with a mask built from the same lengths where Triton cannot run (CPU without the interpreter).
"""

from __future__ import annotations

import torch

from attnforge.accel.cache import StaticKVCache
from attnforge.accel.layout import LayerPlan, ModelPlan
from attnforge.accel.projections import TorchProjections
from attnforge.kernels import reference

ATTENTION_BACKENDS = ("auto", "kernels", "torch")


class KernelAttention:
    """attnforge's Triton kernels; decode calls use a caller-owned workspace and output buffer."""

    name = "attnforge kernels (decode_step_attention, decode_attention, prefill_attention)"
    # A decode step's new token: rotated, stored and attended in one launch (`decode_step_attention`); False
    # runs rope_and_store, then decode_attention (two launches: what A/B measurements compare against).
    fuse_new_token = True

    def __init__(self) -> None:
        from attnforge.kernels import decode, decode_step, prefill, rope_cache

        self._decode, self._step, self._prefill, self._rope = decode, decode_step, prefill, rope_cache
        self.workspaces: dict[tuple, object] = {}
        self.outputs: dict[tuple, torch.Tensor] = {}

    def prepare_decode(self, q: torch.Tensor, keys: torch.Tensor, kv_lens: torch.Tensor) -> None:
        """Size the workspace and output for decode calls of this shape (before a CUDA graph is captured)."""
        key = tuple(q.shape)
        if key not in self.workspaces:
            needs = (self._decode.workspace_size(q, keys, kv_lens),
                     self._step.workspace_size(q.shape[0], q.shape[1], keys))  # fmt: skip
            self.workspaces[key] = self._decode.DecodeWorkspace(q.device, *map(max, *needs))
            self.outputs[key] = torch.empty_like(q)

    def new_token(self, qkv, positions, keys, values, *, scale, kv_lens, rope):
        """Attention `[b, Hq, 1, D]` of a decode step's new token from the q/k/v product `[b, 1, width]`, its
        key and value stored in `keys`/`values` `[b, Hkv, S, D]` at `positions` `[b, 1]` on the way (`rope`:
        a projections.NewTokenRope; kv_lens `[b]` = positions + 1)."""
        norms = {"q_norm": rope.q_norm, "k_norm": rope.k_norm}
        if not self.fuse_new_token:
            q = self._rope.rope_and_store(qkv, rope.cos, rope.sin, positions, keys, values,
                                          num_heads=rope.num_heads, **norms)  # fmt: skip
            return self(q, keys, values, scale=scale, kv_lens=kv_lens, q_lens=None, extent=keys.shape[2])
        shape = (qkv.shape[0], rope.num_heads, 1, keys.shape[3])
        if shape not in self.workspaces and not torch.compiler.is_compiling():
            self.prepare_decode(keys.new_empty(shape), keys, kv_lens)
        return self._step.decode_step_attention(
            qkv, rope.cos, rope.sin, positions, keys, values, num_heads=rope.num_heads, scale=scale,
            workspace=self.workspaces.get(shape), **norms,
        )  # fmt: skip

    def __call__(self, q, keys, values, *, scale, kv_lens, q_lens, extent):
        if q.shape[2] == 1:
            if torch.compiler.is_compiling():  # the kernel's torch.library op, on the prepared workspace
                workspace = self.workspaces.get(tuple(q.shape))  # None: the op takes a temporary one
                return self._decode.decode_attention(q, keys, values, scale=scale, kv_lens=kv_lens,
                                                     workspace=workspace)  # fmt: skip
            self.prepare_decode(q, keys, kv_lens)
            key = tuple(q.shape)
            return self._decode.decode_attention(
                q, keys, values, scale=scale, kv_lens=kv_lens, out=self.outputs[key],
                workspace=self.workspaces[key],
            )  # fmt: skip
        return self._prefill.prefill_attention(
            q, keys[:, :, :extent], values[:, :, :extent], scale=scale, causal=True, kv_lens=kv_lens,
            q_lens=q_lens,
        )  # fmt: skip

    def masked(self, q, keys, values, *, scale, q_lens, mask):
        """Prefill with an explicit bool mask `[b, 1, Lq, Lkv]` (a rotating cache's wrapping chunk)."""
        return self._prefill.prefill_attention(
            q, keys, values, scale=scale, causal=False, q_lens=q_lens, attn_mask=mask
        )


class TorchAttention:
    """torch SDPA (enable_gqa) with a bool mask from the lengths: reads the padding too (the cache is zeros
    there), so it is for machines where the Triton kernels cannot run, not for speed."""

    name = "torch sdpa with a length mask (Triton kernels cannot run here)"

    def __call__(self, q, keys, values, *, scale, kv_lens, q_lens, extent):
        return reference.sdpa(
            q, keys[:, :, :extent], values[:, :, :extent], scale=scale, causal=True, kv_lens=kv_lens,
            q_lens=q_lens,
        )  # fmt: skip

    def masked(self, q, keys, values, *, scale, q_lens, mask):
        """SDPA with an explicit bool mask `[b, 1, Lq, Lkv]` (a rotating cache's wrapping chunk)."""
        return reference.sdpa(q, keys, values, scale=scale, q_lens=q_lens, attn_mask=mask)


def choose_attention(backend: str, device: torch.device):
    """The attention backend for `backend` ("auto": kernels where Triton can run on `device`, else torch)."""
    from attnforge.environment import triton_status

    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention={backend!r} is not one of {ATTENTION_BACKENDS}")
    ok, reason = triton_status(device)
    if backend == "kernels" and not ok:
        raise ValueError(f"attention='kernels' cannot run here: {reason}")
    if backend == "torch" or not ok:
        return TorchAttention()
    return KernelAttention()


class Walk:
    """The model plan, the cache, the attention and projection backends, and the forward pass over them."""

    def __init__(
        self, plan: ModelPlan, cache: StaticKVCache, attention, rope: tuple, projections=None
    ) -> None:
        self.plan, self.cache, self.attention = plan, cache, attention
        self.projections = projections or TorchProjections()
        self.cos, self.sin = rope

    def prepare_decode(self, batch: int) -> None:
        """Size the attention backend's decode scratch for steps of `batch` sequences before the step is
        compiled or captured (a compiled graph then reuses it instead of allocating and zeroing per call)."""
        prepare = getattr(self.attention, "prepare_decode", None)
        if prepare is None:
            return
        keys = self.cache.keys[0][:batch]
        q = keys.new_empty(batch, self.plan.num_heads, 1, self.plan.head_dim)
        prepare(q, keys, torch.ones(batch, dtype=torch.int32, device=keys.device))

    def logits(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        kv_lens: torch.Tensor,
        q_lens: torch.Tensor | None,
        extent: int,
        last_rows: torch.Tensor | None = None,
        chunk=None,
    ) -> torch.Tensor:
        """Logits `[b, vocab]` (float32) of each sequence's last new token.

        Args:
            ids: `[b, L]` new tokens (right-padded); positions: `[b, L]` int64 their cache positions.
            kv_lens: `[b]` valid keys after this step; q_lens: `[b]` valid new tokens (None: all L).
            extent: keys attention may look at (max of kv_lens; prefill only).
            last_rows: `[b]` row of each sequence's last valid token (None: row L - 1).
            chunk: a ring.RingChunk (a prefill chunk that wraps a rotating cache; kv_lens and extent unused).
        """
        hidden = self.plan.embed(ids)
        cos, sin = self.cos[positions], self.sin[positions]
        lengths = (kv_lens, q_lens, extent, chunk)
        for index, layer in enumerate(self.plan.layers):
            hidden = self._layer(index, layer, hidden, cos, sin, positions, lengths)
        if last_rows is None:
            hidden = hidden[:, -1:, :]
        else:
            hidden = hidden.gather(1, last_rows.view(-1, 1, 1).expand(-1, 1, hidden.shape[-1]))
        return self.projections.head(self.plan, hidden)[:, 0, :].float()  # the final norm is per row

    def _layer(self, index, layer: LayerPlan, hidden, cos, sin, positions, lengths):
        batch, length, _ = hidden.shape
        project = self.projections
        qkv = project.attention_in(index, layer, hidden)
        out = self._new_token(index, layer, qkv, positions, lengths) if length == 1 else None
        if out is None:
            out = self._attend(index, layer, qkv, cos, sin, positions, lengths)
        hidden = project.attention_out(index, layer, out.transpose(1, 2).reshape(batch, length, -1), hidden)
        return project.mlp(index, layer, hidden)

    def _new_token(self, index, layer: LayerPlan, qkv, positions, lengths):
        """A decode step's attention with the new token's norms, RoPE and cache write in the attention kernel,
        where that computes what the model's modules do; None elsewhere."""
        kv_lens, _, _, chunk = lengths
        new_token = getattr(self.attention, "new_token", None)
        rope = self.projections.new_token_rope(index, self.cache)
        if chunk is not None or new_token is None or rope is None:
            return None
        keys, values = self.cache.keys[index][: qkv.shape[0]], self.cache.values[index][: qkv.shape[0]]
        return new_token(qkv, positions, keys, values, scale=layer.scale, kv_lens=kv_lens, rope=rope)

    def _attend(self, index, layer: LayerPlan, qkv, cos, sin, positions, lengths):
        """Attention `[b, Hq, L, D]` with the model's q/k norms and RoPE, the new keys written first (a
        rotating cache's wrapping chunk attends through the chunk)."""
        kv_lens, q_lens, extent, chunk = lengths
        q, k, v = self._rotated(layer, qkv, cos, sin)
        if chunk is not None:
            return chunk.attend(self.attention, index, q, k, v, layer.scale)
        self.cache.write(index, k, v, positions)
        keys, values = self.cache.keys[index][: qkv.shape[0]], self.cache.values[index][: qkv.shape[0]]
        return self.attention(
            q, keys, values, scale=layer.scale, kv_lens=kv_lens, q_lens=q_lens, extent=extent
        )

    def _rotated(self, layer: LayerPlan, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple:
        """q `[b, Hq, L, D]`, k, v `[b, Hkv, L, D]` from the fused product `[b, L, width]`: the model's own
        q/k norms and its family's RoPE."""
        plan, (batch, length, _) = self.plan, qkv.shape
        q, k, v = qkv.split(layer.qkv_sizes, dim=-1)
        q = q.view(batch, length, plan.num_heads, plan.head_dim)
        k = k.view(batch, length, plan.num_kv_heads, plan.head_dim)
        if layer.q_norm is not None:
            q, k = layer.q_norm(q), layer.k_norm(k)
        q, k = plan.apply_rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        return q, k, v.view(batch, length, plan.num_kv_heads, plan.head_dim).transpose(1, 2)
