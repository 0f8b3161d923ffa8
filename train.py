"""Thin wrapper so nanoGPT's command works from the repository root: python train.py --help"""

from nanogpt.errors import run_main
from nanogpt.train import main

if __name__ == "__main__":
    run_main(main)
