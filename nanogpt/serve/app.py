"""The HTTP side of `nanogpt serve`: OpenAI's API shapes, the playground page, errors in OpenAI's format.

    GET  /                     the playground (static/index.html): prompt, controls, streamed tokens
    GET  /v1/models            the one model served
    POST /v1/completions       prompt -> text; stream, n, stop, seed, logprobs (and top_k, as vLLM)
    POST /v1/chat/completions  messages rendered as plain text ("User: ...\\nAssistant:"), the same options
    GET  /api/metrics          the run's metrics.jsonl records (the page's loss curve)
    POST /api/inspect          text -> its tokens, every head's attention weights, the logit lens (inspect_model.py)
    GET  /metrics              the server's own figures in Prometheus' text format (requests, tokens, latencies)
    GET  /health               {"status": "ok", "active": jobs generating, "waiting": jobs queued, counters};
                               503 with "stopped" or "draining" when the server cannot take requests

Requests are validated by pydantic models that forbid unknown fields; every error, validation or
not, comes back as {"error": {"message", "type", "param", "code"}} with status 400, 401, 403, 404, 413, 429,
500 or 503, which the official `openai` client raises as its own exceptions. Nothing a client sends stops
the server: what can be refused before the body is read (a foreign Host, a missing key, a stopped or
draining server, a body too large) is refused by `Guard`, a middleware; what a handler lets slip becomes a
generic 500, its detail in the `nanogpt.serve` log; a client that leaves cancels its job.

Advanced machinery: a first read of nanogpt skips it (model.py, train.py, data.py and optim.py, then
generate.py and sample.py come first); engine.py does the generating, this file only speaks HTTP. It holds,
top to bottom: the request shapes (pydantic), `Server` (the engine and the limits, which every handler
needs), `Telemetry` (what /metrics reports), a job's events turned into a response (`Reply`: streamed or
whole, worded by `CompletionReply` or `ChatReply`), the handlers as plain functions, `Guard`, and
`create_app`, which binds a Server to them via app.state.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from nanogpt.device import autocast
from nanogpt.errors import UserError
from nanogpt.inspect_model import inspect as inspect_ids
from nanogpt.metrics import read_metrics
from nanogpt.serve.engine import Busy, Done, Engine, Failed, Finish, Job, Stopped, Token, TooLarge

STATIC = Path(__file__).parent / "static"
MAX_LOGPROBS = 5  # OpenAI's limit for completions
MAX_STOPS = 4  # OpenAI's limit
CHAT_DEFAULT_TOKENS = 256  # a chat request without max_tokens
WATCH_S = 0.25  # how often a request waiting for its tokens checks that its client and the worker are still there
LOCAL_HOSTS = ("localhost", "127.0.0.1", "[::1]")  # the names a request to a loopback server may carry in Host
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"  # the text format every Prometheus version reads

SERVER_ERROR = "The server had an error while processing your request; the details are in the server's log."
STOPPED = "The server's generation worker has stopped, so it cannot answer requests; restart the server."
DRAINING = "The server is shutting down and takes no new requests; retry in a moment or on another server."

log = logging.getLogger("nanogpt.serve")


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None):
        self.status, self.message, self.type, self.param = status, message, type, param


def error_response(status: int, message: str, type: str, param: str | None = None, code: str | None = None):
    headers = {"Retry-After": "1"} if status == 429 else None
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def as_response(e: APIError) -> JSONResponse:
    return error_response(e.status, e.message, e.type, e.param)


# ----------------------------------------------------------------------------- request shapes


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class SamplingFields(BaseModel):
    """What completions and chat completions share."""

    model_config = ConfigDict(extra="forbid")
    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1)  # not OpenAI's; vLLM and llama.cpp accept it too
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOPS or any(not s for s in stops):
            raise APIError(400, "stop must be a non-empty string or a list of up to 4 non-empty strings.", param="stop")
        return stops


class CompletionRequest(SamplingFields):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]
    max_tokens: int = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: Literal[False] = False  # accepted for clients that always send it; echoing is not supported


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str
    name: str | None = None


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class InspectRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str
    layer: int | None = Field(None, ge=0)  # one layer's attention only (a large model's whole is megabytes)
    top: int = Field(5, ge=1, le=50)  # the lens's likeliest tokens per layer and position (step view: 20)
    model: str | None = None


def render_chat(messages: list[ChatMessage]) -> str:
    """A plain-text transcript the model continues: one "Role: content" line per message, then "Assistant:".
    Models trained on plain text know no chat template; this one at least reads like a play."""
    lines = [f"{'System' if m.role == 'developer' else m.role.capitalize()}: {m.content}" for m in messages]
    return "\n".join(lines) + "\nAssistant:"


def _is_type_name(x: object) -> bool:
    return isinstance(x, str) and (x in ("str", "int", "float", "bool", "list", "dict") or "[" in x)


# ----------------------------------------------------------------------------- what /metrics reports


class EngineFigures:
    """A prometheus_client collector: the engine's stats(), read under its lock at each scrape."""

    GAUGES = {
        "active": ("nanogpt_requests_running", "Requests generating now."),
        "waiting": ("nanogpt_requests_waiting", "Requests queued for a free slot."),
    }
    COUNTERS = {
        "prompt_tokens_total": ("nanogpt_prompt_tokens", "Prompt tokens of the requests started (once per request)."),
        "generated_tokens_total": ("nanogpt_generation_tokens", "Tokens generated, over all choices."),
        "requests_total": ("nanogpt_requests_admitted", "Requests the engine took into its queue."),
    }

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self):
        stats = self.engine.stats()
        for key, (name, doc) in self.GAUGES.items():
            yield GaugeMetricFamily(name, doc, value=stats[key])
        for key, (name, doc) in self.COUNTERS.items():
            yield CounterMetricFamily(name, doc, value=stats[key])
        yield GaugeMetricFamily(
            "nanogpt_engine_alive", "1 while the generation worker runs.", value=float(self.engine.alive)
        )


class Telemetry:
    """GET /metrics: the engine's figures, plus what only the HTTP side sees: each generation request's status,
    and the latencies its client lives with (to the first token; between two tokens of one choice)."""

    ENDPOINTS = {"/v1/completions": "completions", "/v1/chat/completions": "chat"}

    def __init__(self, engine: Engine) -> None:
        self.registry = CollectorRegistry()  # one per app, so that several apps in one process keep apart
        self.registry.register(EngineFigures(engine))
        self.first_token = Histogram(
            "nanogpt_time_to_first_token_seconds",
            "From a request's arrival to its first token.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )
        self.inter_token = Histogram(
            "nanogpt_inter_token_latency_seconds",
            "Between two tokens of one choice.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=self.registry,
        )
        self.requests = Counter(
            "nanogpt_requests",
            "Completion and chat requests answered, by endpoint and HTTP status (499: the client left).",
            ["endpoint", "status"],
            registry=self.registry,
        )

    def answered(self, path: str, status: int) -> None:
        if (endpoint := self.ENDPOINTS.get(path)) is not None:
            self.requests.labels(endpoint, str(status)).inc()


# ----------------------------------------------------------------------------- the server's state


def is_local(host: str | None) -> bool:
    """Whether a Host header names this machine's loopback. A web page whose domain an attacker points at
    127.0.0.1 (DNS rebinding) still sends its own domain here, so refusing other names keeps it out."""
    if host is None:  # HTTP/1.0 without Host: not a browser, which always sends one
        return True
    host = host.lower()
    name = host[: host.index("]") + 1] if host.startswith("[") and "]" in host else host.rsplit(":", 1)[0]
    return name in LOCAL_HOSTS


def is_open(path: str) -> bool:
    """The paths that need no API key: /health for load balancers, and the page (no model data in it), which
    then sends the key typed into its field."""
    return path in ("/", "/health") or path.startswith("/static/")


@dataclass
class Server:
    """What every handler needs: the engine and the limits create_app was given. One per app, in app.state.server,
    so that the handlers below can be plain functions rather than closures inside create_app."""

    engine: Engine
    model_id: str
    api_key: str | None = None
    metrics_path: Path | None = None
    max_n: int = 8
    max_tokens_limit: int = 1024
    max_body_bytes: int = 1_000_000
    max_prompt_chars: int = 100_000
    max_stop_chars: int = 200
    max_messages: int = 256
    local_only: bool = True  # the server listens on loopback: refuse requests addressed to other names
    draining: bool = False  # SIGTERM's drain: new requests get 503 while those running finish
    created: int = field(default_factory=lambda: int(time.time()))  # /v1/models reports when the server started
    telemetry: Telemetry = field(init=False)

    def __post_init__(self) -> None:
        self.telemetry = Telemetry(self.engine)

    @property
    def block_size(self) -> int:
        return self.engine.model.config.block_size

    def refusal(self, scope: dict[str, Any]) -> APIError | None:
        """Why a request is refused before its body is read, if it is."""
        headers, path = Headers(scope=scope), scope["path"]
        if self.local_only and not is_local(headers.get("host")):
            return APIError(
                403,
                f"This server listens on loopback and answers only requests addressed to localhost, 127.0.0.1 or "
                f"[::1], not to '{headers['host'][:100]}' (a guard against DNS rebinding). Use one of those names, or "
                "start the server with --host and an API key to reach it from other machines.",
            )
        # compare_digest: the time taken must not tell how much of a guessed key was right
        given = headers.get("authorization", "").encode()
        if self.api_key is not None and not is_open(path) and not secrets.compare_digest(given, self.bearer):
            return APIError(
                401, "Incorrect API key provided. Send it as 'Authorization: Bearer KEY'.", "authentication_error"
            )
        if path.startswith("/v1/") and (self.draining or not self.engine.alive):
            return self.unavailable()
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body_bytes:
            return self.body_too_large()
        return None

    @property
    def bearer(self) -> bytes:
        return f"Bearer {self.api_key}".encode()

    def body_too_large(self) -> APIError:
        return APIError(
            413,
            f"The request body is larger than this server accepts ({self.max_body_bytes} bytes; see --max_body_bytes).",
        )

    def unavailable(self) -> APIError:
        return APIError(503, DRAINING if self.draining else STOPPED, "server_error")

    def failure(self) -> APIError:
        """What a failed job answers: 503 when the server is shutting down or its worker stopped, else a 500
        that says nothing of the cause (the engine logged it)."""
        if self.draining or not self.engine.alive:
            return self.unavailable()
        return APIError(500, SERVER_ERROR, "server_error")

    def check(self, req: SamplingFields, prompt: str, max_tokens: int | None, param: str) -> int:
        """The checks that cost nothing, made before the prompt is encoded; the number of tokens to generate."""
        if req.model != self.model_id:
            raise APIError(
                404, f"The model '{req.model}' does not exist; this server serves '{self.model_id}'.", param="model"
            )
        if req.n > self.max_n:
            raise APIError(400, f"n={req.n} is more than this server allows ({self.max_n}; see --max_n).", param="n")
        if max_tokens is None:
            max_tokens = min(CHAT_DEFAULT_TOKENS, self.max_tokens_limit)
        if max_tokens > self.max_tokens_limit:
            raise APIError(
                400,
                f"max_tokens={max_tokens} is more than this server generates for one request "
                f"({self.max_tokens_limit}; see --max_tokens). Ask for fewer tokens.",
                param="max_tokens",
            )
        if any(len(s) > self.max_stop_chars for s in req.stop_list()):
            raise APIError(
                400,
                f"A stop string may be up to {self.max_stop_chars} characters long (see --max_stop_chars).",
                param="stop",
            )
        self.check_length(prompt, param)
        return max_tokens

    def check_length(self, prompt: str, param: str) -> None:
        if len(prompt) > self.max_prompt_chars:
            raise APIError(
                400,
                f"The prompt has {len(prompt)} characters, more than this server reads ({self.max_prompt_chars}; "
                "see --max_prompt_chars). Please shorten the prompt.",
                param=param,
            )

    async def encode(self, prompt: str, param: str) -> list[int]:
        """The prompt's token ids, or the APIError for a prompt the model cannot read: characters outside a
        character model's vocabulary, no text, more tokens than the context holds."""
        try:  # off the event loop: encoding a long prompt must not hold up the other requests' streams
            ids = await asyncio.to_thread(self.engine.tok.encode, prompt)
        except UserError as e:
            raise APIError(400, str(e), param=param) from None
        if not ids:
            raise APIError(400, "The prompt is empty: give at least one character of text.", param=param)
        if len(ids) > self.block_size:
            raise APIError(
                400,
                f"This model's maximum context length is {self.block_size} tokens, and the prompt has {len(ids)}. "
                "Please shorten the prompt.",
                param=param,
            )
        return ids

    async def make_job(
        self,
        req: SamplingFields,
        prompt: str,
        max_tokens: int | None,
        logprobs: int | None,
        param: str = "prompt",
        own_stop: str | None = None,
    ) -> Job:
        """The engine's job for a request, or the APIError that says which field the server cannot honour.
        `own_stop`: a stop string of the server's, added where the client's leave room, and not held to its limits."""
        max_tokens = self.check(req, prompt, max_tokens, param)
        stops = req.stop_list()
        if own_stop is not None and len(stops) < MAX_STOPS:
            stops.append(own_stop)
        ids = await self.encode(prompt, param)
        return Job(
            prompt_ids=ids,
            max_tokens=max_tokens,
            n=req.n,
            temperature=req.temperature,
            top_k=req.top_k,
            top_p=req.top_p if req.top_p < 1.0 else None,
            seed=req.seed,  # any integer: the engine folds it into the 64 bits a generator takes
            stop=stops,
            logprobs=logprobs,
        )

    def start(self, job: Job) -> None:
        # the engine runs in its own thread; it hands events back through this loop's queue
        job.loop, job.events = asyncio.get_running_loop(), asyncio.Queue()
        try:
            self.engine.submit(job)
        except Busy:
            raise APIError(
                429, "The server is busy: its queue is full. Retry in a moment.", "rate_limit_error"
            ) from None
        except TooLarge as e:  # its words say how many choices fit
            raise APIError(400, str(e), param="n") from None
        except Stopped:
            raise self.unavailable() from None


def server_of(request: Request) -> Server:
    """The app's Server (Guard has checked the API key, where one is set, before the handler was called)."""
    return request.app.state.server


# ----------------------------------------------------------------------------- a job's events, as a response


def usage(done: Done) -> dict[str, int]:
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
    }


def error_event(e: APIError) -> str:
    return f"data: {json.dumps({'error': {'message': e.message, 'type': e.type, 'param': None, 'code': None}})}\n\n"


async def sse_lines(stream: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
    """Server-sent events as OpenAI sends them: one `data: JSON` per chunk, then `data: [DONE]`."""
    try:
        async for chunk in stream:
            yield f"data: {json.dumps(chunk)}\n\n"
    except APIError as e:  # the status line is sent already: the error goes in the stream
        yield error_event(e)
    except Exception:
        log.exception("a streamed response failed")
        yield error_event(APIError(500, SERVER_ERROR, "server_error"))
    yield "data: [DONE]\n\n"


class JobStream(StreamingResponse):
    """A job's server-sent events, the job cancelled however the response ends. Starlette stops a stream whose
    client left by cancelling it, and if that happens before the first chunk the events' own clean-up never
    runs: this is what frees the slot of a client that left while its request waited."""

    def __init__(self, job: Job, lines: AsyncIterator[str]) -> None:
        super().__init__(lines, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.job = job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancelled.set()  # a no-op after Done


class Reply:
    """The answer to one started job, streamed or whole. Completions and chat completions differ only in how
    they word a choice, so each subclass words the choices and this class does the rest, once for both."""

    chunk_head: dict[str, Any]  # the fields every streamed chunk starts with
    whole_head: dict[str, Any]  # those of the one response when not streaming

    def __init__(self, server: Server, job: Job, req: SamplingFields) -> None:
        self.server, self.job, self.stream = server, job, req.stream
        self.include_usage = bool(req.stream_options and req.stream_options.include_usage)
        self.arrived = time.monotonic()
        self.last: dict[int, float] = {}  # when each choice's latest token came, for the inter-token latency

    def opening(self) -> list[dict[str, Any]]:
        """Chunks streamed before the first token."""
        return []

    def token(self, e: Token) -> dict[str, Any]:
        """A streamed token's choice."""
        raise NotImplementedError

    def finish(self, e: Finish) -> dict[str, Any]:
        """The streamed choice that ends choice e.choice."""
        raise NotImplementedError

    def choice(self, index: int, tokens: list[Token], reason: str | None) -> dict[str, Any]:
        """A whole choice, when not streaming."""
        raise NotImplementedError

    async def events(self, request: Request | None) -> AsyncIterator[Token | Finish | Done]:
        """The job's events until Done. A failed job, a stopped worker or (`request` given) a client that left
        ends them with an APIError; leaving early, for whatever reason, cancels the job."""
        watcher = asyncio.create_task(self.watch(request))
        try:
            while True:
                event = await self.job.events.get()
                if isinstance(event, APIError):  # from the watcher
                    raise event
                if isinstance(event, Failed):
                    raise self.server.failure()
                if isinstance(event, Token):
                    self.timed(event)
                yield event
                if isinstance(event, Done):
                    return
        finally:
            watcher.cancel()
            self.job.cancelled.set()  # a no-op after Done; frees the slot when the client went away

    async def watch(self, request: Request | None) -> None:
        """Every WATCH_S while the job runs: a stopped worker ends it (503), and so does a client that left,
        which cancels it at once rather than after its last token. Only a whole response passes `request`: a
        stream's disconnect is Starlette's to see."""
        while True:
            await asyncio.sleep(WATCH_S)
            if not self.server.engine.alive:
                error = self.server.failure()
            elif request is not None and await request.is_disconnected():
                self.job.cancelled.set()
                error = APIError(499, "The client closed the request.")
            else:
                continue
            self.job.events.put_nowait(error)
            return

    def timed(self, e: Token) -> None:
        now, telemetry = time.monotonic(), self.server.telemetry
        if not self.last:
            telemetry.first_token.observe(now - self.arrived)
        elif e.choice in self.last:
            telemetry.inter_token.observe(now - self.last[e.choice])
        self.last[e.choice] = now

    async def chunks(self) -> AsyncIterator[dict[str, Any]]:
        for chunk in self.opening():
            yield chunk
        async for e in self.events(None):
            if isinstance(e, Token):
                yield {**self.chunk_head, "choices": [self.token(e)]}
            elif isinstance(e, Finish):
                yield {**self.chunk_head, "choices": [self.finish(e)]}
            elif self.include_usage:  # OpenAI's last chunk: no choices, the request's usage
                yield {**self.chunk_head, "choices": [], "usage": usage(e)}

    async def collect(self, request: Request) -> tuple[list[list[Token]], list[str | None], Done]:
        """A whole job: each choice's tokens and finish reason, and the final counts."""
        texts: list[list[Token]] = [[] for _ in range(self.job.n)]
        reasons: list[str | None] = [None] * self.job.n
        done = Done(len(self.job.prompt_ids), 0)
        async for e in self.events(request):
            if isinstance(e, Token):
                texts[e.choice].append(e)
            elif isinstance(e, Finish):
                reasons[e.choice] = e.reason
            else:
                done = e
        return texts, reasons, done

    async def respond(self, request: Request) -> StreamingResponse | dict[str, Any]:
        if self.stream:
            return JobStream(self.job, sse_lines(self.chunks()))
        texts, reasons, done = await self.collect(request)
        choices = [self.choice(i, tokens, reasons[i]) for i, tokens in enumerate(texts)]
        return {**self.whole_head, "choices": choices, "usage": usage(done)}


class CompletionReply(Reply):
    """/v1/completions' wording: choices hold "text"; logprobs in the legacy shape, with offsets into the text."""

    def __init__(self, server: Server, job: Job, req: CompletionRequest, prompt: str) -> None:
        super().__init__(server, job, req)
        head = {"id": f"cmpl-{secrets.token_hex(12)}", "object": "text_completion", "created": int(time.time())}
        self.chunk_head = self.whole_head = {**head, "model": server.model_id}
        self.want_logprobs = req.logprobs is not None
        self.prompt_len = len(prompt)
        self.offsets = [len(prompt)] * req.n  # where each streamed choice's next token starts, for text_offset

    def logprobs(self, tokens: list[Token], offset: int) -> dict[str, Any] | None:
        if not self.want_logprobs:
            return None
        offsets, at = [], offset
        for t in tokens:
            offsets.append(at)
            at += len(t.text)
        return {
            "tokens": [t.text for t in tokens],
            "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [dict(t.top or []) for t in tokens],
            "text_offset": offsets,
        }

    def token(self, e: Token) -> dict[str, Any]:
        choice = {"index": e.choice, "text": e.text, "logprobs": self.logprobs([e], self.offsets[e.choice])}
        self.offsets[e.choice] += len(e.text)
        return {**choice, "finish_reason": None}

    def finish(self, e: Finish) -> dict[str, Any]:
        return {"index": e.choice, "text": "", "logprobs": None, "finish_reason": e.reason}

    def choice(self, index: int, tokens: list[Token], reason: str | None) -> dict[str, Any]:
        text = "".join(t.text for t in tokens)
        return {
            "index": index,
            "text": text,
            "logprobs": self.logprobs(tokens, self.prompt_len),
            "finish_reason": reason,
        }


class ChatReply(Reply):
    """/v1/chat/completions' wording: a message (a delta when streaming) from the assistant per choice."""

    def __init__(self, server: Server, job: Job, req: ChatRequest) -> None:
        super().__init__(server, job, req)
        head = {"id": f"chatcmpl-{secrets.token_hex(12)}", "created": int(time.time()), "model": server.model_id}
        self.chunk_head = {**head, "object": "chat.completion.chunk"}
        self.whole_head = {**head, "object": "chat.completion"}
        self.n, self.want_logprobs, self.top = req.n, req.logprobs, req.top_logprobs or 0

    def logprobs(self, tokens: list[Token]) -> dict[str, Any] | None:
        if not self.want_logprobs:
            return None
        return {
            "content": [
                {
                    **logprob_entry(t.text, t.logprob),
                    "top_logprobs": [logprob_entry(a, lp) for a, lp in (t.top or [])[: self.top]],
                }
                for t in tokens
            ]
        }

    def opening(self) -> list[dict[str, Any]]:
        # OpenAI's first chunk of each choice names the role, with no content yet
        delta = {"role": "assistant", "content": ""}
        return [
            {**self.chunk_head, "choices": [{"index": i, "delta": delta, "finish_reason": None}]} for i in range(self.n)
        ]

    def token(self, e: Token) -> dict[str, Any]:
        choice = {"index": e.choice, "delta": {"content": e.text}, "logprobs": self.logprobs([e])}
        return {**choice, "finish_reason": None}

    def finish(self, e: Finish) -> dict[str, Any]:
        return {"index": e.choice, "delta": {}, "finish_reason": e.reason}

    def choice(self, index: int, tokens: list[Token], reason: str | None) -> dict[str, Any]:
        message = {"role": "assistant", "content": "".join(t.text for t in tokens)}
        return {"index": index, "message": message, "logprobs": self.logprobs(tokens), "finish_reason": reason}


def logprob_entry(text: str, lp: float) -> dict[str, Any]:
    return {"token": text, "logprob": lp, "bytes": list(text.encode())}


# ----------------------------------------------------------------------------- the handlers


async def index() -> FileResponse:
    return FileResponse(STATIC / "index.html")


async def health(request: Request) -> JSONResponse:
    """Open to all, for load balancers and scripts: 503 once the server cannot take requests."""
    server = server_of(request)
    status = "draining" if server.draining else "ok" if server.engine.alive else "stopped"
    body = {"status": status, "model": server.model_id, **server.engine.stats()}
    return JSONResponse(body, status_code=200 if status == "ok" else 503)


async def metrics(request: Request) -> dict[str, Any]:
    server = server_of(request)
    if server.metrics_path is None or not server.metrics_path.is_file():
        return {"records": []}
    return {"records": read_metrics(server.metrics_path)}


async def prometheus_metrics(request: Request) -> Response:
    return Response(generate_latest(server_of(request).telemetry.registry), media_type=PROMETHEUS_TEXT)


async def models(request: Request) -> dict[str, Any]:
    server = server_of(request)
    card = {"id": server.model_id, "object": "model", "created": server.created, "owned_by": "nanogpt"}
    limits = {"max_model_len": server.block_size, "max_tokens": server.max_tokens_limit}
    return {"object": "list", "data": [{**card, **limits}]}


async def completions(req: CompletionRequest, request: Request) -> StreamingResponse | dict[str, Any]:
    server = server_of(request)
    prompt = req.prompt if isinstance(req.prompt, str) else req.prompt[0]
    job = await server.make_job(req, prompt, req.max_tokens, req.logprobs)
    reply = CompletionReply(server, job, req, prompt)
    server.start(job)
    return await reply.respond(request)


async def chat(req: ChatRequest, request: Request) -> StreamingResponse | dict[str, Any]:
    server = server_of(request)
    if len(req.messages) > server.max_messages:
        raise APIError(
            400,
            f"The conversation has {len(req.messages)} messages, more than this server reads "
            f"({server.max_messages}; see --max_messages).",
            param="messages",
        )
    prompt = render_chat(req.messages)
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    max_tokens = req.max_completion_tokens or req.max_tokens
    # "\nUser:" ends the text where the model would go on with the user's turn
    job = await server.make_job(req, prompt, max_tokens, logprobs, "messages", own_stop="\nUser:")
    reply = ChatReply(server, job, req)
    server.start(job)
    return await reply.respond(request)


async def inspect(req: InspectRequest, request: Request) -> dict[str, Any]:
    """One forward pass over the text: {"model", "tokens", "layers", "attention", "lens"} (inspect_model.py)."""
    server = server_of(request)
    if req.model is not None and req.model != server.model_id:
        raise APIError(
            404, f"The model '{req.model}' does not exist; this server serves '{server.model_id}'.", param="model"
        )
    n_layer = server.engine.model.config.n_layer
    if req.layer is not None and req.layer >= n_layer:
        raise APIError(400, f"layer={req.layer}: this model's layers are 0..{n_layer - 1}.", param="layer")
    server.check_length(req.text, "text")
    ids = await server.encode(req.text, "text")
    engine = server.engine

    def forward() -> dict[str, Any]:  # in a thread of its own: the engine's worker goes on generating meanwhile
        with autocast(engine.device, engine.dtype):  # autocast is per thread: set it here
            return inspect_ids(engine.model, engine.tok, ids, req.layer, req.top)

    return {"object": "inspection", "model": server.model_id, **await asyncio.to_thread(forward)}


async def on_api_error(request: Request, e: APIError) -> JSONResponse:
    return as_response(e)


async def on_invalid(request: Request, e: RequestValidationError) -> JSONResponse:
    """pydantic's first complaint, in OpenAI's words."""
    err = e.errors()[0]
    # the field's path, without pydantic's names for union members ("str", "list[str]", ...)
    loc = [str(x) for x in err.get("loc", ()) if x != "body" and not _is_type_name(x)]
    param = loc[0] if loc else None
    if err.get("type") == "extra_forbidden":
        message = f"Unrecognized request argument supplied: {'.'.join(loc)}"
    elif err.get("type") == "json_invalid" or not loc:
        message = "The request body is not valid JSON: send a JSON object (Content-Type: application/json)."
    else:
        message = f"Invalid value for '{'.'.join(loc)}': {err.get('msg')}."
    return error_response(400, message, "invalid_request_error", param)


async def on_http_error(request: Request, e: HTTPException) -> JSONResponse:
    """Starlette's own errors (404 for an unknown path, 405 for a wrong method) in OpenAI's format too."""
    return error_response(e.status_code, str(e.detail), "invalid_request_error")


ROUTES = [
    ("GET", "/", index),
    ("GET", "/health", health),
    ("GET", "/api/metrics", metrics),
    ("POST", "/api/inspect", inspect),
    ("GET", "/metrics", prometheus_metrics),
    ("GET", "/v1/models", models),
    ("POST", "/v1/completions", completions),
    ("POST", "/v1/chat/completions", chat),
]


# ----------------------------------------------------------------------------- before the handlers


async def read_body(receive, limit: int) -> bytes | None:
    """A request's whole body, or None once it passes `limit` bytes (a chunked body has no Content-Length to
    check first). Raises ClientDisconnect if the client leaves while sending it."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > limit:
            return None
        if not message.get("more_body", False):
            return b"".join(chunks)


class Guard:
    """An ASGI middleware, outside FastAPI's routing and body parsing, so that a refused request costs nothing:
    Server.refusal's checks (Host, API key, a server that cannot take requests, Content-Length) before the body
    is read, then the body read within --max_body_bytes. It also counts each generation request's status for
    /metrics, and answers any exception a handler lets slip with a generic 500, its traceback in the log."""

    def __init__(self, app, server: Server) -> None:
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 0

        async def send_counted(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.guarded(scope, receive, send_counted)
        except ClientDisconnect:  # the client left while sending its body: nobody to answer
            pass
        except Exception:
            log.exception("%s %s failed", scope["method"], scope["path"])
            if not status:  # nothing sent yet: the client gets a 500 that does not show the exception
                await as_response(APIError(500, SERVER_ERROR, "server_error"))(scope, receive, send_counted)
        finally:
            self.server.telemetry.answered(scope["path"], status or 499)

    async def guarded(self, scope, receive, send) -> None:
        refusal = self.server.refusal(scope)
        if refusal is not None:
            return await as_response(refusal)(scope, receive, send)
        body = await read_body(receive, self.server.max_body_bytes)
        if body is None:
            return await as_response(self.server.body_too_large())(scope, receive, send)
        replayed = False

        async def replay():  # the body read above, then the client's own messages (a disconnect)
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


# ----------------------------------------------------------------------------- the app


def create_app(engine: Engine, model_id: str, **options: Any) -> FastAPI:
    """The app for `engine`; `options` are Server's fields: api_key, metrics_path, the limits (max_n,
    max_tokens_limit, max_body_bytes, ...) and local_only (False for a server listening beyond loopback).
    The model sees at most block_size tokens, but generates up to max_tokens_limit: its window slides, as
    in sample.py (re-encoding the newest half when it is full)."""
    app = FastAPI(title="nanogpt", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = Server(engine, model_id, **options)
    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_invalid)
    app.add_exception_handler(HTTPException, on_http_error)
    # response_model=None: the handlers' return hints are for readers; FastAPI would otherwise validate against them
    for method, path, handler in ROUTES:
        app.add_api_route(path, handler, methods=[method], response_model=None)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(Guard, server=app.state.server)
    return app
