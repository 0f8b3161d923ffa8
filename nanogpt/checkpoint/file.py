"""The single-file checkpoint format: one file holding everything to resume training or to sample.

Advanced machinery: a first read of the code skips it (the reading path is in the README, "Read the
code"); what a student needs is that train.py saves a dict and sample.py loads it back.

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
"""

from __future__ import annotations

import contextlib
import pickle
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch

from nanogpt.atomic import atomic_open
from nanogpt.data import read_meta
from nanogpt.errors import UserError
from nanogpt.model import GPT, GPTConfig
from nanogpt.tokenizer import GPT2Tokenizer, Tokenizer, tokenizer_from_spec

FORMAT_VERSION = 1


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
        if isinstance(e.__context__, KeyboardInterrupt):  # a second Ctrl-C mid-write, which torch's zip writer
            raise e.__context__ from None  # turns into a RuntimeError: it stops the run at once, as Ctrl-C does
        cause = os_error_in(e)
        if cause is None:
            raise
        raise UserError(
            f"could not write the checkpoint {path} ({cause.strerror or cause}); the previous checkpoint, if any, "
            "is unchanged. Free some disk space or choose a writable --out_dir."
        ) from None


def os_error_in(e: BaseException | None) -> OSError | None:
    """The OSError behind a failed write: e itself, or in its context. torch's zip writer reports a failed
    write (disk full, "File too large") as a RuntimeError ("unexpected pos") whose context is the OSError."""
    while e is not None and not isinstance(e, OSError):
        e = e.__context__
    return e


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
    """A freshly initialised GPT of the shape stored in a checkpoint, for its weights to be loaded into.
    On the meta device (no memory) when its weights are shards left on disk (an --fsdp resume): they load
    into the sharded model, which distributed.shard allocates a shard per process."""
    args = dict(ckpt["model_args"])
    if dropout is not None:
        args["dropout"] = dropout
    try:
        with torch.device("meta") if "shards" in ckpt else contextlib.nullcontext():
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
