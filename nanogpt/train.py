"""Train a GPT, on one device or many (DDP or FSDP under torchrun).

    python train.py config/train_shakespeare_char.py --device=cpu --compile=False --max_iters=2000
    torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py

Defaults train GPT-2 124M on OpenWebText, as nanoGPT does. A config file (Python assignment
syntax, parsed not executed) and --key=value options override them, in the order given.
Checkpoints go to <out_dir>/ckpt.pt; Ctrl-C or SIGTERM saves <out_dir>/interrupt.pt. With
--fsdp=True both are sharded, into ckpt.dcp and interrupt.dcp, and ckpt.dcp is consolidated into
ckpt.pt when the run ends.
Resume from any of them with --init_from=resume.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import random
import re
import shlex
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from tqdm import tqdm

from nanogpt.atomic import remove_stale_temp_files
from nanogpt.checkpoint import (
    CKPT_NAME,
    INTERRUPT_NAME,
    INTERRUPT_SHARDED_NAME,
    MANIFEST_NAME,
    SHARDED_NAME,
    consolidate,
    empty_model,
    load_resume_checkpoint,
    model_from_checkpoint,
    read_manifest,
    save_checkpoint,
    save_sharded,
)
from nanogpt.config import option, parse_args
from nanogpt.data import TokenBatches, read_meta
from nanogpt.device import DTYPES, autocast, enable_tf32, resolve_dtype
from nanogpt.distributed import (
    Place,
    checkpoint_blocks,
    end_processes,
    gather_rng_states,
    load_checked_shards,
    optimizer_state_by_name,
    rng_to_restore,
    shard,
    start_processes,
    under_torchrun,
    wrap_model,
)
from nanogpt.errors import UserError, run_main
from nanogpt.memory import TRAIN_ADVICE, is_out_of_memory, out_of_memory, require, training_bytes
from nanogpt.metrics import METRICS_NAME, MetricsWriter
from nanogpt.mfu import peak_flops
from nanogpt.model import GPT, GPTConfig
from nanogpt.optim import OPTIMIZERS, SCHEDULES, build_optimizers, get_lr, set_lr

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
    device: str = option("auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
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
        for name in ("max_iters", "warmup_iters", "lr_decay_iters"):
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


# ----------------------------------------------------------------------------- random state


def rng_state(data_gens: list[torch.Generator]) -> dict[str, Any]:
    """Every random state a training step draws from, as plain values and tensors."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "data": [g.get_state() for g in data_gens],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], data_gens: list[torch.Generator]) -> None:
    random.setstate(_tuples(state["python"]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np_state[1].numpy(), *np_state[2:]))
    torch.set_rng_state(state["torch"])
    data = [state["data"]] if torch.is_tensor(state["data"]) else state["data"]  # older checkpoints: one
    if len(data) == len(data_gens):
        for g, saved in zip(data_gens, data):
            g.set_state(saved)
    else:
        print(
            f"warning: the checkpoint's batches came from {len(data)} generator(s) per process and this run draws "
            f"from {len(data_gens)} (--gradient_accumulation_steps changed); they start afresh, so the resumed run "
            "is correct but not bit-identical.",
            file=sys.stderr,
        )
    if "cuda" in state and torch.cuda.is_available():
        saved, here = len(state["cuda"]), torch.cuda.device_count()
        if saved != here:  # set_rng_state_all would fail on a GPU index that no longer exists
            print(
                f"warning: the checkpoint holds the random states of {saved} GPU(s) and this machine has {here}; "
                "the CUDA generators start afresh, so the resumed run is correct but not bit-identical.",
                file=sys.stderr,
            )
        else:
            torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(x: Any) -> Any:
    """weights_only loading may return lists where tuples were saved; random.setstate wants tuples."""
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def estimate_loss(model, batches: TokenBatches, o: TrainOptions, device: str, ctx, seed: int) -> dict[str, float]:
    """Mean loss over eval_iters batches per split. The batches are the same at every evaluation
    (a fixed seed), so successive val losses differ only because the model changed."""
    out = {}
    model.eval()
    for i, split in enumerate(("train", "val")):
        gen = torch.Generator().manual_seed(seed + 1_000_003 * (i + 1))
        losses = torch.zeros(o.eval_iters)
        for k in range(o.eval_iters):
            x, y = batches.get_batch(split, o.batch_size, gen, device)
            with ctx:
                _, loss = model(x, y)
            losses[k] = loss.item()
        out[split] = losses.mean().item()
    model.train()
    return out


# ----------------------------------------------------------------------------- stopping


class StopRequest:
    """Turns the first Ctrl-C or SIGTERM into a flag checked between iterations, so the run can save
    a clean checkpoint; a second Ctrl-C interrupts immediately, except under torchrun, which passes a
    terminal's Ctrl-C on to processes that got it already (and kills them itself if they take too long)."""

    def __init__(self, at: Place) -> None:
        self.at = at
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.signal_name is not None and signum == signal.SIGINT and not self.at.torchrun:
            raise KeyboardInterrupt
        self.signal_name = self.signal_name or signal.Signals(signum).name

    def agreed(self) -> str | None:
        """The signal that stops the run, the same on every process. A signal reaches torchrun's processes
        at slightly different moments, so they share what they got after each iteration (one small
        all-reduce, on the CPU) and all stop after the same one, where they can save together."""
        if self.at.world == 1:
            return self.signal_name
        import torch.distributed as dist

        names = ("SIGINT", "SIGTERM")
        got = torch.tensor([names.index(self.signal_name) + 1 if self.signal_name else 0])
        dist.all_reduce(got, op=dist.ReduceOp.MAX, group=self.at.cpu_group)
        return names[int(got) - 1] if int(got) else None

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not in the main thread: leave signals alone
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def resume_command(argv: Sequence[str]) -> str:
    args = [a for a in argv if not a.startswith("--init_from=")]
    return shlex.join(["python", "train.py", *args, "--init_from=resume"])


# ----------------------------------------------------------------------------- the run


def build_model(o: TrainOptions, explicit: set[str], meta: dict, at: Place) -> tuple[GPT, dict | None]:
    """The model to train and, when resuming, the checkpoint it came from. With fsdp, a sharded checkpoint's
    weights stay on disk until the model is sharded (TrainState.restore loads them)."""
    if o.init_from == "scratch":
        vocab_size = meta["vocab_size"] or 50304  # GPT-2's 50257 padded up to a multiple of 64
        return GPT(o.model_config(vocab_size)), None
    if o.init_from == "resume":
        path, ckpt = load_resume_checkpoint(o.out_dir, sharded=at.fsdp)
        saved = ckpt["model_args"]
        clash = [
            f"{k}: checkpoint {saved[k]!r}, requested {getattr(o, k)!r}"
            for k in MODEL_SHAPE_KEYS
            if k in explicit and saved.get(k) != getattr(o, k)
        ]
        if clash:
            raise UserError(
                f"cannot resume from {path}: its model has a different shape than requested ({'; '.join(clash)}). "
                "Drop those options to resume as saved, or use a new --out_dir to start a new run."
            )
        if at.master:
            print(f"resuming from {path} at iteration {ckpt['iter_num']}")
        if "shards" in ckpt:
            return empty_model(ckpt, dropout=o.dropout), ckpt
        return model_from_checkpoint(ckpt, dropout=o.dropout), ckpt
    from nanogpt.hf import load_pretrained_gpt2  # transformers is only needed for this path

    model = load_pretrained_gpt2(o.init_from, dropout=o.dropout)
    if o.block_size < model.config.block_size:
        model.crop_block_size(o.block_size)
    elif o.block_size > model.config.block_size and "block_size" in explicit:
        raise UserError(
            f"--block_size={o.block_size} is larger than {o.init_from}'s context ({model.config.block_size}); "
            "use a block_size up to that."
        )
    return model, None


def main(argv: Sequence[str] | None = None) -> None:
    started = time.time()
    argv = list(sys.argv[1:] if argv is None else argv)
    o, explicit = parse_args(TrainOptions, argv, "python train.py", __doc__ or "")

    if o.fsdp:
        check_fsdp_options(o, under_torchrun())
    at = start_processes(o.device, o.backend, o.gradient_accumulation_steps, o.fsdp)
    try:
        train(o, explicit, argv, at, started)
    except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError is a RuntimeError
        if not is_out_of_memory(e):
            raise
        raise out_of_memory(at.device, TRAIN_ADVICE) from None
    finally:
        end_processes(at)
    if o.fsdp and o.consolidate and at.master and not o.eval_only and read_manifest(Path(o.out_dir) / SHARDED_NAME):
        # the run is over: its last sharded checkpoint as one file, for sample.py, eval and export
        print(f"consolidated the sharded checkpoint into {consolidate(o.out_dir, (SHARDED_NAME,))[0]}")


def train(o: TrainOptions, explicit: set[str], argv: list[str], at: Place, started: float) -> None:
    """The training loop, nanoGPT's: evaluate and checkpoint every eval_interval, one optimizer step
    per iteration, until max_iters, the time budget, the target loss or a signal."""
    dtype = resolve_dtype(o.dtype, at.device, training=True)
    if at.fsdp and dtype == "float16":
        raise UserError(
            "--fsdp=True trains in bfloat16 or float32, not float16 (its loss scaling is not supported on sharded "
            "gradients here): use --dtype=bfloat16 (or float32)."
        )
    tokens_per_iter = at.grad_accum * at.world * o.batch_size * o.block_size
    if at.master:
        print(f"tokens per iteration will be: {tokens_per_iter:,}")
    state, batches, resumed = setup(o, explicit, at, dtype)
    skip_eval_at = None
    if resumed is not None:
        # a checkpoint saved at an evaluation already did the evaluation at its iteration
        skip_eval_at = state.iter_num if resumed["reason"] == "eval" and not o.eval_only else None
        # past max_iters, or saved by the final evaluation (the step after it changes no file): nothing to do
        finished = state.iter_num > o.max_iters or (state.iter_num == o.max_iters and skip_eval_at == state.iter_num)
        if finished and not o.eval_only:
            if at.master:
                print(
                    f"the checkpoint is at iteration {state.iter_num}, the end of --max_iters={o.max_iters}: "
                    "nothing to do. Give a larger --max_iters to train on."
                )
            return
    model = wrap_model(state.model, o.compile, at)
    out_dir = prepare_out_dir(o.out_dir) if at.master else Path(o.out_dir)
    ctx = autocast(at.device, dtype)
    watch = DivergenceWatch(at.device)
    flops_per_iter = state.model.estimate_flops_per_token() * tokens_per_iter / at.world
    peak = peak_flops(at.device, DTYPES[dtype]) if at.master else 1.0
    metrics = None
    if at.master and not o.eval_only:  # a resumed run continues the file, a new one sets the old file aside
        resume_iter = state.iter_num if resumed is not None else None
        metrics = MetricsWriter(out_dir, resume_iter, eval_done=skip_eval_at is not None)
    out_of_time = reached_target = False
    with (
        StopRequest(at) as stop,
        TrainLog(o, state.iter_num, at.master, flops_per_iter / peak, tokens_per_iter, metrics, started) as log,
    ):
        if resumed is not None and resumed["rng"] is not None:
            # restored last, after everything that might draw random numbers: the run continues exactly
            set_rng_state(resumed["rng"], state.data_gens)
        while True:
            lr = set_lr(state.optimizers, get_lr(state.iter_num, o, state.train_seconds), o.muon_lr_scale)
            # eval_only evaluates whatever the iteration: a finished checkpoint is rarely at a multiple;
            # a spent time budget gets a last evaluation (and checkpoint) before the run stops
            if o.eval_only or out_of_time or (state.iter_num % o.eval_interval == 0 and state.iter_num != skip_eval_at):
                watch.check()
                val = evaluate_and_checkpoint(model, state, batches, o, at, ctx, log, out_dir, lr)
                reached_target = o.target_val_loss > 0 and val <= o.target_val_loss
            if o.eval_only or out_of_time or reached_target:  # eval_only: evaluate the checkpoint, train nothing
                break

            t_step = time.time()
            loss = train_step(model, state, batches, o, at, ctx, watch)
            if o.max_seconds and at.device.startswith("cuda"):
                torch.cuda.synchronize()  # a time budget needs the step's real duration, not its launch
            state.train_seconds += time.time() - t_step
            log.iteration(state.iter_num, loss, lr, watch)
            state.iter_num += 1
            if state.iter_num > o.max_iters:
                break
            out_of_time = o.max_seconds > 0 and state.train_seconds >= o.max_seconds
            signal_name = stop.agreed()
            if signal_name is not None:
                save_interrupt(state, o, at, out_dir, argv, signal_name, watch, log)
        watch.check()  # the last iterations may not have been logged
        if at.master and not o.eval_only:
            log.write(log.closing_line(state))


# ----------------------------------------------------------------------------- the pieces of the loop


@dataclass
class TrainState:
    """What a checkpoint holds besides the options: everything a resumed run needs to go on exactly."""

    model: GPT  # the bare model: neither compiled nor wrapped by DDP
    optimizers: list[torch.optim.Optimizer]
    scaler: torch.amp.GradScaler
    tokenizer: dict
    data_gens: list[torch.Generator]  # one per micro-batch this process draws in a step (see setup)
    iter_num: int = 0
    best_val_loss: float = 1e9
    train_seconds: float = 0.0  # evaluations excluded: what --max_seconds budgets

    def checkpoint(self, o: TrainOptions, reason: str, rank_rngs: list[dict]) -> dict[str, Any]:
        """The whole checkpoint of an unsharded model. rank_rngs: every process's random states
        (gather_rng_states), for an exact resume with any number of processes."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizers[0].state_dict(),
            **({"muon_optimizer": self.optimizers[1].state_dict()} if len(self.optimizers) > 1 else {}),
            **self.progress(o, reason, rank_rngs),
        }

    def progress(self, o: TrainOptions, reason: str, rank_rngs: list[dict]) -> dict[str, Any]:
        """The checkpoint without the weights and optimizer states: what a sharded save keeps in one file."""
        return {
            "model_args": self.model.config.to_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "train_seconds": self.train_seconds,
            "config": asdict(o),
            "iter_num": self.iter_num,
            "best_val_loss": self.best_val_loss,
            "tokenizer": self.tokenizer,
            "rng": rank_rngs[0],
            **({"rng_ranks": rank_rngs} if len(rank_rngs) > 1 else {}),
            "reason": reason,
        }

    def restore(self, ckpt: dict[str, Any], at: Place) -> None:
        """Progress, optimizer and scaler states from a resume checkpoint (the weights are loaded already,
        except a sharded checkpoint's, loaded here into the shards)."""
        self.iter_num, self.best_val_loss = ckpt["iter_num"], ckpt["best_val_loss"]
        self.train_seconds = ckpt.get("train_seconds", 0.0)  # a time budget goes on from where it stopped
        if "shards" in ckpt:
            load_checked_shards(ckpt["shards"], self.model, self.optimizers[0], at)
            return
        saved = [ckpt[k] for k in ("optimizer", "muon_optimizer") if k in ckpt]
        if saved and len(saved) != len(self.optimizers):
            was = "muon" if "muon_optimizer" in ckpt else "adamw"
            raise UserError(
                f"the checkpoint was trained with --optimizer={was}; resume with the same optimizer (its state "
                "cannot be carried over to another one)."
            )
        # keyed by parameter name (as the single-file --fsdp checkpoints of nanogpt 0.1.0 were): what
        # set_optimizer_state_dict reads
        by_name = ckpt.get("optimizer_format") == "fqn"
        if saved and (at.fsdp or by_name):  # one whole state, sharded as it loads
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            state = saved[0] if by_name else optimizer_state_by_name(self.model, self.optimizers[0], saved[0])
            options = StateDictOptions(full_state_dict=True)
            set_optimizer_state_dict(self.model, self.optimizers[0], optim_state_dict=state, options=options)
            return
        for optimizer, state in zip(self.optimizers, saved):
            optimizer.load_state_dict(state)
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])


def setup(o: TrainOptions, explicit: set[str], at: Place, dtype: str) -> tuple[TrainState, TokenBatches, dict | None]:
    """Seeds, data, model, optimizers and loss scaler, restored from the checkpoint when resuming.
    Returns the state, the batches and, when resuming, the checkpoint's reason and random states."""
    torch.manual_seed(o.seed + at.rank)
    random.seed(o.seed + at.rank)
    np.random.seed(o.seed + at.rank)
    # one generator per micro-batch of a step (grad_accum x world of them), each process drawing every
    # world-th: whatever the number of processes, a step sees the same batches
    slots = range(at.rank, at.grad_accum * at.world, at.world)
    data_gens = [torch.Generator().manual_seed(o.seed + slot) for slot in slots]
    enable_tf32(at.device)
    meta = read_meta(o.resolved_data_dir)
    if at.fsdp:  # every rank keeps a shard of its own initialisation: they must all draw the same one
        torch.manual_seed(o.seed)  # (DDP instead broadcasts rank 0's weights)
    model, ckpt = build_model(o, explicit, meta, at)
    if at.fsdp:
        torch.manual_seed(o.seed + at.rank)
    if ckpt is None and o.init_from == "scratch" and at.master:
        print(f"number of parameters: {model.get_num_params() / 1e6:.2f}M")
    batches = TokenBatches(o.resolved_data_dir, model.config.block_size, vocab_size=model.config.vocab_size)
    if ckpt is not None:
        tokenizer_spec = ckpt["tokenizer"]
    elif o.init_from == "scratch":
        tokenizer_spec = meta["tokenizer"]
    else:
        from nanogpt.hf import tokenizer_spec_for

        tokenizer_spec = tokenizer_spec_for(o.init_from)
    model.to(at.device)
    if o.activation_checkpointing:
        checkpoint_blocks(model)
    if at.fsdp:  # before the optimizers: they must hold the shards
        shard(model, at, dtype)
    if not o.eval_only:
        n_params = sum(p.numel() for p in model.parameters()) // (at.world if at.fsdp else 1)  # held per rank
        need = training_bytes(model.config, n_params, o.batch_size, DTYPES[dtype])
        require(need, at.device, f"a training step of --batch_size={o.batch_size}", TRAIN_ADVICE)
    # float16 gradients underflow to zero below ~6e-8: the GradScaler multiplies the loss before backward
    # and divides the gradients before the step, skipping steps whose gradients overflowed (Micikevicius
    # et al. 2018, "Mixed Precision Training"). bfloat16 has float32's range and needs no scaling.
    scaler = torch.amp.GradScaler(at.device.split(":")[0], enabled=dtype == "float16")
    optimizers = build_optimizers(
        model, o.optimizer, o.learning_rate, o.weight_decay, (o.beta1, o.beta2), at.device.split(":")[0]
    )
    state = TrainState(model, optimizers, scaler, tokenizer_spec, data_gens)
    if ckpt is None:
        return state, batches, None
    state.restore(ckpt, at)
    return state, batches, {"reason": ckpt.get("reason"), "rng": rng_to_restore(ckpt, at)}


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


def prepare_out_dir(name: str) -> Path:
    out_dir = Path(name)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --out_dir={out_dir} ({e.strerror}). Choose a writable folder.") from None
    if not os.access(out_dir, os.W_OK):
        raise UserError(f"--out_dir={out_dir} is not writable. Choose a folder you can write to.")
    sharded = (f"{SHARDED_NAME}/{MANIFEST_NAME}", f"{INTERRUPT_SHARDED_NAME}/{MANIFEST_NAME}")
    for name in (CKPT_NAME, INTERRUPT_NAME, METRICS_NAME, "loss.png", *sharded):
        remove_stale_temp_files(out_dir / name)  # left by a run killed while saving
    return out_dir


class DivergenceWatch:
    """A non-finite loss means the forward pass diverged, whatever the dtype: the GradScaler handles
    overflowing gradients, not a NaN loss. The first bad iteration is remembered on the device (no host
    sync per micro-step) and checked whenever the loop syncs anyway: at logging, evaluation and exit."""

    CAUSES = (
        "Usual causes: a learning rate too high (try --learning_rate 3x lower, or a longer --warmup_iters) "
        "or float16 without loss scaling (use --dtype=bfloat16 or float32)."
    )

    def __init__(self, device: str) -> None:
        self.first_bad_iter = torch.full((), -1, dtype=torch.long, device=device)

    def record(self, loss: torch.Tensor, iter_num: int) -> None:
        self.first_bad_iter.masked_fill_(~torch.isfinite(loss.detach()) & (self.first_bad_iter < 0), iter_num)

    def check(self) -> None:
        bad = int(self.first_bad_iter.item())
        if bad >= 0:
            raise UserError(
                f"the training loss became NaN or infinite at iteration {bad}; training stopped and no checkpoint "
                f"was written after it. {self.CAUSES}"
            )


def train_step(model, state: TrainState, batches: TokenBatches, o: TrainOptions, at: Place, ctx, watch) -> torch.Tensor:
    """One optimizer step over grad_accum micro-batches: forward, backward, clip, step. Returns the last
    micro-batch's loss as a device tensor (reading it would sync with the device)."""
    for micro_step in range(at.grad_accum):
        # DDP all-reduces the gradients in the last micro-step's backward only
        last = micro_step == at.grad_accum - 1
        no_sync = model.no_sync() if at.world > 1 and not at.fsdp and not last else contextlib.nullcontext()
        if at.fsdp:
            model.set_requires_gradient_sync(last)  # reduce-scatter the gradients once, in the last micro-step
        x, y = batches.get_batch("train", o.batch_size, state.data_gens[micro_step], at.device)
        with no_sync, ctx:
            _, loss = model(x, y)
            loss = loss / at.grad_accum  # the mean over micro-batches, not the sum
        watch.record(loss, state.iter_num)
        state.scaler.scale(loss).backward()
    if o.grad_clip != 0.0:
        for optimizer in state.optimizers:
            state.scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
    for optimizer in state.optimizers:
        state.scaler.step(optimizer)
    state.scaler.update()
    for optimizer in state.optimizers:
        optimizer.zero_grad(set_to_none=True)
    return loss.detach() * at.grad_accum


def evaluate_and_checkpoint(
    model, state: TrainState, batches: TokenBatches, o: TrainOptions, at: Place, ctx, log: TrainLog, out_dir, lr
) -> float:
    """Estimate the train and val losses, report them, and save ckpt.pt when val improved (or always,
    with always_save_checkpoint). Returns the val loss."""
    losses = estimate_loss(model, batches, o, at.device, ctx, o.seed)
    if at.world > 1:  # the ranks' figures agree already; averaging makes every decision below identical
        import torch.distributed as dist

        both = torch.tensor([losses["train"], losses["val"]], device=at.device)
        dist.all_reduce(both)
        losses = {"train": both[0].item() / at.world, "val": both[1].item() / at.world}
    if at.master:
        log.evaluation(state, losses, lr)
    if not all(map(math.isfinite, losses.values())):
        raise UserError(
            f"the evaluated loss is NaN or infinite at iteration {state.iter_num} (train {losses['train']}, "
            f"val {losses['val']}): the model has diverged. Training stopped and no checkpoint was written. "
            f"{DivergenceWatch.CAUSES}"
        )
    if losses["val"] < state.best_val_loss or o.always_save_checkpoint:  # the same decision on every rank
        state.best_val_loss = min(state.best_val_loss, losses["val"])
        if state.iter_num > 0 and not o.eval_only:
            rank_rngs = gather_rng_states(rng_state(state.data_gens), at)  # every rank takes part
            if at.fsdp:  # every rank writes its shards
                if at.master:
                    log.write(f"saving sharded checkpoint to {out_dir / SHARDED_NAME}")
                progress = state.progress(o, "eval", rank_rngs)
                save_sharded(out_dir / SHARDED_NAME, state.model, state.optimizers[0], progress)
            elif at.master:
                log.write(f"saving checkpoint to {out_dir / CKPT_NAME}")
                save_checkpoint(out_dir / CKPT_NAME, state.checkpoint(o, "eval", rank_rngs))
            if at.master:  # the checkpoint just written is further along
                (out_dir / INTERRUPT_NAME).unlink(missing_ok=True)
                shutil.rmtree(out_dir / INTERRUPT_SHARDED_NAME, ignore_errors=True)
    return losses["val"]


def save_interrupt(
    state: TrainState, o: TrainOptions, at: Place, out_dir: Path, argv, signal_name: str, watch, log
) -> None:
    """Ctrl-C or SIGTERM between iterations (every process at the same one): save interrupt.pt, or with
    --fsdp a sharded checkpoint, with every process's random states; say how to resume; exit 130 or 143."""
    watch.check()  # never save a diverged model
    rank_rngs = gather_rng_states(rng_state(state.data_gens), at)  # every rank takes part
    if at.fsdp:  # every rank writes its shards
        progress = state.progress(o, "interrupt", rank_rngs)
        saved = save_sharded(out_dir / INTERRUPT_SHARDED_NAME, state.model, state.optimizers[0], progress)
    else:
        saved = out_dir / INTERRUPT_NAME
        if at.master:
            save_checkpoint(saved, state.checkpoint(o, "interrupt", rank_rngs))
    if at.master:
        log.close()
        print(
            f"\nstopped by {signal_name} at iteration {state.iter_num}; saved {saved}.\n"
            f"resume with: {resume_command(argv)}",
            file=sys.stderr,
        )
    raise SystemExit(130 if signal_name == "SIGINT" else 143)


class TrainLog:
    """Where the run reports: the terminal (through the tqdm bar when it shows), wandb when asked, the
    model FLOPs utilisation, <out_dir>/metrics.jsonl and loss.png (master only), and the milestones the
    closing line times."""

    def __init__(
        self,
        o: TrainOptions,
        iter_num: int,
        master: bool,
        peak_fraction_per_second: float,
        tokens_per_iter: int,
        metrics: MetricsWriter | None,
        started: float,
    ):
        self.o, self.master, self.started = o, master, started
        self.tokens_per_iter, self.metrics = tokens_per_iter, metrics
        self.plot = None  # <out_dir>/loss.png, redrawn at each evaluation when matplotlib is installed
        if metrics and o.plot and importlib.util.find_spec("matplotlib") is not None:
            from nanogpt.plot import PlotRefresher

            self.plot = PlotRefresher(metrics.path.parent)
        self.mfu_per_second = peak_fraction_per_second  # MFU = this / seconds per iteration
        self.bar = tqdm(
            total=o.max_iters,
            initial=iter_num,
            disable=None if (o.progress and master) else True,
            unit="it",
            dynamic_ncols=True,
            leave=False,
        )
        self.write = self.bar.write if not self.bar.disable else print
        self.wandb = None
        if o.wandb_log and master:
            try:
                import wandb
            except ImportError:
                raise UserError(
                    "--wandb_log=True needs the wandb package: pip install wandb (or 'nanogpt[wandb]')."
                ) from None
            wandb.init(project=o.wandb_project, name=o.wandb_run_name, config=asdict(o))
            self.wandb = wandb
        self.milestones: dict[float, tuple[float, float, int] | None] = dict.fromkeys(o.milestone_losses)
        self.last_val: float | None = None
        self.running_mfu, self.steps, self.t_last = -1.0, 0, time.time()

    def __enter__(self) -> TrainLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.bar.close()
        if self.metrics:
            self.metrics.close()
            self.metrics = None
        if self.plot:
            self.plot.close()
            self.plot = None
        if self.wandb:
            self.wandb.finish()
            self.wandb = None

    @property
    def mfu_percent(self) -> float | None:
        return self.running_mfu * 100 if self.running_mfu >= 0 else None

    def iteration(self, iter_num: int, loss: torch.Tensor, lr: float, watch: DivergenceWatch) -> None:
        now = time.time()
        dt, self.t_last = now - self.t_last, now
        if iter_num % self.o.log_interval == 0 and self.master:
            lossf = loss.item()  # syncs with the device, so only at log time
            watch.check()
            if self.steps >= 5:  # let the first iterations (compilation, warm-up) pass
                mfu = self.mfu_per_second / dt
                self.running_mfu = mfu if self.running_mfu == -1.0 else 0.9 * self.running_mfu + 0.1 * mfu
            self.write(f"iter {iter_num}: loss {lossf:.4f}, time {dt * 1000:.2f}ms, mfu {self.running_mfu * 100:.2f}%")
            self.bar.set_postfix(loss=f"{lossf:.4f}", refresh=False)
            if self.metrics:
                tokens = (iter_num + 1) * self.tokens_per_iter
                self.metrics.write("train", iter=iter_num, tokens=tokens, train_loss=lossf, lr=lr, mfu=self.mfu_percent)
        self.steps += 1
        self.bar.update(1)

    def evaluation(self, state: TrainState, losses: dict[str, float], lr: float) -> None:
        self.write(f"step {state.iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        if self.wandb:
            self.wandb.log(
                {
                    "iter": state.iter_num,
                    "train/loss": losses["train"],
                    "val/loss": losses["val"],
                    "lr": lr,
                    "mfu": self.running_mfu * 100,
                }
            )
        if self.metrics:
            self.metrics.write(
                "eval",
                iter=state.iter_num,
                tokens=state.iter_num * self.tokens_per_iter,
                train_loss=losses["train"],
                val_loss=losses["val"],
                lr=lr,
                mfu=self.mfu_percent,
            )
            if self.plot:
                self.plot.request()
        self.last_val = losses["val"]
        for m, when in self.milestones.items():
            if when is None and self.last_val <= m:
                self.milestones[m] = (state.train_seconds, time.time() - self.started, state.iter_num)

    def closing_line(self, state: TrainState) -> str:
        """One line for the end of a run: where it got and how fast, speedrun style."""
        parts = [
            f"final val loss {self.last_val:.4f}" if self.last_val is not None else "no evaluation",
            f"{state.iter_num:,} iterations",
            f"{state.iter_num * self.tokens_per_iter:,} tokens",
            f"{state.train_seconds:.1f} s of training",
            f"{time.time() - self.started:.1f} s wall",
        ]
        for m, when in self.milestones.items():
            parts.append(
                f"val <= {m} first at iteration {when[2]}: {when[0]:.1f} s of training, {when[1]:.1f} s wall"
                if when
                else f"val <= {m} not reached"
            )
        return "done: " + "; ".join(parts)


if __name__ == "__main__":
    run_main(main)
