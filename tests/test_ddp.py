"""Distributed data-parallel training: two gloo processes on the CPU, launched by torchrun."""

from __future__ import annotations

import re
import signal

import forkrun as fr
import pytest
import torch
import torch.distributed

from nanogpt.checkpoint import load_checkpoint

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # bfloat16: DDP under autocast, as on GPUs
def test_two_cpu_processes_train_log_once_and_write_one_checkpoint(
    run_script, tiny_checkpoint, tiny_model_args, tmp_path, dtype
):
    """Two processes train, rank 0 alone logs and saves. Each worker records the number formats it computed
    in (forkrun.PRECISION_DRIVER): in both processes every matmul of the training steps and evaluations
    gives `dtype` outputs (bfloat16: autocast was in effect there), while the weights, the gradients DDP
    all-reduces and the optimizer applies, and the checkpoint stay float32."""
    data_dir = tiny_checkpoint.parent / "data"  # a prepared char dataset
    out_dir = tmp_path / "out"
    driver, records = fr.precision_driver(tmp_path / "driver")
    args = [a for a in tiny_model_args if not a.startswith("--gradient_accumulation_steps")]
    proc = run_script(
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        driver,
        records,
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
    assert sorted(p.name for p in out_dir.iterdir()) == ["ckpt.pt", "metrics.jsonl"]
    ckpt = load_checkpoint(out_dir / "ckpt.pt")
    assert ckpt["iter_num"] == 6
    assert not any(k.startswith("module.") for k in ckpt["model"])
    assert ckpt["config"]["gradient_accumulation_steps"] == 2
    assert ckpt["config"]["dtype"] == dtype
    assert all(t.dtype == torch.float32 for t in ckpt["model"].values())  # float32 master weights
    # in each process: matmuls in `dtype` (autocast casts the float32 weights per op), float32 gradients
    for rank in fr.precision_records(records, 2):
        assert rank["linear"] == [f"{phase} torch.{dtype} torch.float32" for phase in ("eval", "train")], rank
        assert rank["master"] == ["Parameter torch.float32"] and rank["grads"] == ["torch.float32"], rank
        assert rank["reduce_scatter"] == []  # DDP all-reduces


# Runs in each torchrun worker: nanogpt's real training loop, with DDP and the optimizer instrumented.
GRAD_SYNC_DRIVER = """
import os
import sys

import torch
import torch.nn.parallel
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.optim.optimizer import register_optimizer_step_pre_hook

from nanogpt.train import main

records = {"hook_calls": [], "local_grads": [], "step_grads": []}
names = {}  # id(parameter) -> its name in the model
state = {"step": 0, "micro": 0}  # optimizer steps taken; training forwards (micro-steps) in the current step


def counting_allreduce(_, bucket):
    # record the call and this rank's own (accumulated) gradients, then all-reduce as DDP does by default
    records["hook_calls"].append((state["step"], state["micro"], bucket.index()))
    local = {names[id(p)]: g.clone() for p, g in zip(bucket.parameters(), bucket.gradients())}
    records["local_grads"].append(local)
    return allreduce_hook(None, bucket)  # divides by the world size, then sums over the ranks


class InstrumentedDDP(torch.nn.parallel.DistributedDataParallel):
    def __init__(self, module, *args, **kwargs):
        super().__init__(module, *args, **kwargs)
        names.update({id(p): n for n, p in module.named_parameters()})
        self.register_comm_hook(None, counting_allreduce)

    def forward(self, *args, **kwargs):
        if torch.is_grad_enabled():  # a training micro-step, not an evaluation batch
            state["micro"] += 1
        return super().forward(*args, **kwargs)


def record_step(optimizer, args, kwargs):
    # the gradients the optimizer is about to apply
    grads = {names[id(p)]: p.grad.clone() for group in optimizer.param_groups for p in group["params"]}
    records["step_grads"].append(grads)
    state["step"] += 1
    state["micro"] = 0


torch.nn.parallel.DistributedDataParallel = InstrumentedDDP  # train.py imports DDP from here when it runs
register_optimizer_step_pre_hook(record_step)
main(sys.argv[2:])
torch.save(records, os.path.join(sys.argv[1], f"rank{os.environ['RANK']}.pt"))
"""


def test_ddp_averages_gradients_across_ranks_and_communicates_only_on_the_last_micro_step(
    run_script, tiny_checkpoint, tiny_model_args, tmp_path
):
    """Two gloo workers run nanogpt.train.main under torchrun with 4 accumulation steps (2 micro-steps
    per rank). A DDP communication hook counts every all-reduce and keeps each rank's local gradients;
    an optimizer pre-step hook keeps the gradients each step applies. This proves that:

    - every optimizer step applies bit-identical gradients on both ranks, equal to the mean of the two
      ranks' different local gradients (the all-reduce really synchronised, and averaged);
    - each step all-reduces each DDP bucket once, during the last micro-step: model.no_sync() skipped
      the communication of the first micro-step (without it there would be twice as many calls).
    """
    driver = tmp_path / "ddp_grad_driver.py"
    driver.write_text(GRAD_SYNC_DRIVER, encoding="utf-8")
    records_dir = tmp_path / "records"
    records_dir.mkdir()
    args = [a for a in tiny_model_args if not a.startswith("--gradient_accumulation_steps")]
    max_iters = 2  # iterations 0..max_iters: max_iters + 1 optimizer steps
    proc = run_script(
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        driver,
        records_dir,
        *args,
        "--gradient_accumulation_steps=4",
        f"--data_dir={tiny_checkpoint.parent / 'data'}",
        f"--out_dir={tmp_path / 'out'}",
        f"--max_iters={max_iters}",
        "--eval_interval=1000",
        "--warmup_iters=0",
        "--grad_clip=0.0",  # so the applied gradients are exactly the all-reduced ones
        "--dtype=float32",
        timeout=240,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    r0, r1 = (torch.load(records_dir / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    steps = max_iters + 1
    n_buckets = 1  # the tiny model's ~60 KB of gradients fit in DDP's first bucket (1 MiB)

    for rec in (r0, r1):
        # one all-reduce per bucket per step, during micro-step 2 of 2; none during micro-step 1 (no_sync)
        assert rec["hook_calls"] == [(step, 2, b) for step in range(steps) for b in range(n_buckets)]
        assert len(rec["step_grads"]) == steps
    for step in range(steps):
        g0, g1 = r0["step_grads"][step], r1["step_grads"][step]
        local0, local1 = r0["local_grads"][step], r1["local_grads"][step]  # one bucket: one entry per step
        assert g0.keys() == g1.keys() == local0.keys() == local1.keys()
        for name in g0:
            # both ranks apply the very same gradient...
            assert torch.equal(g0[name], g1[name]), f"step {step}: {name} differs between the ranks"
            # ...the mean of their local ones, which differ (each rank draws its own batches)
            assert torch.equal(g0[name], local0[name] / 2 + local1[name] / 2), f"step {step}: {name} is not the mean"
        assert any(not torch.equal(local0[n], local1[n]) for n in g0), f"step {step}: the ranks' batches agree"
        assert any(not torch.equal(g0[n], local0[n]) for n in g0), f"step {step}: nothing was averaged"


def test_accumulation_steps_must_divide_among_the_processes(
    run_script, repo_root, tiny_checkpoint, tiny_model_args, tmp_path
):
    args = [a for a in tiny_model_args if not a.startswith("--gradient_accumulation_steps")]
    proc = run_script(
        "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", repo_root / "train.py", *args,
        "--gradient_accumulation_steps=3", f"--data_dir={tiny_checkpoint.parent / 'data'}",
        f"--out_dir={tmp_path / 'out'}", timeout=240,
    )  # fmt: skip
    assert proc.returncode != 0
    # each worker prints the one-paragraph message and exits 2; torchrun then reports the failed workers
    message = " ".join(proc.stderr.split())
    assert "error: --gradient_accumulation_steps=3 must be divisible by the number of processes (2)" in message
    assert "exitcode : 2" in message
    assert not (tmp_path / "out").exists()


def test_ddp_stopped_by_sigterm_resumes_bit_identically(
    run_script, repo_root, tiny_checkpoint, tiny_model_args, tmp_path
):
    """Two processes that torchrun stops with SIGTERM mid-run (a run of a million iterations, signalled once
    rank 0 printed iteration 5), resumed to a few iterations past the stop, against a run straight to
    there: the processes agree on where to stop, interrupt.pt holds each rank's random streams
    (rng_ranks), so the weights and every logged loss (metrics.jsonl's full-precision floats, before and
    after the stop) are bit for bit the same, dropout included."""
    data_dir = tiny_checkpoint.parent / "data"
    args = [a for a in tiny_model_args if not a.startswith(("--gradient_accumulation_steps", "--dropout"))]
    args += ["--gradient_accumulation_steps=2", f"--data_dir={data_dir}", "--eval_interval=4", "--warmup_iters=0"]
    args += ["--dropout=0.1", "--learning_rate=1e-2"]  # dropout: each rank's own generator
    command = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", repo_root / "train.py", *args]

    out = tmp_path / "stopped"
    stopped = fr.signal_at_line(
        [*command, f"--out_dir={out}", "--max_iters=1000000"], tmp_path, "iter 5:", signal.SIGTERM
    )
    stop = re.search(r"stopped by SIGTERM at iteration (\d+); saved (\S+)\.", stopped.stderr)
    assert stopped.returncode != 0 and stop and stop[2] == str(out / "interrupt.pt"), stopped.stderr
    ckpt = load_checkpoint(out / "interrupt.pt")
    assert ckpt["iter_num"] == int(stop[1]) > 5
    assert len(ckpt["rng_ranks"]) == 2 and ckpt["rng"]["data"][0].equal(ckpt["rng_ranks"][0]["data"][0])
    assert not ckpt["rng_ranks"][0]["data"][0].equal(ckpt["rng_ranks"][1]["data"][0])
    end = f"--max_iters={ckpt['iter_num'] + 6}"  # the learning rate follows lr_decay_iters, not max_iters
    resumed = run_script(*command, f"--out_dir={out}", end, "--init_from=resume", timeout=240)
    assert resumed.returncode == 0 and "not bit-identical" not in resumed.stderr, resumed.stderr
    straight = run_script(*command, f"--out_dir={tmp_path / 'straight'}", end, timeout=240)
    assert straight.returncode == 0, straight.stderr

    a = load_checkpoint(tmp_path / "straight" / "ckpt.pt")["model"]
    b = load_checkpoint(out / "ckpt.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    logged = fr.logged_losses(out)  # the stopped run's records before the stop, then the resumed run's
    assert [r[1] for r in logged if r[0] == "train"] == list(range(ckpt["iter_num"] + 7))
    assert logged == fr.logged_losses(tmp_path / "straight")
