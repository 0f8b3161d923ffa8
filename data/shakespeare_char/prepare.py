"""Prepare the shakespeare_char dataset in this folder: python data/shakespeare_char/prepare.py --help

Uses input.txt beside this file when present (any UTF-8 text), else downloads tiny Shakespeare.
"""

import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # the repository root, so this works without installing nanogpt

from nanogpt.errors import run_main  # noqa: E402
from nanogpt.prepare import main  # noqa: E402

if __name__ == "__main__":
    run_main(main, ["--dataset=shakespeare_char", f"--data_dir={HERE}", *sys.argv[1:]])
