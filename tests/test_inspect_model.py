"""nanogpt.inspect_model and model.py's explicit attention path: the weights are the ones the fused kernel
uses (every option, float32 and bfloat16 autocast), rows sum to 1 and are causal, and the logit lens's last
layer is the model's own output. The /api/inspect route is tested in test_serve_inspect.py."""

from __future__ import annotations

import pytest
import torch
from test_model import MODERN, random_ids, sharp_model

from nanogpt.device import autocast
from nanogpt.inspect_model import inspect, lens_logits, run, token_entries
from nanogpt.model import KVCache, Trace
from nanogpt.tokenizer import CharTokenizer

CHARS = [chr(ord("a") + i) for i in range(26)] + list(" .,;:!?\n")  # 34 >= test_model's vocab_size of 32
OPTIONS = {"gpt2": {}, "no_bias": dict(bias=False), "gelu_tanh": dict(activation="gelu_tanh"), **MODERN}
OPTIONS["all_no_bias"] = dict(MODERN["all"], bias=False)


def block_outputs(model, idx: torch.Tensor, trace: Trace | None) -> list[torch.Tensor]:
    """The residual stream after each block: recorded by the trace, or, for the fused path, caught by hooks."""
    if trace is not None:
        model(idx, trace=trace)
        return trace.residual
    outputs = []
    hooks = [b.register_forward_hook(lambda m, i, out: outputs.append(out)) for b in model.transformer.h]
    try:
        model(idx)
    finally:
        for h in hooks:
            h.remove()
    return outputs


def relative_difference(model, idx: torch.Tensor) -> float:
    """The largest difference between the explicit path's block outputs and the fused kernel's, relative to
    the largest output (the sharp models' residual streams reach 20 to 60)."""
    with torch.no_grad():
        fused = block_outputs(model, idx, None)
        explicit = block_outputs(model, idx, Trace())
    assert len(fused) == len(explicit) == model.config.n_layer
    scale = max(a.float().abs().max().item() for a in fused)
    return max((a.float() - b.float()).abs().max().item() for a, b in zip(fused, explicit)) / scale


@pytest.mark.parametrize("name", OPTIONS)
def test_explicit_attention_gives_the_fused_kernels_block_outputs(name):
    model = sharp_model(seed=1, **OPTIONS[name])
    idx = random_ids(2, 16, 32, seed=2)
    assert relative_difference(model, idx) <= 1e-5  # measured: 3.9e-7 to 6.1e-7, a few float32 roundings
    with torch.no_grad():  # and the logits, every position
        fused, _ = model(idx, targets=idx)
        explicit, _ = model(idx, targets=idx, trace=Trace())
    torch.testing.assert_close(explicit, fused, atol=1e-5, rtol=1e-5)


def test_explicit_attention_under_bfloat16_autocast():
    """The GPU's precision on the CPU: the explicit path agrees with the fused kernel to bfloat16's rounding."""
    model = sharp_model(seed=1, **MODERN["all"])
    idx = random_ids(2, 16, 32, seed=2)
    with autocast("cpu", "bfloat16"):
        difference = relative_difference(model, idx)
        trace = run(model, idx[0].tolist())
    assert trace.attention[0].dtype == torch.float32 and trace.residual[0].dtype == torch.float32
    assert difference <= 8 * torch.finfo(torch.bfloat16).eps
    rows = trace.attention[0].float().sum(-1)
    torch.testing.assert_close(rows, torch.ones_like(rows), atol=1e-5, rtol=0)


def test_explicit_attention_through_the_cache():
    """With a KV cache (chunks of a sequence) the explicit path masks the unfilled slots as the fused one does."""
    model = sharp_model(seed=3, **MODERN["all"])
    idx = random_ids(1, 12, 32, seed=5)
    with torch.no_grad():
        full, _ = model(idx, targets=idx)
        cache, trace = KVCache(model.config, 1, idx.device, torch.float32), Trace()
        parts = [model(idx[:, a:b], targets=idx[:, a:b], cache=cache, trace=trace)[0] for a, b in ((0, 5), (5, 12))]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)
    assert trace.attention[0].shape == (1, 2, 5, model.config.block_size)
    assert trace.attention[0][..., 5:].abs().max() == 0  # slots not yet filled get no weight


@pytest.mark.parametrize("name", ["gpt2", "all"])
def test_inspect_shapes_rows_and_causal_zeros(name):
    model = sharp_model(seed=0, **OPTIONS[name])
    tok = CharTokenizer(CHARS[:32])
    ids = tok.encode("to be, or not")
    out = inspect(model, tok, ids)
    T, L, H = len(ids), model.config.n_layer, model.config.n_head
    assert out["tokens"] == [{"id": i, "text": c} for i, c in zip(ids, "to be, or not")]
    assert out["layers"] == list(range(L))
    attention = torch.tensor(out["attention"], dtype=torch.float64)
    assert attention.shape == (L, H, T, T)
    torch.testing.assert_close(attention.sum(-1), torch.ones(L, H, T, dtype=torch.float64), atol=T * 5e-5, rtol=0)
    assert torch.equal(attention.triu(1), torch.zeros_like(attention))  # no query sees a later key
    assert attention.min() >= 0 and out["attention"][0][0][0][0] == 1.0  # the first token sees itself only
    assert all(round(w, 4) == w for w in out["attention"][1][1][-1])  # rounded to 4 decimals
    assert len(out["lens"]) == L and all(len(layer) == T for layer in out["lens"])
    for layer in out["lens"]:
        for top in layer:
            assert len(top) == 5 and [e["prob"] for e in top] == sorted((e["prob"] for e in top), reverse=True)
            assert all(set(e) == {"id", "text", "prob"} and e["text"] == CHARS[e["id"]] for e in top)
    one = inspect(model, tok, ids, layer=1)
    assert one["layers"] == [1] and one["attention"] == [out["attention"][1]] and one["lens"] == out["lens"]


@pytest.mark.parametrize("name", ["gpt2", "logit_softcap", "untied", "all"])
def test_the_last_lens_layer_is_the_models_output(name):
    """The lens after the last block is the model's own next-token distribution (soft cap included); earlier
    layers differ from it."""
    model = sharp_model(seed=5, **OPTIONS[name])
    tok = CharTokenizer(CHARS[:32])
    ids = random_ids(1, 16, 32, seed=3)[0].tolist()
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids]), targets=torch.tensor([ids]))
        last, _ = model(torch.tensor([ids]))
    probs = logits[0].softmax(-1)
    torch.testing.assert_close(probs[-1], last[0, 0].softmax(-1))
    trace = run(model, ids)
    torch.testing.assert_close(lens_logits(model, trace.residual[-1][0]), logits[0], atol=1e-5, rtol=1e-5)
    out = inspect(model, tok, ids)
    want_p, want_i = probs.topk(5)
    for t, top in enumerate(out["lens"][-1]):
        assert [e["id"] for e in top] == want_i[t].tolist()
        assert [e["prob"] for e in top] == pytest.approx(want_p[t].tolist(), abs=6e-5)
    assert out["lens"][0] != out["lens"][-1]


def test_inspect_refuses_what_does_not_fit():
    model = sharp_model(seed=0)
    tok = CharTokenizer(CHARS[:32])
    for ids, layer in (([], None), ([1] * 17, None), ([1, 2], 2)):
        with pytest.raises(ValueError):
            inspect(model, tok, ids, layer)


def test_bpe_tokens_are_decoded_one_by_one():
    """GPT-2's BPE: each id decoded alone; a token that is part of a character reads as U+FFFD."""
    from nanogpt.tokenizer import GPT2Tokenizer

    tok = GPT2Tokenizer()
    ids = tok.encode("Hello world 🦜")  # the parrot is 3 tokens of GPT-2's, each part of its 4 bytes
    entries = token_entries(tok, ids)
    assert entries == [{"id": i, "text": t} for i, t in zip(ids, ["Hello", " world", " \ufffd", "\ufffd", "\ufffd"])]
