"""The sharded checkpoint format of --fsdp runs, written with torch.distributed.checkpoint (DCP).

Advanced machinery: a first read of the code skips it (the reading path is in the README, "Read the
code"). Every process writes its own shards, nothing is gathered in one place. Layout and crash safety:

    ckpt.dcp/latest.json          the complete checkpoint: its folder, iteration, and every file's CRC-32
    ckpt.dcp/iter-0000500-1a2b/   one save: DCP's .metadata and __<rank>_<n>.distcp shards, and state.pt
                                  (the single-file checkpoint's entries but "model" and "optimizer", file.py)
    interrupt.dcp/                the same, saved on Ctrl-C or SIGTERM (interrupt.pt's counterpart)

Each save goes to a new folder; latest.json is replaced atomically once the folder is complete, and only
then are older folders removed. So a crash at any moment leaves latest.json naming a complete checkpoint.
DCP reshards on loading: a sharded checkpoint resumes at any number of processes, with or without FSDP,
and `load_sharded` reads it into one process as an ordinary checkpoint (sample, eval, export, and
`nanogpt consolidate`, which writes it as ckpt.pt).
"""

from __future__ import annotations

import json
import secrets
import shutil
import warnings
import zlib
from pathlib import Path
from typing import Any

import torch

from nanogpt.atomic import atomic_open, atomic_write_bytes
from nanogpt.checkpoint.file import FORMAT_VERSION, diverged_weights, empty_model, load_checkpoint, nonfinite_weights
from nanogpt.distributed import Place
from nanogpt.errors import UserError
from nanogpt.optim import build_optimizers

MANIFEST_NAME = "latest.json"  # in a sharded checkpoint's folder: which save is complete, its files' CRC-32s
STATE_NAME = "state.pt"  # in a sharded save: everything but the weights and the optimizer state


def file_crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def save_sharded(root: Path, model: torch.nn.Module, optimizer, meta: dict[str, Any]) -> Path:
    """Write a sharded checkpoint of a model sharded with FSDP and its optimizer into root (out_dir/ckpt.dcp
    or interrupt.dcp): a collective, every process calls it and writes its own shards. meta: the rest of
    the checkpoint (progress, options, random states), written by rank 0. Returns the new save's folder."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    rank, world = dist.get_rank(), dist.get_world_size()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    local = {k: v.to_local() if hasattr(v, "to_local") else v for k, v in model_sd.items()}
    bad = nonfinite_weights(local)
    any_bad = torch.tensor(len(bad), device=next(iter(local.values())).device)
    dist.all_reduce(any_bad)
    if any_bad.item():  # the same decision on every rank: none writes
        raise diverged_weights(root, bad)
    name = [f"iter-{meta['iter_num']:07d}-{secrets.token_hex(2)}" if rank == 0 else None]
    dist.broadcast_object_list(name)  # a new folder: never the one latest.json names
    folder = root / name[0]
    try:
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=folder)
        if rank == 0:
            with atomic_open(folder / STATE_NAME) as f:
                # "model" left empty: the weights are in the shards
                torch.save({"format_version": FORMAT_VERSION, **meta, "model": {}}, f)
    except (OSError, dcp.api.CheckpointException) as e:
        raise UserError(
            f"could not write the sharded checkpoint {folder} ({e}); the previous checkpoint, named in "
            f"{root / MANIFEST_NAME}, is unchanged. Free some disk space or choose a writable --out_dir."
        ) from None
    dist.barrier()  # every file is written
    files = sorted(p.name for p in folder.iterdir())
    sums: list[Any] = [None] * world
    dist.all_gather_object(sums, {f: file_crc32(folder / f) for f in files[rank::world]})  # a share each
    if rank == 0:
        manifest = {"folder": folder.name, "iter_num": meta["iter_num"], "world_size": world, "crc32": {}}
        for share in sums:
            manifest["crc32"].update(share)
        atomic_write_bytes(root / MANIFEST_NAME, json.dumps(manifest, indent=1).encode())
        for old in root.iterdir():  # older saves, and what a crash mid-save left
            if old.is_dir() and old != folder:
                shutil.rmtree(old, ignore_errors=True)
    return folder


def read_manifest(root: Path) -> tuple[Path, dict[str, Any]] | None:
    """The complete sharded checkpoint in root (out_dir/ckpt.dcp or interrupt.dcp): its folder and
    manifest, or None when there is none."""
    path = root / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        folder = path.parent / manifest["folder"]
        if not isinstance(manifest["iter_num"], int) or not all(isinstance(v, int) for v in manifest["crc32"].values()):
            raise ValueError("wrong types")
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
    with warnings.catch_warnings():  # no_dist is asked for, not assumed: DCP's warning that it assumed so is noise
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.load({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=folder, no_dist=no_dist)
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)


def load_sharded(root: Path) -> dict[str, Any]:
    """The sharded checkpoint in root (out_dir/ckpt.dcp or interrupt.dcp) read into this process as an
    ordinary checkpoint dict (what load_checkpoint returns, AdamW state included): every file checked
    against its CRC-32 first."""
    manifest = read_manifest(root)
    if manifest is None:
        raise UserError(f"no sharded checkpoint in {root} ({MANIFEST_NAME} is missing).")
    folder, m = manifest
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


def load_checked_shards(folder: Path, model: torch.nn.Module, optimizer, at: Place) -> None:
    """Load a sharded checkpoint into the sharded model: the processes check its files' CRC-32s, a share
    each, and load nothing unless all are whole (a collective)."""
    import torch.distributed as dist

    found = read_manifest(folder.parent)  # out_dir/ckpt.dcp/<save>
    if found is None or found[0] != folder:
        raise UserError(f"{folder} was replaced while this run started; run the same command again.")
    manifest = found[1]
    problems: list[Any] = [None] * at.world
    dist.all_gather_object(problems, damaged_shards(folder, manifest, at.rank, at.world))
    problems = [p for share in problems for p in share]
    if problems:
        raise damaged_shards_error(folder, problems)
    load_shards_into(folder, model, optimizer, no_dist=False)
