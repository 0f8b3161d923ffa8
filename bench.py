"""Thin wrapper so nanoGPT's command works from the repository root: python bench.py --help"""

from nanogpt.bench import main
from nanogpt.errors import run_main

if __name__ == "__main__":
    run_main(main)
