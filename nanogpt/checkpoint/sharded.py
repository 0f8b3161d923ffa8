"""The sharded checkpoint format of --fsdp runs, written with torch.distributed.checkpoint (DCP).

Advanced machinery: a first read of the code skips it (the reading path is in the README, "Read the
code"). Every process writes its own shards, nothing is gathered in one place. Layout and crash safety:

    ckpt.dcp/latest.json          the complete checkpoint: its folder, iteration, and every file's CRC-32
    ckpt.dcp/iter-0000500-1a2b/   one save: DCP's .metadata and __<rank>_<n>.distcp shards, and state.pt
                                  (the single-file checkpoint's entries but "model" and "optimizer", file.py)
    interrupt.dcp/                the same, saved on Ctrl-C or SIGTERM (interrupt.pt's counterpart)

Each save goes to a new folder (a name never used before); once every process wrote its part, the files
and folder entries are made durable (fsync) and latest.json is replaced atomically. So a crash, or a
power cut, at any moment leaves latest.json naming a complete checkpoint. The save it replaced stays
GRACE_SECONDS, so a reader that just opened it finishes (one that still loses the race reads latest.json
again); older folders, and what a crashed save left, are removed. A write failing on any process ends
every process with one message, the previous checkpoint untouched.
DCP reshards on loading: a sharded checkpoint resumes at any number of processes, with or without FSDP,
and `load_sharded` reads it into one process as an ordinary checkpoint (sample, eval, export, and
`nanogpt consolidate`, which writes it as ckpt.pt).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
import warnings
import zlib
from pathlib import Path
from typing import Any

import torch

from nanogpt.atomic import atomic_open, atomic_write_bytes
from nanogpt.checkpoint.file import (
    FORMAT_VERSION,
    diverged_weights,
    empty_model,
    load_checkpoint,
    nonfinite_weights,
    os_error_in,
)
from nanogpt.distributed import Place, fail_together
from nanogpt.errors import UserError
from nanogpt.optim import build_optimizers

MANIFEST_NAME = "latest.json"  # in a sharded checkpoint's folder: which save is complete, its files' CRC-32s
STATE_NAME = "state.pt"  # in a sharded save: everything but the weights and the optimizer state
GRACE_SECONDS = 60.0  # a replaced save stays this long: a reader that just opened it finishes


def file_crc32(path: Path, sync: bool = False) -> int:
    """The CRC-32 of a file's bytes; sync: and make them durable (fsync) on the way."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
        if sync:
            os.fsync(f.fileno())
    return crc


def fsync_path(folder: Path) -> None:
    """Make a folder's entries durable: a file renamed or created in it survives a power cut."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_sharded(root: Path, model: torch.nn.Module, optimizer, meta: dict[str, Any], at: Place) -> Path:
    """Write a sharded checkpoint of a model sharded with FSDP and its optimizer into root (out_dir/ckpt.dcp
    or interrupt.dcp): a collective, every process calls it and writes its own shards. meta: the rest of
    the checkpoint (progress, options, random states), written by rank 0. A write failing on any process
    ends them all, with one message (distributed.fail_together), and leaves the previous save as it was.
    Returns the new save's folder."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    local = {k: v.to_local() if hasattr(v, "to_local") else v for k, v in model_sd.items()}
    bad = nonfinite_weights(local)
    any_bad = torch.tensor(len(bad), device=next(iter(local.values())).device)
    dist.all_reduce(any_bad)
    if any_bad.item():  # the same decision on every rank: none writes
        raise diverged_weights(root, bad)
    folder = root / new_folder_name(root, meta["iter_num"], at)
    failure = None
    try:  # DCP gathers every process's write errors and raises the same CheckpointException on each
        dcp.save({"model": model_sd, "optimizer": optim_sd}, storage_writer=shard_writer(folder, at.rank))
        if at.master:
            with atomic_open(folder / STATE_NAME) as f:  # "model" left empty: the weights are in the shards
                torch.save({"format_version": FORMAT_VERSION, **meta, "model": {}}, f)
    except (OSError, RuntimeError, dcp.api.CheckpointException) as e:
        failure = write_failure(folder, root, e)
    fail_together(at, failure)
    # every file is written; each process checks a share and makes it durable (DCP fsyncs its shards, not
    # their folder entries: a power cut could otherwise lose a file that the manifest names)
    files = sorted(p.name for p in folder.iterdir())
    sums: list[Any] = [None] * at.world
    dist.all_gather_object(sums, {f: file_crc32(folder / f, sync=True) for f in files[at.rank :: at.world]})
    failure = None
    if at.master:
        try:
            publish(root, folder, meta["iter_num"], at.world, {k: v for share in sums for k, v in share.items()})
        except OSError as e:
            failure = write_failure(folder, root, e)
    fail_together(at, failure)
    return folder


def shard_writer(folder: Path, rank: int):
    """DCP's file writer, whose failure keeps its cause. torch's zip writer turns a failed write (disk
    full, "File too large") into "unexpected pos", the OSError only in its context, and DCP sends each
    process's exception to the others pickled, without that context: the OSError is raised instead."""
    from torch.distributed.checkpoint import FileSystemWriter

    class Writer(FileSystemWriter):
        def write_data(self, plan, planner):
            try:
                written = super().write_data(plan, planner)
                written.wait()
            except Exception as e:
                cause = os_error_in(e)
                if cause is None:
                    raise
                raise OSError(cause.errno, cause.strerror, str(folder / f"__{rank}_*.distcp")) from None
            return written

    return Writer(folder)


def new_folder_name(root: Path, iter_num: int, at: Place) -> str:
    """A save's folder name, chosen by rank 0 and shared: never a folder that exists (latest.json's, or
    what an earlier save of the same iteration left)."""
    import torch.distributed as dist

    name = [None]
    if at.master:
        root.mkdir(parents=True, exist_ok=True)
        while name[0] is None or (root / name[0]).exists():
            name[0] = f"iter-{iter_num:07d}-{secrets.token_hex(4)}"
    dist.broadcast_object_list(name)
    return name[0]


def write_failure(folder: Path, root: Path, e: BaseException) -> str:
    """The one-paragraph message for a save that failed: the file and the cause (an OSError somewhere in
    what DCP or torch.save raised), and that the previous save is intact."""
    return (
        f"could not write the sharded checkpoint {folder} ({first_cause(e)}); the previous checkpoint, named in "
        f"{root / MANIFEST_NAME}, is unchanged. Free some disk space or choose a writable --out_dir."
    )


def first_cause(e: BaseException) -> str:
    """What went wrong, in a few words: the OSError in what DCP (its CheckpointException holds each
    failed rank's exception) or torch.save (a RuntimeError whose context is the OSError) raised."""
    failures = getattr(e, "failures", {})  # {rank: (exception, traceback)}
    causes = [exc for exc, _ in failures.values()] or [e]
    cause = next((c for c in map(os_error_in, causes) if c is not None), causes[0])
    return f"{cause.strerror}: {cause.filename}" if isinstance(cause, OSError) and cause.filename else str(cause)


def publish(root: Path, folder: Path, iter_num: int, world: int, crc32: dict[str, int]) -> None:
    """Make a complete save the checkpoint: its folder's entries made durable, then latest.json replaced
    atomically. The saves it replaces stay GRACE_SECONDS (listed in it as "retired"), so a reader that
    opened one a moment earlier finishes; older ones, and what a crashed save left, are removed."""
    try:
        previous = read_manifest(root)
    except UserError:  # a damaged latest.json names nothing to keep
        previous = None
    now = time.time()
    retired = [] if previous is None else [{"folder": previous[0].name, "at": now}]
    if previous is not None:
        retired += [r for r in previous[1].get("retired", []) if now - r["at"] < GRACE_SECONDS]
    fsync_path(folder)
    fsync_path(root)
    manifest = {"folder": folder.name, "iter_num": iter_num, "world_size": world, "retired": retired}
    atomic_write_bytes(root / MANIFEST_NAME, json.dumps({**manifest, "crc32": crc32}, indent=1).encode())
    keep = {folder.name, *(r["folder"] for r in retired)}
    for old in root.iterdir():
        if old.is_dir() and old.name not in keep:
            shutil.rmtree(old, ignore_errors=True)


def read_manifest(root: Path) -> tuple[Path, dict[str, Any]] | None:
    """The complete sharded checkpoint in root (out_dir/ckpt.dcp or interrupt.dcp): its folder and
    manifest, or None when there is none."""
    path = root / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest["iter_num"], int) or not all(isinstance(v, int) for v in manifest["crc32"].values()):
            raise ValueError("wrong types")
        if not all(
            isinstance(r["folder"], str) and isinstance(r["at"], (int, float)) for r in manifest.get("retired", [])
        ):
            raise ValueError("wrong types in retired")
        for name in (manifest["folder"], *manifest["crc32"]):  # joined into paths: a name, never a way out
            if not isinstance(name, str) or name in ("", ".", "..") or any(c in name for c in "/\\\0"):
                raise ValueError(f"{name!r} is not a file name")
        folder = path.parent / manifest["folder"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(
            f"{path} is damaged ({e}), so the sharded checkpoint it should name cannot be trusted. Restore it from "
            "a backup or train again."
        ) from None
    return folder, manifest


def damaged_shards(folder: Path, manifest: dict[str, Any], rank: int = 0, world: int = 1) -> list[str]:
    """What is wrong with the files of a sharded checkpoint: missing, or failing their CRC-32. With several
    processes each checks a share (rank, world); alone, all of them."""
    problems = []
    for name in sorted(manifest["crc32"])[rank::world]:
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif file_crc32(path) != manifest["crc32"][name]:
            problems.append(f"{name} does not match its checksum")
    return problems


def damaged_shards_error(folder: Path, problems: list[str]) -> UserError:
    return UserError(
        f"the sharded checkpoint {folder} is damaged ({'; '.join(problems[:3])}"
        f"{f'; and {len(problems) - 3} more' if len(problems) > 3 else ''}); nothing was loaded from it. Restore "
        f"the folder from a backup, or train again (deleting {folder.parent} makes --init_from=resume use an "
        "older ckpt.pt, if there is one)."
    )


def load_sharded_state(folder: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """A sharded save's state.pt: the checkpoint without its weights and optimizer state (checked)."""
    problems = damaged_shards(folder, {"crc32": {STATE_NAME: manifest["crc32"].get(STATE_NAME, -1)}})
    if problems:
        raise damaged_shards_error(folder, problems)
    return load_checkpoint(folder / STATE_NAME)


def load_shards_into(folder: Path, model: torch.nn.Module, optimizer, no_dist: bool) -> None:
    """Load a sharded checkpoint into a model and its optimizer, sharded or not, at any number of processes
    (DCP reshards): each process reads the parts it holds. no_dist: one process alone reads everything."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    try:
        with warnings.catch_warnings():  # no_dist is asked for, not assumed: DCP's warning that it assumed so is noise
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
            dcp.load({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=folder, no_dist=no_dist)
    except (OSError, dcp.api.CheckpointException) as e:  # a file gone since it was checked
        raise damaged_shards_error(folder, [first_cause(e)]) from None
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)


def load_sharded(root: Path) -> dict[str, Any]:
    """The sharded checkpoint in root (out_dir/ckpt.dcp or interrupt.dcp) read into this process as an
    ordinary checkpoint dict (what load_checkpoint returns, AdamW state included): every file checked
    against its CRC-32 first. A reader that loses a race with the training run (a newer save replaced
    the one it was reading, and its grace period passed) reads the manifest again, once."""
    for attempt in range(2):
        manifest = read_manifest(root)
        if manifest is None:
            raise UserError(f"no sharded checkpoint in {root} ({MANIFEST_NAME} is missing).")
        try:
            return load_sharded_folder(*manifest)
        except UserError:
            again = read_manifest(root)
            if attempt == 1 or again is None or again[0] == manifest[0]:
                raise


def load_sharded_folder(folder: Path, m: dict[str, Any]) -> dict[str, Any]:
    """One sharded save read into this process (load_sharded)."""
    problems = damaged_shards(folder, m)
    if problems:
        raise damaged_shards_error(folder, problems)
    ckpt = load_sharded_state(folder, m)
    model = empty_model(ckpt)
    c = ckpt["config"]
    optimizer = build_optimizers(
        model, "adamw", c["learning_rate"], c["weight_decay"], (c["beta1"], c["beta2"]), "cpu"
    )[0]
    load_shards_into(folder, model, optimizer, no_dist=True)
    return {**ckpt, "model": model.state_dict(), "optimizer": optimizer.state_dict()}


def optimizer_state_by_name(model: torch.nn.Module, optimizer, saved: dict[str, Any]) -> dict[str, Any]:
    """A saved optimizer state_dict, whose parameters are numbered in the order of its groups, keyed by
    parameter name instead: the form set_optimizer_state_dict loads into a sharded model."""
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    numbers = [i for group in saved["param_groups"] for i in group["params"]]
    if len(numbers) != len(order):
        raise UserError(
            f"the checkpoint's optimizer state covers {len(numbers)} parameters, this model has {len(order)}: "
            "resume with the options it was trained with."
        )
    name_of = dict(zip(numbers, order))
    return {
        "state": {name_of[i]: s for i, s in saved["state"].items()},
        "param_groups": [{**g, "params": [name_of[i] for i in g["params"]]} for g in saved["param_groups"]],
    }


def check_shards(folder: Path, manifest: dict[str, Any], at: Place) -> None:
    """Check a sharded checkpoint's files against their CRC-32s, each process a share (a collective when
    there are several); every process raises the same error if any file is missing or damaged."""
    problems = damaged_shards(folder, manifest, at.rank, at.world)
    if at.world > 1:
        import torch.distributed as dist

        shares: list[Any] = [None] * at.world
        dist.all_gather_object(shares, problems, group=at.cpu_group)
        problems = [p for share in shares for p in share]
    if problems:
        raise damaged_shards_error(folder, problems)


def load_checked_shards(folder: Path, model: torch.nn.Module, optimizer, at: Place) -> None:
    """Load a sharded checkpoint, checked when it was chosen (check_shards), into the sharded model."""
    found = read_manifest(folder.parent)  # out_dir/ckpt.dcp/<save>
    if found is None or found[0] != folder:
        raise UserError(f"{folder} was replaced while this run started; run the same command again.")
    load_shards_into(folder, model, optimizer, no_dist=False)
