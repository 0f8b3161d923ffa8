"""The GPT language model, in one file you can read top to bottom. Read 1st.

The reading path: 1 this file, 2 train.py, 3 data.py and optim.py, 4 generate.py then sample.py; the
rest is machinery (checkpoints, devices, distributed training, serving) that a first read can skip.

GPT-2 architecture (Radford et al. 2019, "Language Models are Unsupervised Multitask Learners"):
token + learned position embeddings, a stack of pre-LayerNorm transformer blocks, a final LayerNorm
and a language-model head tied to the token embedding. Parameter names follow OpenAI's GPT-2
checkpoints (wte wpe h ln_f c_attn c_proj c_fc), so loading them is a key mapping (see `hf.py`).

GPTConfig also has switches for what came after GPT-2 (rotary positions, RMSNorm, QK-norm, ReLU^2,
an untied head, zero-initialised projections, logit soft-capping, the token shift). All are off by
default, and each is a small branch here, not a second model. Sampling text from the model is
generate.py's job; the KV cache lives here because the forward pass fills it.

References:
1) OpenAI's TensorFlow GPT-2: https://github.com/openai/gpt-2/blob/master/src/model.py
2) Hugging Face's PyTorch GPT-2: transformers/models/gpt2/modeling_gpt2.py
3) nanoGPT by Andrej Karpathy, whose structure this file keeps.

This module is pure: no argv, no file I/O, no environment reads, no prints.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import torch
import torch.nn as nn
from torch.nn import functional as F

NORMS = ("layernorm", "rmsnorm")


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest sequence the position embedding covers
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for efficiency
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linears and LayerNorms, like GPT-2; False is a bit better and faster
    # GELU (Hendrycks & Gimpel 2016) exactly ("gelu", as nanoGPT), or with GPT-2's tanh approximation
    # ("gelu_tanh", needed to reproduce OpenAI's checkpoints). The exact one is ~3x cheaper on CPUs.
    activation: str = "gelu"
    # Options from the work since GPT-2, all off by default so the defaults stay nanoGPT's GPT-2. The
    # speedrun configs turn them on; docs/recipe.md measures what each one buys.
    pos_emb: str = "learned"  # "rope": rotary position embeddings (Su et al. 2021, RoFormer), no wpe table
    rope_theta: float = 10000.0  # the base of RoPE's frequencies
    norm: str = "layernorm"  # "rmsnorm": RMSNorm (Zhang & Sennrich 2019), no mean subtraction, no bias
    qk_norm: bool = False  # RMS-normalise queries and keys per head (Henry et al. 2020; Dehghani et al. 2023)
    tie_weights: bool = True  # False: an untied output head (modded-nanogpt, nanochat)
    zero_init_proj: bool = False  # zero-initialise the residual output projections (modded-nanogpt)
    logit_softcap: float = 0.0  # > 0: logits = cap * tanh(logits / cap) (Gemma 2); 0 turns it off
    # add a learned per-channel share of the previous token's embedding to each token's (RWKV's token
    # shift, Peng et al. 2023; the "smear" of the modded-nanogpt records): local context for free
    token_shift: bool = False

    def __post_init__(self) -> None:
        # the one place a model shape is checked; train.py turns these messages into option errors
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.n_embd % self.n_head != 0:
            nearest = self.n_head * max(1, round(self.n_embd / self.n_head))
            raise ValueError(
                f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; each head gets n_embd / n_head "
                f"dimensions. Try n_embd={nearest}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        choices = {"activation": ("gelu", "gelu_tanh", "relu2"), "pos_emb": ("learned", "rope"), "norm": NORMS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        if self.pos_emb == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError(
                f"pos_emb='rope' needs an even head size, got n_embd / n_head = {self.n_embd // self.n_head}"
            )
        if self.rope_theta <= 0 or self.logit_softcap < 0:
            raise ValueError("rope_theta must be positive and logit_softcap at least 0")

    def to_dict(self) -> dict:
        return asdict(self)


class KVCache:
    """Keys and values of every layer for the tokens seen so far, preallocated to `block_size`.

    Decoding with a cache (prefill the prompt once, then feed one token per step) turns generation
    from O(T^2) work per token into O(T): each new token attends to stored keys instead of
    recomputing the whole prefix. The shapes never change and the fill positions are a tensor, so a
    `torch.compile`d forward pass compiles once for decoding instead of once per position.

    Every row (sequence) has its own fill position, so one cache can hold sequences of different
    lengths: the server decodes all its requests in one forward pass (continuous batching, as in
    vLLM, Kwon et al. 2023, and llama.cpp's server), each row attending to its own filled slots only.
    `cache[a:b]` is a view of rows a..b-1 sharing this cache's memory: a forward pass over it fills
    those rows alone. Generating one batch (generate.py) keeps all rows at the same length.
    """

    def __init__(self, config: GPTConfig, batch_size: int, device: torch.device, dtype: torch.dtype):
        hs = config.n_embd // config.n_head
        shape = (config.n_layer, batch_size, config.n_head, config.block_size, hs)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = torch.zeros(batch_size, dtype=torch.long, device=device)  # (B,) the next position to fill
        self.slots = torch.arange(config.block_size, device=device)  # (S,) position of each cache slot
        self.rows = torch.arange(batch_size, device=device)[:, None]  # (B, 1) row indices, for update
        # token_shift: the embedding of the last token fed, the previous token of the next one; float32,
        # the embeddings' own precision under autocast (zeros: the first token has no previous one)
        self.last_embedding = torch.zeros(batch_size, 1, config.n_embd, device=device)

    def __getitem__(self, rows: slice) -> KVCache:
        """The rows `rows` as a cache of their own, sharing this one's memory (basic slices are views)."""
        view = object.__new__(KVCache)
        view.k, view.v, view.slots = self.k[:, rows], self.v[:, rows], self.slots
        view.pos, view.last_embedding = self.pos[rows], self.last_embedding[rows]
        view.rows = self.rows[: view.pos.size(0)]  # a view's rows count from 0, as its k and v do
        return view

    @property
    def batch_size(self) -> int:
        return self.pos.size(0)

    @property
    def length(self) -> int:
        """Positions filled in the longest row (reads the device: for tests and callers, not the hot path)."""
        return int(self.pos.max())

    def reset(self) -> None:
        """Empty every row (a view: its rows only). Stale keys and values stay, masked out as unfilled."""
        self.pos.zero_()
        self.last_embedding.zero_()

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this layer's new keys/values (B, nh, T, hs) at each row's `positions` (B, T); return the
        whole cache of this layer, (B, nh, block_size, hs): slots not yet filled are masked out by the caller.
        Keys and values are stored in the cache's dtype (a no-op when they already have it)."""
        # indexing [rows, :, positions] addresses (B, T) slots of nh x hs values each, hence the transpose
        self.k[layer][self.rows, :, positions] = k.transpose(1, 2).to(self.k.dtype)
        self.v[layer][self.rows, :, positions] = v.transpose(1, 2).to(self.v.dtype)
        return self.k[layer], self.v[layer]

    def copy_(self, other: KVCache) -> KVCache:
        """Take over the rows of `other`, a cache (or view) of the same shape: to move rows into a bigger cache."""
        for mine, theirs in zip(self._state(), other._state()):
            mine.copy_(theirs)
        return self

    def keep(self, rows: list[int]) -> None:
        """Move the rows `rows` (ascending) to the front, in order, so the sequences still generating stay
        cache[:len(rows)] when others finish. Rows already in place are not copied."""
        start = next((i for i, r in enumerate(rows) if r != i), len(rows))
        source = torch.tensor(rows[start:], dtype=torch.long, device=self.pos.device)
        for t in self._state():
            rows_dim = 1 if t.dim() == 5 else 0  # k and v are (n_layer, B, ...), the others (B, ...)
            t.narrow(rows_dim, start, len(source)).copy_(t.index_select(rows_dim, source))

    def _state(self) -> tuple[torch.Tensor, ...]:
        return self.k, self.v, self.pos, self.last_embedding


def activation_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype the Linear layers produce right now: autocast's when mixed precision is on for the
    weights' device (bfloat16 or float16), else the weights' own."""
    device_type = weight.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


def make_norm(config: GPTConfig) -> nn.Module:
    """LayerNorm (GPT-2) or RMSNorm: the same `weight` parameter name, so checkpoints keep their keys."""
    if config.norm == "rmsnorm":  # RMSNorm (Zhang & Sennrich 2019): rescaling alone works as well, for less
        return nn.RMSNorm(config.n_embd)
    return nn.LayerNorm(config.n_embd, bias=config.bias)


def rope_tables(head_size: int, length: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles, (length, head_size / 2): position p turns the pair of
    dimensions (i, i + head_size/2) by p * theta^(-2i / head_size) (RoFormer, section 3.4)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_size, 2, dtype=torch.float32) / head_size))
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate queries or keys (B, nh, T, hs) by their positions' angles, cos and sin (.., T, hs / 2). The dot
    product of a rotated query and key then depends only on the distance between their positions."""
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class Positions(NamedTuple):
    """Where the T tokens of a forward pass sit, as attention needs it."""

    # (T,) absolute positions, or (B, T) with a cache (each row its own): the slots they fill and may attend to
    pos: torch.Tensor
    rope: tuple[torch.Tensor, torch.Tensor] | None  # RoPE's cos and sin at pos, (.., T, hs / 2); None: learned


@dataclass
class Trace:
    """What an inspecting forward pass (GPT.forward's `trace`) records, for inspect_model.py: each layer's
    attention weights (B, nh, T, S), computed explicitly since the fused kernel never materialises them, and
    the residual stream after each block (B, T, C). Passed per call, so the server's generating thread, which
    runs the same model at the same time, records nothing."""

    attention: list[torch.Tensor] = field(default_factory=list)
    residual: list[torch.Tensor] = field(default_factory=list)


class ReLU2(nn.Module):
    """relu(x)^2, the Primer activation (So et al. 2021): cheaper than GELU and better in speedruns."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x).square()


class TokenShift(nn.Module):
    """x_t + w * x_(t-1) per channel, w learned (initialised to zero in GPT.init_steps: the model
    starts as without it). RWKV's token shift (Peng et al. 2023): each position sees its predecessor
    before any attention, which a layer would otherwise spend its capacity on."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(config.n_embd))

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        if cache is None:
            previous = F.pad(x[:, :-1], (0, 0, 1, 0))  # (B, T, C): zeros before position 0, which has none
        else:  # the token before position 0 is the last one the cache saw
            previous = torch.cat((cache.last_embedding.to(x.dtype), x[:, :-1]), dim=1)  # (B, T, C)
            cache.last_embedding.copy_(x[:, -1:])
        return x + self.weight * previous


def explicit_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, trace: Trace
) -> torch.Tensor:
    """softmax(q k^T / sqrt(hs)) v, what scaled_dot_product_attention computes (without dropout: inspection
    runs in eval mode), with the weights (B, nh, T, S) appended to `trace`. `mask`: True where a query may
    attend; None: causal, query t sees keys 0..t."""
    T, S = q.size(-2), k.size(-2)
    if mask is None:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, nh, T, S)
    # in float32 under autocast too, as the fused kernels do: 16-bit weights would not sum to 1 to 4 decimals
    weights = scores.float().masked_fill(~mask, float("-inf")).softmax(dim=-1)  # exactly zero where masked
    trace.attention.append(weights)
    return weights.to(v.dtype) @ v  # (B, nh, T, hs)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention (Vaswani et al. 2017): every head mixes the values of the
    positions up to and including this one, weighted by softmax(q . k / sqrt(hs))."""

    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        # key, query and value projections for all heads, in one matmul
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        # output projection back into the residual stream
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.qk_norm = config.qk_norm

    def forward(
        self, x: torch.Tensor, at: Positions, cache: KVCache | None = None, trace: Trace | None = None
    ) -> torch.Tensor:
        B, T, C = x.size()  # batch size, sequence length, embedding dimensionality (n_embd)
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        hs = C // self.n_head
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        if self.qk_norm:  # unit-RMS queries and keys keep the attention logits from growing without bound
            q, k = F.rms_norm(q, (hs,)), F.rms_norm(k, (hs,))
        if at.rope is not None:  # positions enter here, as rotations, instead of being added to the input
            q, k = apply_rope(q, *at.rope), apply_rope(k, *at.rope)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v, at.pos)  # (B, nh, block_size, hs)
            # query at absolute position p sees the cache slots 0..p of its row: causal, and blind to unfilled
            # slots, each row at its own length
            attn_mask, is_causal = (at.pos[:, :, None] >= cache.slots).unsqueeze(1), False  # (B, 1, T, block_size)
        else:
            attn_mask, is_causal = None, True
        if trace is not None:  # inspection: the same attention written out, its weights kept
            y = explicit_attention(q, k, v, attn_mask, trace)
        else:
            # scaled dot-product attention (Vaswani et al. 2017); PyTorch picks a fused kernel
            # (FlashAttention on recent GPUs) so the (T, T) attention matrix is never materialised
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0, is_causal=is_causal
            )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble all head outputs side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """The position-wise feed-forward network (Vaswani et al. 2017), 4x wider inside: where each token
    is computed on alone, after attention has gathered its context."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        if config.activation == "relu2":
            self.act = ReLU2()
        else:
            self.act = nn.GELU(approximate="tanh" if config.activation == "gelu_tanh" else "none")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x)) (GPT-2, section 2.3)."""

    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, at: Positions, cache: KVCache | None = None, trace: Trace | None = None
    ) -> torch.Tensor:
        # the residual stream x is only ever added to, so gradients reach the first layer unchanged;
        # normalising each sub-block's input, not its output, is what keeps deep stacks stable
        x = x + self.attn(self.ln_1(x), at, cache, trace)
        x = x + self.mlp(self.ln_2(x))
        return x


def _children_first(module: nn.Module) -> Iterator[nn.Module]:
    """module and everything in it, each module after its children: the order of module.apply(fn)."""
    for child in module.children():
        yield from _children_first(child)
    yield module


class GPT(nn.Module):
    """Embeddings, n_layer Blocks, a final norm and the language-model head: next-token logits."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        modules = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))  # token embedding
        if config.pos_emb == "learned":
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)  # learned position embedding
        if config.token_shift:
            modules["shift"] = TokenShift(config)
        modules.update(
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=make_norm(config),  # pre-norm blocks leave the residual stream un-normalised: GPT-2 adds this
        )
        self.transformer = nn.ModuleDict(modules)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            # weight tying (Press & Wolf 2017): the output projection reuses the token embedding,
            # which saves vocab_size * n_embd parameters and is what GPT-2 does
            self.transformer.wte.weight = self.lm_head.weight
        self.init_buffers()
        # torch's layers drew their own initialisation as they were built, in the order they are registered
        # here (distributed.materialise relies on that to draw those numbers again); ours replaces it
        for p, init in self.init_steps():
            init(p)

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """The buffers derived from the config, RoPE's cos and sin tables: computed, so not saved in
        checkpoints, and computed again for a model materialised from the meta device (distributed.py)."""
        if self.config.pos_emb == "rope":
            cfg = self.config
            cos, sin = rope_tables(cfg.n_embd // cfg.n_head, cfg.block_size, cfg.rope_theta)
            self.register_buffer("rope_cos", cos.to(device), persistent=False)
            self.register_buffer("rope_sin", sin.to(device), persistent=False)

    def init_steps(self) -> Iterator[tuple[nn.Parameter, Callable[[torch.Tensor], object]]]:
        """GPT-2's initialisation, the one place weights are initialised: (parameter, init function) steps
        in the order they draw random numbers. N(0, 0.02) for Linear and Embedding weights, zero biases, a
        zero token shift. Each step sets the whole parameter (none reads it), so a later one overrides an
        earlier one: a tied weight takes lm_head's draw. GPT() runs the steps on the model itself;
        distributed.materialise runs them on a sharded model, one whole parameter at a time."""
        normal = functools.partial(torch.nn.init.normal_, mean=0.0, std=0.02)
        for module in _children_first(self):  # the order of nanoGPT's self.apply(self._init_weights)
            if isinstance(module, nn.Linear):
                yield module.weight, normal
                if module.bias is not None:
                    yield module.bias, torch.nn.init.zeros_
            elif isinstance(module, nn.Embedding):
                yield module.weight, normal
            elif isinstance(module, TokenShift):  # the model starts as without it
                yield module.weight, torch.nn.init.zeros_
        # GPT-2 paper, section 2.3: scale the weights of residual projections by 1/sqrt(N), N being
        # the number of residual layers (2 per block), so the residual stream's variance stays put.
        # With zero_init_proj each block starts as the identity instead (modded-nanogpt); the draw still
        # happens, so the random numbers after it are those of the scaled initialisation
        scaled = functools.partial(torch.nn.init.normal_, mean=0.0, std=0.02 / math.sqrt(2 * self.config.n_layer))
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                yield p, scaled
                if self.config.zero_init_proj:
                    yield p, torch.nn.init.zeros_

    def get_num_params(self, non_embedding: bool = True) -> int:
        """Number of parameters. Embedding tables (lookups, no matmul) are excluded by default, as is
        customary: the learned position embedding, and the token embedding unless the output layer
        shares it."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            if "wpe" in self.transformer:
                n -= self.transformer.wpe.weight.numel()
            if not self.config.tie_weights:
                n -= self.transformer.wte.weight.numel()
        return n

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        trace: Trace | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) token ids -> logits (B, T, vocab_size) and, with targets, the mean cross-entropy.

        Without targets only the last position's logits are computed, (B, 1, vocab_size): that is
        all generation needs and it skips most of the lm_head work. A `trace` records the attention
        weights and the residual stream of every layer (inspect_model.py).
        """
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(f"cannot forward {T} positions, block_size is {self.config.block_size}")
        pos = torch.arange(T, dtype=torch.long, device=idx.device)  # (T,)
        if cache is not None:
            # each row goes on from its own fill position (rows may differ: the server's continuous batching).
            # The caller keeps every row's length + T <= block_size (generate does); checking here would
            # read the positions back from the device at every step
            pos = cache.pos[:, None] + pos  # (B, T)
        x = self.transformer.wte(idx)  # token embeddings (B, T, n_embd)
        if "shift" in self.transformer:
            x = self.transformer.shift(x, cache)
        rope = None
        if "wpe" in self.transformer:
            x = x + self.transformer.wpe(pos)  # plus position embeddings, (T, n_embd) or (B, T, n_embd)
        else:  # cos and sin at pos, broadcast over the heads: (1, T, hs / 2) or (B, 1, T, hs / 2) each
            rope = (self.rope_cos[pos].unsqueeze(-3), self.rope_sin[pos].unsqueeze(-3))
        x = self.transformer.drop(x)
        at = Positions(pos, rope)
        for block in self.transformer.h:
            x = block(x, at, cache, trace)
            if trace is not None:  # the residual stream after each block: the logit lens's input
                trace.residual.append(x)
        if cache is not None:
            cache.pos += T
        x = self.transformer.ln_f(x)
        if targets is None:
            x = x[:, -1:, :]  # generation needs the last position only
        logits = self.head(x)  # (B, T, vocab_size), or (B, 1, vocab_size)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """The normalised residual stream (.., n_embd) -> next-token logits (.., vocab_size)."""
        logits = self.lm_head(x)
        if self.config.logit_softcap:  # smoothly bounded logits (Gemma 2): no token's score can run away
            cap = self.config.logit_softcap
            logits = cap * torch.tanh(logits / cap)
        return logits

    def crop_block_size(self, block_size: int) -> None:
        """Shrink the context window, e.g. to finetune GPT-2 (1024) with a smaller block_size."""
        if not 0 < block_size <= self.config.block_size:
            raise ValueError(f"block_size must be in 1..{self.config.block_size}, got {block_size}")
        self.config.block_size = block_size
        if "wpe" in self.transformer:
            self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])
        else:
            self.rope_cos, self.rope_sin = self.rope_cos[:block_size], self.rope_sin[:block_size]

    def estimate_flops_per_token(self) -> float:
        """Training FLOPs per token: 6N for the matmuls plus attention, PaLM paper appendix B."""
        N = self.get_num_params()
        cfg = self.config
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.block_size
        return 6 * N + 12 * L * H * Q * T

    def generate(self, idx: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
        """nanoGPT's `model.generate(idx, max_new_tokens, temperature=..., top_k=...)`: see generate.py,
        where generation lives (imported here, not at the top: generate.py imports this module)."""
        from nanogpt.generate import generate

        return generate(self, idx, max_new_tokens, **kwargs)
