"""Benchmark training steps and generation, and print a table (and JSON).

    python bench.py                               # seed CPU config and a GPT-2 124M-shaped model
    python bench.py --models=seed --compile=True  # one model, compiled
    python bench.py --models=seed --profile=True  # also the PyTorch profiler's top operators

Training: full steps (forward, backward, clip, AdamW) on random tokens after warm-up; median and
spread in ms, tokens/s, FLOP/s and MFU against the device's peak (datasheet for known GPUs, a
measured matmul for CPUs), peak memory. Generation: tokens/s with and without the KV cache at
batch 1 and batch gen_batch, and the seconds sample.py's default workload (10 samples x 500
tokens) takes done nanoGPT's way (one by one, no cache) and ours (one batch, KV cache).
Weights are random: speed does not depend on them.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from nanogpt.config import device_option, dtype_option, option, parse_args
from nanogpt.device import DTYPES, autocast, enable_tf32, resolve_device, resolve_dtype
from nanogpt.errors import UserError, run_main
from nanogpt.generate import generate
from nanogpt.mfu import peak_flops
from nanogpt.model import GPT, GPTConfig
from nanogpt.optim import build_optimizers

# name -> (model shape, training batch_size) for the scenarios `--models` can list
PRESETS: dict[str, tuple[GPTConfig, int]] = {
    # the seed CPU command of the README: --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128
    "seed": (GPTConfig(block_size=64, vocab_size=65, n_layer=4, n_head=4, n_embd=128, bias=False), 12),
    # config/train_shakespeare_char.py, the GPU baby GPT
    "shakespeare_char": (GPTConfig(block_size=256, vocab_size=65, n_layer=6, n_head=6, n_embd=384, bias=False), 64),
    # GPT-2 124M; one sequence per step keeps it to seconds on a CPU
    "gpt2": (GPTConfig(block_size=1024, vocab_size=50304, n_layer=12, n_head=12, n_embd=768, bias=False), 1),
}


@dataclass
class BenchOptions:
    models: str = option("seed,gpt2", f"comma-separated scenarios among: {', '.join(PRESETS)}")
    batch_size: int = option(0, "training sequences per step; 0 uses the scenario's")
    device: str = device_option()
    dtype: str = dtype_option("auto, float32, bfloat16 or float16")
    compile: bool = option(False, "torch.compile the model for the training steps")
    train_steps: int = option(20, "timed training steps (after warm-up); GPT-2 on a CPU uses a quarter")
    warmup_steps: int = option(3, "untimed training steps first (compilation, allocator warm-up)")
    gen_tokens: int = option(100, "new tokens per generation run; GPT-2 on a CPU uses a quarter")
    gen_batch: int = option(10, "sequences in the batched generation runs")
    sample_tokens: int = option(
        500, "new tokens per sample in the sample.py workload (gen_batch samples); GPT-2 on a CPU uses a tenth"
    )
    profile: bool = option(False, "run the PyTorch profiler over a few training steps and print the top operators")
    json: str = option("bench.json", "write all figures here as JSON ('' to skip)")
    seed: int = option(1337, "random seed")

    def __post_init__(self) -> None:
        unknown = [m for m in self.models.split(",") if m not in PRESETS]
        if unknown:
            raise UserError(f"unknown --models entry {unknown[0]!r}; choose among {', '.join(PRESETS)}.")
        if min(self.train_steps, self.gen_tokens, self.gen_batch, self.sample_tokens) < 1 or self.warmup_steps < 0:
            raise UserError(
                "--train_steps, --gen_tokens, --gen_batch and --sample_tokens must be positive, --warmup_steps >= 0."
            )


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elif device == "mps":
        torch.mps.synchronize()


def peak_memory_mb(device: str) -> float:
    """Peak memory so far: the device allocator's on GPUs, the process's resident set on the CPU."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def bench_train(model: GPT, batch_size: int, o: BenchOptions, device: str, dtype: str, steps: int) -> dict[str, Any]:
    cfg = model.config
    device_type = device.split(":")[0]
    (optimizer,) = build_optimizers(model, "adamw", 1e-4, 0.1, (0.9, 0.95), device_type)
    step_model = torch.compile(model) if o.compile else model
    gen = torch.Generator().manual_seed(o.seed)
    data = torch.randint(cfg.vocab_size, (batch_size * 8, cfg.block_size + 1), generator=gen).to(device)
    ctx = autocast(device, dtype)
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == "float16")  # as train.py does

    def step(i: int) -> None:
        xy = data[(i % 8) * batch_size : (i % 8 + 1) * batch_size]
        with ctx:
            _, loss = step_model(xy[:, :-1], xy[:, 1:])
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    for i in range(o.warmup_steps):
        step(i)
    _sync(device)
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        step(i)
        _sync(device)
        times.append(time.perf_counter() - t0)
    if o.profile:
        print_profile(step, device)
    med = statistics.median(times)
    tokens = batch_size * cfg.block_size
    flops = model.estimate_flops_per_token() * tokens / med
    return {
        "ms_per_iter": med * 1000,
        "ms_min": min(times) * 1000,
        "ms_max": max(times) * 1000,
        "tokens_per_s": tokens / med,
        "flops_per_s": flops,
        "mfu": flops / peak_flops(device, DTYPES[dtype]),
        "batch_size": batch_size,
        "steps": steps,
    }


@torch.no_grad()
def bench_generate(model: GPT, batch: int, tokens: int, use_cache: bool, device: str, dtype: str) -> float:
    """Tokens per second for `batch` sequences of `tokens` new tokens from a 1-token prompt."""
    model.eval()
    x = torch.zeros((batch, 1), dtype=torch.long, device=device)
    with autocast(device, dtype):
        generate(model, x, 2, use_cache=use_cache)  # warm-up
        _sync(device)
        t0 = time.perf_counter()
        generate(model, x, tokens, use_cache=use_cache, top_k=200)
        _sync(device)
    model.train()
    return batch * tokens / (time.perf_counter() - t0)


@torch.no_grad()
def bench_sample_workload(model: GPT, n: int, tokens: int, device: str, dtype: str) -> dict[str, float]:
    """Seconds to generate what `sample.py` does by default (n samples of `tokens` tokens, top_k=200):
    nanoGPT's way (one sample after another, the whole context recomputed for every token) and ours
    (all samples in one batch, KV cache)."""
    model.eval()
    x = torch.zeros((1, 1), dtype=torch.long, device=device)
    kwargs = dict(temperature=0.8, top_k=200)
    out = {}
    with autocast(device, dtype):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(n):
            generate(model, x, tokens, use_cache=False, **kwargs)
        _sync(device)
        out["sequential_nocache_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        generate(model, x.repeat(n, 1), tokens, use_cache=True, **kwargs)
        _sync(device)
        out["batched_cache_s"] = time.perf_counter() - t0
    model.train()
    out["speedup"] = out["sequential_nocache_s"] / out["batched_cache_s"]
    out["samples"], out["tokens"] = n, tokens
    return out


def print_profile(step, device: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        for i in range(3):
            step(i)
        _sync(device)
    key = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=15))


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    o, _ = parse_args(BenchOptions, argv, "python bench.py", __doc__ or "")
    device = resolve_device(o.device)
    dtype = resolve_dtype(o.dtype, device, training=True)
    torch.manual_seed(o.seed)
    enable_tf32(device)
    results: dict[str, Any] = {
        "device": device,
        "dtype": dtype,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "options": asdict(o),
        "models": {},
    }
    print(
        f"device {device}, dtype {dtype}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"compile={o.compile}, peak {peak_flops(device, DTYPES[dtype]) / 1e12:.2f} TFLOP/s"
    )
    for name in o.models.split(","):
        cfg, batch_size = PRESETS[name]
        model = GPT(GPTConfig(**cfg.to_dict())).to(device)
        batch_size = o.batch_size or batch_size
        slow_cpu = name == "gpt2" and device == "cpu"
        # GPT-2 124M on a CPU: a quarter of the steps and generated tokens, a tenth of the sample workload
        steps = max(2, o.train_steps // 4) if slow_cpu else o.train_steps
        gen_tokens = max(1, o.gen_tokens // 4) if slow_cpu else o.gen_tokens
        r = {"params": model.get_num_params(), "config": cfg.to_dict()}
        r["train"] = bench_train(model, batch_size, o, device, dtype, steps)
        r["generate_tokens_per_s"] = {
            f"batch{b}_{'cache' if c else 'nocache'}": bench_generate(model, b, gen_tokens, c, device, dtype)
            for b in (1, o.gen_batch)
            for c in (True, False)
        }
        tokens = o.sample_tokens // 10 if slow_cpu else o.sample_tokens
        r["sample_workload"] = bench_sample_workload(model, o.gen_batch, max(1, tokens), device, dtype)
        r["peak_memory_mb"] = peak_memory_mb(device)
        results["models"][name] = r
        t, g = r["train"], r["generate_tokens_per_s"]
        print(f"\n{name}: {r['params'] / 1e6:.2f}M params, block {cfg.block_size}, batch {batch_size}")
        print(
            f"  train     {t['ms_per_iter']:9.2f} ms/iter (min {t['ms_min']:.2f}, max {t['ms_max']:.2f}, "
            f"{t['steps']} steps)  {t['tokens_per_s']:,.0f} tok/s  {t['flops_per_s'] / 1e9:,.1f} GFLOP/s  "
            f"MFU {t['mfu'] * 100:.1f}%"
        )
        for key, tps in g.items():
            print(f"  generate  {key:<16} {tps:10,.0f} tok/s")
        w = r["sample_workload"]
        print(
            f"  sample    {w['samples']} x {w['tokens']} tokens: one by one without cache (nanoGPT) "
            f"{w['sequential_nocache_s']:.2f} s, batched with cache {w['batched_cache_s']:.2f} s "
            f"({w['speedup']:.1f}x)"
        )
        print(f"  peak memory {r['peak_memory_mb']:,.0f} MB")
        del model
    if o.json:
        Path(o.json).write_text(json.dumps(results, indent=1))
        print(f"\nwrote {o.json}")


if __name__ == "__main__":
    run_main(main)
