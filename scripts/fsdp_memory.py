"""Per-process peak memory of training a GPT-2-medium-shaped model: one process, DDP and FSDP on 2.

    python scripts/fsdp_memory.py [--processes=2] [--n_layer=24 --n_embd=1024 --n_head=16]

Each configuration trains 2 iterations of batch 1 x 64 tokens on the CPU (float32, AdamW), on generated
characters, and reports the peak resident memory of its largest process (getrusage of the finished
children: torchrun's workers included). Then FSDP's set-up alone (train.py's setup(): the
model built and sharded, the optimizer made, nothing run), where building the model on the meta device
shows: no process holds the whole model. The last two: FSDP writing a sharded checkpoint at iteration 2
(with --consolidate=False), then `nanogpt consolidate` of that checkpoint, which is what a run with
--consolidate=True does in rank 0's process when it ends. Weights, gradients and AdamW's two moments take 16 bytes per
parameter; DDP keeps all of them on every process, FSDP a 1/N shard of each.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# train.py's set-up in each torchrun worker, and no training: what building and sharding the model costs
SETUP_ONLY = """
import sys
from nanogpt.config import parse_args
from nanogpt.distributed import end_processes, start_processes
from nanogpt.train import setup
from nanogpt.train_options import TrainOptions

o, explicit = parse_args(TrainOptions, sys.argv[1:], "setup_only.py", "")
at = start_processes(o.device, o.backend, o.gradient_accumulation_steps, o.fsdp)
setup(o, explicit, at, o.dtype)
end_processes(at, together=True)
"""


def peak_mib(cmd: list[str], cwd: Path) -> float:
    """Run cmd in a fresh child process and return the peak RSS (MiB) of its largest descendant."""
    probe = (
        "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", probe, *cmd], cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return int(proc.stdout.strip().splitlines()[-1]) / 1024  # KiB on Linux


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--n_layer", type=int, default=24)
    p.add_argument("--n_head", type=int, default=16)
    p.add_argument("--n_embd", type=int, default=1024)
    a = p.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sys.path.insert(0, str(REPO / "tests"))
        from forkrun import make_text

        (tmp / "input.txt").write_text(make_text(200_000), encoding="utf-8")
        prep = [sys.executable, "-m", "nanogpt", "prepare", "--dataset=mem", "--tokenizer=char", "--input=input.txt"]
        subprocess.run([*prep, f"--data_dir={tmp / 'data'}"], cwd=tmp, check=True, capture_output=True,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))  # fmt: skip
        train = [
            str(REPO / "train.py"), "--device=cpu", "--compile=False", "--dtype=float32", f"--data_dir={tmp / 'data'}",
            f"--n_layer={a.n_layer}", f"--n_head={a.n_head}", f"--n_embd={a.n_embd}", "--block_size=64",
            "--batch_size=1", "--max_iters=2", "--eval_iters=1", "--eval_interval=1000", "--warmup_iters=0",
            "--progress=False", "--plot=False", "--log_interval=1",
        ]  # fmt: skip
        n = a.processes
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]
        runs = {
            "1 process": [sys.executable, *train, f"--gradient_accumulation_steps={n}", "--out_dir=one"],
            f"DDP, {n} processes": [*torchrun, *train, f"--gradient_accumulation_steps={n}", "--out_dir=ddp"],
            f"FSDP, {n} processes": [*torchrun, *train, f"--gradient_accumulation_steps={n}", "--out_dir=fsdp", "--fsdp=True"],
        }  # fmt: skip
        # the set-up's peak: a process's shards and, were the model built whole first, that whole model
        (tmp / "setup_only.py").write_text(SETUP_ONLY, encoding="utf-8")
        setup_only = [*torchrun, "setup_only.py", *train[1:], f"--gradient_accumulation_steps={n}", "--fsdp=True"]
        runs[f"FSDP, {n} processes, set-up only"] = [*setup_only, "--out_dir=setup"]
        # a sharded checkpoint at iteration 2, every process writing its shards; then consolidating it, alone
        saving = [*runs[f"FSDP, {n} processes"][:-2], "--out_dir=saving", "--fsdp=True", "--eval_interval=2"]
        runs[f"FSDP, {n} processes, saving a sharded checkpoint"] = [*saving, "--consolidate=False"]
        runs["nanogpt consolidate of it, 1 process"] = [sys.executable, "-m", "nanogpt", "consolidate", "--out_dir=saving"]  # fmt: skip
        for name, cmd in runs.items():
            results[name] = peak_mib(cmd, tmp)
            print(f"{name}: peak {results[name]:,.0f} MiB per process", flush=True)
    return results


if __name__ == "__main__":
    main()
