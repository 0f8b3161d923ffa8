"""Download and tokenize OpenWebText into this folder: python data/openwebtext/prepare.py --help"""

import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # the repository root, so this works without installing nanogpt

from nanogpt.errors import run_main  # noqa: E402
from nanogpt.openwebtext import main  # noqa: E402

if __name__ == "__main__":
    run_main(main, [f"--data_dir={HERE}", *sys.argv[1:]])
