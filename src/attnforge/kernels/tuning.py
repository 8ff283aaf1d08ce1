"""Launch parameters and measured speed-ups per GPU and shape bucket: the tuning store.

Two tables with the same format, `{gpu: {"arch": "sm90", kernel: {bucket: entry}}}`, where an entry is
`{"params": {...} | null, "speedup": float, "source": str}`, and for decode, measured per call in a CUDA graph
too, `"graph_speedup": float` and, where something else won there, `"graph_combine"` (another way of merging
the same splits) or `"graph_params"` (another launch altogether):
  - the packaged table (tuning.json beside this file), written from committed benchmark results;
  - the user's table (`user_table_path()`: $ATTNFORGE_CACHE_DIR or ~/.cache/attnforge, tuning.json), written
    by `attnforge tune` on the user's own GPU; its entries win over the packaged ones.
A GPU without entries of its own uses those measured on another GPU of its architecture (H100 and H200 are
both sm90); `lookup` says which it used. Kernels call `launch_params`; the optimizer calls `lookup`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

TABLE_PATH = Path(__file__).with_name("tuning.json")
_KNOWN_GPUS = ("h100", "h200", "h20", "a100", "l40s", "l4", "b200")
_reload_hooks: list[Callable[[], None]] = []


@dataclass(frozen=True)
class Entry:
    """One bucket's entry and where it came from."""

    params: dict | None
    speedup: float | None
    source: str  # the result file or command that measured it
    gpu: str  # the GPU it was measured on
    origin: str  # "this GPU" or "architecture sm90 (measured on h100)"
    user: bool  # from the user's table rather than the packaged one
    graph_combine: str | None = None  # how captured calls merge the splits, where it differs from `params`
    graph_speedup: float | None = None  # measured per call inside a CUDA graph (as captured calls launch)
    graph_params: dict | None = None  # captured calls' whole launch, where another one won in a CUDA graph


def user_table_path() -> Path:
    """Where `attnforge tune` stores this user's entries ($ATTNFORGE_CACHE_DIR, else ~/.cache/attnforge)."""
    root = os.environ.get("ATTNFORGE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "attnforge"
    )
    return Path(root) / "tuning.json"


@cache
def load_table(path: Path = TABLE_PATH) -> dict:
    """A whole table (`{}` if the file does not exist)."""
    if not path.exists():
        return {}
    return json.loads(path.read_text())


def reload() -> None:
    """Forget cached tables and everything derived from them (after `attnforge tune` wrote entries)."""
    load_table.cache_clear()
    for hook in _reload_hooks:
        hook()


def on_reload(hook: Callable[[], None]) -> None:
    """Call `hook` whenever the tables are reloaded (kernels clear their cached launch parameters)."""
    _reload_hooks.append(hook)


def gpu_key(device: torch.device | str | None = None) -> str:
    """'h100', 'h200', ... from the CUDA device name; 'cpu' without one."""
    return _device_keys(_as_device(device))[0]


def arch_key(device: torch.device | str | None = None) -> str:
    """'sm90' for compute capability 9.0; 'cpu' without a CUDA device."""
    return _device_keys(_as_device(device))[1]


def _as_device(device) -> torch.device | None:
    """The CUDA device meant (None: the current one), with its index; None for a CPU or without CUDA."""
    if not torch.cuda.is_available():
        return None
    device = torch.device(device) if device is not None else torch.device("cuda")
    if device.type != "cuda":
        return None
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())


@cache
def _device_keys(device: torch.device | None) -> tuple[str, str]:
    if device is None:
        return "cpu", "cpu"
    major, minor = torch.cuda.get_device_capability(device)
    return gpu_key_from_name(torch.cuda.get_device_name(device)), f"sm{major}{minor}"


def gpu_key_from_name(name: str) -> str:
    """'h100' for 'NVIDIA H100 80GB HBM3', 'h200' for 'NVIDIA H200', else the name in lower-case-dashes."""
    name = name.lower()
    return next((key for key in _KNOWN_GPUS if key in name), name.replace("nvidia ", "").replace(" ", "-"))


# Shared memory a block's tiles may take on Hopper (227 KB a block at most), a little kept for the rest.
HOPPER_SHARED_MEMORY = 220 * 1024


def pipeline_bytes(params: dict, head_dim: int, element_size: int) -> int:
    """Shared memory a launch's tiles take (decode or prefill; an upper bound): q's block (BLOCK_M rows, 16
    where the launch leaves it out) and `num_stages` K and V tiles of BLOCK_N rows, head_dim padded to a
    power of two."""
    row = (1 << (head_dim - 1).bit_length()) * element_size
    return (params.get("BLOCK_M", 16) + params["num_stages"] * 2 * params["BLOCK_N"]) * row


def sm_count(device: torch.device | str | None = None) -> int:
    """Streaming multiprocessors of the CUDA device (132 on an H100 SXM); 132 when there is none."""
    device = _as_device(device)
    if device is None:
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


def lookup(
    kernel: str, device: torch.device | str | None, bucket: str, *, architecture: bool = True
) -> Entry | None:
    """The entry for `kernel` in `bucket` on this device: the user's table first, then the packaged one;
    this GPU's own entries first, then (with `architecture`) those of another GPU of the same architecture."""
    gpu, arch = gpu_key(device), arch_key(device)
    tables = ((True, load_table(user_table_path())), (False, load_table()))
    for user, table in tables:
        raw = table.get(gpu, {}).get(kernel, {}).get(bucket)
        if raw is not None:
            return _entry(raw, gpu, "this GPU", user)
    if not architecture or arch == "cpu":
        return None
    for user, table in tables:
        for other, section in sorted(table.items()):
            raw = section.get(kernel, {}).get(bucket) if section.get("arch") == arch else None
            if raw is not None:
                return _entry(raw, other, f"architecture {arch} (measured on {other})", user)
    return None


def _entry(raw: dict, gpu: str, origin: str, user: bool) -> Entry:
    return Entry(raw.get("params"), raw.get("speedup"), raw.get("source", ""), gpu, origin, user,
                 raw.get("graph_combine"), raw.get("graph_speedup"), raw.get("graph_params"))  # fmt: skip


def launch_params(
    kernel: str, device: torch.device | str | None, bucket: str, captured: bool = False
) -> dict | None:
    """Tuned launch parameters for `kernel` in `bucket` on this device (or its architecture), or None (use the
    kernel's heuristic); for calls `captured` in a CUDA graph, the entry's graph launch or merge where it has
    one. An entry may record a speed-up measured with the heuristic ("params": null)."""
    entry = lookup(kernel, device, bucket)
    if captured and entry is not None and entry.graph_params is not None:
        return dict(entry.graph_params)
    if entry is None or entry.params is None:
        return None
    if captured and entry.graph_combine is not None:
        return {**entry.params, "combine": entry.graph_combine}
    return dict(entry.params)


def write_entries(
    gpu: str, arch: str, kernel: str, entries: dict[str, dict], path: Path | None = None
) -> Path:
    """Merge `{bucket: entry}` into a table file (default: the user's) under `gpu`, then reload."""
    path = path or user_table_path()
    table = json.loads(path.read_text()) if path.exists() else {}
    section = table.setdefault(gpu, {})
    section["arch"] = arch
    section.setdefault(kernel, {}).update(entries)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    reload()
    return path
