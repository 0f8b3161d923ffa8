"""The HTTP side of `nanogpt serve`: OpenAI's API shapes, the playground page, errors in OpenAI's format.

    GET  /                     the playground (static/index.html): prompt, controls, streamed tokens
    GET  /v1/models            the one model served
    POST /v1/completions       prompt -> text; stream, n, stop, seed, logprobs (and top_k, as vLLM)
    POST /v1/chat/completions  messages rendered as plain text ("User: ...\\nAssistant:"), the same options
    GET  /api/metrics          the run's metrics.jsonl records (the page's loss curve)
    GET  /health               {"status": "ok", "active": jobs generating, "waiting": jobs queued}

Requests are validated by pydantic models that forbid unknown fields; every error, validation or
not, comes back as {"error": {"message", "type", "param", "code"}} with status 400, 401, 404 or 429,
which the official `openai` client raises as its own exceptions.

Advanced machinery: a first read of nanogpt skips it (model.py, train.py, data.py and optim.py, then
generate.py and sample.py come first); engine.py does the generating, this file only speaks HTTP. It holds,
top to bottom: the request shapes (pydantic), `Server` (the engine and the limits, which every handler
needs), a job's events turned into a response (`Reply`: streamed or whole, worded by `CompletionReply` or
`ChatReply`), the handlers as plain functions, and `create_app`, which binds a Server to them via app.state.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from nanogpt.errors import UserError
from nanogpt.metrics import read_metrics
from nanogpt.serve.engine import Busy, Done, Engine, Failed, Finish, Job, Token

STATIC = Path(__file__).parent / "static"
MAX_LOGPROBS = 5  # OpenAI's limit for completions
CHAT_DEFAULT_TOKENS = 256  # a chat request without max_tokens


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None):
        self.status, self.message, self.type, self.param = status, message, type, param


def error_response(status: int, message: str, type: str, param: str | None = None, code: str | None = None):
    headers = {"Retry-After": "1"} if status == 429 else None
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


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
        if len(stops) > 4 or any(not s for s in stops):
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


def render_chat(messages: list[ChatMessage]) -> str:
    """A plain-text transcript the model continues: one "Role: content" line per message, then "Assistant:".
    Models trained on plain text know no chat template; this one at least reads like a play."""
    lines = [f"{'System' if m.role == 'developer' else m.role.capitalize()}: {m.content}" for m in messages]
    return "\n".join(lines) + "\nAssistant:"


def _is_type_name(x: object) -> bool:
    return isinstance(x, str) and (x in ("str", "int", "float", "bool", "list", "dict") or "[" in x)


# ----------------------------------------------------------------------------- the server's state


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
    created: int = field(default_factory=lambda: int(time.time()))  # /v1/models reports when the server started

    @property
    def block_size(self) -> int:
        return self.engine.model.config.block_size

    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        # compare_digest: the time taken must not tell how much of a guessed key was right
        if not secrets.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            raise APIError(
                401, "Incorrect API key provided. Send it as 'Authorization: Bearer KEY'.", "authentication_error"
            )

    def make_job(self, req: SamplingFields, prompt: str, max_tokens: int | None, logprobs: int | None) -> Job:
        """The engine's job for a request, or the APIError that says which field the server cannot honour."""
        if req.model != self.model_id:
            raise APIError(
                404, f"The model '{req.model}' does not exist; this server serves '{self.model_id}'.", param="model"
            )
        if req.n > self.max_n:
            raise APIError(400, f"n={req.n} is more than this server allows ({self.max_n}; see --max_n).", param="n")
        try:
            ids = self.engine.tok.encode(prompt)
        except UserError as e:
            raise APIError(400, str(e), param="prompt") from None
        if not ids:
            raise APIError(400, "The prompt is empty: give at least one character of text.", param="prompt")
        if max_tokens is None:
            max_tokens = min(CHAT_DEFAULT_TOKENS, self.max_tokens_limit)
        if max_tokens > self.max_tokens_limit:
            raise APIError(
                400,
                f"max_tokens={max_tokens} is more than this server generates for one request "
                f"({self.max_tokens_limit}; see --max_tokens). Ask for fewer tokens.",
                param="max_tokens",
            )
        if len(ids) > self.block_size:
            raise APIError(
                400,
                f"This model's maximum context length is {self.block_size} tokens, and the prompt has {len(ids)}. "
                "Please shorten the prompt.",
                param="prompt",
            )
        return Job(
            prompt_ids=ids,
            max_tokens=max_tokens,
            n=req.n,
            temperature=req.temperature,
            top_k=req.top_k,
            top_p=req.top_p if req.top_p < 1.0 else None,
            seed=req.seed,
            stop=req.stop_list(),
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


def server_of(request: Request, authorize: bool = True) -> Server:
    """The app's Server; unless told otherwise, only once the request has shown the API key (where one is set)."""
    server: Server = request.app.state.server
    if authorize:
        server.authorize(request)
    return server


# ----------------------------------------------------------------------------- a job's events, as a response


async def events(job: Job) -> AsyncIterator[Token | Finish | Done]:
    """The job's events until Done; a Failed event becomes a 500. Leaving early cancels the job."""
    try:
        while True:
            event = await job.events.get()
            if isinstance(event, Failed):
                raise APIError(500, event.message, "server_error")
            yield event
            if isinstance(event, Done):
                return
    finally:
        job.cancelled.set()  # a no-op after Done; frees the slot when the client went away


async def collect(job: Job) -> tuple[list[list[Token]], list[str | None], Done]:
    """A whole job: each choice's tokens and finish reason, and the final counts."""
    texts: list[list[Token]] = [[] for _ in range(job.n)]
    reasons: list[str | None] = [None] * job.n
    done = Done(len(job.prompt_ids), 0)
    async for e in events(job):
        if isinstance(e, Token):
            texts[e.choice].append(e)
        elif isinstance(e, Finish):
            reasons[e.choice] = e.reason
        else:
            done = e
    return texts, reasons, done


def usage(done: Done) -> dict[str, int]:
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
    }


async def sse_lines(stream: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
    """Server-sent events as OpenAI sends them: one `data: JSON` per chunk, then `data: [DONE]`."""
    try:
        async for chunk in stream:
            yield f"data: {json.dumps(chunk)}\n\n"
    except APIError as e:  # the status line is sent already: the error goes in the stream
        yield f"data: {json.dumps({'error': {'message': e.message, 'type': e.type, 'param': None, 'code': None}})}\n\n"
    yield "data: [DONE]\n\n"


class Reply:
    """The answer to one started job, streamed or whole. Completions and chat completions differ only in how
    they word a choice, so each subclass words the choices and this class does the rest, once for both."""

    chunk_head: dict[str, Any]  # the fields every streamed chunk starts with
    whole_head: dict[str, Any]  # those of the one response when not streaming

    def __init__(self, job: Job, req: SamplingFields) -> None:
        self.job, self.stream = job, req.stream
        self.include_usage = bool(req.stream_options and req.stream_options.include_usage)

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

    async def chunks(self) -> AsyncIterator[dict[str, Any]]:
        for chunk in self.opening():
            yield chunk
        async for e in events(self.job):
            if isinstance(e, Token):
                yield {**self.chunk_head, "choices": [self.token(e)]}
            elif isinstance(e, Finish):
                yield {**self.chunk_head, "choices": [self.finish(e)]}
            elif self.include_usage:
                yield {**self.chunk_head, "choices": [], "usage": usage(e)}

    async def respond(self) -> StreamingResponse | dict[str, Any]:
        if self.stream:
            return StreamingResponse(
                sse_lines(self.chunks()), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        texts, reasons, done = await collect(self.job)
        choices = [self.choice(i, tokens, reasons[i]) for i, tokens in enumerate(texts)]
        return {**self.whole_head, "choices": choices, "usage": usage(done)}


class CompletionReply(Reply):
    """/v1/completions' wording: choices hold "text"; logprobs in the legacy shape, with offsets into the text."""

    def __init__(self, job: Job, req: CompletionRequest, prompt: str, model_id: str) -> None:
        super().__init__(job, req)
        head = {"id": f"cmpl-{secrets.token_hex(12)}", "object": "text_completion", "created": int(time.time())}
        self.chunk_head = self.whole_head = {**head, "model": model_id}
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

    def __init__(self, job: Job, req: ChatRequest, model_id: str) -> None:
        super().__init__(job, req)
        head = {"id": f"chatcmpl-{secrets.token_hex(12)}", "created": int(time.time()), "model": model_id}
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


async def health(request: Request) -> dict[str, Any]:
    server = server_of(request, authorize=False)  # open to all, for load balancers and scripts
    return {"status": "ok", "model": server.model_id, **server.engine.stats()}


async def metrics(request: Request) -> dict[str, Any]:
    server = server_of(request)
    if server.metrics_path is None or not server.metrics_path.is_file():
        return {"records": []}
    return {"records": read_metrics(server.metrics_path)}


async def models(request: Request) -> dict[str, Any]:
    server = server_of(request)
    card = {"id": server.model_id, "object": "model", "created": server.created, "owned_by": "nanogpt"}
    limits = {"max_model_len": server.block_size, "max_tokens": server.max_tokens_limit}
    return {"object": "list", "data": [{**card, **limits}]}


async def completions(req: CompletionRequest, request: Request) -> StreamingResponse | dict[str, Any]:
    server = server_of(request)
    prompt = req.prompt if isinstance(req.prompt, str) else req.prompt[0]
    job = server.make_job(req, prompt, req.max_tokens, req.logprobs)
    server.start(job)
    return await CompletionReply(job, req, prompt, server.model_id).respond()


async def chat(req: ChatRequest, request: Request) -> StreamingResponse | dict[str, Any]:
    server = server_of(request)
    prompt = render_chat(req.messages)
    stop = req.stop_list()
    req.stop = [*stop, "\nUser:"] if len(stop) < 4 else stop  # the model would go on with the user's turn
    top = req.top_logprobs or 0
    job = server.make_job(req, prompt, req.max_completion_tokens or req.max_tokens, top if req.logprobs else None)
    server.start(job)
    return await ChatReply(job, req, server.model_id).respond()


async def on_api_error(request: Request, e: APIError) -> JSONResponse:
    return error_response(e.status, e.message, e.type, e.param)


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
    ("GET", "/v1/models", models),
    ("POST", "/v1/completions", completions),
    ("POST", "/v1/chat/completions", chat),
]


# ----------------------------------------------------------------------------- the app


def create_app(
    engine: Engine,
    model_id: str,
    api_key: str | None = None,
    metrics_path: Path | None = None,
    max_n: int = 8,
    max_tokens_limit: int = 1024,
) -> FastAPI:
    """The app for `engine`. The model sees at most block_size tokens, but generates up to max_tokens_limit:
    its window slides, as in sample.py (re-encoding the newest half when it is full)."""
    app = FastAPI(title="nanogpt", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = Server(engine, model_id, api_key, metrics_path, max_n, max_tokens_limit)
    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_invalid)
    app.add_exception_handler(HTTPException, on_http_error)
    # response_model=None: the handlers' return hints are for readers; FastAPI would otherwise validate against them
    for method, path, handler in ROUTES:
        app.add_api_route(path, handler, methods=[method], response_model=None)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
