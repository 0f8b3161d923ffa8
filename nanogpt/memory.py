"""Memory: what a training step or a generation request needs, what the device has, and the
message when it does not fit.

The estimates are deliberately low (they count only the largest buffers), so a request is refused
before allocating only when it certainly cannot fit. What slips through and runs out of memory
anyway is caught where it happens and turned into the same kind of message (`out_of_memory`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from nanogpt.errors import UserError
from nanogpt.model import GPTConfig

TRAIN_ADVICE = (
    "Ways down: a smaller --batch_size with more --gradient_accumulation_steps (same tokens per step), a "
    "smaller --block_size, a smaller model (gpt2 instead of gpt2-xl), --dtype=bfloat16, or --compile=True. "
    "Finetuning gpt2-xl needs about 40 GB."
)
SAMPLE_ADVICE = (
    "Ways down: fewer --num_samples (they are generated together as one batch), fewer --max_new_tokens, "
    "or --dtype=bfloat16 (half the memory for the KV cache)."
)


def _device_name(device: str) -> str:
    kind = device.split(":")[0]
    return {"cuda": f"the GPU ({device})", "mps": "the Apple GPU (mps)"}.get(kind, "the CPU")


MEMINFO = Path("/proc/meminfo")
CGROUP = Path("/sys/fs/cgroup")  # a container's own cgroup (cgroup namespaces); v1 keeps memory in memory/


def _stat_fields(path: Path) -> dict[str, int]:
    """A cgroup memory.stat file: `name value` lines."""
    pairs = (line.split() for line in path.read_text().splitlines())
    return {p[0]: int(p[1]) for p in pairs if len(p) == 2}


def _cgroup_available_bytes(cgroup: Path) -> int | None:
    """What a container's memory limit leaves: the limit less the memory charged to it, where the page
    cache (file pages, active and inactive) counts as free, as in the kernel's MemAvailable and `docker
    stats`: the kernel drops clean cached file pages (and writes back dirty ones) before it runs out.
    cgroup v2 (memory.max) or v1 (memory/memory.limit_in_bytes); None without a limit."""
    v2 = {"limit": "memory.max", "usage": "memory.current", "stat": "memory.stat"}
    v1 = {
        "limit": "memory/memory.limit_in_bytes",
        "usage": "memory/memory.usage_in_bytes",
        "stat": "memory/memory.stat",
    }
    for files, prefix in ((v2, ""), (v1, "total_")):
        try:
            limit = (cgroup / files["limit"]).read_text().strip()
            usage = int((cgroup / files["usage"]).read_text())
        except (OSError, ValueError):
            continue
        if limit == "max" or int(limit) >= 2**60:  # v1 writes "no limit" as a huge number
            return None
        try:
            stat = _stat_fields(cgroup / files["stat"])
        except (OSError, ValueError, IndexError):
            stat = {}
        cache = stat.get(f"{prefix}inactive_file", 0) + stat.get(f"{prefix}active_file", 0)
        return max(0, int(limit) - max(0, usage - cache))
    return None


def _host_available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo, capped by what a container's cgroup limit leaves; None where unknown."""
    try:
        meminfo = MEMINFO.read_text()
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in meminfo.splitlines() if ":" in line)
    if "MemAvailable" not in fields:
        return None
    available = int(fields["MemAvailable"].split()[0]) * 1024
    try:
        limited = _cgroup_available_bytes(CGROUP)
    except ValueError:
        limited = None  # an unreadable limit: MemAvailable stands
    return available if limited is None else min(available, limited)


def available_bytes(device: str) -> int | None:
    """Memory this process could still allocate on `device`, or None where it cannot be known."""
    kind = device.split(":")[0]
    if kind == "cuda":
        dev = torch.device(device)
        free, _ = torch.cuda.mem_get_info(dev)
        # memory PyTorch's caching allocator holds but does not use is free for our next tensors
        return free + torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
    if kind == "mps":
        if not hasattr(torch.mps, "recommended_max_memory"):
            return None
        return torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory()
    return _host_available_bytes() if os.name == "posix" else None


def gb(n: float) -> str:
    """A number of bytes as people read it: 1.5 GB, 300 MB."""
    if n < 2**20:
        return f"{n / 2**10:,.0f} kB"
    return f"{n / 2**30:,.1f} GB" if n >= 2**28 else f"{n / 2**20:,.0f} MB"


def require(parts: dict[str, int], device: str, what: str, advice: str) -> None:
    """Raise a UserError when the buffers in `parts` (name -> bytes) cannot fit in what `device` has left."""
    available = available_bytes(device)
    need = sum(parts.values())
    if available is None or need <= available:
        return
    detail = ", ".join(f"{name} {gb(n)}" for name, n in parts.items() if n >= 2**20)
    raise UserError(
        f"{what} needs at least {gb(need)} of memory ({detail}) but {_device_name(device)} has "
        f"{gb(available)} available, so it would fail part-way. {advice}"
    )


def _bytes_per_element(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


def kv_cache_bytes(config: GPTConfig, rows: int, dtype: torch.dtype) -> int:
    """The keys and values of every layer over block_size positions for `rows` sequences (KVCache.k and .v)."""
    return 2 * config.n_layer * rows * config.block_size * config.n_embd * _bytes_per_element(dtype)


def kv_row_bytes(config: GPTConfig, dtype: torch.dtype) -> int:
    """All a KVCache keeps per sequence: keys and values, the fill position (int64) and the token shift's
    float32 last embedding. What the server's engine counts per active sequence against its budget."""
    return kv_cache_bytes(config, 1, dtype) + 8 + 4 * config.n_embd


def kv_budget_bytes(device: str) -> int:
    """The default memory for the server's KV caches: half of what `device` has available when the server
    starts (the rest for the forward passes' activations and logits, and everything else the process and the
    machine need); 1 GB where the available memory cannot be known."""
    available = available_bytes(device)
    return available // 2 if available is not None else 2**30


def generation_bytes(
    config: GPTConfig, batch: int, prompt_len: int, max_new_tokens: int, dtype: torch.dtype, use_cache: bool
) -> dict[str, int]:
    """Lower bound of the memory `GPT.generate` needs beyond the weights. `dtype` is the activations'
    (the autocast dtype, or the weights')."""
    act = _bytes_per_element(dtype)
    C, T = config.n_embd, min(prompt_len + max_new_tokens, config.block_size)
    parts = {
        # the prompts, each new token and the concatenated result (int64)
        "token ids": 2 * batch * (prompt_len + max_new_tokens) * 8,
        # float32 logits of the last position, their probabilities and the sampling race
        "logits": 3 * batch * config.vocab_size * 4,
        # one layer's widest tensor for the longest forward pass: the MLP's hidden layer
        "activations": batch * T * 4 * C * act,
    }
    if use_cache:
        parts["KV cache"] = kv_cache_bytes(config, batch, dtype)
    return parts


def training_bytes(config: GPTConfig, n_params: int, batch_size: int, dtype: torch.dtype) -> dict[str, int]:
    """Lower bound of the memory one training step needs beyond the weights (float32 master weights)."""
    act = _bytes_per_element(dtype)
    tokens = batch_size * config.block_size
    return {
        "gradients": 4 * n_params,
        "AdamW moments": 8 * n_params,
        # per layer and token, backward keeps at least the inputs of c_attn, c_proj, c_fc and the MLP's
        # 4x-wide hidden activation: ~8 x n_embd values (Korthikanti et al. 2022 count ~17 x n_embd)
        "activations": config.n_layer * tokens * 8 * config.n_embd * act,
        # the logits, and their float32 softmax in the cross-entropy's forward and backward
        "logits": tokens * config.vocab_size * (act + 8),
    }


def is_out_of_memory(e: BaseException) -> bool:
    """A failed allocation: CUDA/MPS raise torch.OutOfMemoryError, PyTorch's CPU allocator a RuntimeError."""
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text.lower())


def out_of_memory(device: str, advice: str) -> UserError:
    return UserError(f"{_device_name(device)} ran out of memory. {advice}")
