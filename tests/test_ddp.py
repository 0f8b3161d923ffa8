"""Distributed data-parallel training: two gloo processes on the CPU, launched by torchrun."""

from __future__ import annotations

import re

import pytest
import torch.distributed

from nanogpt.checkpoint import load_checkpoint

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # bfloat16: DDP under autocast, as on GPUs
def test_two_cpu_processes_train_log_once_and_write_one_checkpoint(
    run_script, repo_root, tiny_checkpoint, tiny_model_args, tmp_path, dtype
):
    data_dir = tiny_checkpoint.parent / "data"  # a prepared char dataset
    out_dir = tmp_path / "out"
    args = [a for a in tiny_model_args if not a.startswith("--gradient_accumulation_steps")]
    proc = run_script(
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        repo_root / "train.py",
        *args,
        "--gradient_accumulation_steps=2",
        f"--data_dir={data_dir}",
        f"--out_dir={out_dir}",
        "--max_iters=6",
        "--eval_interval=3",
        "--learning_rate=1e-2",
        "--warmup_iters=0",
        f"--dtype={dtype}",
        timeout=240,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr
    out = proc.stdout
    # 2 accumulation steps shared by 2 processes: one micro-batch of 4 x 32 tokens each
    assert out.count("tokens per iteration will be: 256\n") == 1
    assert out.count("number of parameters:") == 1
    # only rank 0 logs: every evaluation and iteration line appears exactly once
    steps = re.findall(r"^step (\d+): ", out, re.M)
    iters = re.findall(r"^iter (\d+): ", out, re.M)
    assert steps == ["0", "3", "6"]
    assert iters == [str(i) for i in range(7)]
    assert out.count("saving checkpoint") == 2
    # one checkpoint, written by rank 0 alone, with plain parameter names
    assert sorted(p.name for p in out_dir.iterdir()) == ["ckpt.pt"]
    ckpt = load_checkpoint(out_dir / "ckpt.pt")
    assert ckpt["iter_num"] == 6
    assert not any(k.startswith("module.") for k in ckpt["model"])
    assert ckpt["config"]["gradient_accumulation_steps"] == 2
