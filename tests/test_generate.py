"""nanogpt.generate: the KV cache's decoding equals full recomputation, windows past block_size, batches,
seeds, and sample_next's temperature, top-k and top-p."""

from __future__ import annotations

import pytest
import torch
from test_model import MODERN, random_ids, sharp_model

from nanogpt.generate import generate, generate_stream, sample_next

# ----------------------------------------------------------------------------- generate and generate_stream


def test_gpt_generate_is_nanogpts_api_for_generate():
    """model.generate(idx, n, ...), as nanoGPT calls it, is generate(model, idx, n, ...)."""
    model = sharp_model(seed=2)
    prompt = random_ids(2, 3, 32, seed=2)
    kwargs = dict(temperature=0.8, top_k=10)
    a = model.generate(prompt, 9, generator=torch.Generator().manual_seed(5), **kwargs)
    b = generate(model, prompt, 9, generator=torch.Generator().manual_seed(5), **kwargs)
    assert torch.equal(a, b)


@pytest.mark.parametrize("prompt_len", [1, 5, 16])
@pytest.mark.parametrize("sampling", ["greedy", "sampled", "top_k_top_p"])
def test_cached_generation_equals_full_recomputation(prompt_len, sampling):
    model = sharp_model(seed=prompt_len)
    block = model.config.block_size
    new_tokens = block - prompt_len + 1  # the last one is sampled from a context of exactly block_size tokens
    prompt = random_ids(1, prompt_len, 32, seed=prompt_len)
    kwargs = {
        "greedy": dict(temperature=0.0),
        "sampled": dict(temperature=1.0),
        "top_k_top_p": dict(temperature=0.9, top_k=10, top_p=0.9),
    }[sampling]
    outs = []
    for use_cache in (True, False):
        gen = torch.Generator().manual_seed(1234)
        outs.append(generate(model, prompt, new_tokens, use_cache=use_cache, generator=gen, **kwargs))
    cached, recomputed = outs
    assert cached.shape == (1, prompt_len + new_tokens)
    assert torch.equal(cached[:, :prompt_len], prompt)
    assert torch.equal(cached, recomputed)


def test_sampled_generation_depends_on_the_generator_seed():
    model = sharp_model(seed=7)
    prompt = random_ids(1, 3, 32)
    a = generate(model, prompt, 12, temperature=1.0, generator=torch.Generator().manual_seed(1))
    b = generate(model, prompt, 12, temperature=1.0, generator=torch.Generator().manual_seed(1))
    c = generate(model, prompt, 12, temperature=1.0, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("use_cache", [True, False])
def test_generation_past_block_size(use_cache):
    model = sharp_model(seed=4)
    block = model.config.block_size
    prompt = random_ids(2, 5, 32)
    steps = list(generate_stream(model, prompt, 3 * block, temperature=1.0, use_cache=use_cache))
    assert len(steps) == 3 * block
    assert all(s.shape == (2, 1) for s in steps)
    out = torch.cat([prompt, *steps], dim=1)
    assert out.shape == (2, 5 + 3 * block)
    assert int(out.min()) >= 0 and int(out.max()) < 32


def test_cached_generation_matches_recomputation_up_to_the_window_edge():
    """Greedy past block_size: identical to recomputation until the context first exceeds the window."""
    model = sharp_model(seed=5)
    block = model.config.block_size
    prompt = random_ids(1, 4, 32, seed=9)
    cached = generate(model, prompt, 2 * block, temperature=0.0, use_cache=True)
    recomputed = generate(model, prompt, 2 * block, temperature=0.0, use_cache=False)
    assert cached.shape == recomputed.shape == (1, 4 + 2 * block)
    edge = block + 1  # tokens sampled from contexts of at most block_size tokens
    assert torch.equal(cached[:, :edge], recomputed[:, :edge])


def test_prompt_longer_than_block_size_is_cropped():
    model = sharp_model(seed=6)
    prompt = random_ids(1, 40, 32)
    out = generate(model, prompt, 3, temperature=0.0)
    assert out.shape == (1, 43)
    expected = generate(model, prompt[:, -model.config.block_size :], 1, temperature=0.0)[:, -1]
    assert out[0, 40] == expected[0]


def test_batched_generation_shapes_and_rows_are_independent():
    model = sharp_model(seed=8)
    prompts = random_ids(3, 6, 32, seed=10)
    out = generate(model, prompts, 8, temperature=0.0)
    assert out.shape == (3, 14)
    assert torch.equal(out[:, :6], prompts)
    for row in range(3):
        single = generate(model, prompts[row : row + 1], 8, temperature=0.0)
        assert torch.equal(single, out[row : row + 1])
    assert generate(model, prompts, 0).shape == (3, 6)


@pytest.mark.parametrize("name", MODERN)
def test_modern_options_keep_cached_decoding_equal_to_recomputation(name):
    """Greedy and sampled decoding, streamed, through the cache (RoPE at absolute positions included) equal
    full recomputation up to the window edge; test_model.py checks a chunked cached forward pass."""
    model = sharp_model(seed=3, **MODERN[name])
    prompt = random_ids(2, 5, 32, seed=4)
    new = model.config.block_size - 5 + 1
    for kwargs in (dict(temperature=0.0), dict(temperature=1.0, top_k=8)):
        outs = []
        for use_cache in (True, False):
            gen = torch.Generator().manual_seed(7)
            streamed = list(generate_stream(model, prompt, new, use_cache=use_cache, generator=gen, **kwargs))
            outs.append(torch.cat(streamed, dim=1))
        assert torch.equal(outs[0], outs[1])


# ----------------------------------------------------------------------------- sample_next: temperature, top-k, top-p


def draws(logits_row: torch.Tensor, n: int = 4000, seed: int = 0, **kwargs) -> set[int]:
    logits = logits_row.unsqueeze(0).repeat(n, 1)
    picked = sample_next(logits, generator=torch.Generator().manual_seed(seed), **kwargs)
    assert picked.shape == (n, 1)
    return set(picked.flatten().tolist())


def test_top_k_never_picks_outside_the_k_best():
    logits = torch.tensor([0.5, 2.0, -1.0, 1.9, 0.0, 2.1, 1.0, -3.0])
    allowed = {5, 1, 3}  # the three largest logits
    # a high temperature flattens the distribution, so any leak outside the top 3 would show up
    assert draws(logits, top_k=3, temperature=5.0) == allowed
    assert draws(logits, top_k=1, temperature=5.0) == {5}
    assert draws(logits, top_k=100, temperature=5.0) == set(range(8))  # k beyond the vocabulary: no filter


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.05, 0.30, 0.02, 0.40, 0.20, 0.03])
    logits = probs.log()
    # by probability: 3 (0.40), 1 (0.30), 4 (0.20), 0 (0.05), 5 (0.03), 2 (0.02)
    assert draws(logits, top_p=0.35) == {3}
    assert draws(logits, top_p=0.65) == {3, 1}
    assert draws(logits, top_p=0.8) == {3, 1, 4}
    assert draws(logits, top_p=0.01) == {3}  # the most likely token always stays
    assert draws(logits, top_p=1.0, n=20000) == set(range(6))


def test_top_k_and_top_p_combine():
    probs = torch.tensor([0.05, 0.30, 0.02, 0.40, 0.20, 0.03])
    assert draws(probs.log(), top_k=2, top_p=0.99) == {3, 1}
    assert draws(probs.log(), top_k=4, top_p=0.65) == {3, 1}


def test_temperature_zero_is_argmax_and_rows_are_independent():
    logits = torch.tensor([[0.1, 3.0, 0.2], [5.0, 0.0, 4.9], [-1.0, -2.0, -0.5]])
    assert sample_next(logits, temperature=0.0).flatten().tolist() == [1, 0, 2]
    out = sample_next(logits * 100, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert out.flatten().tolist() == [1, 0, 2]  # peaked distributions pick the argmax per row


def test_sampling_follows_the_softmax_distribution():
    """sample_next draws token i with probability softmax(logits / temperature)_i."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -30.0]]).repeat(40_000, 1)
    for temperature in (1.0, 0.5):
        draws = sample_next(logits, temperature=temperature, generator=torch.Generator().manual_seed(3))
        freq = torch.bincount(draws.view(-1), minlength=5).float() / draws.numel()
        expected = torch.softmax(logits[0] / temperature, dim=-1)
        torch.testing.assert_close(freq, expected, atol=0.01, rtol=0)
