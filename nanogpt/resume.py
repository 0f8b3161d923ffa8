"""Exact resume: random states, the training state a checkpoint holds, and stopping on Ctrl-C or SIGTERM.

Machinery a first read skips (the reading path is in the README, "Read the code"). nanoGPT resumes
the weights, the optimizer and the iteration; this module also carries every random state, the loss
scaler and the time spent, so a resumed run continues bit for bit as if it had never stopped, and it
turns Ctrl-C or SIGTERM into a clean save (interrupt.pt) between two iterations.
"""

from __future__ import annotations

import contextlib
import os
import random
import shlex
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nanogpt import checkpoint
from nanogpt.checkpoint import load_checked_shards, optimizer_state_by_name
from nanogpt.distributed import Place, gather_rng_states
from nanogpt.errors import UserError
from nanogpt.model import GPT
from nanogpt.train_options import MODEL_SHAPE_KEYS, TrainOptions

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


# ----------------------------------------------------------------------------- the training state


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

    def save(
        self, o: TrainOptions, reason: str, out_dir: Path, at: Place, say: Callable[[str], None] | None = None
    ) -> Path:
        """Save this state as a checkpoint, single file or sharded (checkpoint.save), with every process's
        random states for an exact resume at any number of processes. Every rank calls it."""
        rank_rngs = gather_rng_states(rng_state(self.data_gens), at)  # a collective: every rank takes part
        progress = self.progress(o, reason, rank_rngs)
        return checkpoint.save(out_dir, reason, self.model, self.optimizers, progress, at, say)

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


# ----------------------------------------------------------------------------- stopping


class StopRequest:
    """Turns the first Ctrl-C or SIGTERM into a flag checked between iterations, so the run can save
    a clean checkpoint; a second Ctrl-C interrupts immediately, except under torchrun, which passes a
    terminal's Ctrl-C on to processes that got it already (and kills them itself if they take too long)."""

    ORPHANED = "the end of torchrun"  # the reason a worker stops when torchrun died (SIGKILL, the OOM killer)

    def __init__(self, at: Place, argv: Sequence[str]) -> None:
        self.at = at
        self.resume_hint = resume_command(argv, at)  # printed when a signal stops the run
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}
        # torchrun starts each worker in a session of its own, so nothing stops one whose torchrun was killed:
        # it notices its new parent, and stops and saves as on SIGTERM instead of training on unseen
        self._parent = os.getppid() if at.torchrun else None

    def _handle(self, signum, frame) -> None:
        if self.signal_name is not None and signum == signal.SIGINT and not self.at.torchrun:
            raise KeyboardInterrupt
        self.signal_name = self.signal_name or signal.Signals(signum).name

    def agreed(self) -> str | None:
        """The signal that stops the run, the same on every process. A signal reaches torchrun's processes
        at slightly different moments, so they share what they got after each iteration (one small
        all-reduce, on the CPU) and all stop after the same one, where they can save together."""
        if self._parent is not None and os.getppid() != self._parent:
            self.signal_name = self.signal_name or self.ORPHANED
        if self.at.world == 1:
            return self.signal_name
        import torch.distributed as dist

        names = ("SIGINT", "SIGTERM", self.ORPHANED)
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

    def save_and_exit(self, signal_name: str, state: TrainState, o: TrainOptions, out_dir: Path, log: Any) -> None:
        """Stopped between iterations (every process at the same one): save interrupt.pt, or with --fsdp a
        sharded interrupt.dcp, with every process's random states; say how to resume; exit 130 or 143.
        log: the run's report.TrainLog, closed before the message so it stays the last line."""
        log.watch.check()  # never save a diverged model
        saved = state.save(o, "interrupt", out_dir, self.at)
        if self.at.master:
            log.close()
            print(
                f"\nstopped by {signal_name} at iteration {state.iter_num}; saved {saved}.\n"
                f"resume with: {self.resume_hint}",
                file=sys.stderr,
            )
        raise SystemExit(130 if signal_name == "SIGINT" else 143)  # 128 + the signal's number, as a shell reports


def resume_command(argv: Sequence[str], at: Place | None = None) -> str:
    """The command that resumes this run: the same options, --init_from=resume, and under torchrun on one
    machine the same number of processes (a run over several machines is restarted as it was started)."""
    args = [a for a in argv if not a.startswith("--init_from=")]
    launcher = ["python"]
    if at is not None and at.torchrun and os.environ.get("LOCAL_WORLD_SIZE") == str(at.world):
        launcher = ["torchrun", "--standalone", f"--nproc_per_node={at.world}"]
    return shlex.join([*launcher, "train.py", *args, "--init_from=resume"])


# ----------------------------------------------------------------------------- resuming


def resume_model(o: TrainOptions, explicit: set[str], at: Place) -> tuple[GPT, dict[str, Any]]:
    """The model of the checkpoint in out_dir that is further along, and that checkpoint. With fsdp, a
    sharded checkpoint's weights stay on disk until the model is sharded (TrainState.restore loads them)."""
    path, ckpt = checkpoint.load_resume_checkpoint(o.out_dir, at)
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
        return checkpoint.empty_model(ckpt, dropout=o.dropout), ckpt
    return checkpoint.model_from_checkpoint(ckpt, dropout=o.dropout), ckpt


def evaluated_at(resumed: dict[str, Any] | None, state: TrainState, o: TrainOptions) -> int | None:
    """The iteration whose evaluation a resumed run skips: a checkpoint saved at an evaluation did it already."""
    return state.iter_num if resumed is not None and resumed["reason"] == "eval" and not o.eval_only else None


def nothing_to_do(state: TrainState, o: TrainOptions, skip_eval_at: int | None, at: Place) -> bool:
    """A resumed checkpoint past max_iters, or saved by the final evaluation (the step after it changes no
    file): say so, and train nothing."""
    finished = state.iter_num > o.max_iters or (state.iter_num == o.max_iters and skip_eval_at == state.iter_num)
    if finished and not o.eval_only:
        if at.master:
            print(
                f"the checkpoint is at iteration {state.iter_num}, the end of --max_iters={o.max_iters}: "
                "nothing to do. Give a larger --max_iters to train on."
            )
        return True
    return False
