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
    scaler          GradScaler state_dict, when float16 training used one
    rng             random states of Python, numpy, torch, CUDA and the batch sampler
    reason          "eval" (saved at an evaluation) or "interrupt" (saved on Ctrl-C / SIGTERM)

Files are written atomically (see atomic.py), so a crash never leaves a torn checkpoint.
"""

from __future__ import annotations

import pickle
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch

from nanogpt.atomic import atomic_open
from nanogpt.errors import UserError
from nanogpt.model import GPT, GPTConfig
from nanogpt.tokenizer import Tokenizer, tokenizer_from_spec

FORMAT_VERSION = 1
CKPT_NAME = "ckpt.pt"  # saved at evaluations: the best val loss so far (or the latest, always_save_checkpoint)
INTERRUPT_NAME = "interrupt.pt"  # saved when training is stopped by Ctrl-C or SIGTERM


def strip_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove the `_orig_mod.` (torch.compile) and `module.` (DDP) prefixes from parameter names."""
    out = {}
    for k, v in state_dict.items():
        for prefix in ("_orig_mod.", "module."):
            while k.startswith(prefix):
                k = k[len(prefix) :]
        out[k] = v
    return out


def save_checkpoint(path: str | Path, ckpt: dict[str, Any]) -> None:
    """Write ckpt to path atomically: a crash mid-save leaves the previous file intact."""
    ckpt = {"format_version": FORMAT_VERSION, **ckpt}
    try:
        with atomic_open(path) as f:
            torch.save(ckpt, f)
    except OSError as e:
        raise UserError(
            f"could not write the checkpoint {path} ({e.strerror or e}); the previous checkpoint, if any, is "
            "unchanged. Free some disk space or choose a writable --out_dir."
        ) from None


def _migrate(ckpt: dict[str, Any], path: Path) -> dict[str, Any]:
    """Bring an older checkpoint to FORMAT_VERSION, or explain why it cannot be used."""
    version = ckpt.get("format_version", 0)
    if version > FORMAT_VERSION:
        raise UserError(
            f"{path} was written by a newer nanogpt (checkpoint format {version}, this one reads up to "
            f"{FORMAT_VERSION}). Upgrade nanogpt to load it."
        )
    if version == 0:  # a checkpoint written by Karpathy's nanoGPT: same keys, no tokenizer stored
        if "model_args" not in ckpt or "model" not in ckpt:
            raise UserError(f"{path} is not a nanogpt checkpoint (it has no 'model_args'/'model' entries).")
        ckpt = dict(ckpt)
        ckpt["model_args"] = {k: v for k, v in ckpt["model_args"].items() if k in GPTConfig.__dataclass_fields__}
        ckpt["model"] = strip_prefixes(ckpt["model"])
        # nanoGPT kept the character vocabulary in a pickled meta.pkl, which we do not unpickle; without it
        # the model's tokens are GPT-2's, which is right for every nanoGPT dataset except shakespeare_char
        ckpt.setdefault("tokenizer", {"kind": "gpt2"})
        ckpt["format_version"] = FORMAT_VERSION
    return ckpt


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint safely (weights_only) with a clear message for missing or damaged files."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"no checkpoint at {path}. Train a model first (python train.py ...) with the same --out_dir, "
            "or point --out_dir at the folder that holds ckpt.pt."
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(
            f"the checkpoint {path} is damaged or not a PyTorch checkpoint ({first}). Restore it from a backup "
            "or train again; nanogpt writes checkpoints atomically, so this usually means the file was "
            "copied incompletely."
        ) from None
    if not isinstance(ckpt, dict):
        raise UserError(f"{path} is not a nanogpt checkpoint (it holds a {type(ckpt).__name__}).")
    return _migrate(ckpt, path)


def model_from_checkpoint(ckpt: dict[str, Any], dropout: float | None = None) -> GPT:
    """Rebuild the GPT stored in a checkpoint (on the CPU; move it where you need it)."""
    args = dict(ckpt["model_args"])
    if dropout is not None:
        args["dropout"] = dropout
    model = GPT(GPTConfig(**args))
    state = strip_prefixes(ckpt["model"])
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"the checkpoint's weights do not match its model_args: {str(e).splitlines()[0]}") from None
    return model


def tokenizer_from_checkpoint(ckpt: dict[str, Any]) -> Tokenizer:
    return tokenizer_from_spec(ckpt.get("tokenizer", {"kind": "gpt2"}))


def load_resume_checkpoint(out_dir: str | Path) -> tuple[Path, dict[str, Any]]:
    """The checkpoint to resume from: ckpt.pt or interrupt.pt, whichever is further along."""
    out_dir = Path(out_dir)
    found = []
    for name in (CKPT_NAME, INTERRUPT_NAME):
        path = out_dir / name
        if path.is_file():
            try:
                found.append((path, load_checkpoint(path)))
            except UserError as e:
                print(f"warning: skipping {path}: {e}", file=sys.stderr)
    if not found:
        load_checkpoint(out_dir / CKPT_NAME)  # raises the message for a missing or damaged checkpoint
    return max(found, key=lambda pc: pc[1].get("iter_num", 0))
