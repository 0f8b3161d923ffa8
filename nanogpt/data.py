"""Training batches from the uint16 token files written by prepare: read third, with optim.py, after
model.py and train.py (`TokenBatches.get_batch` is nanoGPT's get_batch; the README's "Read the code").

Each split is opened once as a numpy memory map; a batch is one vectorised gather of
`batch_size` random windows of block_size + 1 tokens (inputs and the targets shifted by one).
Randomness comes from a dedicated torch.Generator whose state goes into checkpoints, so a
resumed run draws exactly the batches an uninterrupted run would have drawn.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from nanogpt.errors import UserError

SPLITS = ("train", "val")


def read_meta(data_dir: Path) -> dict:
    """meta.json of a prepared dataset. A folder without one holds GPT-2 tokens (as nanoGPT's openwebtext);
    its vocab_size is then None and models use GPT-2's vocabulary padded to 50304."""
    path = data_dir / "meta.json"
    if not path.exists():
        return {"vocab_size": None, "tokenizer": {"kind": "gpt2"}}
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is damaged ({e}). Run the dataset's prepare.py again.") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("vocab_size"), int) or "tokenizer" not in meta:
        raise UserError(f"{path} is missing 'vocab_size' or 'tokenizer'. Run the dataset's prepare.py again.")
    spec = meta["tokenizer"]
    kind = spec.get("kind") if isinstance(spec, dict) else None
    chars = spec.get("chars") if kind == "char" else None
    valid = kind == "gpt2" or (
        isinstance(chars, list) and len(chars) == meta["vocab_size"] and len(set(map(str, chars))) == len(chars)
    )
    if not valid:
        raise UserError(
            f"{path} is damaged: its 'tokenizer' entry does not describe a {meta['vocab_size']}-token vocabulary. "
            "Run the dataset's prepare.py again."
        )
    return meta


def max_token_id(path: Path, data: np.ndarray, chunk: int = 1 << 24) -> int:
    """The largest token id in a split, over every token: a max over the memory map in chunks of 32 MB
    (seconds for OpenWebText's 9B tokens), remembered in a hidden file beside the split, keyed by the
    file's size and modification time, so later runs on the same file skip the scan."""
    stat = path.stat()
    key = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    cache = path.with_name(f".{path.name}.max_id.json")
    try:
        saved = json.loads(cache.read_text())
        if {k: saved.get(k) for k in key} == key and isinstance(saved.get("max_id"), int):
            return saved["max_id"]
    except (OSError, ValueError):
        pass  # no cache yet, or an unreadable one: scan
    top = max(int(data[i : i + chunk].max()) for i in range(0, len(data), chunk))
    try:
        cache.write_text(json.dumps({**key, "max_id": top}))
    except OSError:
        pass  # a read-only data folder: scan again next time
    return top


class TokenBatches:
    """Random (x, y) batches from `<data_dir>/train.bin` and `val.bin`."""

    def __init__(self, data_dir: str | Path, block_size: int, vocab_size: int | None = None):
        self.data_dir = Path(data_dir)
        self.block_size = block_size
        self.data: dict[str, np.ndarray] = {}
        for split in SPLITS:
            path = self.data_dir / f"{split}.bin"
            if not path.exists():
                raise UserError(
                    f"{path} does not exist. Prepare the dataset first, e.g. "
                    f"'python {self.data_dir / 'prepare.py'}' or 'nanogpt prepare {self.data_dir.name}'."
                )
            size = path.stat().st_size
            if size % 2:
                raise UserError(f"{path} has an odd size ({size} bytes), so it is truncated. Run prepare again.")
            if size // 2 < block_size + 1:
                raise UserError(
                    f"{path} holds {size // 2} tokens, too few for block_size={block_size} (a sample needs "
                    f"block_size + 1 tokens). Use a longer text or a smaller --block_size."
                )
            self.data[split] = np.memmap(path, dtype=np.uint16, mode="r")
        self._offsets = np.arange(block_size + 1)
        if vocab_size is not None:
            self.check_vocab(vocab_size)

    def check_vocab(self, vocab_size: int) -> None:
        """Token ids beyond the model's vocabulary mean the data and model don't belong together."""
        for split, data in self.data.items():
            top = max_token_id(self.data_dir / f"{split}.bin", data)
            if top >= vocab_size:
                raise UserError(
                    f"{self.data_dir / (split + '.bin')} contains token id {top}, but the model's vocabulary has "
                    f"{vocab_size} tokens. The dataset and the model's tokenizer do not match; prepare the data "
                    "again or pick the matching dataset."
                )

    def tokens(self, split: str) -> int:
        return len(self.data[split])

    def get_batch(
        self, split: str, batch_size: int, generator: torch.Generator, device: str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """batch_size random windows of the split: inputs x (B, T) and targets y (B, T), y being x shifted by
        one token, so every position learns to predict the token after it."""
        data = self.data[split]
        ix = torch.randint(len(data) - self.block_size, (batch_size,), generator=generator).numpy()
        windows = torch.from_numpy(data[ix[:, None] + self._offsets].astype(np.int64))  # (B, T + 1)
        x, y = windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
        if device.startswith("cuda"):
            # pinned memory lets the copy run asynchronously while the GPU works on the previous step
            x = x.pin_memory().to(device, non_blocking=True)
            y = y.pin_memory().to(device, non_blocking=True)
        elif device != "cpu":
            x, y = x.to(device), y.to(device)
        return x, y
