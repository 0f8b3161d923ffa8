"""The `nanogpt` command: one entry point with a subcommand per script.

nanogpt prepare shakespeare_char
nanogpt train config/train_shakespeare_char.py --device=cpu --compile=False
nanogpt sample --out_dir=out-shakespeare-char
nanogpt serve --out_dir=out-shakespeare-char
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from nanogpt.errors import run_main

# subcommand -> (module with main(argv), one-line description)
COMMANDS = {
    "prepare": ("nanogpt.prepare", "tokenize a text corpus into train.bin / val.bin / meta.json"),
    "train": ("nanogpt.train", "train or finetune a model (torchrun for several GPUs/processes)"),
    "sample": ("nanogpt.sample", "generate text from a checkpoint or from OpenAI's GPT-2"),
    "bench": ("nanogpt.bench", "measure training and generation speed"),
    "eval": ("nanogpt.evaluate", "loss, perplexity and bits per character/byte of a model on a text"),
    "plot": ("nanogpt.plot", "loss curves of one or several runs as a PNG"),
    "serve": ("nanogpt.serve", "a playground page and an OpenAI-compatible API for a model"),
    "consolidate": ("nanogpt.consolidate", "write an --fsdp run's sharded checkpoints as ckpt.pt / interrupt.pt"),
    "export": ("nanogpt.export", "write a checkpoint as a Hugging Face GPT-2 folder"),
    "openwebtext": ("nanogpt.openwebtext", "download and tokenize OpenWebText with Hugging Face datasets"),
}


def usage() -> str:
    lines = ["usage: nanogpt COMMAND [options]   (nanogpt COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<12} {desc}" for name, (_, desc) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    if argv[0] not in COMMANDS:
        print(f"error: unknown command '{argv[0]}'.\n\n{usage()}", file=sys.stderr)
        raise SystemExit(2)
    module = importlib.import_module(COMMANDS[argv[0]][0])
    run_main(module.main, argv[1:])


if __name__ == "__main__":
    main()
