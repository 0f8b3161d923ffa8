"""FSDP2 (--fsdp=True) and its sharded checkpoints under torchrun: two gloo processes on the CPU."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
from pathlib import Path

import forkrun as fr
import pytest
import torch
import torch.distributed

from nanogpt.checkpoint import INTERRUPT_SHARDED_NAME, MANIFEST_NAME, SHARDED_NAME, load_checkpoint
from nanogpt.errors import UserError
from nanogpt.train_options import TrainOptions, check_fsdp_options

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")

ITER = re.compile(r"^iter (\d+): loss ([\d.]+)", re.M)
VAL = re.compile(r"^step (\d+): train loss [\d.]+, val loss ([\d.]+)", re.M)


def losses(out: str) -> dict[int, float]:
    return {int(i): float(v) for i, v in ITER.findall(out)}


def val_losses(out: str) -> dict[int, float]:
    return {int(i): float(v) for i, v in VAL.findall(out)}


@pytest.fixture(scope="module")
def args(tiny_checkpoint, tiny_model_args) -> list[str]:
    """The tiny model with 2 layers; 2 micro-batches a step, shared among the processes."""
    data_dir = tiny_checkpoint.parent / "data"
    out = [a for a in tiny_model_args if not a.startswith(("--gradient_accumulation_steps", "--n_layer"))]
    return out + [
        "--n_layer=2", "--gradient_accumulation_steps=2", f"--data_dir={data_dir}", "--eval_interval=4",
        "--warmup_iters=0", "--learning_rate=1e-2", "--lr_decay_iters=16",
    ]  # fmt: skip


def torchrun(args: list[str], out: Path, *extra: str, nproc: int = 2, script: list | None = None) -> str:
    """A finished torchrun of train.py (or `script`); returns its output, stdout then stderr (where warnings go)."""
    command = fr.torchrun_command(args, out, *extra, nproc=nproc, script=script)
    out.parent.mkdir(parents=True, exist_ok=True)
    proc = fr.run_script(*command, cwd=out.parent, timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def straight(args, tmp_path_factory) -> tuple[Path, str]:
    """An --fsdp run of 12 iterations on 2 processes, checkpoints at 4, 8 and 12: its out_dir and stdout."""
    out = tmp_path_factory.mktemp("fsdp") / "straight"
    return out, torchrun(args, out, "--max_iters=12", "--fsdp=True")


def copy_run(src: Path, dest: Path, *without: str) -> Path:
    shutil.copytree(src, dest)
    for name in without:
        path = dest / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return dest


def test_fsdp_ddp_and_one_process_follow_the_same_trajectory(straight, args, tmp_path, run_in_process):
    """The same global batch (2 micro-batches) on 2 FSDP processes, 2 DDP processes and 1 process with
    gradient accumulation: every process draws the micro-batches of its slots, so the data are the same."""
    from nanogpt.train import main as train_main

    out, fsdp = straight
    ddp = torchrun(args, tmp_path / "ddp", "--max_iters=12")
    code, single, err = run_in_process(train_main, [*args, f"--out_dir={tmp_path / 'single'}", "--max_iters=12"])
    assert code == 0, err
    assert sorted(losses(fsdp)) == list(range(13)) and sorted(val_losses(fsdp)) == [0, 4, 8, 12]
    for i, loss in losses(ddp).items():  # rank 0 logs its last micro-batch: the same one with FSDP and DDP
        assert losses(fsdp)[i] == pytest.approx(loss, abs=2e-4), i
    for run in (ddp, single):  # the evaluations see the same batches everywhere
        assert val_losses(run) == pytest.approx(val_losses(fsdp), abs=2e-4)
    assert val_losses(fsdp)[12] < val_losses(fsdp)[0] - 0.3
    a = load_checkpoint(out / "ckpt.pt")["model"]
    for name in ("ddp", "single"):
        b = load_checkpoint(tmp_path / name / "ckpt.pt")["model"]
        assert all(torch.allclose(a[k], b[k], atol=2e-4) for k in b), name


def test_fsdp_writes_sharded_checkpoints_and_one_file_at_the_end(straight, run_script, repo_root):
    out, stdout = straight
    assert stdout.count(f"saving sharded checkpoint to {out / SHARDED_NAME}") == 3
    manifest = json.loads((out / SHARDED_NAME / MANIFEST_NAME).read_text())
    assert manifest["iter_num"] == 12 and manifest["world_size"] == 2
    # the saves it replaced less than a minute ago stay for readers that opened them; none other is left
    retired = [r["folder"] for r in manifest["retired"]]
    assert sorted(p.name for p in (out / SHARDED_NAME).iterdir() if p.is_dir()) == sorted(
        [manifest["folder"], *retired]
    )
    assert [r.split("-")[1] for r in retired] == ["0000008", "0000004"][: len(retired)]  # the one just replaced first
    folders = [out / SHARDED_NAME / manifest["folder"]]
    files = sorted(p.name for p in folders[0].iterdir())
    assert sorted(manifest["crc32"]) == files and "state.pt" in files and ".metadata" in files
    assert {f[:4] for f in files if f.endswith(".distcp")} == {"__0_", "__1_"}  # each process wrote its shards
    # at the end, consolidated into the ckpt.pt every tool reads: weights, AdamW state, progress
    assert f"consolidated the sharded checkpoint into {out / 'ckpt.pt'}" in stdout
    ckpt = load_checkpoint(out / "ckpt.pt")
    assert ckpt["iter_num"] == 12
    assert {k for s in ckpt["optimizer"]["state"].values() for k in s} == {"step", "exp_avg", "exp_avg_sq"}
    sample = run_script(repo_root / "sample.py", f"--out_dir={out}", "--num_samples=1", "--max_new_tokens=20")
    assert sample.returncode == 0, sample.stderr


def straight_to(end: int, straight: tuple[Path, str], args: list[str], tmp_path: Path) -> Path:
    """The out_dir of an uninterrupted --fsdp run to iteration `end`: the module's `straight` run for its 12."""
    if end == 12:
        return straight[0]
    out = tmp_path / f"straight{end}"
    torchrun(args, out, f"--max_iters={end}", "--fsdp=True")
    return out


def test_one_rank_killed_mid_run_resumes_bit_identically(straight, args, tmp_path):
    """SIGKILL one of the two processes of a run of a million iterations as soon as its first checkpoint is
    complete (torchrun then stops the other), resume with the same command to iteration 12 (or 4 past the
    checkpoint, if it got further): the weights, AdamW's moments and every loss of metrics.jsonl (full
    precision, those before the kill included) are those of a run nobody stopped."""
    out = tmp_path / "killed"
    command = fr.torchrun_command(args, out, "--max_iters=1000000", "--fsdp=True")
    proc = fr.popen_script(*command, cwd=tmp_path, env=fr.script_env(), new_session=True)
    manifest = out / SHARDED_NAME / MANIFEST_NAME
    try:
        deadline = time.monotonic() + 120
        while not manifest.exists():  # written once every shard of the first checkpoint is
            if proc.poll() is not None or time.monotonic() > deadline:
                fr.kill_group(proc)
                raise AssertionError("no checkpoint within 120 s:\n" + "\n".join(proc.communicate(timeout=30)))
            time.sleep(0.005)
        victim = fr.worker_pid(proc.pid, rank=1)
        assert victim is not None, "rank 1 is not running"
        os.kill(victim, signal.SIGSTOP)  # frozen where it stands; then killed without warning
        os.kill(victim, signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        fr.kill_group(proc)  # torchrun and rank 0 too, if they outlived their partner
    message = " ".join(err.split())
    assert proc.returncode != 0 and "exitcode : -9" in message, err
    # rank 0, in a collective with the dead one, says why it stops: no traceback
    assert "error: process 0 of 2 stopped because another process of this run ended" in message and "bug:" not in err
    saved = json.loads(manifest.read_text())["iter_num"]
    assert saved >= 4 and saved % 4 == 0 and not (out / "ckpt.pt").exists()

    end = max(12, saved + 4)
    resumed = torchrun(args, out, f"--max_iters={end}", "--fsdp=True", "--init_from=resume")
    assert f"resuming from {out / SHARDED_NAME}" in resumed and "not bit-identical" not in resumed
    assert resumed.count("resuming from") == 1  # rank 0 alone says so
    reference = straight_to(end, straight, args, tmp_path)
    logged = fr.logged_losses(out)  # the killed run's records before its checkpoint, then the resumed run's
    assert [r[1] for r in logged if r[0] == "train"] == list(range(end + 1))
    assert logged == fr.logged_losses(reference)
    a = load_checkpoint(reference / "ckpt.pt")
    b = load_checkpoint(out / "ckpt.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    for i, state in a["optimizer"]["state"].items():  # AdamW's moments too
        assert all(torch.equal(v, b["optimizer"]["state"][i][k]) for k, v in state.items())


def test_sigterm_saves_a_sharded_checkpoint_that_resumes_bit_identically(straight, args, tmp_path):
    """torchrun passes SIGTERM on to both processes (of a run of a million iterations, signalled once rank 0
    printed iteration 5), which agree on the iteration to stop after and write interrupt.dcp together, every
    rank's random streams in it; ckpt.dcp (the evaluations') is left alone. Resumed to iteration 12 (or 4
    past the stop), the weights and every loss of metrics.jsonl (full precision) are a straight run's."""
    out = tmp_path / "stopped"
    command = fr.torchrun_command(args, out, "--max_iters=1000000", "--fsdp=True")
    stopped = fr.signal_at_line(command, tmp_path, "iter 5:", signal.SIGTERM)
    stop = re.search(r"stopped by SIGTERM at iteration (\d+); saved (\S+)\.", stopped.stderr)
    assert stopped.returncode != 0 and stop and stop[2].startswith(str(out / INTERRUPT_SHARDED_NAME)), stopped.stderr
    saved = int(stop[1])
    assert json.loads((out / INTERRUPT_SHARDED_NAME / MANIFEST_NAME).read_text())["iter_num"] == saved > 5
    assert json.loads((out / SHARDED_NAME / MANIFEST_NAME).read_text())["iter_num"] < saved  # untouched
    end = max(12, saved + 4)
    resumed = torchrun(args, out, f"--max_iters={end}", "--fsdp=True", "--init_from=resume")
    assert f"resuming from {out / INTERRUPT_SHARDED_NAME}" in resumed and f"at iteration {saved}" in resumed
    assert "not bit-identical" not in resumed
    assert not (out / INTERRUPT_SHARDED_NAME).exists()  # a later evaluation's save is further along
    reference = straight_to(end, straight, args, tmp_path)
    logged = fr.logged_losses(out)  # the stopped run's records before the stop, then the resumed run's
    assert [r[1] for r in logged if r[0] == "train"] == list(range(end + 1))
    assert logged == fr.logged_losses(reference)
    a, b = load_checkpoint(reference / "ckpt.pt")["model"], load_checkpoint(out / "ckpt.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_one_process_resumes_evaluates_samples_and_consolidates_the_shards_of_two(
    straight, args, tmp_path, run_in_process
):
    """2 -> 1: a run killed before its end has shards only; one process reads them (DCP reshards)."""
    from nanogpt.consolidate import main as consolidate_main
    from nanogpt.sample import main as sample_main
    from nanogpt.train import main as train_main

    out = copy_run(straight[0], tmp_path / "two", "ckpt.pt")
    code, stdout, err = run_in_process(
        train_main, [*args, f"--out_dir={out}", "--init_from=resume", "--eval_only=True"]
    )
    assert code == 0, err
    assert f"resuming from {out / SHARDED_NAME}" in stdout
    assert val_losses(stdout)[12] == pytest.approx(val_losses(straight[1])[12], abs=1e-5)
    code, stdout, err = run_in_process(sample_main, [f"--out_dir={out}", "--num_samples=1", "--max_new_tokens=10"])
    assert code == 0 and stdout.strip(), err
    code, stdout, err = run_in_process(consolidate_main, [f"--out_dir={out}"])
    assert code == 0 and f"wrote {out / 'ckpt.pt'}" in stdout, err
    a, b = load_checkpoint(straight[0] / "ckpt.pt"), load_checkpoint(out / "ckpt.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    code, stdout, err = run_in_process(train_main, [*args, f"--out_dir={out}", "--init_from=resume", "--max_iters=16"])
    assert code == 0, err
    assert sorted(losses(stdout)) == [12, 13, 14, 15, 16] and val_losses(stdout)[16] < val_losses(straight[1])[12]


def test_two_processes_resume_a_one_process_run_sharded_or_not(args, tmp_path):
    """1 -> 2: an --fsdp run on one process, resumed on two from its shards (DCP reshards) and from its
    consolidated ckpt.pt (the AdamW state renamed and sharded as it loads): the same state and the same
    batches by two routes, so the same trajectory."""
    one = tmp_path / "one"
    first = torchrun(args, one, "--max_iters=4", "--fsdp=True", nproc=1)
    copy_run(one, tmp_path / "file", SHARDED_NAME)
    from_shards = torchrun(args, one, "--max_iters=8", "--fsdp=True", "--init_from=resume")
    assert f"resuming from {one / SHARDED_NAME}" in from_shards
    from_file = torchrun(args, tmp_path / "file", "--max_iters=8", "--fsdp=True", "--init_from=resume")
    assert f"resuming from {tmp_path / 'file' / 'ckpt.pt'}" in from_file
    assert sorted(losses(from_file)) == [4, 5, 6, 7, 8]
    assert losses(from_shards) == pytest.approx(losses(from_file), abs=2e-4)
    assert val_losses(from_shards)[8] == pytest.approx(val_losses(from_file)[8], abs=2e-4)
    assert val_losses(from_shards)[8] < val_losses(first)[4]


def test_a_damaged_or_missing_shard_is_refused_by_name(straight, args, tmp_path, run_in_process):
    from nanogpt.sample import main as sample_main
    from nanogpt.train import main as train_main

    out = copy_run(straight[0], tmp_path / "damaged", "ckpt.pt")
    folder = out / SHARDED_NAME / json.loads((out / SHARDED_NAME / MANIFEST_NAME).read_text())["folder"]
    shard = sorted(folder.glob("__1_*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    # two processes, each checking a share of the files: both refuse, nothing is loaded
    proc = fr.run_script(
        *fr.torchrun_command(args, out, "--max_iters=16", "--fsdp=True", "--init_from=resume"), cwd=tmp_path
    )
    message = " ".join(proc.stderr.split())
    assert proc.returncode != 0 and "exitcode : 2" in message and "bug:" not in message  # each worker: a UserError
    assert f"the sharded checkpoint {folder} is damaged ({shard.name} does not match its checksum)" in message
    shard.unlink()
    code, _, err = run_in_process(sample_main, [f"--out_dir={out}", "--num_samples=1"])
    assert code == 2 and f"({shard.name} is missing); nothing was loaded from it" in " ".join(err.split())
    (out / SHARDED_NAME / MANIFEST_NAME).write_text('{"folder": ')
    code, _, err = run_in_process(train_main, [*args, f"--out_dir={out}", "--init_from=resume"])
    assert code == 2 and f"{MANIFEST_NAME} is damaged" in " ".join(err.split()) and "Traceback" not in err


MODERN = [  # every architecture option of the speedrun configs and beyond, all at once
    "--pos_emb=rope", "--norm=rmsnorm", "--qk_norm=True", "--activation=relu2", "--tie_weights=False",
    "--logit_softcap=15", "--zero_init_proj=True", "--token_shift=True",
]  # fmt: skip


def test_fsdp_trains_every_architecture_option_in_bfloat16_and_activation_checkpointing_changes_no_loss(args, tmp_path):
    """bfloat16 goes through FSDP's mixed-precision policy: bfloat16 compute, float32 master weights. Each
    worker records its number formats (forkrun.PRECISION_DRIVER): during the forward every Linear holds its
    weight unsharded in bfloat16 (param_dtype) and computes in bfloat16, while the sharded weights the
    optimizer updates stay float32 DTensors, their gradients float32, reduce-scattered in float32
    (reduce_dtype)."""
    options = ["--max_iters=4", "--fsdp=True", "--dtype=bfloat16", *MODERN]
    driver, records = fr.precision_driver(tmp_path / "driver")
    plain = losses(torchrun(args, tmp_path / "plain", *options, script=[driver, records]))
    for r, rank in enumerate(fr.precision_records(records, 2)):
        assert rank["linear"] == ["eval torch.bfloat16 torch.bfloat16", "train torch.bfloat16 torch.bfloat16"], rank
        assert rank["grads"] == ["torch.float32"] and rank["reduce_scatter"] == ["torch.float32"], rank
        # the sharded master weights; rank 0 then consolidates ckpt.pt through a plain (float32) model
        assert "DTensor torch.float32" in rank["master"], rank
        assert all(m.endswith(" torch.float32") for m in rank["master"]), rank
        assert r == 0 or rank["master"] == ["DTensor torch.float32"], rank
    ac = tmp_path / "ac"
    recomputed = losses(torchrun(args, ac, *options, "--activation_checkpointing=True", "--consolidate=False"))
    assert recomputed == pytest.approx(plain, abs=1e-5)  # recomputing activations changes no result
    assert plain[4] < plain[0] - 0.3
    assert (ac / SHARDED_NAME).is_dir() and not (ac / "ckpt.pt").exists()
    ckpt = load_checkpoint(tmp_path / "plain" / "ckpt.pt")
    assert ckpt["model_args"]["pos_emb"] == "rope" and "lm_head.weight" in ckpt["model"]
    assert ckpt["model"]["lm_head.weight"].dtype == torch.float32  # the master weights


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


@pytest.mark.slow  # 5 fresh interpreters, 3 of them torchrun: ~45 s for a measurement script
def test_memory_script_measures_every_configuration():
    """scripts/fsdp_memory.py (the figures in docs/performance.md), on a tiny shape."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import fsdp_memory

    peaks = fsdp_memory.main(["--n_layer=1", "--n_head=2", "--n_embd=32"])
    assert list(peaks) == [
        "1 process",
        "DDP, 2 processes",
        "FSDP, 2 processes",
        "FSDP, 2 processes, set-up only",
        "FSDP, 2 processes, saving a sharded checkpoint",
        "nanogpt consolidate of it, 1 process",
    ]
    assert all(100 < mib < 4000 for mib in peaks.values()), peaks  # a real peak of a real process, in MiB
