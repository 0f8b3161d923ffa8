"""Write the sharded checkpoints of an --fsdp run as single files: ckpt.dcp as ckpt.pt, interrupt.dcp
as interrupt.pt.

    nanogpt consolidate --out_dir=out-shakespeare-char

An --fsdp run writes its checkpoints sharded (<out_dir>/ckpt.dcp, one part per process; interrupt.dcp on
Ctrl-C or SIGTERM) and consolidates ckpt.dcp into ckpt.pt when it ends. This does it for a run that did
not end (killed, stopped, or still running): one process reads every shard, checked against its CRC-32,
and writes the file atomically, with the weights, the AdamW state and the progress, as a single-process
run would have.
sample.py, eval and export read the shards by themselves; this is for copying a model elsewhere, or for
tools that want the single file.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

from nanogpt.checkpoint import consolidate
from nanogpt.config import option, parse_args
from nanogpt.errors import run_main


@dataclass
class ConsolidateOptions:
    out_dir: str = option(
        "out", "the --fsdp run's folder (what train's --out_dir was): holds ckpt.dcp/, interrupt.dcp/"
    )


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    o, _ = parse_args(ConsolidateOptions, argv, "nanogpt consolidate", __doc__ or "")
    for path in consolidate(o.out_dir):
        print(f"wrote {path}")


if __name__ == "__main__":
    run_main(main)
