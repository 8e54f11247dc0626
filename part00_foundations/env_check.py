"""Check the environment: PyTorch version, devices, autocast dtypes, and how fast a matmul runs.

    python part00_foundations/env_check.py              # matmul size picked for the device
    python part00_foundations/env_check.py --size 1024  # 1024 x 1024 matrices

The matmul benchmark multiplies two size x size matrices: 2 * size^3 floating-point operations
(a multiply and an add per term). Training a Transformer is mostly such matmuls, so this number is
the ceiling for how fast your training can go. On a known NVIDIA GPU it is compared with the peak
from the datasheet; the ratio is the "model FLOPs utilization" (MFU) you could hope for at best.
"""
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root: `shared` and the chapter import from anywhere

import torch

from shared.config import parse_config, run_cli
from shared.device import DTYPES, pick_device, supports_dtype, synchronize


@dataclass
class EnvCheckConfig:
    size: int | None = field(default=None, metadata={
        "help": "matrix size for the matmul benchmark; none = 512 on a CPU, 4096 on a GPU", "min": 1})
    device: str = field(default="auto", metadata={"help": "device to benchmark: auto, cpu, cuda or mps"})
    min_seconds: float = field(default=0.2, metadata={"help": "time each benchmark at least this long", "min": 0})

# Dense (no 2:4 sparsity) peak TFLOP/s from NVIDIA's datasheets: (fp32 without tensor cores,
# 16-bit tensor cores: bf16, or fp16 where the GPU has no bf16). Checked in order, first match wins.
GPU_PEAK_TFLOPS = [
    ("H100 PCIe", 51.2, 756.0),
    ("H100", 66.9, 989.4),  # SXM5
    ("H200", 66.9, 989.4),
    ("A100", 19.5, 312.0),
    ("L40S", 91.6, 362.0),
    ("L4", 30.3, 121.0),
    ("RTX 4090", 82.6, 165.2),  # bf16 with fp32 accumulate
    ("RTX 3090", 35.6, 71.0),
    ("V100", 15.7, 125.0),  # no bf16: the 16-bit number is fp16
    ("T4", 8.1, 65.0),  # no bf16: the 16-bit number is fp16
]


def gpu_peak_tflops(name: str):
    """(fp32, 16-bit) dense peak TFLOP/s for a GPU name like "NVIDIA A100-SXM4-80GB", or None."""
    for key, fp32, half in GPU_PEAK_TFLOPS:
        if key in name:
            return fp32, half
    return None


def matmul_gflops(device: str, dtype: torch.dtype, size: int, min_seconds: float = 0.2) -> float:
    """Measured GFLOP/s of a (size x size) @ (size x size) matmul: repeat for min_seconds, count 2*size^3 each."""
    small = torch.randn(64, 64, device=device, dtype=dtype)
    small @ small  # warm-up: the first call pays for library loading and kernel selection
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    synchronize(device)
    reps, start = 0, time.perf_counter()
    while True:
        a @ b
        reps += 1
        synchronize(device)  # GPU calls return before the work is done: wait, or we time nothing
        elapsed = time.perf_counter() - start
        # At least 3 calls for a stable number, unless one call already takes long (e.g. bf16 on a
        # CPU without bf16 units, where a single 1024 x 1024 matmul can take seconds).
        if elapsed >= min_seconds and (reps >= 3 or elapsed >= 1.0):
            return 2 * size**3 * reps / elapsed / 1e9


def devices_available() -> list[str]:
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.insert(0, "cuda")
    if torch.backends.mps.is_available():
        devices.insert(0, "mps")
    return devices


def main(argv=None) -> dict:
    args = parse_config(EnvCheckConfig, argv, description=__doc__)

    print(f"python {platform.python_version()} on {platform.system()} {platform.machine()} | torch {torch.__version__}")
    print(f"CPU: {os.cpu_count()} logical cores, torch threads: {torch.get_num_threads()}, "
          f"SIMD: {torch.backends.cpu.get_cpu_capability()}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            print(f"CUDA {i}: {props.name}, {props.total_memory / 2**30:.1f} GiB, "
                  f"compute capability {props.major}.{props.minor} | CUDA {torch.version.cuda}")
    else:
        print("CUDA: not available" + (" (this torch is a CPU-only build)" if torch.version.cuda is None else ""))
    print(f"MPS (Apple silicon): {'available' if torch.backends.mps.is_available() else 'not available'}")

    devices = devices_available()
    for d in devices:
        dtypes = [name for name in DTYPES if supports_dtype(d, name)]
        print(f"autocast on {d}: {', '.join(dtypes)}")

    device = pick_device(args.device)
    kind = device.split(":")[0]
    size = args.size or (512 if kind == "cpu" else 4096)  # a GPU needs big matrices to reach its peak
    result = {"torch": torch.__version__, "devices": devices, "device": device, "size": size}
    # What to time: fp32, then the 16-bit type this device computes in (bf16 if it can, else fp16).
    half = "bfloat16" if supports_dtype(device, "bfloat16") else "float16" if supports_dtype(device, "float16") else None
    if kind == "cuda" and half == "bfloat16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        half = "float16"  # bf16 only emulated (e.g. T4, V100): fp16 is the fast path
    peaks = gpu_peak_tflops(torch.cuda.get_device_name(device)) if kind == "cuda" else None
    print(f"\nmatmul {size} x {size} on {device} (2 * size^3 = {2 * size**3 / 1e9:.3g} GFLOP per call):")
    for name, peak in (("float32", peaks[0] if peaks else None), (half, peaks[1] if peaks else None)):
        if name is None:
            continue
        gflops = matmul_gflops(device, DTYPES[name], size, args.min_seconds)
        result[f"{name}_gflops"] = gflops
        if peak:
            ratio = f"{gflops / (peak * 1e3):.0%} of the {peak:g} TFLOP/s datasheet peak"
        elif kind == "cuda":
            ratio = "peak unknown for this GPU (add it to GPU_PEAK_TFLOPS)"
        else:
            ratio = f"peak unknown on {kind}: compare measured numbers only"
        print(f"  {name:>8}: {gflops:10.1f} GFLOP/s  ({ratio})")
    if kind == "cpu" and "bfloat16_gflops" in result and result["bfloat16_gflops"] < result["float32_gflops"]:
        print("  bf16 is slower than fp32 here: this CPU has no bf16 matrix instructions (AVX512-BF16 or\n"
              "  AMX), so PyTorch falls back to a slow path that converts every value. Train in float32 here.")
    return result


if __name__ == "__main__":
    run_cli(main)
