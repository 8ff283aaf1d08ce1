"""What `attnforge demo` runs on a model: generate with and without attnforge, time it, check it.

On a GPU: the same greedy generation with transformers' default attention and with attnforge, timed (tok/s,
peak memory). Without one: a reduced copy of the architecture in fp32 with the Triton kernels in the
interpreter, checked against eager attention (logits and tokens) instead of timed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from attnforge.integrations.transformers import patch_model, unpatch_model
from attnforge.models import is_bundled, load_config, load_model
from attnforge.optimizer import get_optimizer

# What a CPU run keeps of the architecture: every attention shape (heads, head_dim); fewer layers, words and
# MLP units, which attention does not see.
CPU_OVERRIDES = {"num_hidden_layers": 2, "vocab_size": 4096, "intermediate_size": 1024}


@dataclass
class GenerationRun:
    """One timed greedy generation."""

    name: str
    seconds: float
    new_tokens: int
    tokens: torch.Tensor = field(repr=False)
    peak_memory_gib: float | None = None
    optimization_rate: float | None = None

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("inf")


def random_prompt(
    vocab_size: int, length: int, *, batch: int = 1, seed: int = 0, device="cpu"
) -> torch.Tensor:
    """Token ids `[batch, length]` drawn away from the special ids at the ends of the vocabulary."""
    generator = torch.Generator().manual_seed(seed)
    low, high = 3, max(4, vocab_size - 3)
    return torch.randint(low, high, (batch, length), generator=generator).to(device)


def generate(model, ids: torch.Tensor, new_tokens: int, cache: str = "dynamic", mask=None) -> torch.Tensor:
    """Greedy generation of exactly `new_tokens` tokens (end-of-sequence ignored)."""
    options = {"cache_implementation": "static"} if cache == "static" else {}
    with torch.no_grad():
        return model.generate(
            ids, attention_mask=mask if mask is not None else torch.ones_like(ids), max_new_tokens=new_tokens,
            min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **options,
        )  # fmt: skip


def timed_generate(model, ids: torch.Tensor, new_tokens: int, cache: str, name: str) -> GenerationRun:
    """Warm up with the same run (so torch.compile of a static cache happens there), then time one generation
    (CUDA-synchronized, peak memory measured on a GPU)."""
    on_gpu = ids.device.type == "cuda"
    generate(model, ids, new_tokens, cache)
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    get_optimizer().reset_stats()
    start = time.perf_counter()
    tokens = generate(model, ids, new_tokens, cache)
    if on_gpu:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    memory = torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None
    stats = get_optimizer().get_stats()
    rate = stats["optimization_rate"] if stats["calls"] else None
    return GenerationRun(name, seconds, new_tokens, tokens, memory, rate)


def speed_comparison(model, ids: torch.Tensor, new_tokens: int, cache: str) -> tuple[GenerationRun, ...]:
    """The model as loaded, then patched with attnforge: (baseline, attnforge)."""
    baseline_name = f"transformers ({model.config._attn_implementation}, {cache} cache)"
    baseline = timed_generate(model, ids, new_tokens, cache, baseline_name)
    baseline.optimization_rate = None
    if not patch_model(model):
        return (baseline,)
    try:
        optimized = timed_generate(model, ids, new_tokens, cache, f"attnforge ({cache} cache)")
    finally:
        unpatch_model(model)
    return baseline, optimized


def same_tokens(a: GenerationRun, b: GenerationRun) -> bool:
    return a.tokens.shape == b.tokens.shape and bool(torch.equal(a.tokens, b.tokens))


@dataclass
class CorrectnessReport:
    """attnforge against eager attention on one model: logits error and whether greedy tokens agree."""

    logits_rel_error: float
    tokens_equal: dict[str, bool]
    stats: dict
    decisions: list[dict]

    @property
    def passed(self) -> bool:
        return self.logits_rel_error <= 1e-4 and all(self.tokens_equal.values())


def correctness_check(model, ids: torch.Tensor, new_tokens: int) -> CorrectnessReport:
    """Eager vs attnforge on `model` (fp32): logits, and greedy tokens (dynamic, static cache, padding)."""
    mask = torch.ones_like(ids)
    if ids.shape[0] > 1:
        mask[0, : ids.shape[1] // 3] = 0  # left padding
    cases = {"dynamic cache": ("dynamic", None), "static cache": ("static", None)}
    if ids.shape[0] > 1:
        cases["left-padded batch"] = ("dynamic", mask)
    with torch.no_grad():
        expected_logits = model(ids).logits
    expected = {name: generate(model, ids, new_tokens, cache, m) for name, (cache, m) in cases.items()}
    if not patch_model(model):
        raise ValueError(f"model_type={model.config.model_type!r} is not supported by attnforge")
    get_optimizer().reset_stats()
    try:
        with torch.no_grad():
            logits = model(ids).logits
        got = {name: generate(model, ids, new_tokens, cache, m) for name, (cache, m) in cases.items()}
    finally:
        unpatch_model(model)
    error = float((logits - expected_logits).abs().max() / expected_logits.abs().max())
    equal = {name: bool(torch.equal(got[name], expected[name])) for name in cases}
    optimizer = get_optimizer()
    return CorrectnessReport(error, equal, optimizer.get_stats(), optimizer.decisions())


def build_for_demo(model_name: str, on_gpu: bool):
    """The demo's model: as named on a GPU (bf16); a reduced fp32 copy of its architecture on a CPU."""
    if on_gpu:
        return load_model(model_name, dtype=torch.bfloat16, device="cuda", attn_implementation="sdpa")
    from transformers import AutoModelForCausalLM

    config = load_config(model_name)
    overrides = {key: value for key, value in CPU_OVERRIDES.items() if hasattr(config, key)}
    config = load_config(model_name, **overrides)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def describe_model(model_name: str, model, on_gpu: bool) -> str:
    """One line: architecture, attention shape, weights."""
    c = model.config
    heads, kv_heads = c.num_attention_heads, getattr(c, "num_key_value_heads", c.num_attention_heads)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    weights = "random weights" if is_bundled(model_name) or not on_gpu else "trained weights"
    reduced = "" if on_gpu else f", reduced for CPU to {c.num_hidden_layers} layers, vocab {c.vocab_size}"
    return (
        f"{model_name} ({c.model_type}: {heads} query / {kv_heads} key-value heads, head_dim {head_dim}, "
        f"{weights}{reduced}; speed does not depend on weight values)"
    )
