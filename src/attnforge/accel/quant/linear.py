"""Weight-only group-wise quantized linear layers: packing, `QuantizedLinear`, and its matmul backends.

Format (one per layer, rows = output features, groups run along the input features):
  - asymmetric integer codes: `w ~= (q - zero) * scale`, `q` in [0, 2^bits - 1], one `scale` (the model's
    dtype) and one integer `zero` (uint8) per `group_size` consecutive input features of a row. The range of
    each group always includes 0, so `zero` is an exact integer code and a constant or all-zero group is
    exact; the clipping of each group's range is searched over CLIP_RATIOS for the least squared error
    (round to nearest otherwise).
  - `codes` uint8 `[out, in * bits / 8]`, row-major like the weight, so slicing rows slices codes (fusion):
      8 bits: one code per byte;
      4 bits: two per byte, element 2j in the low nibble and 2j+1 in the high one;
      5 bits: a 4-bit plane (the low 4 bits, packed as 4-bit, `in/2` bytes) followed by a 1-bit plane (bit 4
              of element 8j+k in bit k of byte j, `in/8` bytes): 8 values in 5 bytes, and the 4-bit plane is
              the layout a 4-bit kernel already reads.
Dequantization is tensor arithmetic only (shifts, masks, one multiply): no host sync and no data-dependent
Python, so it runs on CPU and CUDA, under torch.compile(fullgraph=True) and inside CUDA graphs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

BITS = (4, 5, 8)
GROUP_SIZES = (32, 64, 128)
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)


def pack_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes `q` uint8 `[out, in]` (values < 2^bits, `in` divisible by 8) into
    `[out, in*bits/8]`."""
    _check_bits(bits)
    q = q.to(torch.uint8)
    if bits == 8:
        return q.contiguous()
    if bits == 4:
        return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()
    rows, cols = q.shape
    high = ((q >> 4) & 1).view(rows, cols // 8, 8)
    shifts = torch.arange(8, device=q.device, dtype=torch.uint8)
    plane = (high << shifts).sum(-1, dtype=torch.uint8)
    return torch.cat([pack_codes(q & 15, 4), plane], dim=1)


def unpack_codes(codes: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Integer codes uint8 `[out, in_features]` from packed `codes` `[out, in_features*bits/8]`."""
    rows = codes.shape[0]
    if bits == 8:
        return codes
    if bits == 4:
        return torch.stack([codes & 15, codes >> 4], dim=-1).view(rows, in_features)
    low = unpack_codes(codes[:, : in_features // 2], 4, in_features)
    shifts = torch.arange(8, device=codes.device, dtype=torch.uint8)
    high = ((codes[:, in_features // 2 :, None] >> shifts) & 1).view(rows, in_features)
    return low | (high << 4)


def quantize_weight(weight: torch.Tensor, bits: int, group_size: int, scale_dtype: torch.dtype | None = None):
    """Group-wise asymmetric quantization of `weight` `[out, in]`.

    Returns:
        (codes uint8 `[out, in*bits/8]`, scales `[out, in/group_size]` in `scale_dtype` (default: the
        weight's), zeros uint8 `[out, in/group_size]`).
    """
    _check_bits(bits)
    rows, cols = weight.shape
    scale_dtype = scale_dtype or weight.dtype
    maxq = 2**bits - 1
    w = weight.detach().float().view(rows, cols // group_size, group_size)
    low, high = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
    best = None
    for ratio in CLIP_RATIOS:
        scale = ((high - low) * ratio / maxq).clamp(min=torch.finfo(scale_dtype).tiny)
        scale = scale.to(scale_dtype).float()  # the codes are chosen for the scale as stored
        zero = torch.round(-low * ratio / scale).clamp(0, maxq)
        q = (torch.round(w / scale[..., None]) + zero[..., None]).clamp(0, maxq)
        error = ((q - zero[..., None]) * scale[..., None] - w).square().sum(-1)
        if best is None:
            best = [error, q, scale, zero]
            continue
        better = error < best[0]
        best[0] = torch.where(better, error, best[0])
        best[1] = torch.where(better[..., None], q, best[1])
        best[2] = torch.where(better, scale, best[2])
        best[3] = torch.where(better, zero, best[3])
    _, q, scale, zero = best
    codes = pack_codes(q.view(rows, cols).to(torch.uint8), bits)
    return codes, scale.to(scale_dtype), zero.to(torch.uint8)


def dequantize_weight(codes, scales, zeros, bits: int, group_size: int, in_features: int) -> torch.Tensor:
    """The weight `[out, in_features]` in the scales' dtype: `(q - zero) * scale` per group."""
    rows = codes.shape[0]
    q = unpack_codes(codes, bits, in_features).view(rows, in_features // group_size, group_size)
    dtype = scales.dtype
    weight = (q.to(dtype) - zeros[..., None].to(dtype)) * scales[..., None]
    return weight.view(rows, in_features)


def _torch_matmul(layer: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    """Reference backend: dequantize the whole weight, then one F.linear (portable, not fast)."""
    return F.linear(x, layer.dequantize(), layer.bias)


def _triton_matmul(layer: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    """attnforge's skinny linear on the packed codes (`kernels.gemv.fused_linear`, dequantized as they are
    read: the weight's bytes are read once, at 4/5/8 bits) for calls of at most gemv.MAX_ROWS rows (decode
    steps); longer calls (prefill) dequantize and run F.linear, as the torch backend does."""
    from attnforge.environment import triton_status
    from attnforge.kernels import gemv

    if x.numel() // max(x.shape[-1], 1) > gemv.MAX_ROWS:
        return _torch_matmul(layer, x)
    if not (x.is_cuda or torch.compiler.is_compiling()):  # off a GPU: only through the interpreter
        ok, reason = triton_status(x.device)
        if not ok:
            raise RuntimeError(f"quantized matmul backend 'triton' cannot run here: {reason}")
    return gemv.fused_linear(x, layer.packed(), layer.bias)


def _int4pack_matmul(layer: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    """Core torch's 4-bit kernel (tinygemm, `aten._weight_int4pack_mm`: what gpt-fast and torchao's int4
    weight-only layers run; on the CPU its `_for_cpu` twin), for the calls `_route` gives it. Its
    dequantization is `(q - 8) * scale + offset` with `offset = (8 - zero) * scale` rounded to the scales'
    dtype, within a rounding of the format's `(q - zero) * scale`."""
    packed, scales_and_offsets = layer.tinygemm_weight(x.device)
    rows = x.reshape(-1, layer.in_features).contiguous()
    if x.is_cuda:
        y = torch.ops.aten._weight_int4pack_mm(rows, packed, layer.group_size, scales_and_offsets)
    else:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, packed, layer.group_size,
                                                       scales_and_offsets.to(rows.dtype))  # fmt: skip
    y = y.reshape(*x.shape[:-1], layer.out_features)
    return y if layer.bias is None else y + layer.bias


def _tinygemm_serves(layer: QuantizedLinear, device: torch.device, dtype: torch.dtype) -> bool:
    """4-bit layers with bf16 activations on CUDA, any float activations on the CPU, and an output count the
    kernel's tiles divide (8 on CUDA, 16 on the CPU)."""
    if device.type == "cuda":
        return layer.bits == 4 and layer.out_features % 8 == 0 and dtype == torch.bfloat16
    return device.type == "cpu" and layer.bits == 4 and layer.out_features % 16 == 0


def _route(layer: QuantizedLinear, device: torch.device, dtype: torch.dtype) -> str:
    """The kernel a layer's products run on `device` with `dtype` activations: "tinygemm", "triton" (the
    packed GEMV), "torch", or the name of another registered backend. "tinygemm" layers take the packed
    GEMV for what core torch's kernel does not serve (5 and 8 bits, fp16/fp32 on CUDA, output counts its
    tiles do not divide); "auto" layers do the same on CUDA and take the torch reference off it."""
    backend = layer.backend
    if backend == "auto":
        if device.type != "cuda":
            return "torch"
        backend = "tinygemm"
    if backend == "tinygemm":
        return "tinygemm" if _tinygemm_serves(layer, device, dtype) else "triton"
    return backend


def tinygemm_weight(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, in_features: int,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """4-bit `codes`/`scales`/`zeros` (this module's format) in tinygemm's: the packed int4 tiles for
    `device` and `[in / group, out, 2]` (scale, offset) pairs (`(q - 8) * scale + offset` = `(q - zero) *
    scale`)."""
    q = unpack_codes(codes, 4, in_features).to(device=device, dtype=torch.int32)
    inner_k_tiles = next(t for t in (8, 4, 2) if in_features % (16 * t) == 0)
    if device.type == "cuda":  # element 2j in the high nibble, 2j+1 in the low one
        packed = torch.ops.aten._convert_weight_to_int4pack(
            ((q[:, 0::2] << 4) | q[:, 1::2]).to(torch.uint8), inner_k_tiles
        )
    else:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, inner_k_tiles)
    scale = scales.to(device)
    offset = (8 - zeros.to(device=device, dtype=torch.float32)) * scale.float()
    return packed, torch.stack([scale, offset.to(scale.dtype)], dim=-1).transpose(0, 1).contiguous()


def _routed_matmul(layer: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    """The "auto" (the default) and "tinygemm" backends: the kernel `_route` picks for the call. "auto" is
    what was measured fastest: on CUDA core torch's int4 kernel where it serves (Llama-3-8B decode on an H100,
    speed-4bit: 2.03x bf16 with it, 1.18x with the triton backend;
    benchmarks/results/h100/quant-speed-llama3-8b-*-20261206.md), attnforge's packed GEMV for the other bits;
    off a GPU the torch reference (exact to its rounding, and no interpreter needed)."""
    route = _route(layer, x.device, x.dtype)
    if route == "tinygemm":
        return _int4pack_matmul(layer, x)
    return _triton_matmul(layer, x) if route == "triton" else _torch_matmul(layer, x)


# name -> function(layer, x [..., in]) -> [..., out]. Other GPU backends (gemlite, torchao) plug in here.
MATMUL_BACKENDS: dict[str, Callable[[QuantizedLinear, torch.Tensor], torch.Tensor]] = {
    "auto": _routed_matmul,
    "torch": _torch_matmul,
    "triton": _triton_matmul,
    "tinygemm": _routed_matmul,
}


def register_backend(name: str, function: Callable[[QuantizedLinear, torch.Tensor], torch.Tensor]) -> None:
    """Make `function(layer, x) -> y` available as `QuantizedLinear(..., backend=name)`."""
    MATMUL_BACKENDS[name] = function


def check_backend(backend: str) -> None:
    if backend not in MATMUL_BACKENDS:
        raise ValueError(
            f"backend={backend!r} is not a registered matmul backend ({', '.join(MATMUL_BACKENDS)})"
        )


class QuantizedLinear(nn.Module):
    """`nn.Linear` with weight-only group-wise quantized weights (see the module docstring for the format).

    Buffers: `codes` uint8 `[out, in*bits/8]`, `scales` `[out, in/group_size]` (model dtype), `zeros` uint8
    `[out, in/group_size]`; `bias` `[out]` (a parameter, unquantized) or None.
    forward: `[..., in] -> [..., out]`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        *,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        device=None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        _check_bits(bits)
        check_group_size(group_size, in_features)
        check_backend(backend)
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.backend = bits, group_size, backend
        groups = in_features // group_size
        self.register_buffer(
            "codes", torch.zeros(out_features, in_features * bits // 8, dtype=torch.uint8, device=device)
        )
        self.register_buffer("scales", torch.zeros(out_features, groups, dtype=dtype, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=torch.uint8, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def shaped_like(cls, linear: nn.Linear, bits: int, group_size: int, backend: str = "auto"):
        """An empty (zero-filled) layer of `linear`'s shapes, dtype and device, to load a checkpoint into."""
        weight = linear.weight
        return cls(linear.in_features, linear.out_features, bits, group_size, bias=linear.bias is not None,
                   dtype=weight.dtype, device=weight.device, backend=backend)  # fmt: skip

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int, backend: str = "auto"):
        """Quantize `linear` (its weight `[out, in]`); scales take the weight's dtype, the bias is kept."""
        layer = cls.shaped_like(linear, bits, group_size, backend)
        codes, scales, zeros = quantize_weight(linear.weight, bits, group_size)
        layer.codes.copy_(codes)
        layer.scales.copy_(scales)
        layer.zeros.copy_(zeros)
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        return layer

    def dequantize(self) -> torch.Tensor:
        """The weight `[out, in]` in the scales' dtype."""
        return dequantize_weight(
            self.codes, self.scales, self.zeros, self.bits, self.group_size, self.in_features
        )

    def packed(self):
        """The codes, scales and zeros as `kernels.gemv.PackedWeight` (views, no copy)."""
        from attnforge.kernels.gemv import PackedWeight

        return PackedWeight(self.codes, self.scales, self.zeros, self.bits, self.group_size)

    def tinygemm_weight(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The 4-bit weight in tinygemm's format on `device` (`tinygemm_weight`), converted at the first call
        and kept until the codes, scales or zeros change; under torch.compile only the kept one (convert
        with one eager call first: torch.compile and CUDA graphs must not see the conversion)."""
        kept = getattr(self, "_tinygemm", None)
        if torch.compiler.is_compiling():
            if kept is None:
                raise RuntimeError("the tinygemm backend converts its 4-bit weight at the first eager call; "
                                   "run the model once before torch.compile")  # fmt: skip
            return kept[1]
        key = (device, *[(t.data_ptr(), t._version) for t in (self.codes, self.scales, self.zeros)])
        if kept is not None and kept[0] == key:
            return kept[1]
        converted = tinygemm_weight(self.codes, self.scales, self.zeros, self.in_features, device)
        self._tinygemm = (key, converted)
        return converted

    def runs_tinygemm(self, device: torch.device) -> bool:
        """Whether its products on `device` run core torch's int4 kernel (`_route`, activations in the
        scales' dtype)."""
        return _route(self, device, self.scales.dtype) == "tinygemm"

    def runs_packed_gemv(self, device: torch.device) -> bool:
        """Whether its decode-sized products on `device` run attnforge's packed GEMV (`packed()`)."""
        return _route(self, device, self.scales.dtype) == "triton"

    def prepare(self, device: torch.device) -> None:
        """Convert, eagerly, what this layer's backend needs before torch.compile or a CUDA graph sees it
        (tinygemm: its weight format; the other backends need nothing)."""
        if self.runs_tinygemm(device):
            self.tinygemm_weight(device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return MATMUL_BACKENDS[self.backend](self, x)

    def nbytes(self) -> int:
        """Bytes of codes, scales, zeros and bias."""
        tensors = [self.codes, self.scales, self.zeros] + ([self.bias] if self.bias is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, bias={self.bias is not None}, backend={self.backend!r}"
        )


def fuse_quantized(layers: list[QuantizedLinear]) -> QuantizedLinear | None:
    """One QuantizedLinear whose output rows are `layers`' outputs concatenated, or None when they differ in
    bits, group size, input size, backend or bias presence. Each layer's buffers are re-pointed at its rows of
    the fused ones (same values, no second copy); a second call finds them adjacent and reuses them."""
    first = layers[0]
    same = {(q.bits, q.group_size, q.in_features, q.backend, q.bias is None) for q in layers}
    if len(same) != 1:
        return None
    fused = QuantizedLinear(
        first.in_features,
        sum(q.out_features for q in layers),
        first.bits,
        first.group_size,
        bias=first.bias is not None,
        dtype=first.scales.dtype,
        device="meta",
        backend=first.backend,
    )
    for name in ("codes", "scales", "zeros"):
        setattr(fused, name, _fuse_rows(layers, name))
    if first.bias is not None:
        fused.bias = nn.Parameter(_fuse_rows(layers, "bias"), requires_grad=False)
    return fused


def _fuse_rows(layers: list[nn.Module], name: str) -> torch.Tensor:
    tensors = [getattr(layer, name) for layer in layers]
    rows = sum(t.shape[0] for t in tensors)
    base = tensors[0]
    offset = base.storage_offset()
    adjacent = True
    for tensor in tensors:
        same_storage = tensor.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
        adjacent = adjacent and tensor.is_contiguous() and same_storage and tensor.storage_offset() == offset
        offset += tensor.numel()
    if adjacent:
        return base.as_strided((rows, *base.shape[1:]), base.stride(), base.storage_offset())
    with torch.no_grad():
        fused = torch.cat([t.detach() for t in tensors])
    start = 0
    for layer, tensor in zip(layers, tensors, strict=True):
        part = fused[start : start + tensor.shape[0]]
        if isinstance(tensor, nn.Parameter):
            tensor.data = part
        else:
            setattr(layer, name, part)
        start += tensor.shape[0]
    return fused


def check_group_size(group_size: int, in_features: int | None = None, name: str | None = None) -> None:
    """Raise ValueError naming the bad value and the accepted ones."""
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size={group_size!r} is not supported; accepted: {GROUP_SIZES}")
    if in_features is not None and in_features % group_size:
        where = f"layer {name!r}: " if name else ""
        raise ValueError(
            f"{where}in_features={in_features} is not divisible by group_size={group_size}; accepted group "
            f"sizes here: {tuple(g for g in GROUP_SIZES if in_features % g == 0) or 'none'}"
        )


def _check_bits(bits) -> None:
    if isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"bits={bits!r} is not supported; accepted: {BITS}")
