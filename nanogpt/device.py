"""Which device and number format to run on: auto-detection, checks, and the autocast context."""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager as ContextManager

import torch

from nanogpt.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def mps_available() -> bool:
    return hasattr(torch.backends, "mps") and torch.backends.mps.is_available()


def resolve_device(requested: str) -> str:
    """'auto' picks cuda, then mps, then cpu; an explicit device is checked to exist."""
    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if mps_available() else "cpu"
    kind, colon, index = requested.partition(":")
    if kind in ("cpu", "cuda", "mps") and colon and not (index.isascii() and index.isdigit()):
        raise UserError(
            f"--device={requested} is not a device name: after '{kind}:' comes a device index, a whole number "
            f"counted from 0 ({kind}:N, e.g. --device={kind}:0 for the first). Or give --device={kind} alone."
        )
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise UserError(
                f"--device={requested} was requested but CUDA is not available on this machine "
                "(no NVIDIA GPU, or a CPU-only PyTorch). Use --device=cpu, or --device=auto to pick what is there."
            )
        count = torch.cuda.device_count()
        if colon and int(index) >= count:
            raise UserError(
                f"--device={requested}: this machine has {count} CUDA device(s), numbered from 0: "
                f"use --device=cuda:0{f' to cuda:{count - 1}' if count > 1 else ''}."
            )
    elif kind == "mps":
        if not mps_available():
            raise UserError(
                "--device=mps was requested but Apple's Metal backend is not available here "
                "(it needs a Mac with Apple silicon or an AMD GPU). Use --device=cpu or --device=auto."
            )
    elif kind != "cpu":
        raise UserError(f"unknown --device={requested!r}. Use auto, cpu, cuda, cuda:N or mps.")
    return requested


def native_bf16() -> bool:
    """Whether this CUDA GPU computes in bfloat16 natively (Ampere and newer). PyTorch's own
    is_bf16_supported() also says yes for older GPUs that only emulate it, slowly."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # PyTorch before 2.6 has no such argument and counts native support only
        return torch.cuda.is_bf16_supported()


def resolve_dtype(requested: str, device: str, training: bool = False) -> str:
    """'auto' is bfloat16 on CUDA GPUs that support it, float16 on older ones, float32 elsewhere.

    Every device accepts every dtype for inference. On CPUs without bfloat16/float16 units (before
    AVX-512 BF16 / AMX) mixed precision is emulated and slow, but it runs, which is how the test suite
    checks the GPU's autocast paths on a machine without a GPU. Training in float16 needs loss
    scaling (GradScaler), which PyTorch does not support on every version of the mps backend, so
    float16 training on mps is refused rather than run unscaled."""
    kind = device.split(":")[0]
    if requested == "auto":
        if kind == "cuda":
            return "bfloat16" if native_bf16() else "float16"
        return "float32"
    if requested not in DTYPES:
        raise UserError(f"unknown --dtype={requested!r}. Use auto, float32, bfloat16 or float16.")
    if requested == "bfloat16" and kind == "cuda" and not native_bf16():
        raise UserError("--dtype=bfloat16 is not supported by this GPU (it needs Ampere or newer); use float16.")
    if requested == "float16" and kind == "mps" and training:
        raise UserError(
            "--dtype=float16 training on mps is not supported: float16 gradients underflow without loss scaling, "
            "and PyTorch's GradScaler does not support mps in every version. Use --dtype=bfloat16 (Apple M2 or "
            "newer) or --dtype=float32."
        )
    return requested


def enable_tf32(device: str) -> None:
    """TF32 matmuls on CUDA (Ampere and newer): float32 range with a 10-bit mantissa, nearly free speed."""
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def autocast(device: str, dtype: str) -> ContextManager:
    """Mixed precision for matmuls where the device supports it; a no-op for float32."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=DTYPES[dtype])
