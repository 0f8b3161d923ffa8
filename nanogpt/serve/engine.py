"""The generation engine behind `nanogpt serve`: a bounded queue and one worker thread that owns the model.

Requests become Jobs. Up to `max_active` jobs generate at once: the worker advances each active job by
one token in turn (every job has its own KV cache, random generator and output queue, so outputs never
mix), which keeps every stream moving and bounds the wait for a first token. Further jobs wait in a
queue of `queue_size`; beyond that `submit` refuses (the API answers 429). A job cancelled by its client
(a closed stream) leaves at the worker's next pass and frees its slot.

Events go back to the asyncio side through `loop.call_soon_threadsafe`:
    Token(choice, text, logprob, top)   a generated token; `text` may be "" (half of a UTF-8 character)
    Finish(choice, reason)              "stop" (a stop string was reached) or "length"
    Done(prompt_tokens, completion_tokens) or Failed(message)   the last event of a job
"""

from __future__ import annotations

import asyncio
import codecs
import collections
import logging
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from nanogpt.device import autocast
from nanogpt.generate import generate_stream
from nanogpt.model import GPT
from nanogpt.tokenizer import Tokenizer

log = logging.getLogger("nanogpt.serve")


@dataclass
class Token:
    choice: int
    text: str
    logprob: float | None = None
    top: list[tuple[str, float]] | None = None  # the most likely alternatives and their log-probabilities


@dataclass
class Finish:
    choice: int
    reason: str


@dataclass
class Done:
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Failed:
    message: str


class Busy(Exception):
    """The queue is full."""


class Stopped(Exception):
    """The engine takes no more jobs: it was closed, told to stop accepting (SIGTERM drain), or its worker died."""


class TooLarge(Exception):
    """A job whose rows' KV caches alone exceed the engine's whole memory budget: it could never start."""


@dataclass
class Job:
    prompt_ids: list[int]
    max_tokens: int
    n: int = 1
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # None: no log-probabilities; k: the token's and its k likeliest alternatives'
    events: asyncio.Queue | None = None
    loop: asyncio.AbstractEventLoop | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.monotonic)

    def emit(self, event: Any) -> None:
        if self.loop is None or self.events is None:
            return
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the server's loop is closed: nobody is listening any more
            self.cancelled.set()


class StopStrings:
    """One choice's text, held back while it might be the start of a stop string: tokens are released
    only once no stop string can begin in them, and cut where a stop string begins."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.longest = max((len(s) for s in self.stops), default=0)
        self.pending: list[Token] = []
        self.released = ""  # the text released so far

    def push(self, token: Token) -> tuple[list[Token], bool]:
        """Add a token; return the tokens that may be released now and whether a stop string was reached."""
        self.pending.append(token)
        held = "".join(t.text for t in self.pending)
        text = self.released + held
        hits = [i for s in self.stops if (i := text.find(s, max(0, len(self.released) - self.longest))) >= 0]
        if hits:  # release the text before the stop string, cutting the token it begins in
            chars = min(hits) - len(self.released)
            out = self._release(chars)
            if self.pending and chars > (cut := sum(len(t.text) for t in out)):
                t = self.pending[0]
                out.append(Token(t.choice, t.text[: chars - cut], t.logprob, t.top))
            self.pending.clear()
            return out, True
        # hold back the longest tail that a stop string could still begin with
        hold = next((k for k in range(min(len(text), self.longest - 1), 0, -1) if self._is_stop_prefix(text[-k:])), 0)
        return self._release(len(held) - hold), False

    def flush(self) -> list[Token]:
        return self._release(sum(len(t.text) for t in self.pending))

    def _is_stop_prefix(self, tail: str) -> bool:
        return any(s.startswith(tail) for s in self.stops)

    def _release(self, chars: int) -> list[Token]:
        """Release the pending tokens that fit whole within `chars` characters."""
        out = []
        while self.pending and len(self.pending[0].text) <= chars:
            t = self.pending.pop(0)
            chars -= len(t.text)
            self.released += t.text
            out.append(t)
        return out


class Engine:
    """The worker thread and its queue. `max_batch` and `kv_budget_bytes` are continuous batching's
    (the most jobs in one forward pass, 0 = no limit; the KV caches' memory budget, None = from the device)."""

    def __init__(
        self,
        model: GPT,
        tok: Tokenizer,
        device: str,
        dtype: str,
        max_active: int = 16,
        queue_size: int = 64,
        max_batch: int = 0,
        kv_budget_bytes: int | None = None,
    ):
        self.model, self.tok, self.device, self.dtype = model, tok, device, dtype
        self.max_active, self.queue_size, self.max_batch = max_active, queue_size, max_batch
        self.kv_budget_bytes = kv_budget_bytes
        self.waiting: collections.deque[Job] = collections.deque()
        self.active: list[_Running] = []
        self.cond = threading.Condition()
        self.closed = False  # close() was called: the worker fails what is left and returns
        self.accepting = True  # stop_accepting() turns it off: submit raises Stopped, in-flight jobs finish
        self.counters = {"prompt_tokens_total": 0, "generated_tokens_total": 0, "requests_total": 0}
        self.thread = threading.Thread(target=self._run, name="nanogpt-engine", daemon=True)
        self.thread.start()

    # --------------------------------------------------------------- the asyncio side

    @property
    def alive(self) -> bool:
        """The worker thread is running: False after close() or if it ever stopped on an error."""
        return self.thread.is_alive() and not self.closed

    def submit(self, job: Job) -> None:
        """Queue `job`; raise Stopped when the engine takes no more jobs, Busy when there is no room."""
        with self.cond:
            if not self.accepting or not self.alive:
                raise Stopped("the server is not accepting requests")
            # the waiting room holds queue_size jobs beyond those a free slot takes at once
            room = self.queue_size + max(0, self.max_active - len(self.active))
            if len(self.waiting) >= room:  # full: first drop the requests their clients left
                self.waiting = collections.deque(j for j in self.waiting if not j.cancelled.is_set())
            if len(self.waiting) >= room:
                raise Busy
            self.waiting.append(job)
            self.counters["requests_total"] += 1
            self.cond.notify_all()

    def stats(self) -> dict[str, int]:
        with self.cond:
            waiting = sum(not j.cancelled.is_set() for j in self.waiting)
            return {"active": len(self.active), "waiting": waiting, **self.counters}

    def stop_accepting(self) -> None:
        """Refuse new jobs (submit raises Stopped) while the jobs in flight and waiting finish: SIGTERM's drain."""
        with self.cond:
            self.accepting = False

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no job is active or waiting (or the worker stopped); False if `timeout` passed first."""
        with self.cond:
            return self.cond.wait_for(lambda: not (self.active or self.waiting) or not self.thread.is_alive(), timeout)

    def close(self) -> None:
        """Fail every job in flight or waiting with "the server is shutting down" and join the worker."""
        with self.cond:
            self.closed = True
            self.accepting = False
            self.cond.notify_all()
        if self.thread is not threading.current_thread():
            self.thread.join(timeout=10)

    # --------------------------------------------------------------- the worker thread

    def _run(self) -> None:
        try:
            with torch.inference_mode(), autocast(self.device, self.dtype):  # autocast is per thread: set it here
                while self._step():
                    pass
        except BaseException:  # a bug in the engine itself: log it, and fail every job instead of leaving them hanging
            log.exception("the generation engine stopped")
        finally:
            with self.cond:
                message = "the server is shutting down" if self.closed else "the generation engine stopped"
                jobs = [r.job for r in self.active] + list(self.waiting)
                self.active.clear()
                self.waiting.clear()
                self.accepting = False
                self.cond.notify_all()
            for job in jobs:
                job.emit(Failed(message))

    def _step(self) -> bool:
        """Admit waiting jobs, then advance every active job by one token; False once closed."""
        with self.cond:
            self.waiting = collections.deque(j for j in self.waiting if not j.cancelled.is_set())
            while not self.closed and not self.active and not self.waiting:
                self.cond.wait()
            if self.closed:
                return False
            while len(self.active) < self.max_active and self.waiting:
                job = self.waiting.popleft()
                running = self._guarded(job, _Running, self, job)
                if running is not None:
                    self.active.append(running)
                    self.counters["prompt_tokens_total"] += len(job.prompt_ids)  # once per request, as usage counts
            running = list(self.active)
        for r in running:
            finished = self._guarded(r.job, r.advance)
            with self.cond:
                if finished is not False:  # True, or None: it failed
                    self.active.remove(r)
                    self.cond.notify_all()
        return True

    def _guarded(self, job: Job, work: Any, *args: Any) -> Any:
        """work(*args) for one job; if it raises, that job alone fails (a generic message; the detail goes to the
        log) and None is returned."""
        try:
            return work(*args)
        except Exception:  # one bad request must not stop the server
            log.exception("generation failed for a request")
            job.emit(Failed("generation failed"))
            return None


class _Running:
    """A job being generated: its token stream, and per choice its decoder, stop strings and state."""

    def __init__(self, engine: Engine, job: Job):
        self.engine, self.job = engine, job
        device = engine.device
        gen = torch.Generator(device=device)
        # any integer a client sends is a seed: folded into the 64 bits manual_seed accepts
        gen.manual_seed(job.seed % 2**64 if job.seed is not None else random.randrange(2**63))
        idx = torch.tensor([job.prompt_ids] * job.n, dtype=torch.long, device=device)
        self.stream = generate_stream(
            engine.model,
            idx,
            job.max_tokens,
            temperature=job.temperature,
            top_k=job.top_k,
            top_p=job.top_p,
            generator=gen,
            with_logits=True,
        )
        self.decoders = [codecs.getincrementaldecoder("utf-8")(errors="replace") for _ in range(job.n)]
        self.stops = [StopStrings(job.stop) for _ in range(job.n)]
        self.open = set(range(job.n))  # choices still generating
        self.generated = 0  # completion tokens, summed over choices
        self.steps = 0

    def advance(self) -> bool:
        """One token for every open choice, unless the client left; True when the job is over."""
        return self.job.cancelled.is_set() or self.step()

    def step(self) -> bool:
        """Generate one token for every open choice; True when the job is complete."""
        nxt, logits = next(self.stream)
        self.steps += 1
        ids = nxt[:, 0].tolist()
        logprobs = top = None
        if self.job.logprobs is not None:
            lp = torch.log_softmax(logits, dim=-1)
            logprobs = lp.gather(1, nxt).squeeze(1).tolist()
            values, indices = lp.topk(min(self.job.logprobs, lp.size(-1)), dim=-1)
            top = [
                [(self.engine.tok.decode([i]), v) for i, v in zip(row_i, row_v)]
                for row_i, row_v in zip(indices.tolist(), values.tolist())
            ]
        last = self.steps == self.job.max_tokens
        for c in sorted(self.open):
            self.generated += 1
            self.engine.counters["generated_tokens_total"] += 1  # only this thread writes it
            text = self.decoders[c].decode(self.engine.tok.decode_bytes([ids[c]]), final=last)
            token = Token(c, text, logprobs[c] if logprobs else None, top[c] if top is not None else None)
            released, stopped = self.stops[c].push(token)
            if last and not stopped:
                released += self.stops[c].flush()
            for t in released:
                self.job.emit(t)
            if stopped or last:
                self.job.emit(Finish(c, "stop" if stopped else "length"))
                self.open.discard(c)
        if not self.open:
            self.stream.close()
            self.job.emit(Done(len(self.job.prompt_ids), self.generated))
            return True
        return False
