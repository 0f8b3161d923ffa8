"""A save that fails on one process of a torchrun run (the kernel's "File too large") ends every process
at once with one message, status 2, and the previous checkpoint as it was: DDP and FSDP on gloo."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import forkrun as fr
import pytest
import torch
import torch.distributed

from nanogpt.checkpoint import MANIFEST_NAME, SHARDED_NAME, load_checkpoint, load_sharded

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")

# Runs as each torchrun worker: one rank's files may not grow past a limit (RLIMIT_FSIZE; Python ignores
# SIGXFSZ, so a write past it raises OSError EFBIG), then train.py as torchrun would run it.
LIMITED = """
import os, resource, runpy, sys

rank, limit = sys.argv[1], int(sys.argv[2])
if os.environ["RANK"] == rank:
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
sys.argv = sys.argv[3:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
LIMIT = 64 * 1024  # bytes: metrics.jsonl stays below it, a checkpoint or a shard of these models does not


@pytest.fixture(scope="module")
def args(tiny_checkpoint, tiny_model_args) -> list[str]:
    data_dir = tiny_checkpoint.parent / "data"
    out = [a for a in tiny_model_args if not a.startswith(("--gradient_accumulation_steps", "--n_layer", "--n_embd"))]
    return [*out, "--n_layer=2", "--n_embd=64", "--gradient_accumulation_steps=2", f"--data_dir={data_dir}",
            "--eval_interval=4", "--warmup_iters=0", "--always_save_checkpoint=True"]  # fmt: skip


def torchrun(args: list[str], out: Path, *extra: str, limited_rank: int | None = None) -> fr.Result:
    """train.py on two processes; with limited_rank, that process cannot write a file past LIMIT bytes."""
    script: list = [fr.REPO / "train.py"]
    if limited_rank is not None:
        wrapper = out.parent / "limited.py"
        wrapper.write_text(LIMITED, encoding="utf-8")
        script = [wrapper, str(limited_rank), str(LIMIT), *script]
    return fr.run_script(*fr.torchrun_command(args, out, *extra, script=script), cwd=out.parent, timeout=240)


def digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


def assert_one_message(result: fr.Result, fragment: str) -> None:
    """Every worker exited 2 (a UserError, or the quiet exit of the others), one message said why."""
    err = " ".join(result.stderr.split())
    assert result.returncode != 0, result.stdout
    assert err.count("error: ") == 1 and fragment in err, result.stderr
    assert "bug:" not in err and "exitcode : 2" in err and "exitcode : 1" not in err, result.stderr
    assert "Timeout" not in err and "Connection closed" not in err, result.stderr


def test_ddp_a_master_that_cannot_write_the_checkpoint_stops_every_process(args, tmp_path):
    out = tmp_path / "ddp"
    first = torchrun(args, out, "--max_iters=4")
    assert first.returncode == 0, first.stderr
    before = (out / "ckpt.pt").read_bytes()
    assert len(before) > LIMIT

    failed = torchrun(args, out, "--max_iters=8", "--init_from=resume", limited_rank=0)
    assert_one_message(failed, f"could not write the checkpoint {out / 'ckpt.pt'} (File too large)")
    assert "step 8:" in failed.stdout  # it failed at its save, not before
    assert (out / "ckpt.pt").read_bytes() == before and load_checkpoint(out / "ckpt.pt")["iter_num"] == 4
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_fsdp_a_rank_that_cannot_write_its_shards_stops_every_process(args, tmp_path):
    out = tmp_path / "fsdp"
    first = torchrun(args, out, "--max_iters=4", "--fsdp=True", "--consolidate=False")
    assert first.returncode == 0, first.stderr
    shards = out / SHARDED_NAME
    before = digest(shards)
    saved = json.loads((shards / MANIFEST_NAME).read_text())

    failed = torchrun(args, out, "--max_iters=8", "--fsdp=True", "--init_from=resume", limited_rank=1)
    assert_one_message(failed, "could not write the sharded checkpoint")
    err = " ".join(failed.stderr.split())
    assert f"(File too large: {shards}/iter-0000008-" in err and "/__1_*.distcp)" in err, failed.stderr  # its shards
    assert f"the previous checkpoint, named in {shards / MANIFEST_NAME}, is unchanged" in err
    # the manifest and the save it names are as they were; the failed save's folder is an orphan the
    # next save removes
    assert json.loads((shards / MANIFEST_NAME).read_text()) == saved
    assert {k: v for k, v in digest(shards).items() if k.split("/")[0] in (MANIFEST_NAME, saved["folder"])} == before
    assert load_sharded(shards)["iter_num"] == 4

    resumed = torchrun(args, out, "--max_iters=8", "--fsdp=True", "--init_from=resume", "--consolidate=False")
    assert resumed.returncode == 0, resumed.stderr
    manifest = json.loads((shards / MANIFEST_NAME).read_text())
    assert manifest["iter_num"] == 8
    kept = {manifest["folder"], *(r["folder"] for r in manifest["retired"])}
    assert {p.name for p in shards.iterdir() if p.is_dir()} == kept  # the failed save's folder is gone
