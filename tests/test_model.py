"""nanogpt.model: shapes, causality, initialisation, learning, the KV cache and the options; generation is in
test_generate.py."""

from __future__ import annotations

import math
import time

import pytest
import torch

from nanogpt.model import GPT, GPTConfig, KVCache
from nanogpt.optim import build_optimizers


def tiny_config(**overrides) -> GPTConfig:
    args = dict(block_size=16, vocab_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=True)
    args.update(overrides)
    return GPTConfig(**args)


def tiny_model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(tiny_config(**overrides)).eval()


def sharp_model(seed: int = 0, **overrides) -> GPT:
    """A model with large random weights: attention patterns and next-token distributions are far from
    uniform, so a mistake in what a position attends to changes the generated tokens (a freshly
    initialised GPT is nearly position-blind and would hide it). The token shift's weights too: they
    start at zero, which would hide what it does."""
    model = tiny_model(seed, **overrides)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 or name == "transformer.shift.weight":
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


def random_ids(batch: int, length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- forward


def test_forward_shapes_with_and_without_targets():
    model = tiny_model()
    idx = random_ids(3, 10, 32)
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 10, 32)
    assert loss.dim() == 0 and torch.isfinite(loss)
    logits_last, no_loss = model(idx)
    assert logits_last.shape == (3, 1, 32)
    assert no_loss is None
    # the last-position shortcut computes the same numbers as the full forward pass
    torch.testing.assert_close(logits_last[:, 0], logits[:, -1])


def test_forward_rejects_sequences_longer_than_block_size():
    model = tiny_model()
    model(random_ids(1, 16, 32))  # exactly block_size is fine
    with pytest.raises(ValueError, match="block_size"):
        model(random_ids(1, 17, 32))


@pytest.mark.parametrize("t", [0, 5, 15])
def test_causality_future_tokens_do_not_change_past_logits(t):
    model = sharp_model(seed=1)
    idx = random_ids(2, 16, 32, seed=1)
    changed = idx.clone()
    changed[:, t] = (changed[:, t] + 7) % 32
    logits_a, _ = model(idx, idx)  # passing targets returns the logits at every position
    logits_b, _ = model(changed, changed)
    torch.testing.assert_close(logits_a[:, :t], logits_b[:, :t], rtol=0, atol=1e-6)
    # and the change does reach position t itself, so the comparison above is not vacuous
    assert (logits_a[:, t] - logits_b[:, t]).abs().max() > 1e-4


def test_loss_ignores_targets_of_minus_one():
    model = tiny_model()
    idx = random_ids(2, 8, 32)
    targets = idx.clone()
    targets[:, 4:] = -1
    _, loss_masked = model(idx, targets)
    logits, _ = model(idx, idx)
    expected = torch.nn.functional.cross_entropy(logits[:, :4].reshape(-1, 32), idx[:, :4].reshape(-1))
    torch.testing.assert_close(loss_masked, expected)


def test_initial_loss_is_close_to_uniform_guess():
    vocab = 65
    model = tiny_model(vocab_size=vocab, n_embd=64, n_head=4)
    idx = random_ids(8, 16, vocab, seed=2)
    targets = random_ids(8, 16, vocab, seed=3)
    with torch.no_grad():
        _, loss = model(idx, targets)
    assert abs(loss.item() - math.log(vocab)) < 0.1


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = GPT(tiny_config(n_layer=2, n_embd=64, n_head=4))
    model.train()
    x = random_ids(4, 16, 32, seed=4)
    y = random_ids(4, 16, 32, seed=5)  # arbitrary targets: only memorisation gets the loss down
    (opt,) = build_optimizers(
        model, "adamw", learning_rate=3e-3, weight_decay=0.0, betas=(0.9, 0.99), device_type="cpu"
    )
    start, first_loss, loss = time.time(), None, None
    for _ in range(400):
        _, loss = model(x, y)
        first_loss = first_loss if first_loss is not None else loss.item()
        if loss.item() < 0.05:
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert first_loss > 3.0
    assert loss.item() < 0.1, f"loss {loss.item():.3f} after {time.time() - start:.1f}s"


# ----------------------------------------------------------------------------- structure


def test_weight_tying_shares_one_tensor():
    model = tiny_model()
    assert model.transformer.wte.weight is model.lm_head.weight
    # a training step moves both together, as they are one parameter
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    idx = random_ids(2, 8, 32)
    _, loss = model.train()(idx, idx)
    loss.backward()
    opt.step()
    assert model.transformer.wte.weight.data_ptr() == model.lm_head.weight.data_ptr()
    # the tied tensor is counted once among the parameters
    assert sum(p is model.lm_head.weight for p in model.parameters()) == 1


@pytest.mark.parametrize(
    "bad",
    [dict(n_embd=30, n_head=4), dict(n_embd=32, n_head=3), dict(n_head=0), dict(block_size=0), dict(dropout=1.0)],
)
def test_config_rejects_invalid_shapes(bad):
    with pytest.raises(ValueError):
        tiny_config(**bad)


def test_config_error_names_both_values():
    with pytest.raises(ValueError, match=r"n_embd=30 is not divisible by n_head=4.*Try n_embd=32"):
        GPTConfig(n_embd=30, n_head=4)


@pytest.mark.parametrize("bias", [True, False])
def test_parameter_count_matches_hand_formula(bias):
    V, T, L, C = 50, 24, 3, 48
    model = GPT(GPTConfig(block_size=T, vocab_size=V, n_layer=L, n_head=4, n_embd=C, bias=bias))
    b = 1 if bias else 0
    ln = 2 * C if bias else C  # LayerNorm gain (+ bias)
    attn = C * 3 * C + b * 3 * C + C * C + b * C
    mlp = C * 4 * C + b * 4 * C + 4 * C * C + b * C
    per_block = 2 * ln + attn + mlp
    total = V * C + T * C + L * per_block + ln  # lm_head is tied to wte: counted once
    assert model.get_num_params(non_embedding=False) == total
    assert model.get_num_params() == total - T * C  # position embeddings excluded by default


def test_crop_block_size():
    model = tiny_model()
    idx = random_ids(2, 10, 32)
    before, _ = model(idx, idx)
    wpe_before = model.transformer.wpe.weight.detach().clone()
    model.crop_block_size(12)
    assert model.config.block_size == 12
    assert model.transformer.wpe.weight.shape == (12, 32)
    torch.testing.assert_close(model.transformer.wpe.weight.detach(), wpe_before[:12])
    after, _ = model(idx, idx)
    torch.testing.assert_close(after, before)  # the first positions keep their embeddings
    with pytest.raises(ValueError):
        model(random_ids(1, 13, 32))
    assert model.generate(random_ids(1, 4, 32), 20).shape == (1, 24)  # generation respects the new window
    for bad in (0, 13):
        with pytest.raises(ValueError):
            model.crop_block_size(bad)


# ----------------------------------------------------------------------------- KV cache


def test_cached_forward_in_chunks_equals_full_forward():
    """Prefill, then a multi-token chunk (the masked branch), then single tokens: same logits as no cache."""
    model = sharp_model(seed=3)
    idx = random_ids(2, 14, 32, seed=6)
    full, _ = model(idx, idx)
    cache = KVCache(model.config, 2, torch.device("cpu"), torch.float32)
    pieces = [(0, 5), (5, 9), (9, 10), (10, 14)]
    for a, b in pieces:
        logits, _ = model(idx[:, a:b], cache=cache)
        assert cache.length == b
        torch.testing.assert_close(logits[:, -1], full[:, b - 1], rtol=1e-5, atol=1e-5)


def counted_training_flops_per_token(model: GPT, batch: int = 2) -> float:
    """FLOPs of one forward + backward pass per token as PyTorch's FlopCounterMode counts them, with
    attention in the math backend so that its matmuls are counted too (the fused CPU kernel is not)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    T = model.config.block_size
    x = torch.randint(model.config.vocab_size, (batch, T), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        _, loss = model(x, x)
        loss.backward()
    return counter.get_total_flops() / (batch * T)


@pytest.mark.parametrize("shape", [(4, 4, 128, 64, 65), (2, 2, 32, 16, 50304)])
def test_flops_per_token_estimate_matches_pytorchs_flop_counter(shape):
    """The 6N + 12 L H Q T formula (PaLM, appendix B) behind MFU, against an independent count. The
    formula also counts 6 FLOPs per LayerNorm gain, which the counter (matmuls only) does not see."""
    n_layer, n_head, n_embd, block_size, vocab = shape
    model = GPT(GPTConfig(block_size, vocab, n_layer, n_head, n_embd, bias=False))
    counted, estimate = counted_training_flops_per_token(model), model.estimate_flops_per_token()
    gains = sum(p.numel() for n, p in model.named_parameters() if "ln" in n)
    assert counted == estimate - 6 * gains


# ----------------------------------------------------------------------------- modern options

MODERN = {
    "rope": dict(pos_emb="rope"),
    "rmsnorm": dict(norm="rmsnorm"),
    "qk_norm": dict(qk_norm=True),
    "relu2": dict(activation="relu2"),
    "untied": dict(tie_weights=False),
    "zero_init_proj": dict(zero_init_proj=True),
    "logit_softcap": dict(logit_softcap=5.0),
    "token_shift": dict(token_shift=True),
    "all": dict(
        pos_emb="rope",
        norm="rmsnorm",
        qk_norm=True,
        activation="relu2",
        tie_weights=False,
        logit_softcap=5.0,
        token_shift=True,
    ),  # fmt: skip
}


@pytest.mark.parametrize("name", MODERN)
def test_modern_options_keep_a_chunked_cached_forward_equal_to_the_full_forward(name):
    """A chunked forward pass through the cache (RoPE at absolute positions included) gives the full forward's
    logits; tests/test_generate.py checks that decoding through the cache equals full recomputation."""
    model = sharp_model(seed=3, **MODERN[name])
    idx = random_ids(2, 12, 32, seed=5)
    with torch.no_grad():
        full, _ = model(idx, targets=idx)
        cache = KVCache(model.config, 2, idx.device, torch.float32)
        parts = [model(idx[:, a:b], targets=idx[:, a:b], cache=cache)[0] for a, b in ((0, 5), (5, 6), (6, 12))]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def test_every_option_keeps_cached_logits_equal_under_bfloat16_autocast():
    """The GPU's path on the CPU: RoPE at cached positions, QK-norm, the token shift's carried embedding
    and the rest, through the cache in chunks, equal a full forward pass under bfloat16 autocast."""
    from nanogpt.device import autocast
    from nanogpt.model import activation_dtype

    model = sharp_model(seed=2, **MODERN["all"])
    idx = random_ids(2, 14, 32, seed=1)
    with torch.no_grad(), autocast("cpu", "bfloat16"):
        full, _ = model(idx, targets=idx)
        cache = KVCache(model.config, 2, idx.device, activation_dtype(model.lm_head.weight))
        parts = [model(idx[:, a:b], targets=idx[:, a:b], cache=cache)[0] for a, b in ((0, 5), (5, 6), (6, 14))]
    assert cache.k.dtype == torch.bfloat16
    tolerance = 4 * torch.finfo(torch.bfloat16).eps * full.float().abs().max().item()
    assert (torch.cat(parts, dim=1).float() - full.float()).abs().max().item() <= tolerance


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", ["learned", "rope", "qk_norm", "token_shift", "all"])
def test_rows_of_one_cache_at_different_lengths_decode_as_each_sequence_alone(name, dtype):
    """The server's continuous batching: sequences prefilled into views of one cache's rows, at different
    lengths, then decoded together one token per step (each row its own positions, mask, cache slots and
    previous embedding), give the logits of each sequence decoded alone; rows kept (others finished) and rows
    copied into a bigger cache decode on. Under bfloat16 autocast too, the GPU's path."""
    from nanogpt.device import autocast
    from nanogpt.model import activation_dtype

    model = sharp_model(seed=4, **({} if name == "learned" else MODERN[name]))
    lengths = [3, 9, 1, 6]
    seqs = [random_ids(1, n + 7, 32, seed=n) for n in lengths]  # a prompt of n tokens, then 7 fed one at a time

    def feed(rows: list[int], t: int, cache: KVCache) -> torch.Tensor:  # the token after n + t - 1 of each row
        return model(torch.cat([seqs[i][:, lengths[i] + t :][:, :1] for i in rows]), cache=cache)[0]

    with torch.no_grad(), autocast("cpu", dtype):
        act = activation_dtype(model.lm_head.weight)
        alone = []
        for i, n in enumerate(lengths):
            cache = KVCache(model.config, 1, seqs[i].device, act)
            alone.append(
                torch.cat([model(seqs[i][:, :n], cache=cache)[0]] + [feed([i], t, cache) for t in range(7)], 1)
            )
        batch = KVCache(model.config, 4, seqs[0].device, act)
        steps = [torch.cat([model(s[:, :n], cache=batch[i : i + 1])[0] for i, (s, n) in enumerate(zip(seqs, lengths))])]
        steps += [feed([0, 1, 2, 3], t, batch) for t in range(5)]  # the four rows together, at positions n + t
        assert batch.pos.tolist() == [n + 5 for n in lengths]
        batch.keep([1, 3])  # rows 0 and 2 finished: 1 and 3 move to the front and decode on
        kept = [feed([1, 3], 5, batch[:2])]
        bigger = KVCache(model.config, 6, seqs[0].device, act)  # as the server's engine grows its cache
        bigger[:2].copy_(batch[:2])
        kept.append(feed([1, 3], 6, bigger[:2]))
    assert bigger.pos[:2].tolist() == [lengths[1] + 7, lengths[3] + 7]
    pairs = [
        (torch.cat(steps, dim=1), torch.cat([a[:, :6] for a in alone])),  # (4, 6, vocab)
        (torch.cat(kept, dim=1), torch.cat([alone[i][:, 6:] for i in (1, 3)])),  # (2, 2, vocab)
    ]
    for together, expected in pairs:
        if dtype == "float32":  # the same arithmetic, with a different number of rows in the matmuls
            torch.testing.assert_close(together, expected, atol=1e-5, rtol=1e-5)
        else:
            tolerance = 4 * torch.finfo(torch.bfloat16).eps * expected.float().abs().max().item()
            assert (together.float() - expected.float()).abs().max().item() <= tolerance


def test_rope_attention_depends_on_distance_not_position():
    """With RoPE and no learned positions, a sequence shifted by s positions gives the same logits, through
    every layer: only relative positions matter. The model reads its positions' angles from rope_cos/rope_sin
    at 0..T-1; tables computed for block_size + s positions and cut at s put the sequence at s..s+T-1, with
    nothing before it. The model does use positions: all at the same one, the logits change."""
    from nanogpt.model import rope_tables

    model = sharp_model(seed=1, pos_emb="rope")
    assert "wpe" not in model.transformer and "wpe.weight" not in str(list(model.state_dict()))
    cfg = model.config
    hs = cfg.n_embd // cfg.n_head
    x = random_ids(2, cfg.block_size, cfg.vocab_size, seed=2)
    with torch.no_grad():
        at_zero, loss = model(x, x)
        assert torch.isfinite(loss)
        for shift in (1, 5, 100):
            cos, sin = rope_tables(hs, cfg.block_size + shift, cfg.rope_theta)
            model.rope_cos, model.rope_sin = cos[shift:], sin[shift:]
            torch.testing.assert_close(model(x, x)[0], at_zero, rtol=1e-5, atol=1e-4)  # float32 angles
        cos, sin = rope_tables(hs, cfg.block_size, cfg.rope_theta)
        model.rope_cos, model.rope_sin = cos[:1].expand_as(cos), sin[:1].expand_as(sin)  # every token at 0
        assert (model(x, x)[0] - at_zero).abs().max() > 0.1


def test_token_shift_adds_the_previous_embeddings_share_through_the_cache_too_and_starts_as_without_it():
    """Position t gets x_t + w * x_(t-1) per channel, position 0 nothing; fed in chunks through a cache it
    is the same; and at initialisation (w = 0) the model equals the one without the option."""
    from nanogpt.model import TokenShift

    shift = TokenShift(tiny_config())
    with torch.no_grad():
        shift.weight.copy_(torch.randn(32))
    x = torch.randn(2, 6, 32)
    expected = x.clone()
    expected[:, 1:] += shift.weight * x[:, :-1]
    torch.testing.assert_close(shift(x), expected)
    cache = KVCache(tiny_config(), 2, x.device, torch.float32)
    torch.testing.assert_close(torch.cat([shift(x[:, a:b], cache) for a, b in ((0, 4), (4, 5), (5, 6))], 1), expected)
    cache.reset()  # a re-encoded window starts without a previous token, as full recomputation does
    torch.testing.assert_close(shift(x[:, 3:], cache), shift(x[:, 3:]))
    assert not torch.allclose(shift(x[:, 3:]), expected[:, 3:])
    idx = random_ids(2, 10, 32, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(tiny_model(4, token_shift=True)(idx, idx)[0], tiny_model(4)(idx, idx)[0])
    assert tiny_model(token_shift=True).get_num_params() == tiny_model().get_num_params() + 32


def test_options_change_the_parameters_as_documented():
    base = tiny_model(bias=False)
    untied = tiny_model(bias=False, tie_weights=False)
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    V, C, T = 32, 32, 16
    assert sum(p.numel() for p in untied.parameters()) == sum(p.numel() for p in base.parameters()) + V * C
    # the non-embedding count excludes lookup tables: wpe, and wte once it is not the output layer
    assert untied.get_num_params() == base.get_num_params()
    rope = tiny_model(bias=False, pos_emb="rope")
    assert (
        rope.get_num_params() == base.get_num_params()
        and rope.get_num_params(False) == base.get_num_params(False) - T * C
    )
    rms = tiny_model(norm="rmsnorm")
    assert isinstance(rms.transformer.ln_f, torch.nn.RMSNorm) and set(rms.state_dict()) <= set(
        tiny_model().state_dict()
    )
    zero = tiny_model(zero_init_proj=True)
    assert all(p.abs().sum() == 0 for n, p in zero.named_parameters() if n.endswith("c_proj.weight"))
    capped = sharp_model(logit_softcap=2.0)
    logits, _ = capped(random_ids(1, 8, 32))
    assert logits.abs().max() < 2.0


def test_defaults_are_unchanged_gpt2():
    """The options are off by default, and the parameters are GPT-2's, named as before them (the values drawn
    are test_the_default_model_draws_nanogpts_weights_for_the_same_seed's)."""
    cfg = GPTConfig()
    assert (cfg.pos_emb, cfg.norm, cfg.qk_norm, cfg.activation, cfg.tie_weights) == (
        "learned",
        "layernorm",
        False,
        "gelu",
        True,
    )
    assert (cfg.zero_init_proj, cfg.logit_softcap) == (False, 0.0)
    names = list(tiny_model().state_dict())
    assert names[:2] == ["transformer.wte.weight", "transformer.wpe.weight"] and names[-1] == "lm_head.weight"


@pytest.mark.parametrize("bias", [True, False])
def test_the_default_model_draws_nanogpts_weights_for_the_same_seed(bias):
    """With the options at their defaults, the same parameters drawn in the same order as nanoGPT's model.py
    (the anchor checkout in shared/): for the same seed every tensor is equal, bit for bit, and the random
    generator ends in the same state (no extra or missing draws)."""
    import importlib.util
    import os
    from pathlib import Path

    source = Path(__file__).resolve().parents[2] / "shared/anchors/nanoGPT/model.py"
    if not source.is_file():
        if os.environ.get("CI") == "true":
            pytest.fail(f"nanoGPT's model.py must be at {source} in CI (shared/ beside the checkout)")
        pytest.skip(f"nanoGPT's model.py not found at {source}")
    spec = importlib.util.spec_from_file_location("nanogpt_anchor_model", source)
    anchor = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(anchor)
    args = dict(block_size=16, vocab_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=bias)
    torch.manual_seed(0)
    theirs = anchor.GPT(anchor.GPTConfig(**args)).state_dict()
    theirs_next = torch.rand(4)
    torch.manual_seed(0)
    ours = GPT(GPTConfig(**args)).state_dict()
    ours_next = torch.rand(4)
    theirs = {k: v for k, v in theirs.items() if not k.endswith(".attn.bias")}  # nanoGPT's mask buffer, if any
    assert list(ours) == list(theirs)
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name
    assert torch.equal(ours_next, theirs_next)


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(pos_emb="alibi"), "pos_emb must be one of learned, rope"),
        (dict(norm="batchnorm"), "norm must be one of layernorm, rmsnorm"),
        (dict(activation="swish"), "activation must be one of gelu, gelu_tanh, relu2"),
        (dict(pos_emb="rope", n_embd=30, n_head=2), "even head size"),
        (dict(logit_softcap=-1.0), "logit_softcap"),
    ],
)
def test_invalid_options_are_named(bad, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**bad)
