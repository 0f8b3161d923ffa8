"""`nanogpt serve`: a local playground page and an OpenAI-compatible API for a trained model.

    nanogpt serve --out_dir=out-shakespeare-char            # then open http://127.0.0.1:8000
    nanogpt serve --init_from=gpt2 --port=8080 --api_key=secret

Any OpenAI client works against it (base_url="http://127.0.0.1:8000/v1"); the model's id is the name
of its out_dir (or init_from). Needs the [serve] extra: pip install 'nanogpt[serve]' (FastAPI, uvicorn).
engine.py generates, app.py speaks HTTP, static/ holds the page.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from nanogpt.config import device_option, dtype_option, init_from_option, option, out_dir_option, parse_args
from nanogpt.errors import UserError, run_main


@dataclass
class ServeOptions:
    init_from: str = init_from_option()
    out_dir: str = out_dir_option("folder holding ckpt.pt and metrics.jsonl (init_from=resume)")
    host: str = option("127.0.0.1", "address to listen on; 0.0.0.0 exposes the server to your network")
    port: int = option(8000, "TCP port (0: any free port, printed at start)")
    api_key: str = option("", "require 'Authorization: Bearer KEY' on the API (empty: no key)")
    model_name: str = option("", "the model id clients ask for (default: the out_dir's or init_from's name)")
    max_active: int = option(16, "requests generating at once (each advances one token in turn)")
    queue_size: int = option(64, "requests waiting beyond those; more are refused with 429")
    max_n: int = option(8, "the largest n (completions per request) accepted")
    max_tokens: int = option(
        1024, "the most tokens one request may generate; past block_size the model's window slides, as in sample.py"
    )
    device: str = device_option()
    dtype: str = dtype_option()

    def __post_init__(self) -> None:
        if self.max_active < 1 or self.queue_size < 0 or self.max_n < 1 or self.max_tokens < 1:
            raise UserError("--max_active, --max_n and --max_tokens must be at least 1, --queue_size at least 0.")
        if not 0 <= self.port <= 65535:
            raise UserError(f"--port must be between 0 and 65535, got {self.port}.")

    @property
    def model_id(self) -> str:
        if self.model_name:
            return self.model_name
        return Path(self.out_dir).resolve().name if self.init_from == "resume" else Path(self.init_from).name


def build_app(o: ServeOptions):
    """The model, its engine and the FastAPI app for options `o`."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise UserError("nanogpt serve needs FastAPI and uvicorn: pip install 'nanogpt[serve]'.") from None
    from nanogpt.device import enable_tf32, resolve_device, resolve_dtype
    from nanogpt.inference import load_inference_model
    from nanogpt.metrics import METRICS_NAME
    from nanogpt.serve.app import create_app
    from nanogpt.serve.engine import Engine

    device = resolve_device(o.device)
    dtype = resolve_dtype(o.dtype, device)
    enable_tf32(device)
    model, tok, source, _ = load_inference_model(o.init_from, o.out_dir)
    model.eval().to(device)
    engine = Engine(model, tok, device, dtype, o.max_active, o.queue_size)
    metrics = Path(o.out_dir) / METRICS_NAME if o.init_from == "resume" else None
    app = create_app(engine, o.model_id, o.api_key or None, metrics, o.max_n, o.max_tokens)
    return app, engine, source


class BackgroundServer:
    """An app served by uvicorn in a daemon thread, for notebooks, scripts and tests: `.url`, then `.stop()`.
    Port 0 picks a free port."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, timeout: float = 30):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
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
    import uvicorn

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
    print(f"serving {source} as '{o.model_id}' at {url}  (OpenAI API: {url}/v1; Ctrl-C stops)", flush=True)
    try:
        uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    finally:
        engine.close()


if __name__ == "__main__":
    run_main(main)
