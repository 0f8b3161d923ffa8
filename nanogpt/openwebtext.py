"""OpenWebText (Gokaslan & Cohen 2019) tokenized with GPT-2's BPE into train.bin / val.bin.

    python data/openwebtext/prepare.py            # ~54 GB of Hugging Face cache, ~17 GB of .bin files
    nanogpt openwebtext --num_proc=16

Every document is followed by <|endoftext|> (50256), as in GPT-2's training data. 0.05% of the
documents (seeded shuffle) form the validation split. The result is about 9B training tokens
(train.bin ~17 GB) and 4M validation tokens, the figures nanoGPT reports.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nanogpt.atomic import atomic_open
from nanogpt.config import option, parse_args
from nanogpt.errors import UserError, run_main
from nanogpt.tokenizer import GPT2_EOT, GPT2Tokenizer


@dataclass
class OpenWebTextOptions:
    data_dir: str = option("data/openwebtext", "folder for train.bin and val.bin")
    dataset: str = option("openwebtext", "Hugging Face dataset to load (any with a 'text' column)")
    num_proc: int = option(max(1, (os.cpu_count() or 2) // 2), "processes for tokenization and loading")
    val_fraction: float = option(0.0005, "fraction of documents held out for validation")
    seed: int = option(2357, "seed of the shuffle that picks the validation documents")
    shards: int = option(1024, "write each split in this many chunks (bounds memory use)")

    def __post_init__(self) -> None:
        if self.num_proc < 1 or self.shards < 1:
            raise UserError("--num_proc and --shards must be at least 1.")
        if not 0.0 < self.val_fraction < 1.0:
            raise UserError(f"--val_fraction must be between 0 and 1, got {self.val_fraction}.")


def tokenize(example: dict) -> dict:
    """GPT-2 tokens of one document, <|endoftext|> appended (special tokens in the text stay plain text)."""
    ids = GPT2Tokenizer().encode_ordinary(example["text"])
    ids.append(GPT2_EOT)
    return {"ids": ids, "len": len(ids)}


def split_dataset(dataset, val_fraction: float, seed: int):
    """A DatasetDict with 'train' and 'val' from a dataset's single 'train' split."""
    split = dataset.train_test_split(test_size=val_fraction, seed=seed, shuffle=True)
    split["val"] = split.pop("test")
    return split


def write_split(tokenized, path: Path, shards: int) -> int:
    """Concatenate a tokenized split's 'ids' into a uint16 file, chunk by chunk; returns the token count.
    The file is written atomically (atomic.py): only a complete file ever takes the final name."""
    from tqdm import tqdm

    total = 0
    shards = max(1, min(shards, len(tokenized)))
    with atomic_open(path) as f:
        for i in tqdm(range(shards), desc=f"writing {path.name}"):
            chunk = tokenized.shard(num_shards=shards, index=i, contiguous=True).with_format("numpy")
            if len(chunk):
                ids = np.concatenate(chunk["ids"]).astype(np.uint16)
                f.write(ids.tobytes())
                total += len(ids)
    return total


def prepare_openwebtext(dataset, o: OpenWebTextOptions) -> dict[str, int]:
    """Split, tokenize and write a datasets.Dataset (the 'train' split of OpenWebText, or any text dataset)."""
    splits = split_dataset(dataset, o.val_fraction, o.seed)
    tokenized = splits.map(tokenize, remove_columns=["text"], desc="tokenizing", num_proc=o.num_proc)
    out = Path(o.data_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, part in tokenized.items():
        counts[name] = write_split(part, out / f"{name}.bin", o.shards)
        print(f"{name} has {counts[name]:,} tokens")
    return counts


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    o, _ = parse_args(OpenWebTextOptions, argv, "nanogpt openwebtext", __doc__ or "")
    try:
        import datasets
    except ImportError:
        raise UserError("preparing OpenWebText needs Hugging Face datasets: pip install 'nanogpt[owt]'.") from None
    try:
        dataset = datasets.load_dataset(o.dataset, num_proc=o.num_proc, split="train")
    except (OSError, ConnectionError, datasets.exceptions.DatasetNotFoundError) as e:
        raise UserError(
            f"could not load the dataset '{o.dataset}' from the Hugging Face hub ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:160] if str(e) else ''}). It needs internet access and ~54 GB of disk "
            "in the Hugging Face cache (set HF_HOME to put it elsewhere)."
        ) from None
    prepare_openwebtext(dataset, o)


if __name__ == "__main__":
    run_main(main)
