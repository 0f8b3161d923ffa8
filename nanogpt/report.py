"""The training log: the terminal (through a tqdm bar when it shows), metrics.jsonl and loss.png, wandb,
model FLOPs utilisation, the milestones a speedrun times, the watch for a diverging loss, and a short
sample at each evaluation (to watch the model learn).

Machinery a first read skips (the reading path is in the README, "Read the code"): train.py calls
`log.iteration` after each step and `log.evaluation` after each evaluation, where nanoGPT prints.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from nanogpt.device import DTYPES
from nanogpt.distributed import Place
from nanogpt.errors import UserError
from nanogpt.generate import generate
from nanogpt.metrics import MetricsWriter
from nanogpt.mfu import peak_flops
from nanogpt.model import GPT
from nanogpt.resume import TrainState
from nanogpt.tokenizer import Tokenizer, tokenizer_from_spec
from nanogpt.train_options import TrainOptions


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


class EvalSample:
    """Watch it learn: at each evaluation, a few dozen tokens the model writes from a fixed prompt, kept in
    metrics.jsonl beside the val loss (the page's timeline, `nanogpt plot --samples`).

    It leaves training exactly as it was: the model goes to eval mode and back, as estimate_loss does;
    the draws come from a generator of its own, seeded afresh each time from --seed (the global random
    state is never touched, and successive samples differ only because the model changed); no autograd
    graph is built (generate runs under inference_mode)."""

    PROMPT = "\n"  # where a text may begin; a vocabulary without it starts from token 0
    TEMPERATURE = 0.8  # a little sharper than the model's own distribution: fewer wild picks, not greedy loops

    def __init__(self, n_tokens: int, seed: int, tokenizer: Tokenizer) -> None:
        self.n_tokens, self.seed, self.tok = n_tokens, seed, tokenizer
        try:
            self.prompt = tokenizer.encode(self.PROMPT)
        except UserError:  # a character vocabulary without a new line
            self.prompt = [0]

    def __call__(self, model: GPT, ctx: contextlib.AbstractContextManager) -> dict[str, str]:
        """The prompt and the text the model writes after it; `model` is the bare one (not DDP's wrapper)."""
        device = model.lm_head.weight.device
        idx = torch.tensor([self.prompt], dtype=torch.long, device=device)
        gen = torch.Generator(device=device).manual_seed(self.seed)
        training = model.training
        model.eval()  # dropout off
        try:
            with ctx:  # the run's autocast, as at evaluation
                out = generate(model, idx, self.n_tokens, temperature=self.TEMPERATURE, generator=gen)
        finally:
            model.train(training)
        # a vocabulary padded past the tokenizer's (GPT-2's 50257 to 50304) may draw an id with no text
        ids = [i for i in out[0, len(self.prompt) :].tolist() if i < self.tok.vocab_size]
        return {"prompt": self.tok.decode(self.prompt), "text": self.tok.decode(ids)}


def eval_sample_for(o: TrainOptions, at: Place, tokenizer_spec: dict) -> EvalSample | None:
    """The run's EvalSample, or None: --eval_sample_tokens=0, or --fsdp, whose model is sharded across
    the ranks (every forward pass needs all of them), so one rank cannot generate alone; or a tokenizer
    that cannot be loaded here (a warning: the samples are a convenience, never a reason to stop)."""
    if o.eval_sample_tokens <= 0 or at.fsdp:
        return None
    try:
        return EvalSample(o.eval_sample_tokens, o.seed, tokenizer_from_spec(tokenizer_spec))
    except UserError as e:
        print(f"warning: no samples in metrics.jsonl at evaluations: {e}", file=sys.stderr)
        return None


class TrainLog:
    """Where the run reports: the terminal (through the tqdm bar when it shows), wandb when asked, the
    model FLOPs utilisation, <out_dir>/metrics.jsonl and loss.png (master only), and the milestones the
    closing line times."""

    def __init__(
        self,
        o: TrainOptions,
        at: Place,
        state: TrainState,
        dtype: str,
        out_dir: Path,
        tokens_per_iter: int,
        started: float,
        **metrics_args,
    ):
        self.o, self.master, self.started, self.tokens_per_iter = o, at.master, started, tokens_per_iter
        self.watch = DivergenceWatch(at.device)
        # MFU: the model's FLOPs per iteration (PaLM, appendix B) over what the device can do per second
        flops_per_iter = state.model.estimate_flops_per_token() * self.tokens_per_iter / at.world
        peak = peak_flops(at.device, DTYPES[dtype]) if at.master else 1.0
        self.metrics = None  # <out_dir>/metrics.jsonl; a resumed run continues the file (metrics.py)
        if at.master and not o.eval_only:
            self.metrics = MetricsWriter(out_dir, **metrics_args)
        self.sample = eval_sample_for(o, at, state.tokenizer) if self.metrics else None
        self.plot = None  # <out_dir>/loss.png, redrawn at each evaluation when matplotlib is installed
        if self.metrics and o.plot and importlib.util.find_spec("matplotlib") is not None:
            from nanogpt.plot import PlotRefresher

            self.plot = PlotRefresher(self.metrics.path.parent)
        self.mfu_per_second = flops_per_iter / peak  # MFU = this / seconds per iteration
        self.bar = tqdm(
            total=o.max_iters,
            initial=state.iter_num,
            disable=None if (o.progress and at.master) else True,
            unit="it",
            dynamic_ncols=True,
            leave=False,
        )
        self.write = self.bar.write if not self.bar.disable else print
        self.wandb = None
        if o.wandb_log and at.master:
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

    def iteration(self, iter_num: int, loss: torch.Tensor, lr: float) -> None:
        now = time.time()
        dt, self.t_last = now - self.t_last, now
        if iter_num % self.o.log_interval == 0 and self.master:
            lossf = loss.item()  # syncs with the device, so only at log time
            self.watch.check()
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

    def evaluation(
        self,
        state: TrainState,
        losses: dict[str, float],
        lr: float,
        ctx: contextlib.AbstractContextManager = contextlib.nullcontext(),
    ) -> None:
        """Report an evaluation (master only), and write the model's sample (under ctx, the run's autocast)."""
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
            if self.sample and math.isfinite(losses["val"]):  # a diverged model has nothing to show
                seen = state.iter_num * self.tokens_per_iter
                fields = self.sample(state.model, ctx)
                self.metrics.write("sample", iter=state.iter_num, tokens=seen, val_loss=losses["val"], **fields)
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
