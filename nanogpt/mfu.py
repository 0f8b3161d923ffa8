"""Model FLOPs utilisation: achieved FLOP/s as a fraction of what the device can do.

MFU (PaLM paper, appendix B) compares the FLOPs a training step must do by the model's arithmetic
with the device's peak. GPU peaks are the vendors' dense tensor-core figures; for a CPU there is no
datasheet figure we can trust, so we measure a large matmul once and use that as the peak.
"""

from __future__ import annotations

import functools
import re
import time

import torch

# dense (no sparsity) peak FLOP/s for bfloat16/float16 tensor-core math, from vendor datasheets
GPU_PEAK_FLOPS = {
    "H200": 989e12,
    "H100 PCIe": 756e12,  # before "H100": the first entry whose words match wins
    "H100": 989e12,  # SXM
    "A100": 312e12,
    "A10G": 70e12,
    "A10": 125e12,
    "L40S": 362e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "V100": 125e12,
    "T4": 65e12,
}


@functools.cache
def measured_matmul_flops(device: str = "cpu", dtype: torch.dtype = torch.float32, n: int = 1024) -> float:
    """Best FLOP/s of a few n x n matmuls (5; on a CPU, as many as fit in ~0.2 s): this device's practical peak."""
    gen = torch.Generator(device=device).manual_seed(0)  # not the global one: training's random stream stays put
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    best, spent = float("inf"), 0.0
    for _ in range(5):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
        spent += time.perf_counter() - t0
        if device == "cpu" and spent > 0.2:  # bfloat16 on a CPU without bf16 units takes seconds per matmul
            break
    return 2 * n**3 / best


def peak_flops(device: str, dtype: torch.dtype = torch.float32) -> float:
    """Peak FLOP/s of `device`: the datasheet figure for known GPUs, else a measured matmul."""
    if device.startswith("cuda") and torch.cuda.is_available():
        flops = datasheet_peak(torch.cuda.get_device_name(torch.device(device)))
        if flops is not None:
            return flops if dtype != torch.float32 else flops / 2  # TF32 runs at half the bf16 rate
    return measured_matmul_flops(device, dtype, 512 if device == "cpu" else 1024)


def datasheet_peak(gpu_name: str) -> float | None:
    """The GPU_PEAK_FLOPS entry whose words appear as whole words of the device name, e.g. "NVIDIA
    A100-SXM4-40GB" is an A100 and "NVIDIA L40" is not an L4. None for a GPU not in the table."""
    words = re.split(r"[\s\-_/]+", gpu_name.upper())
    for key, flops in GPU_PEAK_FLOPS.items():
        k = key.upper().split()
        if any(words[i : i + len(k)] == k for i in range(len(words))):
            return flops
    return None
