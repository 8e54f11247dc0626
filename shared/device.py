"""Pick the device and the autocast dtype, and read peak memory.

Order of preference: CUDA GPU, then Apple silicon (MPS), then CPU.
"""
from __future__ import annotations

import contextlib
import resource
import sys

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(requested: str = "auto") -> str:
    """Return "cuda", "mps" or "cpu". "auto" picks the best one available."""
    if requested != "auto":
        kind = requested.split(":")[0]
        if kind not in ("cpu", "cuda", "mps"):
            raise ValueError(f"--device {requested}: unknown device; use auto, cpu, cuda, cuda:N or mps")
        if kind == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {requested}: no CUDA GPU is visible to PyTorch (try --device cpu)")
        if kind == "mps" and not torch.backends.mps.is_available():
            raise ValueError(f"--device {requested}: Apple MPS is not available (try --device cpu)")
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def supports_dtype(device: str, dtype: str) -> bool:
    """Can autocast on `device` compute in `dtype`?"""
    kind = device.split(":")[0]
    if dtype == "float32":
        return True
    if kind == "cuda":
        return dtype == "float16" or torch.cuda.is_bf16_supported()
    if kind == "mps":
        return dtype in ("float16", "bfloat16")
    return dtype == "bfloat16"  # CPU autocast speaks bfloat16 (float16 matmuls on CPU are emulated and slow)


def best_dtype(device: str) -> str:
    """The lowest-precision dtype that trains safely without a GradScaler: bf16 where supported."""
    return "bfloat16" if device.split(":")[0] == "cuda" and supports_dtype(device, "bfloat16") else "float32"


def autocast(device: str, dtype: str):
    """A context manager: mixed precision for `dtype`, or a no-op for float32."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if dtype == "float32":
        return contextlib.nullcontext()
    if not supports_dtype(device, dtype):
        raise ValueError(f"--dtype {dtype} is not supported on {device}; use float32 or bfloat16")
    return torch.autocast(device_type=device.split(":")[0], dtype=DTYPES[dtype])


def peak_memory_mb(device: str) -> float:
    """Peak memory so far in MiB: allocator peak on CUDA, the process's max resident set on CPU/MPS."""
    kind = device.split(":")[0]
    if kind == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    # ru_maxrss is in KiB on Linux and in bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def synchronize(device: str) -> None:
    """Wait for queued GPU work, so wall-clock timings mean something."""
    kind = device.split(":")[0]
    if kind == "cuda":
        torch.cuda.synchronize()
    elif kind == "mps":
        torch.mps.synchronize()
