"""TrainOptions: every option of train.py, with its default, its help line and its checks.

Machinery a first read skips (the reading path is in the README, "Read the code"): train.py reads
these as `o.learning_rate`, `o.batch_size`..., as nanoGPT's train.py reads its globals. Defaults train
GPT-2 124M on OpenWebText, as nanoGPT's do; config files and --key=value options override them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from nanogpt.config import device_option, option
from nanogpt.errors import UserError
from nanogpt.model import GPTConfig
from nanogpt.optim import OPTIMIZERS, SCHEDULES

# the GPTConfig fields a resumed run must keep (its weights only fit that model)
MODEL_SHAPE_KEYS = (
    "n_layer", "n_head", "n_embd", "block_size", "bias",
    "activation", "pos_emb", "rope_theta", "norm", "qk_norm", "tie_weights", "logit_softcap", "token_shift",
)  # fmt: skip
MODEL_OPTIONS = (*MODEL_SHAPE_KEYS, "dropout", "zero_init_proj")  # the options that are GPTConfig fields


@dataclass
class TrainOptions:
    # I/O
    out_dir: str = option("out", "folder for checkpoints (ckpt.pt, interrupt.pt)")
    eval_interval: int = option(2000, "evaluate train/val loss (and maybe checkpoint) every this many iterations")
    log_interval: int = option(1, "print the training loss every this many iterations")
    eval_iters: int = option(200, "batches per split used to estimate the loss at each evaluation")
    eval_only: bool = option(False, "evaluate once and exit (e.g. to measure a pretrained GPT-2)")
    always_save_checkpoint: bool = option(True, "checkpoint at every evaluation, not only when val loss improves")
    init_from: str = option(
        "scratch", "'scratch', 'resume' (from out_dir), gpt2 / gpt2-medium / gpt2-large / gpt2-xl, or a HF folder"
    )
    # logging
    wandb_log: bool = option(False, "log to Weights & Biases (pip install wandb; WANDB_MODE=offline works)")
    wandb_project: str = option("owt", "wandb project name")
    wandb_run_name: str = option("gpt2", "wandb run name")
    progress: bool = option(True, "show a tqdm progress bar when writing to a terminal")
    plot: bool = option(True, "redraw <out_dir>/loss.png at each evaluation when matplotlib is installed")
    eval_sample_tokens: int = option(
        48, "at each evaluation, sample this many tokens from a fixed prompt into metrics.jsonl (0: none)"
    )
    # data
    dataset: str = option("openwebtext", "dataset name: its files are in <data_dir>, default data/<dataset>")
    data_dir: str = option("", "folder with train.bin, val.bin and meta.json; default data/<dataset>")
    gradient_accumulation_steps: int = option(5 * 8, "micro-batches per optimizer step (summed over all ranks)")
    batch_size: int = option(12, "sequences per micro-batch (per rank)")
    block_size: int = option(1024, "context length in tokens")
    # model
    n_layer: int = option(12, "number of transformer blocks")
    n_head: int = option(12, "attention heads per block")
    n_embd: int = option(768, "embedding width; must be divisible by n_head")
    dropout: float = option(0.0, "dropout probability: 0 for pretraining, 0.1+ for finetuning")
    bias: bool = option(False, "biases in Linear and LayerNorm layers (GPT-2 has them)")
    # model: what came after GPT-2, all off by default (see nanogpt/model.py and docs/recipe.md)
    activation: str = option("gelu", "MLP activation: gelu (exact, nanoGPT), gelu_tanh (GPT-2's), relu2 (Primer)")
    pos_emb: str = option("learned", "position embeddings: learned (GPT-2) or rope (rotary, RoFormer)")
    rope_theta: float = option(10000.0, "the base of the rotary frequencies (pos_emb=rope)")
    norm: str = option("layernorm", "layernorm (GPT-2) or rmsnorm")
    qk_norm: bool = option(False, "RMS-normalise each head's queries and keys")
    tie_weights: bool = option(True, "share the token embedding with the output layer (GPT-2); False unties it")
    zero_init_proj: bool = option(False, "start every block's output projections at zero (modded-nanogpt)")
    logit_softcap: float = option(0.0, "cap the logits smoothly at this value (Gemma 2); 0 turns it off")
    token_shift: bool = option(False, "add a learned share of the previous token's embedding to each (RWKV)")
    # optimizer
    optimizer: str = option("adamw", "adamw (nanoGPT), or muon: Muon for the blocks' matrices, AdamW for the rest")
    learning_rate: float = option(6e-4, "peak learning rate")
    muon_lr_scale: float = option(
        1.0, "muon: Muon's learning rate as a multiple of learning_rate (1: AdamW's update size, see optim.py)"
    )
    max_iters: int = option(600000, "total optimizer steps")
    weight_decay: float = option(1e-1, "AdamW weight decay for 2-D weights")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.95, "AdamW beta2")
    grad_clip: float = option(1.0, "clip gradients to this global norm; 0 disables")
    # learning rate schedule
    decay_lr: bool = option(True, "warm up then follow lr_schedule; False keeps the learning rate constant")
    lr_schedule: str = option(
        "cosine", "cosine (to min_lr at lr_decay_iters, nanoGPT) or wsd (warm-up, stable, linear cool-down to min_lr)"
    )
    cooldown_frac: float = option(
        0.2, "wsd: the last fraction of the run (iterations, or the time budget) cooling down"
    )
    warmup_iters: int = option(2000, "iterations of linear warm-up")
    lr_decay_iters: int = option(600000, "iteration at which the cosine decay reaches min_lr (~max_iters)")
    min_lr: float = option(6e-5, "final learning rate (~learning_rate / 10, Chinchilla)")
    # budgets
    max_seconds: float = option(
        0.0,
        "training-time budget in seconds (evaluations excluded; 0: none). The schedule follows the time, so the "
        "run ends cooled down; a resumed run continues the remaining budget",
    )
    target_val_loss: float = option(0.0, "stop at the first evaluation whose val loss is at most this (0: never)")
    milestones: str = option("", "comma-separated val losses; the closing line says when each was first reached")
    # system
    backend: str = option("auto", "DDP backend: auto (nccl on CUDA, gloo on CPU), nccl or gloo")
    fsdp: bool = option(
        False,
        "under torchrun: shard weights, gradients and optimizer state over the processes (FSDP2, fully_shard) "
        "instead of replicating them (DDP)",
    )
    consolidate: bool = option(
        True,
        "--fsdp: when the run ends, also write its last sharded checkpoint as one ckpt.pt (one process then holds "
        "the whole model and AdamW state in CPU memory, 16 bytes per parameter; `nanogpt consolidate` does it later)",
    )
    activation_checkpointing: bool = option(
        False, "recompute each block's activations during backward instead of keeping them: less memory, more compute"
    )
    device: str = device_option()
    dtype: str = option(
        "auto",
        "auto (bfloat16 on recent GPUs, float16 with loss scaling on old ones, float32 elsewhere), float32, "
        "bfloat16, float16; on CPUs without bf16/fp16 units the 16-bit types are emulated and slow",
    )
    compile: Optional[bool] = option(
        None,
        "torch.compile the model: slower start, faster steps. None (auto) compiles on CUDA only; on CPUs "
        "and mps it did not pay off (docs/performance.md)",
    )
    seed: int = option(1337, "random seed (batches: the same for any number of processes; dropout: plus the rank)")

    def __post_init__(self) -> None:
        for name in ("eval_interval", "log_interval", "eval_iters", "gradient_accumulation_steps", "batch_size"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name} must be a positive integer, got {getattr(self, name)}.")
        for name in ("max_iters", "warmup_iters", "lr_decay_iters", "eval_sample_tokens"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name} must not be negative, got {getattr(self, name)}.")
        try:  # the model's own checks; the vocabulary comes from the data later, so any valid size will do
            self.model_config(vocab_size=1)
        except ValueError as e:  # GPTConfig names its fields; here they are options
            raise UserError(re.sub(rf"\b({'|'.join(MODEL_OPTIONS)})\b", r"--\1", f"{e}.")) from None
        for name in ("learning_rate", "muon_lr_scale"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name} must be positive, got {getattr(self, name)}.")
        for name in ("min_lr", "weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name} must be at least 0, got {getattr(self, name)}.")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise UserError("--beta1 and --beta2 must be in [0, 1).")
        if self.backend not in ("auto", "nccl", "gloo"):
            raise UserError(f"--backend must be auto, nccl or gloo, got {self.backend!r}.")
        if self.optimizer not in OPTIMIZERS or self.lr_schedule not in SCHEDULES:
            raise UserError(
                f"--optimizer must be one of {', '.join(OPTIMIZERS)} and --lr_schedule one of {', '.join(SCHEDULES)}; "
                f"got {self.optimizer!r} and {self.lr_schedule!r}."
            )
        if not 0.0 < self.cooldown_frac <= 1.0 or self.max_seconds < 0 or self.target_val_loss < 0:
            raise UserError("--cooldown_frac must be in (0, 1]; --max_seconds and --target_val_loss at least 0.")
        try:
            self.milestone_losses  # noqa: B018 - parsed here so a typo fails before training
        except ValueError:
            raise UserError(
                f"--milestones must be comma-separated numbers, e.g. 1.886,1.6; got {self.milestones!r}."
            ) from None

    @property
    def milestone_losses(self) -> list[float]:
        """The val losses the closing line times: --milestones, and --target_val_loss when set."""
        values = [float(v) for v in self.milestones.split(",") if v.strip()]
        return sorted({*values, *([self.target_val_loss] if self.target_val_loss else [])}, reverse=True)

    def model_config(self, vocab_size: int) -> GPTConfig:
        return GPTConfig(vocab_size=vocab_size, **{k: getattr(self, k) for k in MODEL_OPTIONS})

    @property
    def resolved_data_dir(self) -> Path:
        return Path(self.data_dir) if self.data_dir else Path("data") / self.dataset


def check_fsdp_options(o: TrainOptions, under_torchrun: bool) -> None:
    """--fsdp=True with the options it cannot work with: refused before any process group starts."""
    if not under_torchrun:
        raise UserError(
            "--fsdp=True shards the model over the processes torchrun starts: run it under torchrun, e.g. "
            "torchrun --standalone --nproc_per_node=2 train.py ... --fsdp=True."
        )
    if o.optimizer == "muon":
        raise UserError(
            "--optimizer=muon cannot run with --fsdp=True: Muon orthogonalises whole matrices, and FSDP gives each "
            "process a shard of each. Use --optimizer=adamw, or leave --fsdp off (DDP replicates the matrices)."
        )
    if o.compile:
        raise UserError("--compile=True is not supported with --fsdp=True yet; leave --compile unset (auto).")
