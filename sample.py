"""Thin wrapper so nanoGPT's command works from the repository root: python sample.py --help"""

from nanogpt.sample import main
from nanogpt.errors import run_main

if __name__ == "__main__":
    run_main(main)
