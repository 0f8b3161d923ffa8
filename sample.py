"""Thin wrapper so nanoGPT's command works from the repository root: python sample.py --help"""

from nanogpt.errors import run_main
from nanogpt.sample import main

if __name__ == "__main__":
    run_main(main)
