"""Optimizers and learning-rate schedules.

- AdamW (Loshchilov & Hutter 2019) for every parameter, nanoGPT's choice: weight decay on matrices and
  embeddings, none on biases and gains, as in GPT-2/3 practice.
- Muon (Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks") for the 2-D
  weights inside the transformer blocks: momentum whose update is orthogonalised by a few Newton-Schulz
  iterations, so every direction of a weight matrix learns at a similar rate. The embeddings, the
  output head, gains and biases keep AdamW, as in the modded-nanogpt speedruns. `torch.optim.Muon` does
  the work; its "match_rms_adamw" scaling lets both share one learning rate.

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


def build_optimizers(
    model: GPT, name: str, learning_rate: float, weight_decay: float, betas: tuple[float, float], device_type: str
) -> list[torch.optim.Optimizer]:
    """AdamW alone, or Muon for the blocks' matrices plus AdamW for the rest; all groups follow one
    learning rate (get_lr)."""
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
        optimizers.append(
            torch.optim.Muon(matrices, lr=learning_rate, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw")
        )
    return optimizers


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
