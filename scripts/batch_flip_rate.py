"""How often continuous batching changes a seeded request's text, measured: the same seeded requests run
alone (one after another, each its own forward passes: what generate_stream and sample.py compute) and all
at once (one forward pass per step over every active sequence), on a small trained model.

    python scripts/batch_flip_rate.py [--out_dir=tests/fixtures/compat] [--requests=50] [--max_tokens=100]
                                      [--dtype=float32] [--device=cpu]

Prints, per request whose text differs, the choice and the token where it first does, and the count.
Why a token can flip at all is in nanogpt/serve/engine.py's docstring: the batched matmuls have more rows.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

from nanogpt.errors import UserError
from nanogpt.inference import load_inference_model
from nanogpt.serve.engine import Done, Engine, Failed, Job, Token

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "compat"
PROMPTS = ["KING:", "ROMEO:\n", "the ", "NURSE:\nwine and", "O", "JULIET:\nqueen the king", "\n", "far land"]


def encode(tok, text: str) -> list[int]:
    """The prompt's tokens; characters a character-level vocabulary lacks are left out."""
    try:
        return tok.encode(text)
    except UserError:
        return [i for c in text if c in getattr(tok, "stoi", {}) for i in tok.encode(c)]


def requests(tok, count: int, max_tokens: int) -> list[dict]:
    """Request i: seed i, a prompt, settings and n that vary with i, and up to max_tokens tokens (past the
    context, so windows slide at different steps in different rows)."""
    return [
        dict(
            prompt_ids=encode(tok, PROMPTS[i % len(PROMPTS)]),
            max_tokens=max_tokens - 7 * (i % 5),
            n=1 + (i % 3 == 0),
            temperature=(1.0, 0.8, 0.0, 1.2)[i % 4],
            top_k=(None, 10)[i % 2],
            top_p=(None, None, 0.9)[i % 3],
            seed=i,
        )
        for i in range(count)
    ]


async def run(engine: Engine, specs: list[dict], alone: bool) -> list[list[list[str]]]:
    """Each request's tokens per choice: submitted one after another (alone) or all at once."""
    loop = asyncio.get_running_loop()

    async def one(spec: dict) -> list[list[str]]:
        job = Job(**spec, events=asyncio.Queue(), loop=loop)
        engine.submit(job)
        tokens: list[list[str]] = [[] for _ in range(job.n)]
        while not isinstance(event := await job.events.get(), (Done, Failed)):
            if isinstance(event, Token):
                tokens[event.choice].append(event.text)
        assert isinstance(event, Done), event
        return tokens

    if alone:
        return [await one(spec) for spec in specs]
    return list(await asyncio.gather(*(one(spec) for spec in specs)))


def measure(model, tok, count: int = 50, max_tokens: int = 100, device: str = "cpu", dtype: str = "float32") -> dict:
    """Run the requests alone (max_batch=1) and together; the requests whose tokens differ, with where."""
    specs = requests(tok, count, max_tokens)
    outputs = {}
    for name, max_batch in (("alone", 1), ("together", 0)):
        engine = Engine(model, tok, device, dtype, max_active=count, queue_size=count, max_batch=max_batch)
        try:
            outputs[name] = asyncio.run(run(engine, specs, alone=name == "alone"))
        finally:
            engine.close()
    flips = []
    for i, (a, b) in enumerate(zip(outputs["alone"], outputs["together"])):
        for c, (x, y) in enumerate(zip(a, b)):
            if x != y:
                at = next((t for t, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
                flips.append({"request": i, "choice": c, "token": at, "of": len(x)})
    tokens = sum(len(x) for out in outputs["alone"] for x in out)
    return {"requests": count, "tokens": tokens, "flipped_requests": len({f["request"] for f in flips}), "flips": flips}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out_dir", default=str(FIXTURE), help="the trained run (default: the compat fixture)")
    p.add_argument("--requests", type=int, default=50)
    p.add_argument("--max_tokens", type=int, default=100)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    args = p.parse_args(argv)
    model, tok, _, _ = load_inference_model("resume", args.out_dir)
    model = model.to(args.device).eval()
    result = measure(model, tok, args.requests, args.max_tokens, args.device, args.dtype)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
