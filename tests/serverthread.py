"""A real nanogpt server for tests: create_app served by uvicorn in a thread, on a free loopback port."""

from __future__ import annotations

import http.client
import json
import string
import time
import urllib.parse

import openai
import torch

from nanogpt.model import GPT, GPTConfig
from nanogpt.serve import BackgroundServer
from nanogpt.serve.app import create_app
from nanogpt.serve.engine import Engine
from nanogpt.tokenizer import CharTokenizer

CHARS = sorted(set(string.printable) - set("\t\r\x0b\x0c"))
BLOCK = 96
MODEL_ID = "tiny"


def tiny_model() -> tuple[GPT, CharTokenizer]:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=len(CHARS), block_size=BLOCK, n_layer=1, n_head=2, n_embd=32)).eval()
    with torch.no_grad():  # sharper than at initialisation, so greedy text is not one repeated character
        model.lm_head.weight.mul_(8)
    return model, CharTokenizer(CHARS)


def request(method: str, url: str, body: object = None, raw: bytes | None = None, headers: dict | None = None):
    """One plain HTTP request with the standard library: (status, parsed JSON body or text, response headers)."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    hdrs = {"Content-Type": "application/json"} if body is not None else {}
    conn.request(method, parts.path, data, {**hdrs, **(headers or {})})
    resp = conn.getresponse()
    text = resp.read().decode()
    conn.close()
    try:
        return resp.status, json.loads(text), dict(resp.getheaders())
    except ValueError:
        return resp.status, text, dict(resp.getheaders())


def open_stream(url: str, body: dict) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """POST a streaming request and return the connection and response after its first event line."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    conn.request("POST", parts.path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    assert resp.readline().startswith(b"data: ")
    return conn, resp


class Server:
    """create_app for tiny_model(), served in a background thread on a free loopback port."""

    def __init__(self, step_seconds: float = 0.0, **app_kwargs):
        self.model, self.tok = tiny_model()
        if step_seconds:  # a slow device: every forward pass takes this long, so a stream lasts a while
            forward = self.model.forward

            def slow_forward(*args, **kwargs):
                time.sleep(step_seconds)
                return forward(*args, **kwargs)

            self.model.forward = slow_forward
        engine_kwargs = {k: app_kwargs.pop(k) for k in ("max_active", "queue_size") if k in app_kwargs}
        self.engine = Engine(self.model, self.tok, "cpu", "float32", **engine_kwargs)
        self.app = create_app(self.engine, MODEL_ID, **app_kwargs)
        self.background = BackgroundServer(self.app)
        self.url = self.background.url

    def client(self, api_key: str = "none", **kwargs) -> openai.OpenAI:
        kwargs.setdefault("timeout", 60)  # a server that stopped answering fails the test instead of hanging it
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, **kwargs)

    def stop(self) -> None:
        self.background.stop()
        self.engine.close()


def greedy(server: Server, prompt: str, n: int) -> str:
    """What the model itself generates greedily after `prompt`."""
    ids = torch.tensor([server.tok.encode(prompt)])
    out = server.model.generate(ids, n, temperature=0.0)
    return server.tok.decode(out[0, ids.size(1) :].tolist())


def seeded(server: Server, prompt: str, n: int, seed: int, samples: int = 1, **kwargs) -> list[str]:
    """What the model samples after `prompt` from a generator seeded with `seed`, `samples` rows at once."""
    ids = torch.tensor([server.tok.encode(prompt)] * samples)
    gen = torch.Generator().manual_seed(seed)
    out = server.model.generate(ids, n, generator=gen, **kwargs)
    return [server.tok.decode(row[ids.size(1) :].tolist()) for row in out]
