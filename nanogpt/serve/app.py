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
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
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
    block_size = engine.model.config.block_size
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error_response(e.status, e.message, e.type, e.param)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
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

    @app.exception_handler(HTTPException)
    async def _http(request: Request, e: HTTPException):
        return error_response(e.status_code, str(e.detail), "invalid_request_error")

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise APIError(
                401, "Incorrect API key provided. Send it as 'Authorization: Bearer KEY'.", "authentication_error"
            )

    @app.get("/")
    async def index():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, **engine.stats()}

    @app.get("/api/metrics")
    async def metrics(request: Request):
        authorize(request)
        if metrics_path is None or not metrics_path.is_file():
            return {"records": []}
        return {"records": read_metrics(metrics_path)}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        card = {"id": model_id, "object": "model", "created": created, "owned_by": "nanogpt"}
        return {"object": "list", "data": [{**card, "max_model_len": block_size, "max_tokens": max_tokens_limit}]}

    def make_job(req: SamplingFields, prompt: str, max_tokens: int | None, logprobs: int | None) -> Job:
        if req.model != model_id:
            raise APIError(
                404, f"The model '{req.model}' does not exist; this server serves '{model_id}'.", param="model"
            )
        if req.n > max_n:
            raise APIError(400, f"n={req.n} is more than this server allows ({max_n}; see --max_n).", param="n")
        try:
            ids = engine.tok.encode(prompt)
        except UserError as e:
            raise APIError(400, str(e), param="prompt") from None
        if not ids:
            raise APIError(400, "The prompt is empty: give at least one character of text.", param="prompt")
        if max_tokens is None:
            max_tokens = min(CHAT_DEFAULT_TOKENS, max_tokens_limit)
        if max_tokens > max_tokens_limit:
            raise APIError(
                400,
                f"max_tokens={max_tokens} is more than this server generates for one request "
                f"({max_tokens_limit}; see --max_tokens). Ask for fewer tokens.",
                param="max_tokens",
            )
        if len(ids) > block_size:
            raise APIError(
                400,
                f"This model's maximum context length is {block_size} tokens, and the prompt has {len(ids)}. "
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

    def start(job: Job) -> None:
        job.loop, job.events = asyncio.get_running_loop(), asyncio.Queue()
        try:
            engine.submit(job)
        except Busy:
            raise APIError(
                429, "The server is busy: its queue is full. Retry in a moment.", "rate_limit_error"
            ) from None

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

    def sse(stream: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
        async def body():
            try:
                async for chunk in stream:
                    yield f"data: {json.dumps(chunk)}\n\n"
            except APIError as e:  # the status line is sent already: the error goes in the stream
                yield f"data: {json.dumps({'error': {'message': e.message, 'type': e.type, 'param': None, 'code': None}})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        authorize(request)
        prompt = req.prompt if isinstance(req.prompt, str) else req.prompt[0]
        job = make_job(req, prompt, req.max_tokens, req.logprobs)
        start(job)
        head = {"id": f"cmpl-{secrets.token_hex(12)}", "object": "text_completion", "created": int(time.time())}
        head["model"] = model_id
        want_logprobs = req.logprobs is not None

        def logprobs_of(tokens: list[Token], offset: int) -> dict[str, Any] | None:
            if not want_logprobs:
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

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            async def chunks():
                offsets = [len(prompt)] * req.n
                async for e in events(job):
                    if isinstance(e, Token):
                        choice = {"index": e.choice, "text": e.text, "logprobs": logprobs_of([e], offsets[e.choice])}
                        offsets[e.choice] += len(e.text)
                        yield {**head, "choices": [{**choice, "finish_reason": None}]}
                    elif isinstance(e, Finish):
                        choice = {"index": e.choice, "text": "", "logprobs": None, "finish_reason": e.reason}
                        yield {**head, "choices": [choice]}
                    elif include_usage:
                        yield {**head, "choices": [], "usage": usage(e)}

            return sse(chunks())

        texts, reasons, done = await collect(job)
        choices = [
            {
                "index": i,
                "text": "".join(t.text for t in tokens),
                "logprobs": logprobs_of(tokens, len(prompt)),
                "finish_reason": reasons[i],
            }
            for i, tokens in enumerate(texts)
        ]
        return {**head, "choices": choices, "usage": usage(done)}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        authorize(request)
        prompt = render_chat(req.messages)
        stop = req.stop_list()
        req.stop = [*stop, "\nUser:"] if len(stop) < 4 else stop  # the model would go on with the user's turn
        top = req.top_logprobs or 0
        job = make_job(req, prompt, req.max_completion_tokens or req.max_tokens, top if req.logprobs else None)
        start(job)
        head = {"id": f"chatcmpl-{secrets.token_hex(12)}", "created": int(time.time()), "model": model_id}

        def content_logprobs(tokens: list[Token]) -> dict[str, Any] | None:
            if not req.logprobs:
                return None

            def entry(text: str, lp: float) -> dict[str, Any]:
                return {"token": text, "logprob": lp, "bytes": list(text.encode())}

            return {
                "content": [
                    {**entry(t.text, t.logprob), "top_logprobs": [entry(a, lp) for a, lp in (t.top or [])[:top]]}
                    for t in tokens
                ]
            }

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            head_chunk = {**head, "object": "chat.completion.chunk"}

            async def chunks():
                for i in range(req.n):
                    delta = {"role": "assistant", "content": ""}
                    yield {**head_chunk, "choices": [{"index": i, "delta": delta, "finish_reason": None}]}
                async for e in events(job):
                    if isinstance(e, Token):
                        choice = {"index": e.choice, "delta": {"content": e.text}, "logprobs": content_logprobs([e])}
                        yield {**head_chunk, "choices": [{**choice, "finish_reason": None}]}
                    elif isinstance(e, Finish):
                        yield {**head_chunk, "choices": [{"index": e.choice, "delta": {}, "finish_reason": e.reason}]}
                    elif include_usage:
                        yield {**head_chunk, "choices": [], "usage": usage(e)}

            return sse(chunks())

        texts, reasons, done = await collect(job)
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": "".join(t.text for t in tokens)},
                "logprobs": content_logprobs(tokens),
                "finish_reason": reasons[i],
            }
            for i, tokens in enumerate(texts)
        ]
        return {**head, "object": "chat.completion", "choices": choices, "usage": usage(done)}

    return app
