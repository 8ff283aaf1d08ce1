"""Launch parameters and measured speed-ups, keyed by GPU and shape bucket (tuning.json beside this file).

The table is written from benchmark runs (benchmarks/, `attnforge evolve tune` later); each entry records the
result file it came from. Kernels call `launch_params`; the optimizer calls `measured_speedup`.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import torch

TABLE_PATH = Path(__file__).with_name("tuning.json")


@cache
def load_table(path: Path = TABLE_PATH) -> dict:
    """The whole table: {gpu_key: {kernel: {bucket: {"params": {...}, "speedup": float, "source": str}}}}."""
    if not path.exists():
        return {}
    return json.loads(path.read_text())


def gpu_key(device: torch.device | str | None = None) -> str:
    """'h100', 'h200', ... from the CUDA device name; 'cpu' without one."""
    device = torch.device(device) if device is not None else None
    if (device is not None and device.type != "cuda") or not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    for key in ("h100", "h200", "h20", "a100", "l40s", "l4", "b200"):
        if key in name:
            return key
    return name.replace("nvidia ", "").replace(" ", "-")


def sm_count(device: torch.device | str | None = None) -> int:
    """Streaming multiprocessors of the CUDA device (132 on an H100 SXM); 132 when there is none."""
    device = torch.device(device) if device is not None else None
    if (device is not None and device.type != "cuda") or not torch.cuda.is_available():
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


def _entry(kernel: str, gpu: str, bucket: str) -> dict | None:
    return load_table().get(gpu, {}).get(kernel, {}).get(bucket)


def launch_params(kernel: str, gpu: str, bucket: str) -> dict | None:
    """Tuned launch parameters for `kernel` on `gpu` in shape `bucket`, or None (use the heuristic).

    An entry may record a speed-up measured with the heuristic's parameters ("params": null).
    """
    entry = _entry(kernel, gpu, bucket)
    return None if entry is None or entry.get("params") is None else dict(entry["params"])


def measured_speedup(kernel: str, gpu: str, bucket: str) -> float | None:
    """Measured speed-up over torch's best correct path in that bucket, or None if unmeasured."""
    entry = _entry(kernel, gpu, bucket)
    return None if entry is None else entry.get("speedup")
