"""The training loop: read this file second, after model.py (the reading path is in the README).

It holds what nanoGPT's train.py holds, in the same order: set-up, the loop, one training step, and
evaluation with checkpointing. The machinery around it lives beside it, so the loop stays in view:
train_options.py (every option), resume.py (random states, exact resume, Ctrl-C/SIGTERM), report.py
(the log), distributed.py (DDP and FSDP) and checkpoint/ (both checkpoint formats). Then read data.py
(`get_batch`) and optim.py (`get_lr`, AdamW and Muon).
"""

from __future__ import annotations

import contextlib
import math
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nanogpt import checkpoint
from nanogpt.config import parse_args
from nanogpt.data import TokenBatches, read_meta
from nanogpt.device import DTYPES, autocast, enable_tf32, resolve_dtype
from nanogpt.distributed import (
    Place,
    checkpoint_blocks,
    end_processes,
    lost_peer,
    rng_to_restore,
    shard,
    start_processes,
    under_torchrun,
    wrap_model,
)
from nanogpt.errors import UserError, run_main
from nanogpt.memory import TRAIN_ADVICE, is_out_of_memory, out_of_memory, require, training_bytes
from nanogpt.metrics import METRICS_NAME
from nanogpt.model import GPT
from nanogpt.optim import build_optimizers, get_lr
from nanogpt.report import DivergenceWatch, TrainLog
from nanogpt.resume import StopRequest, TrainState, evaluated_at, nothing_to_do, resume_model, set_rng_state
from nanogpt.train_options import TrainOptions, check_fsdp_options

USAGE = """Train a GPT, on one device or many (DDP or FSDP under torchrun).

    python train.py config/train_shakespeare_char.py --device=cpu --compile=False --max_iters=2000
    torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py

Defaults train GPT-2 124M on OpenWebText, as nanoGPT does. A config file (Python assignment
syntax, parsed not executed) and --key=value options override them, in the order given.
Checkpoints go to <out_dir>/ckpt.pt; Ctrl-C or SIGTERM saves <out_dir>/interrupt.pt. With
--fsdp=True both are sharded, into ckpt.dcp and interrupt.dcp, and ckpt.dcp is consolidated into
ckpt.pt when the run ends.
Resume from any of them with --init_from=resume.
"""

# ----------------------------------------------------------------------------- set-up


def main(argv: Sequence[str] | None = None) -> None:
    started = time.time()
    argv = list(sys.argv[1:] if argv is None else argv)
    o, explicit = parse_args(TrainOptions, argv, "python train.py", USAGE)
    if o.fsdp:
        check_fsdp_options(o, under_torchrun())
    # one process, or one of torchrun's (DDP or FSDP): its device, rank and share of the micro-batches
    at = start_processes(o.device, o.backend, o.gradient_accumulation_steps, o.fsdp)
    together = False  # every process got to the same end, so they may wait for each other before leaving
    try:
        train(o, explicit, at, StopRequest(at, argv), started)
        together = True
    except SystemExit:  # Ctrl-C/SIGTERM: every process stopped after the same iteration and saved its part
        together = True
        raise
    except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError is a RuntimeError
        if is_out_of_memory(e):
            raise out_of_memory(at.device, TRAIN_ADVICE) from None
        lost = lost_peer(e, at)  # a collective whose other end was killed: a clear message, not a traceback
        if lost is None:
            raise
        raise lost from None
    finally:
        end_processes(at, together)
    shards = checkpoint.SHARDED_NAME
    if (
        o.fsdp
        and o.consolidate
        and at.master
        and not o.eval_only
        and checkpoint.read_manifest(Path(o.out_dir) / shards)
    ):
        # the run is over: its last sharded checkpoint as one file, for sample.py, eval and export
        print(f"consolidated the sharded checkpoint into {checkpoint.consolidate(o.out_dir, (shards,))[0]}")


def build_model(o: TrainOptions, explicit: set[str], meta: dict, at: Place) -> tuple[GPT, dict | None]:
    """The model to train (from scratch, from out_dir's checkpoint, or OpenAI's GPT-2) and, when resuming,
    the checkpoint it came from."""
    if o.init_from == "scratch":
        vocab_size = meta["vocab_size"] or 50304  # GPT-2's 50257 padded up to a multiple of 64
        # --fsdp: on the meta device, which takes no memory; each process allocates and initialises only its
        # shards (distributed.shard). A resume from shards does the same (checkpoint.empty_model)
        with torch.device("meta") if at.fsdp else contextlib.nullcontext():
            return GPT(o.model_config(vocab_size)), None
    if o.init_from == "resume":
        return resume_model(o, explicit, at)
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
    if ckpt is None and o.init_from == "scratch" and at.master:
        print(f"number of parameters: {model.get_num_params() / 1e6:.2f}M")
    batches = TokenBatches(o.resolved_data_dir, model.config.block_size, vocab_size=model.config.vocab_size)
    tokenizer_spec = ckpt["tokenizer"] if ckpt is not None else tokenizer_of(o, meta)
    if not any(p.is_meta for p in model.parameters()):  # built on the meta device: sharding allocates it
        model.to(at.device)
    if o.activation_checkpointing:
        checkpoint_blocks(model)
    if at.fsdp:  # before the optimizers: they must hold the shards
        shard(model, at, dtype)  # initialises a model built on the meta device, drawing from seed o.seed
        torch.manual_seed(o.seed + at.rank)
    if not o.eval_only:
        n_params = sum(p.numel() for p in model.parameters()) // (at.world if at.fsdp else 1)  # held per rank
        need = training_bytes(model.config, n_params, o.batch_size, DTYPES[dtype])
        require(need, at.device, f"a training step of --batch_size={o.batch_size}", TRAIN_ADVICE)
    # float16 gradients underflow to zero below ~6e-8: the GradScaler multiplies the loss before backward
    # and divides the gradients before the step, skipping steps whose gradients overflowed (Micikevicius
    # et al. 2018, "Mixed Precision Training"). bfloat16 has float32's range and needs no scaling.
    scaler = torch.amp.GradScaler(at.device.split(":")[0], enabled=dtype == "float16")
    # AdamW (Loshchilov & Hutter 2019), or Muon for the blocks' matrices: see optim.py
    optimizers = build_optimizers(
        model, o.optimizer, o.learning_rate, o.weight_decay, (o.beta1, o.beta2), at.device.split(":")[0]
    )
    state = TrainState(model, optimizers, scaler, tokenizer_spec, data_gens)
    if ckpt is None:
        return state, batches, None
    state.restore(ckpt, at)
    return state, batches, {"reason": ckpt.get("reason"), "rng": rng_to_restore(ckpt, at)}


def tokenizer_of(o: TrainOptions, meta: dict) -> dict[str, Any]:
    """The tokenizer a new run's checkpoints record: the dataset's, or GPT-2's for a GPT-2 finetune."""
    if o.init_from == "scratch":
        return meta["tokenizer"]
    from nanogpt.hf import tokenizer_spec_for

    return tokenizer_spec_for(o.init_from)


# ----------------------------------------------------------------------------- the loop


@dataclass
class Run:
    """What the loop works with. nanoGPT keeps these in globals; here they travel together."""

    o: TrainOptions
    at: Place  # this process's device and rank
    model: torch.nn.Module  # as the loop calls it: compiled and/or wrapped by DDP (state.model is the bare one)
    state: TrainState  # iteration, optimizers, loss scaler, batch generators: what a checkpoint holds
    batches: TokenBatches
    ctx: contextlib.AbstractContextManager  # autocast: the forward pass in bfloat16/float16 where asked
    log: TrainLog
    out_dir: Path


def train(o: TrainOptions, explicit: set[str], at: Place, stop: StopRequest, started: float) -> None:
    """nanoGPT's training loop: evaluate and checkpoint every eval_interval, one optimizer step per
    iteration, until max_iters, the time budget, the target loss or a signal (Ctrl-C, SIGTERM)."""
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
    skip_eval_at = evaluated_at(resumed, state, o)
    if nothing_to_do(state, o, skip_eval_at, at):
        return
    model = wrap_model(state.model, o.compile, at)
    out_dir = checkpoint.prepare_out_dir(o.out_dir, (METRICS_NAME, "loss.png")) if at.master else Path(o.out_dir)
    metrics = {"resume_iter": state.iter_num if resumed else None, "eval_done": skip_eval_at is not None}
    with stop, TrainLog(o, at, state, dtype, out_dir, tokens_per_iter, started, **metrics) as log:
        if resumed is not None and resumed["rng"] is not None:
            # restored last, after everything that might draw random numbers: the run continues exactly
            set_rng_state(resumed["rng"], state.data_gens)
        run = Run(o, at, model, state, batches, autocast(at.device, dtype), log, out_dir)
        out_of_time = reached_target = False
        while True:
            # the learning rate of this iteration: warm-up, then cosine or warmup-stable-decay (optim.py)
            lr = get_lr(state.iter_num, o, state.train_seconds)
            for optimizer in state.optimizers:
                for group in optimizer.param_groups:  # Muon's step size is its own multiple of it
                    group["lr"] = lr * o.muon_lr_scale if isinstance(optimizer, torch.optim.Muon) else lr
            # eval_only evaluates whatever the iteration: a finished checkpoint is rarely at a multiple;
            # a spent time budget gets a last evaluation (and checkpoint) before the run stops
            if o.eval_only or out_of_time or (state.iter_num % o.eval_interval == 0 and state.iter_num != skip_eval_at):
                log.watch.check()
                val = evaluate_and_checkpoint(run, lr)
                reached_target = o.target_val_loss > 0 and val <= o.target_val_loss
            if o.eval_only or out_of_time or reached_target:  # eval_only: evaluate the checkpoint, train nothing
                break

            t_step = time.time()
            loss = train_step(run)
            if o.max_seconds and at.device.startswith("cuda"):
                torch.cuda.synchronize()  # a time budget needs the step's real duration, not its launch
            state.train_seconds += time.time() - t_step
            log.iteration(state.iter_num, loss, lr)
            state.iter_num += 1
            if state.iter_num > o.max_iters:
                break
            out_of_time = o.max_seconds > 0 and state.train_seconds >= o.max_seconds
            signal_name = stop.agreed()  # Ctrl-C or SIGTERM: every process stops after the same iteration
            if signal_name is not None:
                stop.save_and_exit(signal_name, state, o, out_dir, log)
        log.watch.check()  # the last iterations may not have been logged
        if at.master and not o.eval_only:
            log.write(log.closing_line(state))


# ----------------------------------------------------------------------------- one training step


def train_step(run: Run) -> torch.Tensor:
    """One optimizer step over grad_accum micro-batches: forward, backward, clip, step. Returns the last
    micro-batch's loss as a device tensor (reading it would sync with the device)."""
    o, at, model, state = run.o, run.at, run.model, run.state
    # gradient accumulation: grad_accum micro-batches of batch_size sequences make one step of a larger
    # batch, in the memory of a micro-batch (their gradients add up in .grad between the steps)
    for micro_step in range(at.grad_accum):
        # DDP all-reduces the gradients in the last micro-step's backward only
        last = micro_step == at.grad_accum - 1
        no_sync = model.no_sync() if at.world > 1 and not at.fsdp and not last else contextlib.nullcontext()
        if at.fsdp:
            model.set_requires_gradient_sync(last)  # reduce-scatter the gradients once, in the last micro-step
        x, y = run.batches.get_batch("train", o.batch_size, state.data_gens[micro_step], at.device)
        with no_sync, run.ctx:  # the forward pass under autocast: matmuls in bfloat16/float16 where asked
            _, loss = model(x, y)
            loss = loss / at.grad_accum  # the mean over micro-batches, not the sum
        run.log.watch.record(loss, state.iter_num)
        state.scaler.scale(loss).backward()  # float16: the loss scaled up so small gradients survive
    if o.grad_clip != 0.0:
        # clip the gradients' global norm: one bad batch cannot throw the weights far (Pascanu et al. 2013)
        for optimizer in state.optimizers:
            state.scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
    for optimizer in state.optimizers:
        state.scaler.step(optimizer)  # skipped when float16 gradients overflowed
    state.scaler.update()
    for optimizer in state.optimizers:
        optimizer.zero_grad(set_to_none=True)  # free the gradients' memory now, not at the next backward
    return loss.detach() * at.grad_accum


# ----------------------------------------------------------------------------- evaluation and checkpoint


@torch.no_grad()
def estimate_loss(model, batches: TokenBatches, o: TrainOptions, device: str, ctx, seed: int) -> dict[str, float]:
    """Mean loss over eval_iters batches per split. The batches are the same at every evaluation
    (a fixed seed), so successive val losses differ only because the model changed."""
    out = {}
    model.eval()  # dropout off
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


def evaluate_and_checkpoint(run: Run, lr: float) -> float:
    """Estimate the train and val losses, report them, and save ckpt.pt (or, with --fsdp, ckpt.dcp) when
    val improved, or always with always_save_checkpoint. Returns the val loss."""
    o, at, state = run.o, run.at, run.state
    losses = estimate_loss(run.model, run.batches, o, at.device, run.ctx, o.seed)
    if at.world > 1:  # the ranks' figures agree already; averaging makes every decision below identical
        import torch.distributed as dist

        both = torch.tensor([losses["train"], losses["val"]], device=at.device)
        dist.all_reduce(both)
        losses = {"train": both[0].item() / at.world, "val": both[1].item() / at.world}
    if at.master:
        run.log.evaluation(state, losses, lr, run.ctx)  # prints and logs them, with a sample of the model
    if not all(map(math.isfinite, losses.values())):
        raise UserError(
            f"the evaluated loss is NaN or infinite at iteration {state.iter_num} (train {losses['train']}, "
            f"val {losses['val']}): the model has diverged. Training stopped and no checkpoint was written. "
            f"{DivergenceWatch.CAUSES}"
        )
    if losses["val"] < state.best_val_loss or o.always_save_checkpoint:  # the same decision on every rank
        state.best_val_loss = min(state.best_val_loss, losses["val"])
        if state.iter_num > 0 and not o.eval_only:
            state.save(o, "eval", run.out_dir, at, say=run.log.write)
    return losses["val"]


if __name__ == "__main__":
    run_main(main)
