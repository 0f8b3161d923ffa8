"""Sample text from a trained model or from OpenAI's GPT-2 (its --help is USAGE below).

Read it fifth and last, after generate.py (the README's "Read the code"): nanoGPT's sample.py, the
command around the sampling loop: load a model, encode the prompt, generate, decode, print.
"""

from __future__ import annotations

import codecs
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from nanogpt.config import device_option, dtype_option, init_from_option, option, out_dir_option, parse_args
from nanogpt.device import DTYPES, autocast, enable_tf32, resolve_device, resolve_dtype
from nanogpt.errors import UserError, run_main
from nanogpt.generate import generate as generate_tokens
from nanogpt.generate import generate_stream
from nanogpt.inference import load_inference_model
from nanogpt.memory import SAMPLE_ADVICE, generation_bytes, is_out_of_memory, out_of_memory, require
from nanogpt.tokenizer import GPT2_EOT, GPT2Tokenizer, Tokenizer

SEPARATOR = "---------------"
USAGE = """Sample text from a trained model or from OpenAI's GPT-2.

    python sample.py --out_dir=out-shakespeare-char
    python sample.py --init_from=gpt2-xl --start="What is the answer to life?" --num_samples=5
    python sample.py --out_dir=out-shakespeare-char --start=FILE:prompt.txt

All samples are generated together as one batch with a KV cache. With --num_samples=1 the text
streams to the terminal as it is generated.
"""


@dataclass
class SampleOptions:
    init_from: str = init_from_option()
    out_dir: str = out_dir_option("folder holding ckpt.pt (ignored unless init_from=resume)")
    start: str = option("\n", "the prompt; FILE:path reads it from a file")
    num_samples: int = option(10, "number of samples, generated together as one batch")
    max_new_tokens: int = option(500, "tokens generated per sample")
    temperature: float = option(0.8, "1.0 samples the model's distribution, lower is more conservative, 0 is greedy")
    top_k: Optional[int] = option(200, "sample only among the k most likely tokens (None: no limit)")
    top_p: Optional[float] = option(None, "nucleus sampling: the smallest set of tokens with this total probability")
    seed: int = option(1337, "random seed")
    device: str = device_option()
    dtype: str = dtype_option(
        "auto (bfloat16 on recent GPUs, float16 on old ones, float32 elsewhere), float32, bfloat16, float16"
    )
    compile: bool = option(
        False,
        "torch.compile the forward pass: ~40 s to compile 3 graphs (prompt, 1-token decoding, re-encoding when "
        "the window is full) used for every position; no gain on CPUs",
    )
    use_cache: bool = option(True, "use the KV cache; False recomputes the whole context for each token (nanoGPT)")

    def __post_init__(self) -> None:
        if self.num_samples < 1 or self.max_new_tokens < 0:
            raise UserError("--num_samples must be at least 1 and --max_new_tokens at least 0.")
        if self.temperature < 0:
            raise UserError(f"--temperature must be >= 0 (0 is greedy), got {self.temperature}.")
        if self.top_k is not None and self.top_k < 1:
            raise UserError(f"--top_k must be at least 1 (or None), got {self.top_k}.")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise UserError(f"--top_p must be in (0, 1] (or None), got {self.top_p}.")


def read_prompt(start: str) -> str:
    """--start's text: itself, or after FILE: the named file's."""
    if not start.startswith("FILE:"):
        return start
    path = start[len("FILE:") :]
    return read_text_file(Path(path), f"--start=FILE:{path}", "prompt file")


def read_text_file(path: Path, option: str, what: str) -> str:
    """A UTF-8 text file named on the command line; the messages call it `what` and say it came from
    `option` (eval's --text=... reads its text here too)."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"the {what} {path} (from {option}) does not exist.") from None
    except UnicodeDecodeError:
        raise UserError(f"the {what} {path} (from {option}) is not UTF-8 text. Convert it to UTF-8.") from None
    except OSError as e:
        raise UserError(f"cannot read the {what} {path} (from {option}): {e.strerror}.") from None


def encode_prompt(tok: Tokenizer, text: str) -> list[int]:
    ids = tok.encode(text)
    if not ids:
        if isinstance(tok, GPT2Tokenizer):
            return [GPT2_EOT]  # GPT-2 was trained with <|endoftext|> between documents: a neutral start
        raise UserError("the prompt is empty. Give some text with --start, e.g. --start='ROMEO:'.")
    return ids


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    o, _ = parse_args(SampleOptions, argv, "python sample.py", USAGE)
    device = resolve_device(o.device)
    dtype = resolve_dtype(o.dtype, device)
    torch.manual_seed(o.seed)
    enable_tf32(device)
    model, tok, _, _ = load_inference_model(o.init_from, o.out_dir)
    model.eval().to(device)
    if o.compile:  # the forward pass generate() calls; the static-shape KV cache keeps it to a few graphs
        model.forward = torch.compile(model.forward)
    ids = encode_prompt(tok, read_prompt(o.start))
    need = generation_bytes(model.config, o.num_samples, len(ids), o.max_new_tokens, DTYPES[dtype], o.use_cache)
    require(need, device, f"generating {o.num_samples} x {o.max_new_tokens} tokens", SAMPLE_ADVICE)
    try:
        generate(model, tok, ids, o, device, dtype)
    except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError is a RuntimeError
        if not is_out_of_memory(e):
            raise
        raise out_of_memory(device, SAMPLE_ADVICE) from None


def generate(model, tok: Tokenizer, ids: list[int], o: SampleOptions, device: str, dtype: str) -> None:
    """Print o.num_samples continuations of the prompt `ids`."""
    x = torch.tensor(ids, dtype=torch.long, device=device)[None, :].repeat(o.num_samples, 1)
    kwargs = dict(temperature=o.temperature, top_k=o.top_k, top_p=o.top_p, use_cache=o.use_cache)
    with torch.no_grad(), autocast(device, dtype):
        if o.num_samples == 1:  # stream: print each token as soon as it is known
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            sys.stdout.write(tok.decode(ids))
            for nxt in generate_stream(model, x, o.max_new_tokens, **kwargs):
                sys.stdout.write(decoder.decode(tok.decode_bytes(nxt[0].tolist())))
                sys.stdout.flush()
            sys.stdout.write(decoder.decode(b"", final=True) + "\n" + SEPARATOR + "\n")
        else:
            y = generate_tokens(model, x, o.max_new_tokens, **kwargs)
            for row in y.tolist():
                print(tok.decode(row))
                print(SEPARATOR)


if __name__ == "__main__":
    run_main(main)
