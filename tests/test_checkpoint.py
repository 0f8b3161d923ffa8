"""nanogpt.checkpoint: round trips, prefix stripping, damaged files and crash-safe saving."""

from __future__ import annotations

import os
import random

import pytest
import torch

from nanogpt.checkpoint import (
    FORMAT_VERSION,
    load_checkpoint,
    load_resume_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
    strip_prefixes,
    tokenizer_from_checkpoint,
)
from nanogpt.errors import UserError
from nanogpt.model import GPT, GPTConfig
from nanogpt.tokenizer import CharTokenizer, GPT2Tokenizer

CHARS = list("\n !,.:?ABCabcdefghijklmnopqrstuvwxyz")


def make_ckpt(seed: int = 0, iter_num: int = 7) -> dict:
    torch.manual_seed(seed)
    cfg = GPTConfig(block_size=16, vocab_size=len(CHARS), n_layer=2, n_head=2, n_embd=16, bias=False)
    model = GPT(cfg)
    return {
        "model_args": cfg.to_dict(),
        "model": model.state_dict(),
        "tokenizer": {"kind": "char", "chars": CHARS},
        "config": {"n_layer": 2, "dataset": "tiny"},
        "iter_num": iter_num,
        "best_val_loss": 1.5,
    }


def assert_same_weights(model: GPT, state: dict) -> None:
    got = model.state_dict()
    assert set(got) == set(strip_prefixes(state))
    for k, v in strip_prefixes(state).items():
        assert torch.equal(got[k], v), k


def test_round_trip(tmp_path):
    ckpt = make_ckpt()
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, ckpt)
    loaded = load_checkpoint(path)
    assert loaded["format_version"] == FORMAT_VERSION
    assert loaded["iter_num"] == 7 and loaded["best_val_loss"] == 1.5
    assert loaded["config"] == {"n_layer": 2, "dataset": "tiny"}
    model = model_from_checkpoint(loaded)
    assert model.config == GPTConfig(**ckpt["model_args"])
    assert_same_weights(model, ckpt["model"])
    assert model.transformer.wte.weight is model.lm_head.weight  # tying survives loading
    tok = tokenizer_from_checkpoint(loaded)
    assert isinstance(tok, CharTokenizer) and tok.chars == CHARS
    assert tok.decode(tok.encode("hello, world!")) == "hello, world!"
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"]


def test_loaded_model_computes_the_same_outputs(tmp_path):
    ckpt = make_ckpt(seed=3)
    original = GPT(GPTConfig(**ckpt["model_args"]))
    original.load_state_dict(ckpt["model"])
    save_checkpoint(tmp_path / "c.pt", ckpt)
    restored = model_from_checkpoint(load_checkpoint(tmp_path / "c.pt"))
    idx = torch.randint(len(CHARS), (2, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(restored.eval()(idx, idx)[0], original.eval()(idx, idx)[0], rtol=0, atol=0)


def test_dropout_override(tmp_path):
    save_checkpoint(tmp_path / "c.pt", make_ckpt())
    model = model_from_checkpoint(load_checkpoint(tmp_path / "c.pt"), dropout=0.1)
    assert model.config.dropout == 0.1


@pytest.mark.parametrize("prefix", ["_orig_mod.", "module.", "module._orig_mod.", "_orig_mod._orig_mod."])
def test_compiled_or_ddp_prefixes_are_stripped(tmp_path, prefix):
    ckpt = make_ckpt(seed=1)
    plain = ckpt["model"]
    ckpt["model"] = {prefix + k: v for k, v in plain.items()}  # as a torch.compile'd / DDP model saves them
    save_checkpoint(tmp_path / "c.pt", ckpt)
    model = model_from_checkpoint(load_checkpoint(tmp_path / "c.pt"))
    assert_same_weights(model, plain)


def test_strip_prefixes_only_touches_leading_prefixes():
    state = {"_orig_mod.transformer.h.0.attn.c_attn.weight": 1, "transformer.module.x": 2}
    assert strip_prefixes(state) == {"transformer.h.0.attn.c_attn.weight": 1, "transformer.module.x": 2}


def test_nanogpt_checkpoint_without_format_version(tmp_path):
    """A checkpoint from Karpathy's nanoGPT (GPT-2 vocabulary): compiled prefixes, no tokenizer, no format_version."""
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=8, vocab_size=50304, n_layer=1, n_head=2, n_embd=8)
    plain = GPT(cfg).state_dict()
    legacy = {
        "model": {"_orig_mod." + k: v for k, v in plain.items()},
        "model_args": {**cfg.to_dict(), "unknown_old_arg": 1},
        "iter_num": 5000,
        "best_val_loss": torch.tensor(1.47),
        "config": {"dataset": "openwebtext"},
    }
    torch.save(legacy, tmp_path / "old.pt")
    loaded = load_checkpoint(tmp_path / "old.pt")
    assert loaded["format_version"] == FORMAT_VERSION
    assert "unknown_old_arg" not in loaded["model_args"]
    assert_same_weights(model_from_checkpoint(loaded), plain)
    assert isinstance(tokenizer_from_checkpoint(loaded), GPT2Tokenizer)


def test_newer_format_is_refused(tmp_path):
    ckpt = make_ckpt()
    torch.save({**ckpt, "format_version": FORMAT_VERSION + 1}, tmp_path / "c.pt")
    with pytest.raises(UserError, match="newer nanogpt"):
        load_checkpoint(tmp_path / "c.pt")


def test_missing_checkpoint(tmp_path):
    path = tmp_path / "out" / "ckpt.pt"
    with pytest.raises(UserError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value) and "--out_dir" in str(info.value)
    with pytest.raises(UserError, match="no checkpoint"):
        load_resume_checkpoint(tmp_path / "out")


@pytest.mark.parametrize("damage", ["truncated", "tail_cut", "garbage", "empty", "text"])
def test_damaged_file_gives_user_error(tmp_path, damage):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, make_ckpt())
    data = path.read_bytes()
    damaged = {
        "truncated": data[: len(data) // 2],
        "tail_cut": data[:-100],
        "garbage": random.Random(0).randbytes(4096),
        "empty": b"",
        "text": b"this is not a checkpoint\n" * 10,
    }[damage]
    path.write_bytes(damaged)
    with pytest.raises(UserError) as info:
        load_checkpoint(path)
    # one sentence of ours, not the unpickler's or the zip reader's words cut mid-way
    assert str(info.value).startswith(
        f"the checkpoint {path} is truncated or is not a PyTorch checkpoint, so it cannot be read. Restore it"
    )


def test_other_pickles_are_not_checkpoints(tmp_path):
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(UserError, match="not a nanogpt checkpoint"):
        load_checkpoint(tmp_path / "tensor.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "dict.pt")
    with pytest.raises(UserError, match="not a nanogpt checkpoint"):
        load_checkpoint(tmp_path / "dict.pt")


def test_weights_not_matching_model_args(tmp_path):
    ckpt = make_ckpt()
    ckpt["model_args"] = {**ckpt["model_args"], "n_embd": 32}
    save_checkpoint(tmp_path / "c.pt", ckpt)
    with pytest.raises(UserError, match="do not match its model_args"):
        model_from_checkpoint(load_checkpoint(tmp_path / "c.pt"))


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_failed_save_keeps_the_old_file_and_leaves_no_temp_files(tmp_path, monkeypatch, error):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, make_ckpt(seed=0))
    before = path.read_bytes()
    real_save = torch.save

    def save_then_fail(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)  # the bytes are written...
        f.write(b"partial")
        raise error  # ...then the disk fills up (or the user presses Ctrl-C) before the save completes

    monkeypatch.setattr(torch, "save", save_then_fail)
    expected = UserError if isinstance(error, OSError) else KeyboardInterrupt
    with pytest.raises(expected) as info:
        save_checkpoint(path, make_ckpt(seed=1))
    if expected is UserError:
        assert "No space left on device" in str(info.value) and "unchanged" in str(info.value)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["ckpt.pt"]
    monkeypatch.undo()
    assert_same_weights(model_from_checkpoint(load_checkpoint(path)), make_ckpt(seed=0)["model"])


def test_ctrl_c_inside_torch_save_stops_as_ctrl_c_and_keeps_the_old_file(tmp_path, monkeypatch):
    """A KeyboardInterrupt raised while torch's zip writer is mid-record comes out of torch.save as a
    RuntimeError ("unexpected pos"); the save must stop as Ctrl-C does, not as a bug."""
    import forkrun

    from nanogpt.checkpoint import file

    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, make_ckpt(seed=0))
    before = path.read_bytes()
    monkeypatch.setattr(file, "atomic_open", forkrun.failing_atomic_open(file.atomic_open, KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, make_ckpt(seed=1))
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["ckpt.pt"]


def test_save_into_a_missing_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="could not write the checkpoint"):
        save_checkpoint(tmp_path / "missing" / "ckpt.pt", make_ckpt())


def test_resume_picks_the_furthest_checkpoint(tmp_path, capsys):
    save_checkpoint(tmp_path / "ckpt.pt", make_ckpt(iter_num=100))
    save_checkpoint(tmp_path / "interrupt.pt", make_ckpt(iter_num=150))
    path, ckpt = load_resume_checkpoint(tmp_path)
    assert path.name == "interrupt.pt" and ckpt["iter_num"] == 150
    (tmp_path / "interrupt.pt").write_bytes(b"torn")  # a damaged candidate is skipped with a warning
    path, ckpt = load_resume_checkpoint(tmp_path)
    assert path.name == "ckpt.pt" and ckpt["iter_num"] == 100
    assert "skipping" in capsys.readouterr().err


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_weights_are_never_saved(tmp_path, bad):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, make_ckpt(seed=0))
    before = path.read_bytes()
    diverged = make_ckpt(seed=1)
    diverged["model"]["transformer.h.1.mlp.c_fc.weight"][3, 4] = bad
    with pytest.raises(UserError, match=r"not writing .*NaN or infinite values \(transformer.h.1.mlp.c_fc.weight\)"):
        save_checkpoint(path, diverged)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_resume_skips_a_checkpoint_with_nonfinite_weights(tmp_path, capsys):
    """A diverged interrupt.pt further along (e.g. written by an older version) must not be resumed from."""
    save_checkpoint(tmp_path / "ckpt.pt", make_ckpt(iter_num=100))
    diverged = {"format_version": FORMAT_VERSION, **make_ckpt(iter_num=150)}
    diverged["model"]["lm_head.weight"].fill_(float("nan"))  # tied: wte too
    torch.save(diverged, tmp_path / "interrupt.pt")
    with pytest.raises(UserError, match="holds NaN or infinite weights"):
        load_checkpoint(tmp_path / "interrupt.pt")
    path, ckpt = load_resume_checkpoint(tmp_path)
    assert path.name == "ckpt.pt" and ckpt["iter_num"] == 100
    assert "skipping" in capsys.readouterr().err
