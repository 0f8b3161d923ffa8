"""`nanogpt serve`: a local playground page and an OpenAI-compatible API for a trained model.

    nanogpt serve --out_dir=out-shakespeare-char            # then open http://127.0.0.1:8000
    nanogpt serve --init_from=gpt2 --port=8080 --api_key=secret
    NANOGPT_API_KEY=secret nanogpt serve --host=0.0.0.0   # the key from the environment (or --api_key_file=PATH)

Any OpenAI client works against it (base_url="http://127.0.0.1:8000/v1"); the model's id is the name
of its out_dir (or init_from). Needs the [serve] extra: pip install 'nanogpt[serve]' (FastAPI, uvicorn,
prometheus_client). engine.py generates, app.py speaks HTTP, static/ holds the page. SIGTERM drains: new
requests get 503 while running ones get --drain_seconds to finish; then the server exits.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from nanogpt.config import device_option, dtype_option, init_from_option, option, out_dir_option, parse_args
from nanogpt.errors import UserError, run_main

API_KEY_VARIABLE = "NANOGPT_API_KEY"
FLUSH_S = 5  # once the server stops, how long answers still being sent may take before they are cut


@dataclass
class ServeOptions:
    init_from: str = init_from_option()
    out_dir: str = out_dir_option("folder holding ckpt.pt and metrics.jsonl (init_from=resume)")
    host: str = option("127.0.0.1", "address to listen on; 0.0.0.0 exposes the server to your network")
    port: int = option(8000, "TCP port (0: any free port, printed at start)")
    api_key: str = option("", "require 'Authorization: Bearer KEY' on the API (empty: no key)")
    api_key_file: str = option(
        "", f"read the API key from this file, so that it does not show in ps (or set {API_KEY_VARIABLE})"
    )
    model_name: str = option("", "the model id clients ask for (default: the out_dir's or init_from's name)")
    max_active: int = option(16, "requests generating at once (each advances one token in turn)")
    queue_size: int = option(64, "requests waiting beyond those; more are refused with 429")
    max_n: int = option(8, "the largest n (completions per request) accepted")
    max_tokens: int = option(
        1024, "the most tokens one request may generate; past block_size the model's window slides, as in sample.py"
    )
    max_batch: int = option(
        0, "the most requests in one forward pass (0: every active one; 1: each its own, the old turn-taking)"
    )
    kv_budget_gb: float = option(
        0.0, "memory for the active requests' KV caches, in GB (0: half of what the device has free); more wait"
    )
    max_body_bytes: int = option(1_000_000, "the largest request body accepted, in bytes (larger: 413)")
    max_prompt_chars: int = option(100_000, "the longest prompt accepted, in characters, checked before encoding")
    max_stop_chars: int = option(200, "the longest stop string accepted, in characters")
    max_messages: int = option(256, "the most messages a chat request may hold")
    drain_seconds: float = option(
        20.0, "on SIGTERM, how long running requests may take to finish (new ones get 503) before the server exits"
    )
    device: str = device_option()
    dtype: str = dtype_option()

    def __post_init__(self) -> None:
        if self.max_active < 1 or self.queue_size < 0 or self.max_n < 1 or self.max_tokens < 1:
            raise UserError("--max_active, --max_n and --max_tokens must be at least 1, --queue_size at least 0.")
        limits = (self.max_body_bytes, self.max_prompt_chars, self.max_stop_chars, self.max_messages)
        if min(limits) < 1 or min(self.drain_seconds, self.max_batch, self.kv_budget_gb) < 0:
            raise UserError(
                "--max_body_bytes, --max_prompt_chars, --max_stop_chars and --max_messages must be at least 1, "
                "--drain_seconds, --max_batch and --kv_budget_gb at least 0."
            )
        if self.api_key and self.api_key_file:
            raise UserError("give the API key once: --api_key or --api_key_file, not both.")
        if not 0 <= self.port <= 65535:
            raise UserError(f"--port must be between 0 and 65535, got {self.port}.")

    @property
    def model_id(self) -> str:
        if self.model_name:
            return self.model_name
        return Path(self.out_dir).resolve().name if self.init_from == "resume" else Path(self.init_from).name


def api_key_of(o: ServeOptions) -> str | None:
    """The API key: --api_key, else the contents of --api_key_file, else $NANOGPT_API_KEY; None for no key."""
    if not o.api_key_file:
        return o.api_key or os.environ.get(API_KEY_VARIABLE) or None
    try:
        key = Path(o.api_key_file).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(
            f"cannot read the API key file {o.api_key_file} ({getattr(e, 'strerror', None) or e})."
        ) from None
    if not key:
        raise UserError(f"the API key file {o.api_key_file} is empty: put the key in it, or leave out --api_key_file.")
    return key


def is_loopback(host: str) -> bool:
    """Whether listening on `host` keeps the server to this machine."""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may well reach beyond
        return False


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """What to say at start when the server is reachable from other machines and anyone there may use it."""
    if is_loopback(host) or api_key is not None:
        return None
    return (
        f"warning: listening on {host} without an API key: anyone who can reach this port can use the model. "
        f"Set a key with --api_key_file=PATH or {API_KEY_VARIABLE}."
    )


def build_app(o: ServeOptions):
    """The model, its engine and the FastAPI app for options `o`."""
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise UserError(
            "nanogpt serve needs FastAPI, uvicorn and prometheus_client: pip install 'nanogpt[serve]'."
        ) from None
    from nanogpt.device import enable_tf32, resolve_device, resolve_dtype
    from nanogpt.inference import load_inference_model
    from nanogpt.metrics import METRICS_NAME
    from nanogpt.serve.app import create_app
    from nanogpt.serve.engine import Engine

    api_key = api_key_of(o)  # before the model loads: a missing key file is said at once
    device = resolve_device(o.device)
    dtype = resolve_dtype(o.dtype, device)
    enable_tf32(device)
    model, tok, source, _ = load_inference_model(o.init_from, o.out_dir)
    model.eval().to(device)
    kv_budget = int(o.kv_budget_gb * 2**30) if o.kv_budget_gb else None  # GB as memory.gb reads it
    engine = Engine(model, tok, device, dtype, o.max_active, o.queue_size, o.max_batch, kv_budget)
    app = create_app(
        engine,
        o.model_id,
        api_key=api_key,
        metrics_path=Path(o.out_dir) / METRICS_NAME if o.init_from == "resume" else None,
        max_n=o.max_n,
        max_tokens_limit=o.max_tokens,
        max_body_bytes=o.max_body_bytes,
        max_prompt_chars=o.max_prompt_chars,
        max_stop_chars=o.max_stop_chars,
        max_messages=o.max_messages,
        local_only=is_loopback(o.host),
    )
    return app, engine, source


def drain(app, engine, seconds: float) -> bool:
    """SIGTERM's graceful stop: new requests get 503 at once (/health too, so that a load balancer stops sending
    any), those running or waiting get `seconds` to finish, and any left then fail cleanly (a 503, or an error
    event ending their stream) instead of being cut off. True if all finished in time."""
    app.state.server.draining = True
    engine.stop_accepting()
    idle = engine.wait_idle(seconds)
    if not idle:
        engine.close()
    return idle


def serve_until_stopped(app, engine, sock: socket.socket, drain_seconds: float) -> None:
    """uvicorn on `sock` until Ctrl-C or SIGTERM. SIGTERM drains first (see drain), in a thread, since a signal
    handler must return at once; a second SIGTERM, or Ctrl-C, stops without waiting. Either way answers still
    being sent then get FLUSH_S more seconds."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if sig != signal.SIGTERM or app.state.server.draining:
                return super().handle_exit(sig, frame)
            app.state.server.draining = True  # at once: the thread may take a moment to start

            def drain_then_exit() -> None:
                drain(app, engine, drain_seconds)
                uvicorn.Server.handle_exit(self, sig, frame)  # uvicorn exits, then ends the process by SIGTERM

            threading.Thread(target=drain_then_exit, name="nanogpt-drain", daemon=True).start()

    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=FLUSH_S)
    DrainingServer(config).run(sockets=[sock])


class BackgroundServer:
    """An app served by uvicorn in a daemon thread, for notebooks, scripts and tests: `.url`, then `.stop()`.
    Port 0 picks a free port."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, timeout: float = 30):
        import uvicorn

        config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=FLUSH_S)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="nanogpt-serve", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {host}:{port}")
            time.sleep(0.01)
        bound = self.server.servers[0].sockets[0].getsockname()
        self.url = f"http://{host}:{bound[1]}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    o, _ = parse_args(ServeOptions, argv, "nanogpt serve", __doc__ or "")
    app, engine, source = build_app(o)
    handler = logging.StreamHandler()  # a failed request's traceback, with the time it happened
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("nanogpt.serve").addHandler(handler)

    sock = socket.socket(socket.AF_INET6 if ":" in o.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((o.host, o.port))
    except OSError as e:
        raise UserError(
            f"cannot listen on {o.host}:{o.port} ({e.strerror}). Another server may be using the port: "
            "choose another with --port (0 picks a free one)."
        ) from None
    sock.listen(2048)  # connections made from now on wait in the backlog until uvicorn serves them
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    if warning := exposure_warning(o.host, app.state.server.api_key):
        print(warning, file=sys.stderr)
    print(f"serving {source} as '{o.model_id}' at {url}  (OpenAI API: {url}/v1; Ctrl-C stops)", flush=True)
    try:
        serve_until_stopped(app, engine, sock, o.drain_seconds)
    finally:
        engine.close()


if __name__ == "__main__":
    run_main(main)
