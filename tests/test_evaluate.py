"""nanogpt eval: loss, perplexity, bits per character and per byte, on a text or a prepared split."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nanogpt.checkpoint import load_checkpoint, save_checkpoint
from nanogpt.device import autocast
from nanogpt.errors import UserError
from nanogpt.evaluate import evaluate_tokens, main
from nanogpt.model import GPT, GPTConfig
from nanogpt.tokenizer import CharTokenizer, GPT2Tokenizer

CTX = autocast("cpu", "float32")


def char_model(vocab: int, block_size: int = 16, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab, block_size=block_size, n_layer=2, n_head=2, n_embd=32)).eval()


def reference_nats(model: GPT, ids: list[int]) -> float:
    """Token by token: the log-probability of ids[i] given the tokens since the start of its window."""
    T, total = model.config.block_size, 0.0
    with torch.no_grad():
        for i in range(1, len(ids)):
            start = (i - 1) // T * T  # the window that predicts position i
            logits, _ = model(torch.tensor([ids[start:i]]))  # the last position's logits only
            total -= torch.log_softmax(logits[0, -1].double(), -1)[ids[i]].item()
    return total


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_total_loss_equals_token_by_token_reference(batch_size):
    tok = CharTokenizer(list("abcdefgh é\n"))
    text = "abc défg hé\nabba cede fg " * 3  # 77 characters: 4 full windows of 16 and a short one
    ids = tok.encode(text)
    model = char_model(tok.vocab_size)
    r = evaluate_tokens(model, np.array(ids), tok, batch_size, "cpu", CTX)
    assert r.tokens == len(ids) - 1
    assert r.nats == pytest.approx(reference_nats(model, ids), rel=1e-5)
    assert r.bytes == len(text[1:].encode())  # é takes two bytes
    assert r.bits_per_byte == pytest.approx(r.nats / math.log(2) / r.bytes)
    assert r.bits_per_byte < r.bits_per_token  # more bytes than characters
    assert r.perplexity == pytest.approx(math.exp(r.nats / r.tokens))


def test_one_window_equals_the_models_own_loss():
    tok = CharTokenizer(list("abcd"))
    ids = tok.encode("abcdabca")
    model = char_model(4, block_size=32)
    x, y = torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])
    _, loss = model(x, y)
    assert evaluate_tokens(model, np.array(ids), tok, 8, "cpu", CTX).loss == pytest.approx(loss.item(), rel=1e-6)


def test_bits_per_byte_normalise_gpt2_tokens_by_utf8_bytes():
    tok = GPT2Tokenizer()
    text = "Naïve café owners sell crème brûlée, 7 days a week."
    ids = tok.encode(text)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50304, block_size=8, n_layer=1, n_head=2, n_embd=16)).eval()
    r = evaluate_tokens(model, np.array(ids), tok, 4, "cpu", CTX)
    assert r.tokens == len(ids) - 1 < len(text)
    assert r.bytes == len(text.encode()) - len(tok.decode_bytes(ids[:1]))  # the first token is never predicted
    assert r.nats == pytest.approx(reference_nats(model, ids), rel=1e-5)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_under_cpu_autocast(dtype):
    tok = CharTokenizer(list("abcd"))
    ids = np.array(tok.encode("abcdabcaddcbabcd" * 4))
    model = char_model(4)
    exact = evaluate_tokens(model, ids, tok, 4, "cpu", CTX)
    low = evaluate_tokens(model, ids, tok, 4, "cpu", autocast("cpu", dtype))
    assert low.loss == pytest.approx(exact.loss, rel=2e-2)


def test_eval_command_on_a_trained_run(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    """The val split the run was trained on, and any text file: same model, figures that agree."""
    ckpt = load_checkpoint(tiny_checkpoint / "ckpt.pt")
    data_dir = Path(ckpt["config"]["data_dir"])
    main([f"--out_dir={tiny_checkpoint}", "--device=cpu"])
    out = capsys.readouterr().out
    loss = float(re.search(r"^loss: ([\d.]+) nats per token$", out, re.M)[1])
    bpc = float(re.search(r"^bits per character: ([\d.]+)$", out, re.M)[1])
    assert f"text: {data_dir / 'val.bin'}" in out
    assert bpc == pytest.approx(loss / math.log(2), abs=1e-4)
    val = np.memmap(data_dir / "val.bin", dtype=np.uint16, mode="r")
    assert f"{len(val) - 1:,} tokens predicted" in out
    # the same tokens given as text give the same loss
    tok = CharTokenizer(ckpt["tokenizer"]["chars"])
    (tmp_path / "val.txt").write_text(tok.decode(val.tolist()), encoding="utf-8")
    main([f"--out_dir={tiny_checkpoint}", f"--text={tmp_path / 'val.txt'}", "--device=cpu", "--batch_size=3"])
    assert float(re.search(r"^loss: ([\d.]+)", capsys.readouterr().out, re.M)[1]) == pytest.approx(loss, abs=2e-4)
    # --max_tokens evaluates a prefix
    main([f"--out_dir={tiny_checkpoint}", "--device=cpu", "--max_tokens=100"])
    assert "99 tokens predicted" in capsys.readouterr().out


def test_hf_folder_loss_equals_transformers(tmp_path, capsys):
    """A Hugging Face GPT-2 folder (--init_from): the loss equals the one computed from transformers' logits."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=16, vocab_size=50257)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    hf.save_pretrained(str(tmp_path / "tiny-gpt2"))
    text = "The quick brown fox jumps over the lazy dog. " * 4
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    main([f"--init_from={tmp_path / 'tiny-gpt2'}", f"--text={tmp_path / 't.txt'}", "--device=cpu"])
    out = capsys.readouterr().out
    ids = GPT2Tokenizer().encode(text)
    nats = 0.0
    with torch.no_grad():
        for s in range(0, len(ids) - 1, 16):
            window = torch.tensor([ids[s : s + 17]])
            logits = hf(window[:, :-1]).logits
            nats += F.cross_entropy(logits[0], window[0, 1:], reduction="sum").item()
    assert float(re.search(r"^loss: ([\d.]+)", out, re.M)[1]) == pytest.approx(nats / (len(ids) - 1), abs=1e-4)
    assert "bits per byte" in out and "bits per character" not in out


def test_bad_input_says_what_to_do(tiny_checkpoint, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        main([f"--out_dir={tiny_checkpoint}", f"--text={tmp_path / 'missing.txt'}", "--device=cpu"])
    (tmp_path / "x.txt").write_text("\u263a\u263a\u263a", encoding="utf-8")  # not in the character vocabulary
    with pytest.raises(UserError, match="not in the model's vocabulary"):
        main([f"--out_dir={tiny_checkpoint}", f"--text={tmp_path / 'x.txt'}", "--device=cpu"])
    with pytest.raises(UserError, match="--split must be train or val"):
        main([f"--out_dir={tiny_checkpoint}", "--split=test"])
    # a char model on a dataset of GPT-2 tokens: the ids would mean nothing
    gpt2_data = tmp_path / "gpt2data"
    gpt2_data.mkdir()
    np.arange(100, dtype=np.uint16).tofile(gpt2_data / "val.bin")
    with pytest.raises(UserError, match="different tokenizer"):
        main([f"--out_dir={tiny_checkpoint}", f"--data_dir={gpt2_data}", "--device=cpu"])
    # a checkpoint whose dataset folder is gone
    ckpt = load_checkpoint(tiny_checkpoint / "ckpt.pt")
    ckpt["config"]["data_dir"] = str(tmp_path / "gone")
    (tmp_path / "moved").mkdir()
    save_checkpoint(tmp_path / "moved" / "ckpt.pt", ckpt)
    with pytest.raises(UserError, match="--text=FILE or --data_dir"):
        main([f"--out_dir={tmp_path / 'moved'}", "--device=cpu"])
