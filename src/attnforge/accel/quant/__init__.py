"""Weight-only group-wise quantization (4, 5, 8 bits), quantized checkpoints and their quality measurement.

    report = attnforge.quantize(model, recipe="speed-4bit", group_size=64)
    attnforge.accel.quant.save_quantized(model, "out/"); model = attnforge.load_quantized("out/")

linear.py: the packed format, QuantizedLinear and its matmul backends; recipes.py: which layer gets how
many bits; checkpoint.py: save, load, convert; quality.py: perplexity and logit error against the
unquantized model.
"""

from attnforge.accel.quant.checkpoint import convert, load_quantized, save_quantized
from attnforge.accel.quant.linear import (
    BITS,
    GROUP_SIZES,
    MATMUL_BACKENDS,
    QuantizedLinear,
    fuse_quantized,
    register_backend,
)
from attnforge.accel.quant.recipes import RECIPES, LayerReport, QuantizationReport, quantize

__all__ = [
    "BITS",
    "GROUP_SIZES",
    "MATMUL_BACKENDS",
    "RECIPES",
    "LayerReport",
    "QuantizationReport",
    "QuantizedLinear",
    "convert",
    "fuse_quantized",
    "load_quantized",
    "quantize",
    "register_backend",
    "save_quantized",
]
