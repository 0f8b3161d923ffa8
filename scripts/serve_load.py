"""Load on `nanogpt serve`, in the manner of vLLM's serving benchmark: concurrent streaming completions
through the official openai client, the batched engine against the turn-taking one in the same run.

    python scripts/serve_load.py --out_dir=out-shakespeare-char [--streams=1,8,50] [--max_tokens=200]

For each engine (`--max_batch=0`: one forward pass over every active stream; `--max_batch=1`: each stream
its own forward pass, in turn) and each number of concurrent streams, serves the run in a background thread
on a free loopback port, fires the streams at once (stream i with seed i), and measures:
- total generated tokens per second over all streams (from the first request to the last token);
- time to first token (TTFT), p50 and p99 over the streams;
- inter-token latency (ITL): the gaps between consecutive tokens of a stream, p50 and p99 over all gaps.
Engines alternate, round by round, so a machine that slows down slows both. Prints a table, returns the
figures (and --json writes them with the CPU and the commit).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


async def stream_one(client, model: str, prompt: str, max_tokens: int, seed: int) -> tuple[list[float], str]:
    """One streamed completion: the arrival time of each token (perf_counter) and the text."""
    times, parts = [], []
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, seed=seed, stream=True)
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].finish_reason is None:
            times.append(time.perf_counter())
            parts.append(chunk.choices[0].text)
    return times, "".join(parts)


async def load(url: str, model: str, prompts: list[str], max_tokens: int) -> dict:
    """Stream one completion per prompt, all at once, request i with seed i; the figures and each text."""
    import openai

    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(
            *(stream_one(client, model, p, max_tokens, seed) for seed, p in enumerate(prompts))
        )
    wall = max(t[-1] for t, _ in results if t) - t0
    firsts = [t[0] - t0 for t, _ in results if t]
    gaps = [b - a for t, _ in results for a, b in zip(t, t[1:])]
    tokens = sum(len(t) for t, _ in results)
    return {
        "texts": [text for _, text in results],
        "requests": len(prompts),
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "first_token_p50_s": statistics.median(firsts),
        "first_token_p99_s": percentile(firsts, 99),
        "first_token_max_s": max(firsts),
        "itl_p50_s": statistics.median(gaps) if gaps else 0.0,
        "itl_p99_s": percentile(gaps, 99) if gaps else 0.0,
    }


def serve_and_load(out_dir: str, max_batch: int, streams: int, max_tokens: int, prompt: str) -> dict:
    """Start a server for the run with this engine, put `streams` concurrent streams on it, stop it."""
    from nanogpt.serve import BackgroundServer, ServeOptions, build_app

    o = ServeOptions(
        out_dir=out_dir,
        device="cpu",
        max_active=max(16, streams),
        queue_size=max(64, streams),
        max_batch=max_batch,
        max_tokens=max(1024, max_tokens),
    )
    app, engine, _ = build_app(o)
    server = BackgroundServer(app)
    try:
        return asyncio.run(load(server.url, o.model_id, [prompt] * streams, max_tokens))
    finally:
        server.stop()
        engine.close()


def machine() -> dict:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line), "")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return {"cpu": cpu or platform.processor(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "commit": commit, "date": time.strftime("%Y-%m-%d")}  # fmt: skip


def table(figures: dict) -> str:
    rows = [
        "| streams | engine | tokens/s (all streams) | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 |",
        "|---|---|---|---|---|---|---|",
    ]
    for (streams, engine), r in sorted(figures.items()):
        rows.append(
            f"| {streams} | {engine} | {r['tokens_per_s']:,.0f} | {r['first_token_p50_s'] * 1e3:,.0f} ms | "
            f"{r['first_token_p99_s'] * 1e3:,.0f} ms | {r['itl_p50_s'] * 1e3:.1f} ms | {r['itl_p99_s'] * 1e3:.1f} ms |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out_dir", default="out-shakespeare-char", help="the trained run to serve")
    p.add_argument("--streams", default="1,8,50", help="numbers of concurrent streams (default 1,8,50)")
    p.add_argument("--max_tokens", type=int, default=200, help="tokens per stream (default 200)")
    p.add_argument("--prompt", default="ROMEO:", help="the prompt of every stream")
    p.add_argument("--engines", default="batched,turns", help="batched (--max_batch=0), turns (--max_batch=1)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    a = p.parse_args(argv)

    engines = {"batched": 0, "turns": 1}
    figures = {}
    for streams in (int(s) for s in a.streams.split(",")):
        for name in a.engines.split(","):  # alternating: both engines see the same machine
            r = serve_and_load(a.out_dir, engines[name], streams, a.max_tokens, a.prompt)
            figures[(streams, name)] = r
            print(
                f"{streams:>3} streams, {name:<7}: {r['tokens_per_s']:8,.0f} tokens/s, TTFT p50 "
                f"{r['first_token_p50_s']:.3f} s p99 {r['first_token_p99_s']:.3f} s, ITL p50 "
                f"{r['itl_p50_s'] * 1e3:.1f} ms p99 {r['itl_p99_s'] * 1e3:.1f} ms",
                flush=True,
            )
    print(table(figures))
    if a.json:
        rows = [
            {"streams": s, "engine": e, **{k: v for k, v in r.items() if k != "texts"}} for (s, e), r in figures.items()
        ]
        a.json.write_text(json.dumps({"machine": machine(), "max_tokens": a.max_tokens, "runs": rows}, indent=1))
    return figures


if __name__ == "__main__":
    main()
