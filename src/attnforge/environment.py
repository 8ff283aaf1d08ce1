"""What this machine can run: versions, the GPU, whether Triton kernels can launch, which backends exist."""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

import torch


def package_version(name: str) -> str | None:
    """Installed version of a distribution, or None."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def triton_interpret() -> bool:
    """True when TRITON_INTERPRET=1: Triton kernels run on the CPU through the interpreter (slow)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")


def fp32_dot(dtype: torch.dtype) -> bool:
    """Whether a kernel's `tl.dot` on `dtype` inputs multiplies in full fp32 (`input_precision="ieee"`): fp32
    inputs (not tf32), and bf16 under the CPU interpreter (triton 3.9), whose tl.dot reads bf16's raw bits as
    integers; on a GPU bf16/fp16 always use the tensor cores."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and triton_interpret())


def triton_status(device: torch.device | str | None = None) -> tuple[bool, str]:
    """Whether attnforge's Triton kernels can run on `device` (default: CUDA if present), and why."""
    if package_version("triton") is None:
        return False, "triton is not installed"
    device = torch.device(device) if device is not None else None
    if triton_interpret():
        return True, "TRITON_INTERPRET=1: Triton interpreter on CPU tensors (correctness only, slow)"
    if device is not None and device.type != "cuda":
        return False, f"tensors on {device.type}: Triton kernels need a CUDA GPU (or TRITON_INTERPRET=1)"
    if not torch.cuda.is_available():
        return False, (
            "no CUDA GPU: Triton kernels need one, or run on CPU through the Triton interpreter with "
            "TRITON_INTERPRET=1 (correctness only, slow)"
        )
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return False, f"GPU compute capability {major}.{minor} is below 8.0 (Ampere), which the kernels need"
    return True, f"CUDA GPU {torch.cuda.get_device_name()} (sm_{major}{minor})"


@functools.cache
def pdl_supported(device: torch.device) -> bool:
    """Programmatic dependent launch: a Hopper (sm90+) GPU, not the interpreter, and a Triton that has it."""
    if triton_interpret() or device.type != "cuda":
        return False
    try:  # grid dependency control in the language, and the launch option
        from triton.backends.nvidia.compiler import CUDAOptions
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait  # noqa: F401
    except ImportError:
        return False
    has_option = "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})
    return has_option and torch.cuda.get_device_capability(device)[0] >= 9


def git_commit(root: Path | None = None) -> str | None:
    """The commit of the source tree: ATTNFORGE_GIT_COMMIT if set (copies without .git), else git's HEAD."""
    if os.environ.get("ATTNFORGE_GIT_COMMIT"):
        return os.environ["ATTNFORGE_GIT_COMMIT"]
    root = root or Path(__file__).resolve().parents[2]
    try:
        done = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def device_info() -> dict:
    """Name, SM count, memory and driver of the current CUDA device (empty dict without one)."""
    if not torch.cuda.is_available():
        return {}
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    info = {
        "gpu": props.name,
        "sm_count": props.multi_processor_count,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "compute_capability": f"{props.major}.{props.minor}",
        "cuda": torch.version.cuda,
    }
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        info["driver"] = done.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        info["driver"] = None
    return info


def sdpa_backends() -> dict[str, bool]:
    """torch SDPA backends that can run here (flash and cuDNN need a CUDA GPU)."""
    cuda = torch.cuda.is_available()
    backends = torch.backends.cuda
    return {
        "math": True,
        "flash": cuda and backends.is_flash_attention_available() and backends.flash_sdp_enabled(),
        "efficient": cuda and backends.mem_efficient_sdp_enabled(),
        "cudnn": cuda and backends.cudnn_sdp_enabled() and torch.backends.cudnn.is_available(),
    }


def environment_report() -> dict:
    """Everything a result file or `attnforge info` records about where it ran."""
    triton_ok, triton_reason = triton_status()
    return {
        "attnforge": package_version("attnforge"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "transformers": package_version("transformers"),
        "platform": platform.platform(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        **device_info(),
        "triton_kernels": triton_ok,
        "triton_reason": triton_reason,
        "sdpa_backends": sdpa_backends(),
        "git_commit": git_commit(),
    }
