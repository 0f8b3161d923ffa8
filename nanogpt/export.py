"""Export a checkpoint as a Hugging Face GPT-2 folder, loadable with transformers' from_pretrained.

    nanogpt export --out_dir=out-shakespeare-char --to=hf-model/

The folder gets config.json, generation_config.json, model.safetensors and the tokenizer: GPT-2's
tokenizer files, or nanogpt_char_vocab.json for a character-level model. An existing folder is
written into only if it is empty or holds a previous export; files other than ours are never deleted.
The folder is also a valid --init_from for train and sample.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from nanogpt.checkpoint import CKPT_NAME, INTERRUPT_NAME, load_model_checkpoint, model_from_checkpoint
from nanogpt.config import option, parse_args
from nanogpt.errors import UserError, run_main
from nanogpt.hf import check_export, export_hf, usage_snippet


@dataclass
class ExportOptions:
    out_dir: str = option("out", "folder holding the checkpoint (what train's --out_dir was)")
    to: str = option("", "destination folder for the Hugging Face files (created if needed)")
    ckpt: str = option(
        CKPT_NAME, f"checkpoint file name in out_dir; {INTERRUPT_NAME} is used if {CKPT_NAME} is missing"
    )

    def __post_init__(self) -> None:
        if not self.to:
            raise UserError("say where to write the export with --to=FOLDER, e.g. --to=hf-model.")


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    o, explicit = parse_args(ExportOptions, argv, "nanogpt export", __doc__ or "")
    path, ckpt = load_model_checkpoint(o.out_dir, o.ckpt if "ckpt" in explicit else None)
    dest = Path(o.to)
    spec = ckpt.get("tokenizer", {"kind": "gpt2"})
    check_export(dest)  # refusals that need no model (no transformers, an unusable --to) come before building it
    model = model_from_checkpoint(ckpt)
    files = export_hf(model, spec, dest)
    print(f"exported {path} (iteration {ckpt.get('iter_num', '?')}) to {dest}:")
    for f in files:
        print(f"  {f.name:<28} {f.stat().st_size:>14,} bytes")
    print("\nload it with transformers and generate:\n")
    print(usage_snippet(dest, spec, model.config.block_size))


if __name__ == "__main__":
    run_main(main)
