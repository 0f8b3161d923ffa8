"""Turn a text file into `train.bin`, `val.bin` (uint16 token ids) and `meta.json` (the tokenizer).

    nanogpt prepare shakespeare_char          # characters; what data/shakespeare_char/prepare.py runs
    nanogpt prepare shakespeare               # GPT-2 BPE tokens; data/shakespeare/prepare.py
    nanogpt prepare mybook --input=book.txt --tokenizer=char

The text is `input.txt` in the dataset folder when present, else `--input`, else (for the two
Shakespeare datasets) tiny Shakespeare downloaded from its public URL and checked by sha256.
The first 90% of the text is the training split, the rest validation, as in nanoGPT.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nanogpt.atomic import atomic_open, atomic_write_bytes
from nanogpt.config import option, parse_args
from nanogpt.errors import UserError, run_main
from nanogpt.tokenizer import CharTokenizer, GPT2Tokenizer, Tokenizer

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
KNOWN_TOKENIZERS = {"shakespeare_char": "char", "shakespeare": "gpt2"}
BIN_DTYPE = np.uint16  # every vocabulary here has at most 65,536 tokens


@dataclass
class PrepareOptions:
    dataset: str = option("shakespeare_char", "dataset name; files go to <data_dir> (default data/<dataset>)")
    data_dir: str = option("", "folder for input.txt, train.bin, val.bin and meta.json; default data/<dataset>")
    input: str = option("", "text file to use instead of <data_dir>/input.txt (any UTF-8 text)")
    tokenizer: str = option("", "'char' or 'gpt2'; default char for shakespeare_char, gpt2 for shakespeare")
    val_fraction: float = option(0.1, "fraction of the text, taken from its end, used for validation")
    download_timeout: float = option(30.0, "seconds to wait for the network when downloading tiny Shakespeare")

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise UserError(f"--val_fraction must be between 0 and 1, got {self.val_fraction}.")
        if self.tokenizer not in ("", "char", "gpt2"):
            raise UserError(f"--tokenizer must be 'char' or 'gpt2', got {self.tokenizer!r}.")


def download(url: str, dest: Path, sha256: str, timeout: float) -> None:
    """Download url to dest with a progress bar, checking the sha256; atomic, so no partial file stays."""
    from tqdm import tqdm

    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, atomic_open(dest) as out:
            total = int(resp.headers.get("Content-Length") or 0) or None
            digest = hashlib.sha256()
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {dest.name}") as bar:
                while chunk := resp.read(1 << 16):
                    digest.update(chunk)
                    out.write(chunk)
                    bar.update(len(chunk))
            if digest.hexdigest() != sha256:
                raise UserError(f"the file downloaded from {url} has the wrong sha256; try again later.")
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise UserError(
            f"could not download {url} ({reason}). If this machine is offline, put the text file at {dest} "
            f"yourself, or pass --input=PATH to use any UTF-8 text file."
        ) from None


def read_corpus(path: Path) -> str:
    """Read a UTF-8 text file, refusing missing, empty or binary files with a useful message."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"input file {path} does not exist. Pass --input=PATH to a UTF-8 text file.") from None
    except OSError as e:
        raise UserError(f"cannot read input file {path}: {e.strerror}.") from None
    if not raw.strip():
        raise UserError(f"input file {path} is empty. Put some UTF-8 text in it (a book works well).")
    if b"\x00" in raw:
        raise UserError(f"input file {path} looks like a binary file (it contains NUL bytes); use a text file.")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(
            f"input file {path} is not valid UTF-8 (bad byte at offset {e.start}). Re-save it as UTF-8, e.g. "
            f"'iconv -f latin1 -t utf-8 {path.name} > input.txt'."
        ) from None


def write_tokens(path: Path, ids: Sequence[int]) -> None:
    with atomic_open(path) as f:
        f.write(np.asarray(ids, dtype=BIN_DTYPE).tobytes())


def make_data_dir(data_dir: Path) -> None:
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(
            f"cannot create the data folder {data_dir} ({e.strerror or e}). Choose another --data_dir."
        ) from None


def find_input(opts: PrepareOptions, data_dir: Path) -> Path:
    if opts.input:
        return Path(opts.input)
    local = data_dir / "input.txt"
    if local.exists() or opts.dataset not in KNOWN_TOKENIZERS:
        return local
    make_data_dir(data_dir)
    download(SHAKESPEARE_URL, local, SHAKESPEARE_SHA256, opts.download_timeout)
    return local


def prepare(opts: PrepareOptions) -> dict:
    """Tokenize the corpus and write the dataset files; returns what meta.json holds."""
    data_dir = Path(opts.data_dir or Path("data") / opts.dataset)
    kind = opts.tokenizer or KNOWN_TOKENIZERS.get(opts.dataset)
    if kind is None:
        raise UserError(f"dataset '{opts.dataset}' is not a known one; choose --tokenizer=char or --tokenizer=gpt2.")
    text = read_corpus(find_input(opts, data_dir))
    print(f"length of dataset in characters: {len(text):,}")
    tok: Tokenizer
    if kind == "char":
        tok = CharTokenizer.from_text(text)
        if tok.vocab_size > np.iinfo(BIN_DTYPE).max + 1:
            raise UserError(f"the text has {tok.vocab_size:,} distinct characters, more than uint16 holds; use gpt2.")
        print("all the unique characters:", "".join(tok.chars))
        print(f"vocab size: {tok.vocab_size:,}")
    else:
        tok = GPT2Tokenizer()
    n = len(text)
    split = int(n * (1 - opts.val_fraction))
    encode = tok.encode_ordinary if isinstance(tok, GPT2Tokenizer) else tok.encode
    train_ids, val_ids = encode(text[:split]), encode(text[split:])
    if len(train_ids) < 2 or len(val_ids) < 2:
        raise UserError(f"the text is too short to split ({len(text)} characters); use a longer text.")
    print(f"train has {len(train_ids):,} tokens")
    print(f"val has {len(val_ids):,} tokens")
    make_data_dir(data_dir)
    if not shutil.disk_usage(data_dir).free > 2 * (len(train_ids) + len(val_ids)) + (1 << 20):
        raise UserError(f"not enough free disk space in {data_dir} for the token files.")
    meta = {
        "vocab_size": tok.vocab_size,
        "tokenizer": tok.spec(),
        "dtype": "uint16",
        "train_tokens": len(train_ids),
        "val_tokens": len(val_ids),
    }
    try:
        write_tokens(data_dir / "train.bin", train_ids)
        write_tokens(data_dir / "val.bin", val_ids)
        atomic_write_bytes(data_dir / "meta.json", json.dumps(meta, ensure_ascii=False, indent=1).encode("utf-8"))
    except OSError as e:
        raise UserError(f"could not write the dataset files in {data_dir} ({e.strerror or e}).") from None
    print(f"wrote {data_dir / 'train.bin'}, {data_dir / 'val.bin'} and {data_dir / 'meta.json'}")
    return meta


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-"):  # `nanogpt prepare NAME ...`
        argv[0] = f"--dataset={argv[0]}"
    opts, _ = parse_args(PrepareOptions, argv, "nanogpt prepare", __doc__ or "")
    prepare(opts)


if __name__ == "__main__":
    run_main(main)
