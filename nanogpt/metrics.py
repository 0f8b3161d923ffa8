"""metrics.jsonl: one JSON object per logged iteration and per evaluation, appended as a run trains.

    {"kind": "train", "iter": 250, "time": 31.2, "tokens": 192768, "train_loss": 2.01, "lr": 0.001, "mfu": 1.9}
    {"kind": "eval", "iter": 250, "time": 33.0, "tokens": 192000, "train_loss": 1.98, "val_loss": 2.05, ...}
    {"kind": "sample", "iter": 250, "time": 33.1, "tokens": 192000, "val_loss": 2.05, "prompt": "\\n", "text": ...}

`time` is wall seconds since the run began (a resumed run goes on from where its file stopped), `tokens`
the training tokens seen, `mfu` a percentage (null until measured). A "sample" record follows each
evaluation's (report.EvalSample: the model's text from a fixed prompt, to watch it learn). Crash safety comes from the format:
each record is one line, written with one write() and flushed, so a SIGKILL loses at most the line being
written; a torn last line is skipped by readers and dropped when a resumed run continues the file. A
resumed run first drops the records logged after its checkpoint (those iterations run again), so no
iteration appears twice; a run started afresh in the same folder moves the old file aside
(metrics.1.jsonl, metrics.2.jsonl, ...) and starts a new one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, BinaryIO

from nanogpt.atomic import atomic_write_bytes

METRICS_NAME = "metrics.jsonl"


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The complete records of a metrics file, in order; a torn or garbled line is skipped."""
    records = []
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break  # the last line of a run killed mid-write
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if isinstance(record, dict) and isinstance(record.get("iter"), int):
                records.append(record)
    return records


def set_aside(path: Path) -> Path:
    """Rename `path` (metrics.jsonl) to the first free metrics.N.jsonl beside it and return the new name."""
    n = 1
    while (aside := path.with_name(f"{path.stem}.{n}{path.suffix}")).exists():
        n += 1
    os.replace(path, aside)
    return aside


class MetricsWriter:
    """Appends records to <out_dir>/metrics.jsonl for one run.

    resume_iter: None for a run from scratch (an existing file is set aside); else the checkpoint's
    iteration, and whether the resumed run skips the evaluation at that iteration (the checkpoint was
    saved by it), in which case that evaluation's records (eval and sample) are kept.
    """

    EVALUATION_KINDS = ("eval", "sample")  # written by the evaluation at an iteration, before its checkpoint

    def __init__(self, out_dir: str | os.PathLike, resume_iter: int | None = None, eval_done: bool = False):
        self.path = Path(out_dir) / METRICS_NAME
        self.time_offset = 0.0
        if self.path.exists():
            if resume_iter is None:
                set_aside(self.path)
            else:
                kept = [
                    r
                    for r in read_metrics(self.path)
                    if r["iter"] < resume_iter
                    or (eval_done and r["iter"] == resume_iter and r.get("kind") in self.EVALUATION_KINDS)
                ]
                atomic_write_bytes(self.path, b"".join(_line(r) for r in kept))
                self.time_offset = max((float(r.get("time", 0.0)) for r in kept), default=0.0)
        self.started = time.time()
        self._file: BinaryIO | None = open(self.path, "ab", buffering=0)  # unbuffered: one write() per record

    def write(self, kind: str, **fields: Any) -> None:
        """Append one record. A disk that fills up (or a file-size limit) stops the log, with one warning, not
        the run: the checkpoints matter more, and their own saves say clearly when they cannot be written."""
        if self._file is None:
            return
        record = {"kind": kind, **fields, "time": round(self.time_offset + time.time() - self.started, 3)}
        try:
            self._file.write(_line(record))
        except OSError as e:
            print(
                f"warning: could not append to {self.path} ({e.strerror}); training goes on without logging its "
                f"metrics from iteration {fields.get('iter')} on. Free some disk space for its checkpoints.",
                file=sys.stderr,
            )
            self.close()

    def close(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None


def _line(record: dict[str, Any]) -> bytes:
    # strict JSON has no NaN or Infinity: a diverged loss is written as null (the run stops right after)
    clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
    return (json.dumps(clean, allow_nan=False) + "\n").encode()
