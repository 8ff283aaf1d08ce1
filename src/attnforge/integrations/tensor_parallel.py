"""Tensor-parallel generation: transformers' own tensor parallelism, with attnforge's attention on each rank.

Nothing here shards a model: transformers does (`from_pretrained(..., distributed_config=DistributedConfig(
tp_size=N))`, or `tp_plan="auto"` where DistributedConfig has no tp_size), inside a torch.distributed process
group started by torchrun (NCCL on GPUs, gloo on CPU). Each rank's attention layers then hold H/N query heads
and Hkv/N key/value heads; attnforge's attention function and kernels read head counts from the tensors, and
its mask hook is told the split (`note_head_shards`) so it decides for the local shapes.

    python -m torch.distributed.run --standalone --nproc-per-node 2 -m attnforge.cli generate --tp 2 ...
    (`attnforge generate --tp 2` runs exactly that)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from attnforge import models
from attnforge.integrations.transformers import IMPLEMENTATION, note_head_shards, patch_transformers

LAUNCHER = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


# ----------------------------------------------------------------------------------------------------------
# Checks before anything starts


def check_tp_size(tp_size: int, config, *, gpus: int | None = None) -> None:
    """Raise ValueError (naming the values) unless `config`'s heads split `tp_size` ways on this machine.

    Args:
        tp_size: ranks (one per GPU on CUDA). config: the model's transformers config.
        gpus: GPUs available (None: not running on GPUs, no limit).
    """
    if tp_size < 1:
        raise ValueError(f"tp_size={tp_size}: the tensor-parallel size must be at least 1")
    if gpus is not None and tp_size > gpus:
        raise ValueError(f"tp_size={tp_size}: only {gpus} CUDA GPU(s) here (one rank per GPU)")
    text = getattr(config, "get_text_config", lambda: config)()
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    if heads % tp_size or kv_heads % tp_size:
        raise ValueError(
            f"tp_size={tp_size} does not divide the head counts: num_attention_heads={heads}, "
            f"num_key_value_heads={kv_heads} (sizes that do: {_divisors(heads, kv_heads)})"
        )


def _divisors(heads: int, kv_heads: int) -> list[int]:
    return [n for n in range(1, kv_heads + 1) if heads % n == 0 and kv_heads % n == 0]


# ----------------------------------------------------------------------------------------------------------
# Inside torchrun: process group, checkpoint, model


@dataclass(frozen=True)
class Rank:
    """This process's place in the group: rank, world size, its device and the backend."""

    rank: int
    world: int
    device: torch.device
    backend: str


def init_distributed() -> Rank:
    """Join the process group torchrun set up (env RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    NCCL with one GPU per rank (cuda:LOCAL_RANK) where CUDA is available, else gloo on the CPU.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise RuntimeError("not inside torchrun: RANK / WORLD_SIZE are not set (see tensor_parallel.launch)")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    backend = "nccl" if cuda else "gloo"
    if not dist.is_initialized():
        # NCCL bound to this rank's GPU (barriers then need no device ids); a timeout that outlasts rank 0
        # building and saving a random-weight model while the others wait (NCCL's default is 10 minutes)
        dist.init_process_group(backend, device_id=device if cuda else None, timeout=timedelta(minutes=60))
    return Rank(dist.get_rank(), dist.get_world_size(), device, backend)


def shared_checkpoint(model: str, rank: Rank, *, dtype: torch.dtype, seed: int = 0) -> tuple[str, bool]:
    """A checkpoint every rank can load: a local directory or hub id as it is, or a bundled architecture built
    by rank 0 with random weights (seeded) and saved to a temporary directory (one host: ranks share it).

    Returns:
        (path, temporary): remove a temporary one with `remove_checkpoint` once every rank has loaded it.
    """
    if models.model_source(model) != "bundled":
        return model, False
    holder = [None]
    if rank.rank == 0:
        directory = tempfile.mkdtemp(prefix="attnforge-tp-")
        built = models.build_model(model, dtype=dtype, device=rank.device, seed=seed)
        built.save_pretrained(directory)
        del built
        if rank.device.type == "cuda":
            torch.cuda.empty_cache()  # the whole model was on this GPU; its shard is loaded next
        holder = [directory]
    dist.broadcast_object_list(holder, src=0)
    return holder[0], True


def remove_checkpoint(path: str, rank: Rank) -> None:
    """Rank 0 removes a temporary checkpoint after every rank is past loading it."""
    dist.barrier()
    if rank.rank == 0:
        shutil.rmtree(path, ignore_errors=True)


def load_tensor_parallel(path: str, *, dtype: torch.dtype, attn_implementation: str = IMPLEMENTATION):
    """Load a causal LM sharded over the current process group by transformers' tensor parallelism.

    Each rank keeps 1/world of the attention and MLP weights (DTensor shards); attention calls receive q
    `[B, H/world, L, D]` and k/v `[B, Hkv/world, Lkv, D]`. With attn_implementation="attnforge",
    transformers is patched first and the mask hook is told the head split.

    Raises:
        ValueError: the world size does not divide the model's head counts.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    world = dist.get_world_size()
    offline = models.model_source(path) != "hub"
    check_tp_size(world, AutoConfig.from_pretrained(path, local_files_only=offline))
    if attn_implementation == IMPLEMENTATION:
        patch_transformers()
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation=attn_implementation, local_files_only=offline,
        **_sharding_options(world),
    )  # fmt: skip
    note_head_shards(model.config, world)
    return model.eval()


def _sharding_options(world: int) -> dict:
    """`distributed_config=DistributedConfig(tp_size=world)` (transformers >= 5.17), else `tp_plan="auto"`."""
    try:
        from transformers.distributed import DistributedConfig

        return {"distributed_config": DistributedConfig(tp_size=world)}
    except (ImportError, TypeError):
        return {"tp_plan": "auto"}


# ----------------------------------------------------------------------------------------------------------
# Generation and its measurement


def greedy_generate(model, ids: torch.Tensor, new_tokens: int, **options) -> torch.Tensor:
    """Greedy `model.generate` of exactly `new_tokens` tokens (EOS ignored): ids `[B, L]` -> `[B, new_tokens]`
    (the new tokens only); `options` go to generate (e.g. cache_implementation="static").

    Every rank must call it with the same ids (transformers' TP replicates the logits, so ranks agree).
    """
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, **options,
        )  # fmt: skip
    return out[:, ids.shape[1] :]


@dataclass
class DecodeRun:
    """Tokens and timing of one generation on one rank (bytes are this rank's: 1/world of the model)."""

    tokens: list[int]
    ttft_s: float
    decode_s: float
    bytes_per_step: float

    @property
    def decode_tok_s(self) -> float | None:
        steps = len(self.tokens) - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else None

    @property
    def achieved_gb_s(self) -> float | None:
        """This rank's bytes per decode step (its weight shards + its K/V heads) / time per step."""
        rate = self.decode_tok_s
        return self.bytes_per_step * rate / 1e9 if rate else None

    def summary(self) -> dict:
        """Plain values for a result file."""
        return {"tokens": self.tokens, "ttft_s": self.ttft_s, "decode_s": self.decode_s,
                "decode_tok_s": self.decode_tok_s, "bytes_per_step": self.bytes_per_step,
                "achieved_gb_s": self.achieved_gb_s}  # fmt: skip

    def line(self, world: int, device: str) -> str:
        rate, bandwidth = self.decode_tok_s, self.achieved_gb_s
        decode = f"{rate:.1f} tok/s" if rate else "-"
        per_gpu = f"{bandwidth:.1f} GB/s per rank" if bandwidth else "-"
        return (f"{len(self.tokens)} tokens | TTFT {self.ttft_s * 1e3:.0f} ms | decode {decode} | {per_gpu} "
                f"| TP={world} on {device}")  # fmt: skip


def timed_decode(model, ids: torch.Tensor, new_tokens: int, device: torch.device) -> DecodeRun:
    """Greedy generation timed two ways on every rank: one token (prefill, TTFT), then all `new_tokens`;
    decode time = the difference (transformers' generate has no per-step hook that syncs the same way on
    every version). On a GPU an untimed run of 2 tokens warms up first."""
    if device.type == "cuda":
        greedy_generate(model, ids, 2)
    _, first = _timed(lambda: greedy_generate(model, ids, 1), device)
    tokens, total = _timed(lambda: greedy_generate(model, ids, new_tokens), device)
    mid_length = ids.shape[1] + new_tokens // 2
    return DecodeRun(tokens[0].tolist(), first, max(total - first, 0.0), _step_bytes(model, mid_length))


def _timed(fn, device: torch.device):
    dist.barrier()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - start


def _step_bytes(model, kv_length: int) -> float:
    """Bytes one decode step reads on this rank: local weight shards and the local K/V of `kv_length` tokens
    (batch 1). The embedding table is counted whole (as in the single-GPU accelerator's metric)."""
    weights = sum(_local(p).numel() * p.element_size() for p in model.parameters())
    text = model.config.get_text_config()
    heads = text.num_attention_heads
    kv_heads = (getattr(text, "num_key_value_heads", None) or heads) // dist.get_world_size()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv = 2 * text.num_hidden_layers * kv_heads * head_dim * kv_length * model.dtype.itemsize
    return float(weights + kv)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    to_local = getattr(tensor, "to_local", None)
    return to_local() if to_local is not None else tensor


# ----------------------------------------------------------------------------------------------------------
# Launching


def launch(tp_size: int, module_args: list[str], *, env: dict | None = None) -> int:
    """Run `python -m <module_args>` as `tp_size` ranks through torch.distributed.run (`--standalone`: a
    free port on this host) and return its exit status. On CUDA, NVLink multicast is off unless the caller
    set NCCL_NVLS_ENABLE."""
    environment = {**os.environ, **(env or {})}
    environment.setdefault("NCCL_NVLS_ENABLE", "0")
    command = [*LAUNCHER, "--nproc-per-node", str(tp_size), "-m", *module_args]
    return subprocess.call(command, env=environment)


def inside_torchrun() -> bool:
    """True in a process torchrun started (its environment names a world size)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ
