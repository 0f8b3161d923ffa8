"""The model to sample, evaluate or serve: a trained checkpoint's, or OpenAI's GPT-2.

Machinery a first read skips (the reading path is in the README, "Read the code"): sample.py, eval and
serve call `load_inference_model` and get a model and its tokenizer, wherever they came from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nanogpt.checkpoint import load_model_checkpoint, model_from_checkpoint, tokenizer_from_checkpoint
from nanogpt.errors import UserError
from nanogpt.hf import load_pretrained_gpt2, tokenizer_spec_for
from nanogpt.model import GPT
from nanogpt.tokenizer import Tokenizer, tokenizer_from_spec


def load_inference_model(init_from: str, out_dir: str | Path) -> tuple[GPT, Tokenizer, str, dict[str, Any]]:
    """The model to sample, evaluate or serve, its tokenizer, where it came from, and the training options
    it was saved with ({} for GPT-2): the checkpoint in out_dir (init_from="resume"), or OpenAI's GPT-2 /
    a Hugging Face folder (needs transformers)."""
    config: dict[str, Any] = {}
    if init_from == "resume":
        path, ckpt = load_model_checkpoint(out_dir)
        model, tok, source = model_from_checkpoint(ckpt), tokenizer_from_checkpoint(ckpt), str(path)
        config = ckpt.get("config", {})
    else:
        model, tok = load_pretrained_gpt2(init_from), tokenizer_from_spec(tokenizer_spec_for(init_from))
        source = init_from
    if tok.vocab_size > model.config.vocab_size:
        raise UserError(
            f"{source} is damaged: its tokenizer has {tok.vocab_size} tokens but its model only "
            f"{model.config.vocab_size}."
        )
    return model, tok, source, config
