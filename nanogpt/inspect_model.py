"""Inside a model on one text: its tokens, every head's attention weights, and the logit lens.

Advanced machinery: a first read of nanogpt skips it (model.py, train.py, data.py and optim.py, then
generate.py and sample.py come first). `inspect` runs one forward pass with a `Trace` (model.py), which
makes every attention layer compute softmax(q k^T / sqrt(hs)) explicitly and keep the weights, and keeps
the residual stream after every block. The logit lens (nostalgebraist 2020, "interpreting GPT: the logit
lens") sends each of those streams through the final norm and the head, as if the model ended there: the
next-token guess after each layer, the last layer's being the model's own. The server's /api/inspect and
the playground's attention and layer-by-layer views show what this returns.

Pure functions of a model, a tokenizer and token ids: no I/O, no device or precision choices (the caller
sets autocast), JSON-ready output rounded to DECIMALS.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from nanogpt.model import GPT, Trace
from nanogpt.tokenizer import Tokenizer

DECIMALS = 4  # attention weights and probabilities are rounded to this many decimals
TOP = 5  # the lens's likeliest next tokens per layer and position


def token_entries(tok: Tokenizer, ids: Sequence[int]) -> list[dict[str, Any]]:
    """Each token id with its text, decoded alone: a GPT-2 token holding part of a multi-byte character
    reads as U+FFFD (the replacement character), as tiktoken decodes it."""
    return [{"id": i, "text": tok.decode([i])} for i in ids]


def run(model: GPT, ids: Sequence[int]) -> Trace:
    """One forward pass over `ids` (at most block_size of them) that records a Trace; batch size 1."""
    idx = torch.tensor([list(ids)], dtype=torch.long, device=model.lm_head.weight.device)
    trace = Trace()
    with torch.inference_mode():
        model(idx, trace=trace)
    return trace


def lens_logits(model: GPT, residual: torch.Tensor) -> torch.Tensor:
    """The next-token logits (.., vocab_size) a residual stream (.., n_embd) gives through the final norm
    and the head, in float32 (the last block's stream gives the model's own logits)."""
    with torch.inference_mode():
        return model.head(model.transformer.ln_f(residual)).float()


def lens(model: GPT, tok: Tokenizer, trace: Trace, top: int = TOP) -> list[list[list[dict[str, Any]]]]:
    """[layer][position]: the `top` likeliest next tokens after each block, {"id", "text", "prob"}, likeliest
    first. One layer at a time, so a GPT-2-sized vocabulary needs (T, vocab_size) floats, not n_layer times."""
    layers = []
    for residual in trace.residual:
        probs, ids = lens_logits(model, residual[0]).softmax(dim=-1).topk(min(top, model.config.vocab_size))
        layers.append(
            [
                [{**entry, "prob": round(p, DECIMALS)} for entry, p in zip(token_entries(tok, row_ids), row_probs)]
                for row_ids, row_probs in zip(ids.tolist(), probs.tolist())
            ]
        )
    return layers


def rounded(weights: torch.Tensor) -> list[list[list[float]]]:
    """One layer's attention weights (1, nh, T, T) as [head][query][key] lists, rounded."""
    return weights[0].double().round(decimals=DECIMALS).tolist()  # double: 0.1234 prints as 0.1234


def inspect(model: GPT, tok: Tokenizer, ids: Sequence[int], layer: int | None = None, top: int = TOP) -> dict[str, Any]:
    """One forward pass over `ids`: {"tokens", "layers", "attention", "lens"}. `attention` is [layer][head]
    [query][key] for the layers listed in "layers" (all, or only `layer`), each row summing to 1 and zero
    above the diagonal; `lens` is [layer][position][rank] for every layer (after each block), the `top`
    likeliest tokens (the playground's step view asks for 20)."""
    if not 0 < len(ids) <= model.config.block_size:
        raise ValueError(f"inspect needs 1 to {model.config.block_size} tokens, got {len(ids)}")
    if layer is not None and not 0 <= layer < model.config.n_layer:
        raise ValueError(f"layer must be in 0..{model.config.n_layer - 1}, got {layer}")
    trace = run(model, ids)
    layers = list(range(model.config.n_layer)) if layer is None else [layer]
    return {
        "tokens": token_entries(tok, ids),
        "layers": layers,
        "attention": [rounded(trace.attention[i]) for i in layers],
        "lens": lens(model, tok, trace, top),
    }
