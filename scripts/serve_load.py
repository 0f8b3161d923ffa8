"""Load on `nanogpt serve`: many concurrent streaming completions through the official openai client.

    python scripts/serve_load.py --out_dir=out-shakespeare-char [--requests=50] [--max_tokens=100]

Serves the run in a background thread (as `nanogpt serve` would, on a free loopback port), fires all
requests at once, each streaming with its own seed, and prints the figures: wall time, generated tokens per
second over all streams, and the latency to the first token and to the last (p50, p99, max).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


async def load(url: str, model: str, prompts: list[str], max_tokens: int) -> dict:
    """Stream one completion per prompt, all at once, request i with seed i; the figures and each text."""
    import openai

    async def one(client: openai.AsyncOpenAI, seed: int) -> tuple[float, float, int, str]:
        t0 = time.perf_counter()
        first, parts = None, []
        stream = await client.completions.create(
            model=model, prompt=prompts[seed], max_tokens=max_tokens, seed=seed, stream=True
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].finish_reason is None:
                first = first or time.perf_counter() - t0
                parts.append(chunk.choices[0].text)
        return first, time.perf_counter() - t0, len(parts), "".join(parts)

    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(client, seed) for seed in range(len(prompts))))
        wall = time.perf_counter() - t0
    firsts, totals, tokens, texts = zip(*results)
    return {
        "texts": list(texts),
        "requests": len(prompts),
        "tokens": sum(tokens),
        "wall_s": wall,
        "tokens_per_s": sum(tokens) / wall,
        "first_token_p50_s": statistics.median(firsts),
        "first_token_p99_s": percentile(firsts, 99),
        "first_token_max_s": max(firsts),
        "latency_p50_s": statistics.median(totals),
        "latency_p99_s": percentile(totals, 99),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out_dir", default="out-shakespeare-char", help="the trained run to serve")
    p.add_argument("--requests", type=int, default=50, help="concurrent streaming requests (default 50)")
    p.add_argument("--max_tokens", type=int, default=50, help="tokens per request (default 50)")
    p.add_argument("--prompt", default="ROMEO:", help="the prompt of every request")
    p.add_argument("--max_active", type=int, default=16, help="the server's --max_active (default 16)")
    a = p.parse_args(argv)

    from nanogpt.serve import BackgroundServer, ServeOptions, build_app

    o = ServeOptions(out_dir=a.out_dir, device="cpu", max_active=a.max_active, queue_size=max(64, a.requests))
    app, engine, source = build_app(o)
    server = BackgroundServer(app)
    try:
        r = asyncio.run(load(server.url, o.model_id, [a.prompt] * a.requests, a.max_tokens))
    finally:
        server.stop()
        engine.close()
    print(
        f"{source}: {r['requests']} concurrent streams x {a.max_tokens} tokens (--max_active={a.max_active}) in "
        f"{r['wall_s']:.2f} s: {r['tokens_per_s']:.0f} tokens/s in all; first token p50 {r['first_token_p50_s']:.3f} s, "
        f"p99 {r['first_token_p99_s']:.3f} s, max {r['first_token_max_s']:.3f} s; whole request p50 "
        f"{r['latency_p50_s']:.2f} s, p99 {r['latency_p99_s']:.2f} s"
    )
    return r


if __name__ == "__main__":
    main()
