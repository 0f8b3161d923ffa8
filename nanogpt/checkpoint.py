"""Checkpoints: one self-contained file holding everything to resume training or to sample.

A checkpoint is a dict of tensors and plain Python values (so `torch.load(weights_only=True)` can
read it without unpickling arbitrary objects):

    format_version  int, FORMAT_VERSION
    model_args      GPTConfig as a dict
    model           the model's state_dict (no `_orig_mod.`/`module.` prefixes)
    tokenizer       {"kind": "char", "chars": [...]} or {"kind": "gpt2"}
    config          the training options as a dict
    iter_num        the next iteration to run
    best_val_loss   the best validation loss so far
    optimizer       AdamW state_dict (absent in exported or weights-only files)
    muon_optimizer  Muon state_dict, for runs with --optimizer=muon
    train_seconds   training time so far (evaluations excluded), which a --max_seconds budget goes on from
    scaler          GradScaler state_dict, when float16 training used one
    rng             random states of Python, numpy, torch, CUDA and the batch sampler (rank 0's with DDP)
    rng_ranks       every DDP process's random states, rank by rank (evaluation checkpoints of DDP runs)
    reason          "eval" (saved at an evaluation) or "interrupt" (saved on Ctrl-C / SIGTERM)

Files are written atomically (see atomic.py), so a crash never leaves a torn checkpoint; loading
checks every entry's CRC-32, so a damaged copy is refused rather than loaded with wrong weights.

Runs with --fsdp=True write sharded checkpoints instead, with torch.distributed.checkpoint (DCP): every
process writes its own shards, nothing is gathered in one place. Layout and crash safety:

    ckpt.dcp/latest.json          the complete checkpoint: its folder, iteration, and every file's CRC-32
    ckpt.dcp/iter-0000500-1a2b/   one save: DCP's .metadata and __<rank>_<n>.distcp shards, and state.pt
                                  (everything above but "model" and "optimizer")
    interrupt.dcp/                the same, saved on Ctrl-C or SIGTERM (interrupt.pt's counterpart)

Each save goes to a new folder; latest.json is replaced atomically once the folder is complete, and only
then are older folders removed. So a crash at any moment leaves latest.json naming a complete checkpoint.
DCP reshards on loading: a sharded checkpoint resumes at any number of processes, with or without FSDP,
and `load_sharded` reads it into one process as an ordinary checkpoint (sample, eval, export, and
`nanogpt consolidate`, which writes it as ckpt.pt).
"""

from __future__ import annotations

import json
import pickle
import secrets
import shutil
import sys
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Any

import torch

from nanogpt.atomic import atomic_open, atomic_write_bytes
from nanogpt.data import read_meta
from nanogpt.errors import UserError
from nanogpt.model import GPT, GPTConfig
from nanogpt.tokenizer import GPT2Tokenizer, Tokenizer, tokenizer_from_spec

FORMAT_VERSION = 1
CKPT_NAME = "ckpt.pt"  # saved at evaluations: the best val loss so far (or the latest, always_save_checkpoint)
INTERRUPT_NAME = "interrupt.pt"  # saved when training is stopped by Ctrl-C or SIGTERM
SHARDED_NAME = "ckpt.dcp"  # --fsdp runs' ckpt.pt: a folder of shards (see above)
INTERRUPT_SHARDED_NAME = "interrupt.dcp"  # --fsdp runs' interrupt.pt
MANIFEST_NAME = "latest.json"  # in SHARDED_NAME: which save is complete, and its files' CRC-32s
STATE_NAME = "state.pt"  # in a sharded save: everything but the weights and the optimizer state


def strip_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove the `_orig_mod.` (torch.compile) and `module.` (DDP) prefixes from parameter names."""
    out = {}
    for k, v in state_dict.items():
        while k.startswith(("_orig_mod.", "module.")):  # in any order: DDP(compiled) saves module._orig_mod.
            k = k.partition(".")[2]
        out[k] = v
    return out


# What torch.load raises for a file that is not a whole checkpoint: a torn zip archive comes out as an
# OSError (EINVAL) or a RuntimeError from its zip reader, garbage as whatever the unpickler chokes on.
# Anything else (a MemoryError, a bug) propagates as itself.
_DAMAGED_FILE_ERRORS = (
    pickle.UnpicklingError,
    EOFError,
    RuntimeError,
    ValueError,
    IndexError,
    KeyError,
    UnicodeDecodeError,
    zipfile.BadZipFile,
)


def nonfinite_weights(state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an infinity (one device sync in all)."""
    names = [k for k, v in state_dict.items() if torch.is_tensor(v) and v.is_floating_point()]
    if not names:
        return []
    finite = torch.stack([torch.isfinite(state_dict[k]).all() for k in names]).tolist()
    return [k for k, ok in zip(names, finite) if not ok]


def diverged_weights(path: str | Path, bad: list[str]) -> UserError:
    return UserError(
        f"not writing {path}: the model's weights hold NaN or infinite values ({bad[0] if bad else 'on a process'}"
        f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}), so training has diverged; the previous "
        "checkpoint, if any, is unchanged. Usual causes: a learning rate too high (try --learning_rate 3x lower, "
        "or a longer --warmup_iters) or float16 without loss scaling (use --dtype=bfloat16 or float32)."
    )


def save_checkpoint(path: str | Path, ckpt: dict[str, Any]) -> None:
    """Write ckpt to path atomically: a crash mid-save leaves the previous file intact. Weights with
    NaN or infinite values are never written: they would replace a good checkpoint with a useless one."""
    bad = nonfinite_weights(ckpt["model"])
    if bad:
        raise diverged_weights(path, bad)
    ckpt = {**ckpt, "format_version": FORMAT_VERSION}
    try:
        with atomic_open(path) as f:
            torch.save(ckpt, f)
    except (OSError, RuntimeError) as e:
        # torch.save reports a failed write (disk full...) as a RuntimeError whose context is the OSError
        if not isinstance(e, OSError):
            e = e.__context__
            if not isinstance(e, OSError):
                raise
        raise UserError(
            f"could not write the checkpoint {path} ({e.strerror or e}); the previous checkpoint, if any, is "
            "unchanged. Free some disk space or choose a writable --out_dir."
        ) from None


def _migrate(ckpt: dict[str, Any], path: Path) -> dict[str, Any]:
    """Bring an older checkpoint to FORMAT_VERSION, or explain why it cannot be used."""
    version = ckpt.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise UserError(f"{path} is damaged: its format_version is {version!r}, not a version number.")
    if version > FORMAT_VERSION:
        raise UserError(
            f"{path} was written by a newer nanogpt (checkpoint format {version}, this one reads up to "
            f"{FORMAT_VERSION}). Upgrade nanogpt to load it."
        )
    if not isinstance(ckpt.get("model_args"), dict) or not isinstance(ckpt.get("model"), dict):
        raise UserError(f"{path} is not a nanogpt checkpoint (it has no 'model_args'/'model' entries).")
    if version == 0:  # a checkpoint written by Karpathy's nanoGPT: same keys, no tokenizer stored
        ckpt = dict(ckpt)
        ckpt["model_args"] = {k: v for k, v in ckpt["model_args"].items() if k in GPTConfig.__dataclass_fields__}
        ckpt["model"] = strip_prefixes(ckpt["model"])
        if "tokenizer" not in ckpt:
            ckpt["tokenizer"] = _nanogpt_tokenizer(ckpt, path)
        ckpt["format_version"] = FORMAT_VERSION
    return ckpt


def _nanogpt_tokenizer(ckpt: dict[str, Any], path: Path) -> dict[str, Any]:
    """The tokenizer of a nanoGPT checkpoint. A model with GPT-2's vocabulary (50257, or 50304 padded) uses
    GPT-2's tokens; a smaller one (shakespeare_char) had its characters in data/<dataset>/meta.pkl, which
    we do not unpickle, so it needs the meta.json that `nanogpt prepare` writes for the same dataset."""
    vocab_size = ckpt["model_args"].get("vocab_size", GPTConfig.vocab_size)
    if not isinstance(vocab_size, int) or vocab_size >= GPT2Tokenizer.vocab_size:
        return {"kind": "gpt2"}
    config = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    dataset = str(config.get("dataset") or "<dataset>")
    data_dir = Path(config.get("data_dir") or Path("data") / dataset)
    meta_path = data_dir / "meta.json"
    if not meta_path.is_file():
        raise UserError(
            f"{path} is a nanoGPT checkpoint with a {vocab_size}-token vocabulary (not GPT-2's) and {meta_path}, "
            f"which would hold that vocabulary, is missing. nanoGPT kept it in a pickled meta.pkl, which nanogpt "
            f"does not unpickle: run 'nanogpt prepare {dataset}' on the same text (from this folder) to write "
            f"{meta_path}, then try again."
        )
    meta = read_meta(data_dir)
    if meta["vocab_size"] != vocab_size:
        raise UserError(
            f"{meta_path} describes a {meta['vocab_size']}-token vocabulary but the model in {path} has "
            f"{vocab_size} tokens; prepare the dataset the model was trained on."
        )
    return meta["tokenizer"]


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint safely (weights_only) with a clear message for missing or damaged files."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"no checkpoint at {path}. Train a model first (python train.py ...) with the same --out_dir, "
            "or point --out_dir at the folder that holds ckpt.pt."
        )
    try:
        bad_entry = _entry_failing_crc(path)
    except PermissionError as e:
        raise UserError(f"cannot read the checkpoint {path}: {e.strerror}.") from None
    if bad_entry is not None:
        raise UserError(
            f"the checkpoint {path} is damaged: the data of {bad_entry} does not match its checksum. Restore it "
            "from a backup or train again."
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, *_DAMAGED_FILE_ERRORS) as e:
        refused = isinstance(e, pickle.UnpicklingError) and "Weights only load failed" in str(e)
        if refused and zipfile.is_zipfile(path):  # a whole torch.save file, not garbage the unpickler choked on
            raise UserError(
                f"{path} holds Python objects other than tensors and plain values; nanogpt does not load them, "
                "as unpickling them could run arbitrary code. Only load checkpoints from sources you trust, and "
                "save them as plain dicts of tensors."
            ) from None
        # torch's own messages for a torn archive are long and cut mid-sentence: say what we know instead
        what = "is damaged" if zipfile.is_zipfile(path) else "is truncated"
        raise UserError(
            f"the checkpoint {path} {what} or is not a PyTorch checkpoint, so it cannot be read. Restore it from a "
            "backup or train again. nanogpt writes checkpoints atomically, so a damaged one usually means the file "
            "was copied incompletely."
        ) from None
    if not isinstance(ckpt, dict):
        raise UserError(f"{path} is not a nanogpt checkpoint (it holds a {type(ckpt).__name__}).")
    if not zipfile.is_zipfile(path):
        print(
            f"warning: {path} is in PyTorch's legacy (pre-1.6) format, which stores no checksums: its data could "
            "not be verified.",
            file=sys.stderr,
        )
    ckpt = _migrate(ckpt, path)
    bad = nonfinite_weights(ckpt["model"])
    if bad:
        raise UserError(
            f"the checkpoint {path} holds NaN or infinite weights ({bad[0]}): the run that wrote it had diverged. "
            "Use an earlier checkpoint, or train again with a lower --learning_rate."
        )
    return ckpt


def _entry_failing_crc(path: Path) -> str | None:
    """The first entry of a checkpoint (a zip archive) whose data fails its CRC-32. torch.load does not check
    them, so without this a flipped bit in the weights would load silently. None when all match, and for a
    file that is no complete zip archive: torch.load then refuses it (or, for the legacy format, says it
    could not be verified)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip()
    except (zipfile.BadZipFile, EOFError):
        return None


def empty_model(ckpt: dict[str, Any], dropout: float | None = None) -> GPT:
    """A freshly initialised GPT of the shape stored in a checkpoint, for its weights to be loaded into."""
    args = dict(ckpt["model_args"])
    if dropout is not None:
        args["dropout"] = dropout
    try:
        return GPT(GPTConfig(**args))
    except (TypeError, ValueError) as e:
        raise UserError(f"the checkpoint's model_args are damaged ({e}).") from None


def model_from_checkpoint(ckpt: dict[str, Any], dropout: float | None = None) -> GPT:
    """Rebuild the GPT stored in a checkpoint (on the CPU; move it where you need it)."""
    model = empty_model(ckpt, dropout)
    state = strip_prefixes(ckpt["model"])
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"the checkpoint's weights do not match its model_args: {str(e).splitlines()[0]}") from None
    return model


def tokenizer_from_checkpoint(ckpt: dict[str, Any]) -> Tokenizer:
    return tokenizer_from_spec(ckpt.get("tokenizer", {"kind": "gpt2"}))


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


def load_resume_checkpoint(out_dir: str | Path, sharded: bool = False) -> tuple[Path, dict[str, Any]]:
    """The checkpoint to resume from, whichever is further along: ckpt.pt, interrupt.pt, or the sharded
    ckpt.dcp or interrupt.dcp. sharded=True (an --fsdp run, which loads shards where they belong) leaves a
    sharded checkpoint's weights and optimizer state on disk: the dict then has "shards", its folder,
    instead of "model" and "optimizer"."""
    out_dir = Path(out_dir)
    found, damaged = [], []
    for name in (CKPT_NAME, INTERRUPT_NAME):
        path = out_dir / name
        if path.is_file():
            try:
                found.append((path, load_checkpoint(path)))
            except UserError as e:
                damaged.append((path, e))
    for name in (SHARDED_NAME, INTERRUPT_SHARDED_NAME):
        manifest = read_manifest(out_dir / name)
        if manifest is None:
            continue
        folder, m = manifest
        further = max((c.get("iter_num", 0) for _, c in found), default=-1)
        if m["iter_num"] > further or (m["iter_num"] == further and sharded):  # a tie: the cheaper to load
            try:
                ckpt = {**load_sharded_state(folder, m), "shards": folder} if sharded else load_sharded(folder.parent)
                found = [(folder, ckpt)]
            except UserError as e:
                damaged.append((folder, e))
    if not found:
        if damaged:
            raise damaged[0][1]
        load_checkpoint(out_dir / CKPT_NAME)  # raises the message for a missing checkpoint
    for path, e in damaged:
        print(f"warning: skipping {path}: {e}", file=sys.stderr)
    return max(found, key=lambda pc: pc[1].get("iter_num", 0))


# ----------------------------------------------------------------------------- sharded checkpoints (--fsdp)


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
        f"older {CKPT_NAME}, if there is one)."
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
    from nanogpt.optim import build_optimizers

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


def load_inference_model(init_from: str, out_dir: str | Path) -> tuple[GPT, Tokenizer, str, dict[str, Any]]:
    """The model to sample, evaluate or serve, its tokenizer, where it came from, and the training options
    it was saved with ({} for GPT-2): the checkpoint in out_dir (init_from="resume"), or OpenAI's GPT-2 /
    a Hugging Face folder (needs transformers)."""
    config: dict[str, Any] = {}
    if init_from == "resume":
        path, ckpt = load_model_checkpoint(out_dir)
        model, tok, source = model_from_checkpoint(ckpt), tokenizer_from_checkpoint(ckpt), str(path)
        config = ckpt.get("config", {})
    else:
        from nanogpt.hf import load_pretrained_gpt2, tokenizer_spec_for

        model, tok = load_pretrained_gpt2(init_from), tokenizer_from_spec(tokenizer_spec_for(init_from))
        source = init_from
    if tok.vocab_size > model.config.vocab_size:
        raise UserError(
            f"{source} is damaged: its tokenizer has {tok.vocab_size} tokens but its model only "
            f"{model.config.vocab_size}."
        )
    return model, tok, source, config
