"""Optimizers and learning-rate schedules: read third, with data.py, after model.py and train.py
(`get_lr` is nanoGPT's; the README's "Read the code").

- AdamW (Loshchilov & Hutter 2019) for every parameter, nanoGPT's choice: weight decay on matrices and
  embeddings, none on biases and gains, as in GPT-2/3 practice.
- Muon (Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks") for the 2-D
  weights inside the transformer blocks: momentum whose update is orthogonalised by a few Newton-Schulz
  iterations, so every direction of a weight matrix learns at a similar rate. The embeddings, the
  output head, gains and biases keep AdamW, as in the modded-nanogpt speedruns. This is torch.optim.Muon
  (its state, options and "match_rms_adamw" scaling, which lets both optimizers share one schedule;
  --muon_lr_scale multiplies Muon's peak) with two changes that leave its bfloat16 results bit for bit
  the same. The Newton-Schulz iteration runs in float32 on CPUs: torch.optim.Muon always runs it in
  bfloat16, which CPUs without bfloat16 units emulate (on the seed CPU model it managed 31 iterations in
  30 s where AdamW managed 431). And same-shaped matrices are orthogonalised together, one batched
  iteration per shape: on the 4-layer seed CPU model that halves the optimizer step (49 to 25 ms; the whole
  training step 133 to 98 ms, AdamW's 80 ms; 2-core AVX2 AMD EPYC, 2026-11-29).

Schedules give the learning rate as a fraction of its peak, from the run's progress: the iteration over
max_iters, or, under a time budget, the elapsed training time over max_seconds, whichever is further.
- cosine: linear warm-up, then a cosine down to min_lr at lr_decay_iters (GPT-3, nanoGPT);
- wsd: linear warm-up, a long stable phase at the peak, and a linear cool-down to min_lr over the last
  cooldown_frac of the run (warmup-stable-decay, Hu et al. 2024 "MiniCPM"; Hägele et al. 2024).
"""

from __future__ import annotations

import math

import torch

from nanogpt.errors import UserError
from nanogpt.model import GPT

OPTIMIZERS = ("adamw", "muon")
SCHEDULES = ("cosine", "wsd")


def newton_schulz(
    g: torch.Tensor, steps: int, eps: float, coefficients: tuple[float, float, float], dtype: torch.dtype
) -> torch.Tensor:
    """Approximately orthogonalise g (towards U V^T of its SVD): Keller Jordan's quintic Newton-Schulz
    iteration, X <- a X + (b X X^T + c (X X^T)^2) X, after scaling X to spectral norm at most 1.
    g is one matrix (m, n) or a stack of them (k, m, n), orthogonalised each on its own."""
    a, b, c = coefficients
    x = g.to(dtype)
    if x.dim() == 2:
        return newton_schulz(x[None], steps, eps, coefficients, dtype)[0]
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the wide orientation: the Gram matrix X X^T is the smaller one
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


class Muon(torch.optim.Muon):
    """torch.optim.Muon with the Newton-Schulz iteration in `ns_dtype`, batched over same-shaped matrices
    (see the module docstring)."""

    def __init__(self, params, ns_dtype: torch.dtype, **kwargs):
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            params, updates = [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)
                params.append(p)
                updates.append(p.grad.lerp(buf, momentum) if group["nesterov"] else buf)
            # one batched iteration per shape: the blocks' matrices come in a few shapes, n_layer of each
            by_shape: dict[torch.Size, list[int]] = {}
            for i, u in enumerate(updates):
                by_shape.setdefault(u.shape, []).append(i)
            for idx in by_shape.values():
                stacked = torch.stack([updates[i] for i in idx])
                ortho = newton_schulz(stacked, group["ns_steps"], group["eps"], group["ns_coefficients"], self.ns_dtype)
                for k, i in enumerate(idx):
                    p = params[i]
                    scale = 0.2 * math.sqrt(max(p.shape))  # "match_rms_adamw": AdamW's update size, AdamW's lr
                    p.mul_(1 - lr * group["weight_decay"])
                    p.add_(ortho[k].to(p.dtype), alpha=-lr * scale)
        return loss


def build_optimizers(
    model: GPT, name: str, learning_rate: float, weight_decay: float, betas: tuple[float, float], device_type: str
) -> list[torch.optim.Optimizer]:
    """AdamW alone, or Muon for the blocks' matrices plus AdamW for the rest; all groups follow one
    schedule (get_lr, set_lr)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    hidden = {n for n, p in params.items() if name == "muon" and p.dim() == 2 and n.startswith("transformer.h.")}
    decay = [p for n, p in params.items() if n not in hidden and p.dim() >= 2]
    no_decay = [p for n, p in params.items() if n not in hidden and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # the fused kernel does the whole update in one launch; it exists for CUDA, MPS and CPU tensors
    fused = device_type in ("cuda", "cpu", "mps")
    optimizers: list[torch.optim.Optimizer] = [torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)]
    if hidden:
        if not hasattr(torch.optim, "Muon"):
            raise UserError(
                f"--optimizer=muon needs torch.optim.Muon, which PyTorch {torch.__version__} does not have (it came "
                "with PyTorch 2.9). Upgrade PyTorch, or use --optimizer=adamw."
            )
        matrices = [params[n] for n in sorted(hidden)]
        ns_dtype = torch.float32 if device_type == "cpu" else torch.bfloat16
        optimizers.append(
            Muon(matrices, ns_dtype, lr=learning_rate, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw")
        )
    return optimizers


def set_lr(optimizers: list[torch.optim.Optimizer], lr: float, muon_scale: float = 1.0) -> float:
    """Set the learning rate of every group: `lr`, times `muon_scale` for Muon's. Returns lr."""
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = lr * muon_scale if isinstance(optimizer, torch.optim.Muon) else lr
    return lr


def get_lr(it: int, o, seconds: float = 0.0) -> float:
    """The learning rate at iteration `it`, `seconds` of training in, for TrainOptions `o`."""
    if not o.decay_lr:
        return o.learning_rate
    warm = o.learning_rate * (it + 1) / (o.warmup_iters + 1)  # linear warm-up
    if o.lr_schedule == "cosine" and o.max_seconds <= 0:  # nanoGPT's schedule, by iterations
        if it < o.warmup_iters:
            return warm
        if it > o.lr_decay_iters:
            return o.min_lr
        ratio = (it - o.warmup_iters) / max(1, o.lr_decay_iters - o.warmup_iters)
        coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))  # goes from 1 to 0
        return o.min_lr + coeff * (o.learning_rate - o.min_lr)
    # progress through the run: by iterations, or by time under a budget, whichever is further along
    progress = it / max(1, o.max_iters)
    if o.max_seconds > 0:
        progress = max(progress, seconds / o.max_seconds)
    progress = min(progress, 1.0)
    if o.lr_schedule == "cosine":  # under a time budget the cosine follows the progress
        scheduled = o.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (o.learning_rate - o.min_lr)
    else:
        into = max(0.0, progress - (1.0 - o.cooldown_frac)) / o.cooldown_frac  # 0 until the cool-down, then -> 1
        scheduled = o.learning_rate + into * (o.min_lr - o.learning_rate)
    # a budget too short for the warm-up still ends cooled down
    return min(warm, scheduled) if it < o.warmup_iters else scheduled
