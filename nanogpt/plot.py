"""Loss curves from the metrics.jsonl of one or several runs, overlaid, as a PNG.

    nanogpt plot out-shakespeare-char [more out_dirs...] [--to=loss.png] [--x=iter|time|tokens] [--log]
    nanogpt plot out-shakespeare-char --samples    # prints what the model wrote at each evaluation

Solid lines are the train loss logged every log_interval iterations (one micro-batch each, so noisy),
dots joined by dashes the val loss at each evaluation, one colour per run, labelled by its folder.
matplotlib draws them with its headless Agg backend: pip install 'nanogpt[plot]'. A training run also
refreshes <out_dir>/loss.png at each evaluation when matplotlib is installed.
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from nanogpt.atomic import atomic_open
from nanogpt.config import option, parse_args
from nanogpt.errors import UserError, run_main
from nanogpt.metrics import METRICS_NAME, read_metrics

X_AXES = {"iter": "iteration", "time": "wall time (s)", "tokens": "training tokens"}


@dataclass
class PlotOptions:
    to: str = option("loss.png", "the PNG to write")
    x: str = option("iter", "the horizontal axis: iter, time (wall seconds since the run began) or tokens")
    log: bool = option(False, "a logarithmic loss axis (--log)")
    samples: bool = option(
        False, "print the samples written at each evaluation (iteration, val loss, text) instead of drawing"
    )

    def __post_init__(self) -> None:
        if self.x not in X_AXES:
            raise UserError(f"--x must be one of {', '.join(X_AXES)}, got {self.x!r}.")


def new_figure():
    """A matplotlib Figure drawn by the Agg backend: no display, no pyplot global state (so a background
    thread may draw), or a UserError saying how to install matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install matplotlib (or 'nanogpt[plot]').") from None
    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def read_runs(out_dirs: Sequence[str | Path]) -> list[tuple[Path, list[dict]]]:
    """Each run folder with its metrics records; a UserError for a folder without any."""
    runs = []
    for d in out_dirs:
        path = Path(d) / METRICS_NAME
        if not path.is_file():
            raise UserError(
                f"{path} does not exist: {d} is not the out_dir of a training run, or the run predates "
                "metrics.jsonl. Give the --out_dir of a run (train.py writes metrics.jsonl as it goes)."
            )
        records = read_metrics(path)
        if not records:
            raise UserError(f"{path} holds no complete record yet; wait for the run's first logged iteration.")
        runs.append((Path(d), records))
    return runs


def draw(runs: list[tuple[Path, list[dict]]], x: str = "iter", log: bool = False):
    """The figure: per run, its train loss (thin, translucent) and val loss (dots and dashes), one colour each."""
    fig = new_figure()
    ax = fig.add_subplot()
    for i, (d, records) in enumerate(runs):
        color = f"C{i % 10}"
        label = d.resolve().name
        train = [(r[x], r["train_loss"]) for r in records if r["kind"] == "train" and r.get("train_loss") is not None]
        val = [(r[x], r["val_loss"]) for r in records if r["kind"] == "eval" and r.get("val_loss") is not None]
        if train:
            ax.plot(*zip(*train), color=color, alpha=0.45, linewidth=1, label=f"{label} train")
        if val:
            ax.plot(*zip(*val), color=color, marker="o", markersize=3, linestyle="--", label=f"{label} val")
    ax.set_xlabel(X_AXES[x])
    ax.set_ylabel("loss (nats per token)")
    if log:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def sample_timeline(runs: list[tuple[Path, list[dict]]]) -> str:
    """Each run's samples (metrics.jsonl's "sample" records) as text: a header, then one line per evaluation
    with its iteration, val loss and sample, new lines shown as ↵ so that each sample keeps to its line."""
    shown = str.maketrans({"\n": "↵", "\r": "", "\t": " "})
    out = []
    for d, records in runs:
        samples = [r for r in records if r["kind"] == "sample"]
        out.append(f"{d}: {len(samples)} sample(s)" if samples else f"{d}: no samples (--eval_sample_tokens=0?)")
        if samples:
            out.append(f"{'iter':>8}  {'val loss':>8}  sample")
        for r in samples:
            val = f"{r['val_loss']:8.4f}" if isinstance(r.get("val_loss"), (int, float)) else f"{'-':>8}"
            out.append(f"{r['iter']:>8}  {val}  {str(r.get('text', '')).translate(shown)}")
    return "\n".join(out)


def plot_runs(out_dirs: Sequence[str | Path], to: str | Path, x: str = "iter", log: bool = False) -> Path:
    """Draw the curves of every run in `out_dirs` into the PNG `to`, replaced atomically (a page or viewer
    reading it never sees half a file)."""
    fig = draw(read_runs(out_dirs), x, log)
    to = Path(to)
    try:
        with atomic_open(to) as f:
            fig.savefig(f, format="png")
    except OSError as e:
        raise UserError(f"cannot write {to} ({e.strerror}). Choose a --to in a folder you can write to.") from None
    return to


class PlotRefresher:
    """Redraws <out_dir>/loss.png whenever asked, in a child process, so that the training process never
    imports matplotlib (some 35 MiB of a small CPU run's peak memory). One child serves the whole run: started
    with the refresher, it imports matplotlib once and redraws the picture for each line it reads, running only
    on a core that training leaves idle (SCHED_IDLE). Requests that arrive while it draws collapse into one more
    drawing; close() draws a last time, waits for it (DRAW_TIMEOUT_S at most, then the child is killed) and
    ends the child. A background thread only talks to the child."""

    DRAW_TIMEOUT_S = 60.0  # a drawing takes well under a second; the first one also imports matplotlib
    CHILD_CODE = "import sys; from nanogpt.plot import draw_on_request; draw_on_request(sys.argv[1])"

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.wanted = threading.Event()
        self.closing = False
        self.child: subprocess.Popen | None = None
        with contextlib.suppress(OSError):  # started now, so that it imports matplotlib while training sets up
            self.child = self._start_child()
        self.thread = threading.Thread(target=self._run, name="nanogpt-plot", daemon=True)
        self.thread.start()

    def request(self) -> None:
        self.wanted.set()

    def close(self) -> None:
        self.closing = True
        self.wanted.set()
        self.thread.join()  # bounded: at most the drawing under way and the last one, each killed at the timeout

    def _run(self) -> None:
        try:
            while True:
                self.wanted.wait()
                self.wanted.clear()
                closing = self.closing  # read before drawing: a close() during the drawing gets one more
                problem = self._draw()
                if problem:  # a plot is a convenience: never stop training for it, and stop trying
                    print(
                        f"warning: could not draw {self.out_dir / 'loss.png'} ({problem}); training goes on.",
                        file=sys.stderr,
                    )
                    return
                if closing:
                    return
        finally:
            self._end_child()

    def _draw(self) -> str | None:
        """Have the child draw once; why it failed, or None when it drew or had nothing to draw yet."""
        try:
            if self.child is None:
                self.child = self._start_child()
            self.child.stdin.write(b"draw\n")
            self.child.stdin.flush()
        except OSError as e:  # no interpreter to start, or a child that has died
            return self._last_error() or str(e)
        if not select.select([self.child.stdout], [], [], self.DRAW_TIMEOUT_S)[0]:
            return f"the drawing took over {self.DRAW_TIMEOUT_S:.0f} s"
        answer = self.child.stdout.readline().decode(errors="replace").strip()
        if answer in ("drawn", "nothing to draw"):  # the latter: no complete record yet, or an unwritable folder
            return None
        return answer or self._last_error() or f"the drawing process ended with status {self.child.wait()}"

    def _start_child(self) -> subprocess.Popen:
        env = dict(os.environ)
        # the child imports this very package, even from a checkout that is not installed (python train.py)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), str(Path(__file__).parents[1])]))
        self.errors = tempfile.TemporaryFile()  # a file, not a pipe: a long traceback can never block the child
        # its own session: the terminal's Ctrl-C goes to training, whose close() then ends the child
        argv = [sys.executable, "-c", self.CHILD_CODE, str(self.out_dir.resolve())]
        return subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.errors, env=env, start_new_session=True
        )

    def _last_error(self) -> str:
        if self.child is None:
            return ""
        self.errors.seek(0)
        lines = self.errors.read().decode(errors="replace").strip().splitlines()
        return lines[-1] if lines else ""

    def _end_child(self) -> None:
        """Close the child's input (it exits at the end of it), kill it if it lingers, and reap it."""
        if self.child is None:
            return
        with contextlib.suppress(OSError):
            self.child.stdin.close()
        try:
            self.child.wait(self.DRAW_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.child.kill()
            self.child.wait()  # reaped: no zombie left behind
        self.errors.close()


def draw_on_request(out_dir: str) -> None:
    """PlotRefresher's child: for each line read, redraw <out_dir>/loss.png and answer one line ("drawn",
    "nothing to draw", or what went wrong); the end of the input ends it."""
    try:  # training comes first: run only on a core it leaves idle (Linux), else at a low priority
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        os.nice(10)
    with contextlib.suppress(UserError):
        new_figure()  # import matplotlib now, while training sets up, rather than at the first drawing
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    sys.stdout = sys.stderr  # whatever a library prints stays out of the answers
    for _ in sys.stdin:
        try:
            plot_runs([out_dir], Path(out_dir) / "loss.png")
            answer = "drawn"
        except UserError:
            answer = "nothing to draw"
        except Exception as e:  # reported once by the parent, which then stops asking
            answer = f"{type(e).__name__}: {e}".replace("\n", " ")
        print(answer, file=answers, flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    out_dirs = [a for a in argv if not a.startswith("-")]
    flags = [a for a in argv if a.startswith("-")]
    o, _ = parse_args(PlotOptions, flags, "nanogpt plot", __doc__ or "", positional="OUT_DIR [OUT_DIR ...]")
    if not out_dirs:
        raise UserError("name at least one run folder: nanogpt plot OUT_DIR [OUT_DIR...] [--to=loss.png].")
    if o.samples:
        print(sample_timeline(read_runs(out_dirs)))
    else:
        print(f"wrote {plot_runs(out_dirs, o.to, o.x, o.log)}")


if __name__ == "__main__":
    run_main(main)
