"""Checkpoints: which file of an out_dir to load, what to delete after a save, and one save() for both formats.

Advanced machinery: a first read of the code skips it (the reading path is in the README, "Read the
code"). The loop in train.py calls `save` and never asks which format it writes:

    file.py      the single-file format, ckpt.pt and interrupt.pt (what nanoGPT writes, plus checks)
    sharded.py   the sharded format of --fsdp runs, ckpt.dcp/ and interrupt.dcp/ (a folder of shards)

An out_dir holds ckpt.pt (saved at evaluations: the best val loss so far, or the latest with
always_save_checkpoint) and, after Ctrl-C or SIGTERM, interrupt.pt; --fsdp runs write ckpt.dcp and
interrupt.dcp instead. Resuming and sampling take whichever is further along; a save at an evaluation
deletes the interrupt checkpoints, which it has overtaken.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from nanogpt.atomic import remove_stale_temp_files
from nanogpt.checkpoint.file import (
    FORMAT_VERSION,
    empty_model,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
    strip_prefixes,
    tokenizer_from_checkpoint,
)
from nanogpt.checkpoint.sharded import (
    MANIFEST_NAME,
    STATE_NAME,
    check_shards,
    load_checked_shards,
    load_sharded,
    load_sharded_state,
    optimizer_state_by_name,
    read_manifest,
    save_sharded,
)
from nanogpt.distributed import Place, fail_together
from nanogpt.errors import UserError

__all__ = [
    "CKPT_NAME", "INTERRUPT_NAME", "SHARDED_NAME", "INTERRUPT_SHARDED_NAME", "MANIFEST_NAME", "STATE_NAME",
    "FORMAT_VERSION", "empty_model", "load_checkpoint", "model_from_checkpoint", "save_checkpoint", "strip_prefixes",
    "tokenizer_from_checkpoint", "load_checked_shards", "load_sharded", "optimizer_state_by_name", "read_manifest",
    "save", "load_model_checkpoint", "load_resume_checkpoint", "consolidate", "prepare_out_dir",
]  # fmt: skip

CKPT_NAME = "ckpt.pt"  # saved at evaluations: the best val loss so far (or the latest, always_save_checkpoint)
INTERRUPT_NAME = "interrupt.pt"  # saved when training is stopped by Ctrl-C or SIGTERM
SHARDED_NAME = "ckpt.dcp"  # --fsdp runs' ckpt.pt: a folder of shards (sharded.py)
INTERRUPT_SHARDED_NAME = "interrupt.dcp"  # --fsdp runs' interrupt.pt
FILES = {"eval": CKPT_NAME, "interrupt": INTERRUPT_NAME}  # by the reason a checkpoint is saved
FOLDERS = {"eval": SHARDED_NAME, "interrupt": INTERRUPT_SHARDED_NAME}


def prepare_out_dir(name: str, also: tuple[str, ...] = ()) -> Path:
    """Create out_dir if needed, check that it is writable, and remove the temporary files a run killed
    while saving left beside its checkpoints (and beside `also`, the run's other files)."""
    out_dir = Path(name)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --out_dir={out_dir} ({e.strerror}). Choose a writable folder.") from None
    if not os.access(out_dir, os.W_OK):
        raise UserError(f"--out_dir={out_dir} is not writable. Choose a folder you can write to.")
    sharded = (f"{SHARDED_NAME}/{MANIFEST_NAME}", f"{INTERRUPT_SHARDED_NAME}/{MANIFEST_NAME}")
    for name in (CKPT_NAME, INTERRUPT_NAME, *also, *sharded):
        remove_stale_temp_files(out_dir / name)
    return out_dir


def save(
    out_dir: Path,
    reason: str,
    model: torch.nn.Module,
    optimizers: list[torch.optim.Optimizer],
    progress: dict[str, Any],
    at: Place,
    say: Callable[[str], None] | None = None,
) -> Path:
    """Save the training state for `reason` ("eval" or "interrupt") in either format: one file that rank 0
    writes or, when the model is sharded (--fsdp), a folder whose shards every process writes (then a
    collective: every rank calls it). model: the bare model (not compiled, not DDP-wrapped); progress:
    the rest of the checkpoint (TrainState.progress). `say` announces an evaluation's save. Returns what
    was written: the file, or the sharded save's folder."""
    if at.fsdp:
        if say and at.master:
            say(f"saving sharded checkpoint to {out_dir / FOLDERS[reason]}")
        saved = save_sharded(out_dir / FOLDERS[reason], model, optimizers[0], progress, at)
    else:
        saved, failure = out_dir / FILES[reason], None
        if at.master:
            if say:
                say(f"saving checkpoint to {saved}")
            weights = {"model": model.state_dict(), "optimizer": optimizers[0].state_dict()}
            if len(optimizers) > 1:
                weights["muon_optimizer"] = optimizers[1].state_dict()
            try:
                save_checkpoint(saved, {**weights, **progress})
            except UserError as e:  # told to every process: none waits for a master that gave up
                failure = str(e)
        fail_together(at, failure)
    if reason == "eval" and at.master:  # the checkpoint just written is further along than an interrupt's
        with contextlib.suppress(OSError):
            (out_dir / INTERRUPT_NAME).unlink(missing_ok=True)
        shutil.rmtree(out_dir / INTERRUPT_SHARDED_NAME, ignore_errors=True)
    return saved


def load_model_checkpoint(out_dir: str | Path, name: str | None = None) -> tuple[Path, dict[str, Any]]:
    """The checkpoint to sample, evaluate or export, and where it came from: `name` in out_dir when given;
    otherwise the further along of ckpt.pt and an --fsdp run's ckpt.dcp (ckpt.pt on a tie: the shards
    consolidated), or when there is neither, of interrupt.pt and interrupt.dcp."""
    out_dir = Path(out_dir)
    if name is not None:
        return out_dir / name, load_checkpoint(out_dir / name)
    for file, shards in ((CKPT_NAME, SHARDED_NAME), (INTERRUPT_NAME, INTERRUPT_SHARDED_NAME)):
        ckpt = load_checkpoint(out_dir / file) if (out_dir / file).exists() else None
        sharded = read_manifest(out_dir / shards)
        if sharded is not None and (ckpt is None or sharded[1]["iter_num"] > ckpt.get("iter_num", 0)):
            return sharded[0], load_sharded(out_dir / shards)
        if ckpt is not None:
            return out_dir / file, ckpt
    return out_dir / CKPT_NAME, load_checkpoint(out_dir / CKPT_NAME)  # raises the message for a missing one


def load_resume_checkpoint(out_dir: str | Path, at: Place | None = None) -> tuple[Path, dict[str, Any]]:
    """The checkpoint to resume from, whichever is further along: ckpt.pt, interrupt.pt, or the sharded
    ckpt.dcp or interrupt.dcp. A damaged one is skipped with a warning when another is whole. With `at` of
    an --fsdp run (which loads shards where they belong; a collective then), a sharded checkpoint's
    weights and optimizer state stay on disk, checked: the dict has "shards", its folder, instead of
    "model" and "optimizer"."""
    out_dir, sharded = Path(out_dir), at is not None and at.fsdp
    found, damaged = [], []
    for name in (CKPT_NAME, INTERRUPT_NAME):
        path = out_dir / name
        if path.is_file():
            try:
                found.append((path, load_checkpoint(path)))
            except UserError as e:
                damaged.append((path, e))
    for name in (SHARDED_NAME, INTERRUPT_SHARDED_NAME):
        further = max((c.get("iter_num", 0) for _, c in found), default=-1)
        try:
            manifest = read_manifest(out_dir / name)
            if manifest is None:
                continue
            folder, m = manifest
            if m["iter_num"] > further or (m["iter_num"] == further and sharded):  # a tie: the cheaper to load
                if sharded:
                    check_shards(folder, m, at)
                ckpt = {**load_sharded_state(folder, m), "shards": folder} if sharded else load_sharded(folder.parent)
                found = [(folder, ckpt)]
        except UserError as e:
            damaged.append((out_dir / name, e))
    if not found:
        if damaged:
            raise damaged[0][1]
        load_checkpoint(out_dir / CKPT_NAME)  # raises the message for a missing checkpoint
    if at is None or at.master:
        for path, e in damaged:
            print(f"warning: skipping {path}: {e}", file=sys.stderr)
    return max(found, key=lambda pc: pc[1].get("iter_num", 0))


def consolidate(out_dir: str | Path, names: tuple[str, ...] = (SHARDED_NAME, INTERRUPT_SHARDED_NAME)) -> list[Path]:
    """Write out_dir's sharded checkpoints as single files (atomically), for tools that read those:
    ckpt.dcp as ckpt.pt, interrupt.dcp as interrupt.pt. Returns the files written."""
    out_dir = Path(out_dir)
    written = []
    for shards, file in ((SHARDED_NAME, CKPT_NAME), (INTERRUPT_SHARDED_NAME, INTERRUPT_NAME)):
        if shards in names and read_manifest(out_dir / shards) is not None:
            save_checkpoint(out_dir / file, load_sharded(out_dir / shards))
            written.append(out_dir / file)
    if not written:
        raise UserError(
            f"no sharded checkpoint in {out_dir} (no {' or '.join(f'{n}/{MANIFEST_NAME}' for n in names)}); only "
            "runs with --fsdp=True write one."
        )
    return written
