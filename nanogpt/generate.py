"""Generation: a trained GPT writes text one token at a time. Read 4th, then sample.py.

The reading path: 1 model.py, 2 train.py, 3 data.py and optim.py, 4 this file then sample.py; the rest
is machinery a first read can skip. A language model gives, for a context, a distribution over the
next token; generating is a loop that samples one token from it, appends it and asks again. The KV
cache (model.KVCache) makes each step cost one token's work instead of the whole context's.

    generate_stream(model, idx, n, ...)  yields the n new tokens one by one (sample.py; serve/engine.py batches it)
    generate(model, idx, n, ...)         the prompts with the n new tokens appended (nanoGPT's API)
    sample_next(logits, ...)             one token per row: temperature, top-k, top-p, then a draw

This module is pure: no argv, no file I/O, no environment reads, no prints.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from nanogpt.model import GPT, KVCache, activation_dtype


@torch.inference_mode()  # no autograd graph: less memory, and faster than no_grad
def generate(model: GPT, idx: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
    """Return idx (B, T) extended by max_new_tokens sampled tokens, (B, T + max_new_tokens); the
    keyword arguments are generate_stream's."""
    new = list(generate_stream(model, idx, max_new_tokens, **kwargs))
    return torch.cat([idx, *new], dim=1) if new else idx


@torch.inference_mode()
def generate_stream(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    with_logits: bool = False,
) -> Iterator[torch.Tensor] | Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield max_new_tokens next tokens, each (B, 1), continuing the prompts idx (B, T); with
    `with_logits`, pairs of the token and the float32 logits (B, vocab_size) it was drawn from
    (before temperature and filtering: the model's own distribution, for log-probabilities).

    With `use_cache` the prompt is encoded once and each step feeds one token. When the context
    reaches block_size the oldest half of the window is dropped and the rest re-encoded (learned
    position embeddings make a true sliding window impossible); up to block_size tokens the
    result equals full recomputation (`use_cache=False`, which crops to the last block_size
    tokens each step, as nanoGPT does).
    """
    block_size = model.config.block_size
    if not use_cache:  # nanoGPT's loop: the whole (cropped) context through the model for every token
        for _ in range(max_new_tokens):
            logits, _ = model(idx[:, -block_size:])  # the model sees at most block_size positions
            nxt = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)
            idx = torch.cat((idx, nxt), dim=1)
            yield (nxt, logits[:, -1, :].float()) if with_logits else nxt
        return
    param = model.lm_head.weight
    # The cache holds keys and values in the dtype the attention projections produce: bfloat16 or
    # float16 under autocast, so it takes half the memory and loses nothing (k and v were computed
    # in that precision); the queries meet them in the same dtype, as in full recomputation.
    cache = KVCache(model.config, idx.size(0), param.device, activation_dtype(param))
    context = idx[:, -block_size:]
    logits, _ = model(context, cache=cache)  # prefill: the whole prompt in one pass fills the cache
    filled = context.size(1)  # = cache.length, counted here so the loop never waits on the device
    for i in range(max_new_tokens):
        nxt = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)
        yield (nxt, logits[:, -1, :].float()) if with_logits else nxt
        if i == max_new_tokens - 1:
            break  # the last token needs no forward pass of its own
        context = torch.cat((context, nxt), dim=1)
        if filled == block_size:  # full: keep the newest half and re-encode it
            context = slide_window(context, block_size)
            cache.reset()
            logits, _ = model(context, cache=cache)
            filled = context.size(1)
        else:  # decode: only the new token goes through, attending to the cached keys and values
            logits, _ = model(nxt, cache=cache)
            filled += 1


def slide_window(context: torch.Tensor, block_size: int) -> torch.Tensor:
    """What a full window (B, T) keeps when it slides: its newest block_size // 2 + 1 tokens, to be re-encoded.
    Learned position embeddings make a true sliding window impossible (every kept token's position changes),
    so half the window goes at once and re-encoding is paid once every block_size // 2 tokens."""
    return context[:, -(block_size // 2 + 1) :]


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token per row of logits (B, vocab) -> (B, 1).

    temperature 0 means greedy (argmax). top_k keeps the k most likely tokens; top_p keeps the
    smallest set of most likely tokens whose probability reaches p (nucleus sampling, Holtzman et
    al. 2020). Both filter before sampling, so a token outside the kept set is never drawn.
    """
    # Under autocast the logits arrive in bfloat16/float16. The softmax, the cumulative sum of top_p
    # and the sampling race run in float32: in 16 bits the small probabilities of a 50k vocabulary
    # round to zero and a cumulative sum drifts by more than top_p's resolution.
    logits = logits.float()
    if temperature == 0.0:
        return logits.argmax(dim=-1, keepdim=True)
    # temperature divides the logits: below 1 it sharpens the distribution towards the likeliest
    # tokens (safer, duller text), above 1 it flattens it (more varied, more mistakes)
    logits = logits / temperature
    # top-k (Fan et al. 2018): the long tail of unlikely tokens, each rare but many together, is where
    # incoherent picks come from, so only the k best may be drawn
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    # top-p adapts the cut to the distribution: few tokens where the model is sure, many where it is not
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True, dim=-1)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # drop a token when the tokens ranked above it already reach top_p; the top token always stays
        drop_sorted = (cum - torch.softmax(sorted_logits, dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, sorted_idx, drop_sorted)  # back from rank order to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # filtered tokens have logit -inf, so probability 0
    # argmax(p_i / E_i) with E_i ~ Exp(1) picks token i with probability p_i (the "exponential race"):
    # the same distribution as torch.multinomial at half its cost, which matters one token at a time
    race = torch.empty_like(probs).exponential_(1.0, generator=generator).clamp_(min=1e-30)
    return (probs / race).argmax(dim=-1, keepdim=True)
