"""nanogpt/checkpoint/sharded.py: the manifest's checks, the replaced save's grace period, a reader that
loses the race, a damaged sharded checkpoint skipped when resuming, and an FSDP kill storm."""

from __future__ import annotations

import json
import os
import queue
import random
import shutil
import signal
import threading
import time
from pathlib import Path

import forkrun as fr
import pytest
import torch
import torch.distributed

from nanogpt.checkpoint import (
    CKPT_NAME,
    INTERRUPT_SHARDED_NAME,
    MANIFEST_NAME,
    SHARDED_NAME,
    load_resume_checkpoint,
    load_sharded,
    read_manifest,
    sharded,
)
from nanogpt.errors import UserError

needs_dist = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")


@pytest.fixture(scope="module")
def args(tiny_checkpoint, tiny_model_args) -> list[str]:
    data_dir = tiny_checkpoint.parent / "data"
    out = [a for a in tiny_model_args if not a.startswith(("--gradient_accumulation_steps", "--n_layer"))]
    return [*out, "--n_layer=2", "--gradient_accumulation_steps=2", f"--data_dir={data_dir}", "--warmup_iters=0",
            "--fsdp=True", "--consolidate=False"]  # fmt: skip


@pytest.fixture(scope="module")
def one_save(args, tmp_path_factory) -> Path:
    """out_dir of a one-process --fsdp run with a sharded checkpoint at iteration 2 (and no ckpt.pt)."""
    out = tmp_path_factory.mktemp("sharded") / "out"
    proc = fr.run_script(*fr.torchrun_command(args, out, "--max_iters=2", "--eval_interval=2", nproc=1), cwd=out.parent)
    assert proc.returncode == 0, proc.stderr
    return out


def write_manifest(root: Path, **changes) -> None:
    manifest = {**json.loads((root / MANIFEST_NAME).read_text()), **changes}
    (root / MANIFEST_NAME).write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "change",
    [
        {"folder": ".."},
        {"folder": "/etc"},
        {"folder": "a/../../b"},
        {"folder": ""},
        {"folder": "x\0y"},
        {"folder": 7},
        {"crc32": {"../../state.pt": 1}},
        {"crc32": {"/etc/passwd": 1}},
        {"retired": [{"folder": "x", "at": "soon"}]},
    ],
)
def test_a_manifest_naming_a_way_out_of_its_folder_is_damaged(one_save, tmp_path, change):
    root = shutil.copytree(one_save / SHARDED_NAME, tmp_path / SHARDED_NAME)
    write_manifest(root, **change)
    with pytest.raises(UserError, match=f"{MANIFEST_NAME} is damaged"):
        read_manifest(root)


def fake_save(root: Path, name: str, now: float, monkeypatch) -> Path:
    """publish() of a folder holding one file, at time `now`."""
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "f").write_bytes(name.encode())
    monkeypatch.setattr(sharded.time, "time", lambda: now)
    sharded.publish(
        root, folder, iter_num=int(name.split("-")[1]), world=1, crc32={"f": sharded.file_crc32(folder / "f")}
    )
    return folder


def test_a_replaced_save_stays_for_the_grace_period_and_a_crashed_one_goes(tmp_path, monkeypatch):
    root, grace = tmp_path / "ckpt.dcp", sharded.GRACE_SECONDS
    a = fake_save(root, "iter-1-a", 1000.0, monkeypatch)
    crashed = root / "iter-2-crashed"  # a save killed before its manifest: no reader ever saw it
    crashed.mkdir()
    b = fake_save(root, "iter-2-b", 1000.0 + grace / 2, monkeypatch)
    assert read_manifest(root)[0] == b and a.is_dir() and not crashed.exists()
    c = fake_save(root, "iter-3-c", 1000.0 + grace * 0.9, monkeypatch)
    assert a.is_dir() and b.is_dir()  # a retired 0.9 grace ago, b 0.4 ago: both may be being read
    assert [r["folder"] for r in read_manifest(root)[1]["retired"]] == [b.name, a.name]
    d = fake_save(root, "iter-4-d", 1000.0 + grace * 2, monkeypatch)
    assert not a.exists() and not b.exists() and c.is_dir() and d.is_dir()  # a and b retired 1.5 and 1.1 grace ago


def test_a_reader_that_loses_the_race_reads_the_manifest_again(one_save, tmp_path, monkeypatch):
    """A save replaced the one the reader had just looked up, and it was deleted: the reader goes on with the
    new one instead of failing as damaged."""
    root = shutil.copytree(one_save / SHARDED_NAME, tmp_path / SHARDED_NAME)
    real = sharded.damaged_shards
    looked_up = []

    def replaced_meanwhile(folder, manifest, *a):
        if not looked_up:  # the training run's next save lands, its grace period passes
            looked_up.append(folder)
            newer = folder.with_name(folder.name + "-newer")
            folder.rename(newer)
            write_manifest(root, folder=newer.name)
        return real(folder, manifest, *a)

    monkeypatch.setattr(sharded, "damaged_shards", replaced_meanwhile)
    assert load_sharded(root)["iter_num"] == 2 and len(looked_up) == 1


def test_resume_skips_a_damaged_sharded_checkpoint_with_a_warning(one_save, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(one_save / SHARDED_NAME, out / INTERRUPT_SHARDED_NAME)
    shutil.copy(tiny_checkpoint / CKPT_NAME, out / CKPT_NAME)  # iteration 4
    write_manifest(out / INTERRUPT_SHARDED_NAME, iter_num=100)  # the further along, were it whole
    (out / INTERRUPT_SHARDED_NAME / MANIFEST_NAME).write_text('{"folder": ')
    path, ckpt = load_resume_checkpoint(out)
    assert path == out / CKPT_NAME and ckpt["iter_num"] == 4
    err = " ".join(capsys.readouterr().err.split())
    assert (
        f"warning: skipping {out / INTERRUPT_SHARDED_NAME}: {out / INTERRUPT_SHARDED_NAME / MANIFEST_NAME} is damaged"
        in err
    )

    shutil.rmtree(out / INTERRUPT_SHARDED_NAME)  # now a whole save with a damaged shard, further along
    shutil.copytree(one_save / SHARDED_NAME, out / INTERRUPT_SHARDED_NAME)
    write_manifest(out / INTERRUPT_SHARDED_NAME, iter_num=100)
    folder, _ = read_manifest(out / INTERRUPT_SHARDED_NAME)
    shard = sorted(folder.glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:-1])
    path, ckpt = load_resume_checkpoint(out)
    assert path == out / CKPT_NAME
    assert f"({shard.name} does not match its checksum)" in " ".join(capsys.readouterr().err.split())


class Lines:
    """A child's stdout read on a thread, so waiting for a line has a deadline."""

    def __init__(self, proc) -> None:
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(line) for line in proc.stdout], daemon=True).start()

    def wait_for(self, prefix: str, count: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while count > 0:
            line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            count -= line.startswith(prefix)


@needs_dist
def test_fsdp_kill_storm_leaves_a_checkpoint_that_loads_and_resumes(args, tmp_path):
    """SIGKILL one process, or all, at 10 random moments of an --fsdp run that saves every 2 iterations (a kill
    often lands mid-save); after each, the sharded checkpoint left loads and the next run resumes from it."""
    rng = random.Random(21)
    out = tmp_path / "storm"
    reached = -1
    for round in range(10):
        extra = ["--init_from=resume"] if round else []
        command = fr.torchrun_command(
            args, out, "--max_iters=1000000", "--eval_interval=2", "--always_save_checkpoint=True", *extra
        )
        err_file = tmp_path / f"stderr-{round}.txt"  # a file, not a pipe: tqdm's bar would fill one, and block the run
        proc = fr.popen_script(*command, cwd=tmp_path, new_session=True, stderr=err_file)
        victim = rng.choice(["rank 0", "rank 1", "all"])
        try:
            lines = Lines(proc)
            if round:
                lines.wait_for("resuming from", 1)
            lines.wait_for("iter ", rng.randint(1 if round else 3, 9))
            time.sleep(rng.uniform(0, 0.1))  # anywhere in an iteration, an evaluation or a save
            for rank in (0, 1) if victim == "all" else (int(victim[-1]),):
                os.kill(fr.worker_pid(proc.pid, rank), signal.SIGKILL)
            proc.wait(timeout=120)  # torchrun stops the other process itself
        finally:
            fr.kill_group(proc)
        err = err_file.read_text()
        assert "Timeout" not in err and "bug:" not in err, err  # a survivor says why it stopped, no traceback
        saved = load_sharded(out / SHARDED_NAME)  # every file whole, the weights and AdamW state readable
        assert saved["iter_num"] >= max(reached, 2), (round, victim)
        reached = saved["iter_num"]
    resumed = fr.run_script(*fr.torchrun_command(args, out, f"--max_iters={reached + 4}", "--eval_interval=2",
                                              "--init_from=resume"), cwd=tmp_path, timeout=240)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert (
        f"resuming from {out / SHARDED_NAME}" in resumed.stdout or f"{out / INTERRUPT_SHARDED_NAME}" in resumed.stdout
    )
    assert load_sharded(out / SHARDED_NAME)["iter_num"] == reached + 4
