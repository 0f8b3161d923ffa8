"""How well a model predicts a text: mean loss, perplexity, and bits per character or per byte.

    nanogpt eval --out_dir=out-shakespeare-char                  # the val split of the run's dataset
    nanogpt eval --out_dir=out-shakespeare-char --text=book.txt  # any UTF-8 text
    nanogpt eval --init_from=gpt2 --text=book.txt                # OpenAI's GPT-2 (or a HF folder)

The tokens are cut into consecutive windows of block_size; every token after the first is predicted
once, from the tokens before it in its window. Loss is the mean cross-entropy in nats per token and
perplexity its exponential. Both depend on the tokenizer, so they compare models that share one. Bits
per byte divide the total information by the UTF-8 bytes of the predicted text, so models with
different tokenizers compare (a character model of ASCII text has one byte per token: its bits per
byte are its bits per character, also printed).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from nanogpt.config import device_option, dtype_option, init_from_option, option, out_dir_option, parse_args
from nanogpt.data import SPLITS, max_token_id, read_meta
from nanogpt.device import autocast, enable_tf32, resolve_device, resolve_dtype
from nanogpt.errors import UserError, run_main
from nanogpt.inference import load_inference_model
from nanogpt.model import GPT
from nanogpt.sample import read_text_file
from nanogpt.tokenizer import CharTokenizer, Tokenizer


@dataclass
class EvalOptions:
    init_from: str = init_from_option()
    out_dir: str = out_dir_option("folder holding ckpt.pt (init_from=resume)")
    text: str = option("", "a UTF-8 text file to evaluate on; empty: --split of the dataset")
    split: str = option("val", "train or val: the prepared split to evaluate on when no --text is given")
    data_dir: str = option("", "the prepared dataset of --split; default: the one the checkpoint was trained on")
    max_tokens: int = option(0, "evaluate on the first this many tokens only (0: all)")
    batch_size: int = option(8, "windows per forward pass")
    device: str = device_option()
    dtype: str = dtype_option()

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise UserError(f"--split must be train or val, got {self.split!r}.")
        if self.max_tokens < 0 or self.batch_size < 1:
            raise UserError("--max_tokens must be at least 0 and --batch_size at least 1.")


@dataclass
class Evaluation:
    tokens: int  # tokens predicted
    bytes: int  # UTF-8 bytes of the predicted text
    nats: float  # total cross-entropy

    @property
    def loss(self) -> float:
        return self.nats / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def bits_per_byte(self) -> float:
        return self.nats / math.log(2) / self.bytes

    @property
    def bits_per_token(self) -> float:
        return self.loss / math.log(2)


@torch.no_grad()
def evaluate_tokens(model: GPT, ids: np.ndarray, tok: Tokenizer, batch_size: int, device: str, ctx) -> Evaluation:
    """Total cross-entropy of `ids` (1-D, any integer dtype, a memory map is fine) under `model`, window by
    window of block_size (see the module doc)."""
    T = model.config.block_size
    if len(ids) < 2:
        raise UserError("the text is too short to evaluate: it needs at least 2 tokens.")
    starts = range(0, len(ids) - 1, T)
    full = [s for s in starts if s + T + 1 <= len(ids)]
    batches = [full[i : i + batch_size] for i in range(0, len(full), batch_size)]
    batches += [[s] for s in starts if s + T + 1 > len(ids)]  # the last, shorter window (if any) on its own
    nats, n_bytes = 0.0, 0
    for batch in tqdm(batches, unit="batch", leave=False, disable=None):
        n = min(T, len(ids) - 1 - batch[0])
        windows = torch.from_numpy(np.stack([ids[s : s + n + 1] for s in batch]).astype(np.int64))
        x, y = windows[:, :-1].to(device), windows[:, 1:].to(device)
        with ctx:
            logits, _ = model(x, y)
        nats += F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum").item()
        n_bytes += len(tok.decode_bytes(windows[:, 1:].flatten().tolist()))  # a token's bytes don't depend on context
    return Evaluation(tokens=len(ids) - 1, bytes=n_bytes, nats=nats)


def read_split(path: Path, vocab_size: int) -> np.ndarray:
    """A prepared split's token ids (a memory map), checked as training checks them: whole uint16 tokens,
    every id inside the model's vocabulary (the scan is cached beside the split, see data.max_token_id)."""
    size = path.stat().st_size
    if size % 2:
        raise UserError(f"{path} has an odd size ({size} bytes), so it is truncated. Run prepare again.")
    if size == 0:  # NumPy cannot map an empty file
        return np.zeros(0, dtype=np.uint16)
    ids = np.memmap(path, dtype=np.uint16, mode="r")
    top = max_token_id(path, ids)
    if top >= vocab_size:
        raise UserError(
            f"{path} contains token id {top}, but the model's vocabulary has {vocab_size} tokens. The dataset "
            "and the model's tokenizer do not match; prepare the data again or give --data_dir or --text=FILE."
        )
    return ids


def check_length(ids: np.ndarray, where: str, o: EvalOptions) -> None:
    """Every token after the first is predicted, so at least 2 are needed, in the text and after --max_tokens."""
    if len(ids) < 2:
        fix = "Give a longer text." if o.text else "Prepare the dataset again from a longer text, or give --text=FILE."
        raise UserError(
            f"{where} holds {len(ids)} token{'' if len(ids) == 1 else 's'}, too few to evaluate on: every token "
            f"after the first is predicted from the ones before it, so eval needs at least 2. {fix}"
        )
    if o.max_tokens == 1:
        raise UserError("--max_tokens=1 leaves 1 token, too few: eval needs at least 2 (--max_tokens=0: all).")


def load_ids(o: EvalOptions, tok: Tokenizer, trained_with: dict, vocab_size: int) -> tuple[np.ndarray, str]:
    """The token ids to evaluate on and a description of where they came from; trained_with: the
    checkpoint's training options, whose dataset --split refers to."""
    if o.text:
        text = read_text_file(Path(o.text), f"--text={o.text}", "text file")
        ids = np.array(tok.encode(text), dtype=np.int64)
        where = o.text
    else:
        data_dir = Path(o.data_dir) if o.data_dir else None
        if data_dir is None and o.init_from == "resume":
            data_dir = Path(trained_with.get("data_dir") or Path("data") / trained_with.get("dataset", "openwebtext"))
        if data_dir is None:
            raise UserError(f"--init_from={o.init_from} has no dataset of its own: give --text=FILE or --data_dir.")
        path = data_dir / f"{o.split}.bin"
        if not path.exists():
            raise UserError(f"{path} does not exist. Prepare the dataset, or give --text=FILE or --data_dir.")
        spec = read_meta(data_dir)["tokenizer"]
        if spec != tok.spec():
            raise UserError(
                f"{data_dir} was tokenized with a different tokenizer ({spec.get('kind')}) than the model's "
                f"({tok.spec().get('kind')}), so its token ids mean nothing to the model. Use --text=FILE instead."
            )
        ids = read_split(path, vocab_size)
        where = str(path)
    check_length(ids, where, o)
    return (ids[: o.max_tokens] if o.max_tokens else ids), where


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    o, _ = parse_args(EvalOptions, argv, "nanogpt eval", __doc__ or "")
    device = resolve_device(o.device)
    dtype = resolve_dtype(o.dtype, device)
    enable_tf32(device)
    model, tok, source, trained_with = load_inference_model(o.init_from, o.out_dir)
    model.eval().to(device)
    ids, where = load_ids(o, tok, trained_with, model.config.vocab_size)
    r = evaluate_tokens(model, ids, tok, o.batch_size, device, autocast(device, dtype))
    print(f"model: {source}")
    print(f"text: {where}: {r.tokens:,} tokens predicted, {r.bytes:,} bytes")
    print(f"loss: {r.loss:.4f} nats per token")
    print(f"perplexity: {r.perplexity:.3f}")
    if isinstance(tok, CharTokenizer):
        print(f"bits per character: {r.bits_per_token:.4f}")
    print(f"bits per byte: {r.bits_per_byte:.4f}")


if __name__ == "__main__":
    run_main(main)
