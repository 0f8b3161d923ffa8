"""FSDP2 (--fsdp=True) under torchrun: two gloo processes on the CPU."""

from __future__ import annotations

import re

import pytest
import torch
import torch.distributed

from nanogpt.checkpoint import load_checkpoint
from nanogpt.errors import UserError
from nanogpt.train import TrainOptions, check_fsdp_options

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")

ITER = re.compile(r"^iter (\d+): loss ([\d.]+)", re.M)


@pytest.fixture
def torchrun(run_script, repo_root, tiny_checkpoint, tiny_model_args, tmp_path):
    """torchrun(out, *options) -> the finished run's stdout: 2 processes, the tiny model with 2 layers."""
    data_dir = tiny_checkpoint.parent / "data"
    args = [a for a in tiny_model_args if not a.startswith(("--gradient_accumulation_steps", "--n_layer"))]
    args += ["--n_layer=2", "--gradient_accumulation_steps=2", f"--data_dir={data_dir}", "--eval_interval=4"]
    args += ["--warmup_iters=0", "--learning_rate=1e-2"]

    def run(out: str, *extra: str) -> str:
        proc = run_script(
            "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", repo_root / "train.py",
            *args, f"--out_dir={tmp_path / out}", *extra, timeout=240,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert "Traceback" not in proc.stderr
        return proc.stdout

    return run


def losses(out: str) -> dict[int, float]:
    return {int(i): float(v) for i, v in ITER.findall(out)}


def test_fsdp_follows_ddp_resumes_bit_exactly_and_its_checkpoint_serves_sample_and_one_process(
    torchrun, tmp_path, run_script, repo_root, tiny_model_args
):
    fsdp = torchrun("fsdp", "--max_iters=8", "--fsdp=True")
    ddp = torchrun("ddp", "--max_iters=8")
    assert sorted(losses(fsdp)) == list(range(9))
    for i, loss in losses(ddp).items():  # the same data and initialisation: the same trajectory
        assert losses(fsdp)[i] == pytest.approx(loss, abs=2e-4), i
    # the checkpoint is one ordinary file: the whole model, gathered from the shards
    a = load_checkpoint(tmp_path / "fsdp" / "ckpt.pt")
    b = load_checkpoint(tmp_path / "ddp" / "ckpt.pt")
    assert a["optimizer_format"] == "fqn" and a["iter_num"] == 8
    assert all(torch.allclose(a["model"][k], b["model"][k], atol=1e-4) for k in b["model"])
    # killed at an evaluation and resumed with as many processes: bit for bit the straight run
    torchrun("resumed", "--max_iters=4", "--fsdp=True")
    resumed = torchrun("resumed", "--max_iters=8", "--fsdp=True", "--init_from=resume")
    assert {i: v for i, v in losses(fsdp).items() if i >= 4} == losses(resumed)
    c = load_checkpoint(tmp_path / "resumed" / "ckpt.pt")["model"]
    assert all(torch.equal(a["model"][k], c[k]) for k in c)
    # plain sample.py reads it, and one process resumes it (2 -> 1)
    sample = run_script(
        repo_root / "sample.py",
        f"--out_dir={tmp_path / 'fsdp'}",
        "--device=cpu",
        "--num_samples=1",
        "--max_new_tokens=20",
    )
    assert sample.returncode == 0, sample.stderr
    args = [a for a in tiny_model_args if not a.startswith("--n_layer")]
    single = run_script(
        repo_root / "train.py", *args, "--n_layer=2", f"--out_dir={tmp_path / 'fsdp'}", "--max_iters=10",
        "--init_from=resume", "--eval_interval=4", "--learning_rate=1e-2",
        f"--data_dir={load_checkpoint(tmp_path / 'fsdp' / 'ckpt.pt')['config']['data_dir']}",
    )  # fmt: skip
    assert single.returncode == 0, single.stderr
    assert "resuming from" in single.stdout and sorted(losses(single.stdout)) == [8, 9, 10]


def test_fsdp_activation_checkpointing_changes_no_loss_and_bfloat16_trains(torchrun):
    plain = losses(torchrun("plain", "--max_iters=4", "--fsdp=True"))
    recomputed = losses(torchrun("ac", "--max_iters=4", "--fsdp=True", "--activation_checkpointing=True"))
    assert recomputed == pytest.approx(plain, abs=1e-5)  # recomputing activations changes no result
    bf16 = losses(torchrun("bf16", "--max_iters=8", "--fsdp=True", "--dtype=bfloat16"))  # the mixed-precision policy
    assert bf16[8] < bf16[0] - 0.3 and bf16[0] == pytest.approx(plain[0], abs=0.05)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(optimizer="muon"), "--optimizer=muon cannot run with --fsdp=True"),
        (dict(compile=True), "--compile=True is not supported with --fsdp=True"),
    ],
)
def test_options_fsdp_cannot_work_with_are_refused_by_name(options, message):
    with pytest.raises(UserError, match=re.escape(message)):
        check_fsdp_options(TrainOptions(fsdp=True, **options), under_torchrun=True)


def test_fsdp_needs_torchrun(tmp_path):
    from nanogpt.train import main

    with pytest.raises(UserError, match="run it under torchrun"):
        main(["--fsdp=True", f"--out_dir={tmp_path}"])


def test_memory_script_measures_three_configurations():
    """scripts/fsdp_memory.py (the figures in docs/performance.md), on a tiny shape."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import fsdp_memory

    peaks = fsdp_memory.main(["--n_layer=1", "--n_head=2", "--n_embd=32"])
    assert list(peaks) == ["1 process", "DDP, 2 processes", "FSDP, 2 processes"]
    assert all(100 < mib < 4000 for mib in peaks.values()), peaks  # a real peak of a real process, in MiB
