"""The generation engine behind `nanogpt serve`: a bounded queue and one worker thread that owns the model.
Machinery a first read skips: generate.py is the sampling loop this engine runs for many requests at once.

Requests become Jobs; a job's `n` choices are its sequences, one row each of one batched KV cache. The worker
does continuous batching, as vLLM (Kwon et al. 2023) and llama.cpp's server do after Orca (Yu et al. 2022,
iteration-level scheduling). Every step it
  1. starts the waiting jobs that get one of `max_active` slots and whose rows fit the memory budget: each
     job's prompt is prefilled by itself (exactly as generate_stream prefills it) into free rows of the cache,
     and its first tokens are drawn;
  2. runs one forward pass over every active sequence, cache[:rows], each row at its own position with its
     own causal mask (model.KVCache), or one pass per group of `max_batch` jobs (1: each job its own pass,
     the turn-taking of earlier versions, kept for side-by-side measurements);
  3. lets each job draw its next tokens from its own rows of the logits, with its own settings and its own
     torch.Generator (generate.sample_next), and send them;
  4. drops finished, failed and cancelled jobs at once, moving later rows down so the active ones stay
     cache[:rows].
A job whose window is full slides it as generate_stream does: its rows keep their newest block_size // 2 + 1
tokens and are re-encoded by themselves. Throughput comes from step 2: decoding one token multiplies a vector
by every weight matrix, a cost set by reading the weights from memory, and B sequences in one pass read them
once for B tokens.

Same seed, same text? Each job draws from its own logits with its own generator, so no request ever takes
another's tokens or random numbers. But its logits come out of matmuls with one row per active sequence, and
BLAS kernels choose their blocking and vector code by shape, so the same dot products are summed in another
order and the float32 logits may differ in their last bits from those of the request alone. A token is an
argmax (greedy, or the exponential race of sample_next), so such a difference changes it only when two
candidates are that close, and from that token on the text differs. Measured with scripts/batch_flip_rate.py
(50 seeded requests, alone and all together, on the trained compat fixture, CPU, 2026-12-02): 0 of 50
requests differ, in 5,769 tokens (25,869 with --max_tokens=400) in float32 and 5,769 under bfloat16 autocast,
although every row's logits differ from its alone run's in the last bits (by up to 4e-6 on this model, 1e-6
on a random one of the demo's size): no two candidates were ever that close. On the demo model's shape
trained 600 iterations: 0 of 50 as well (5,769 tokens in float32, 12,469 under bfloat16 with
--max_tokens=200). tests/test_serve_engine.py runs the script in the compat fixture's pinned environment,
where the arithmetic is the same on every x86 CPU, so the count it asserts holds on any. A larger model, a flatter
distribution or a GPU (whose kernels change with the batch size more often) make a flip likelier; the
script measures any run. `max_batch=1` gives generate_stream's (sample.py's) tokens bit for bit.

Memory: every active sequence holds one row of the cache (memory.kv_row_bytes: 2 x n_layer x block_size x
n_embd values of the cache's dtype, and the token shift's row). Rows are admitted while they fit
`kv_budget_bytes` (default: half the device's available memory) and the rest wait, first come first served;
a job whose rows alone exceed the budget is refused at submit (TooLarge). The cache grows by doubling as
rows are needed, up to the budget, and is freed when no job is left.

Nothing one request does stops the worker: an exception in one job (its seed, prefill, sampling) fails that
job alone with a generic message, the traceback goes to the "nanogpt.serve" log. If the worker ever stops,
every job fails and `submit` raises Stopped (`alive` turns False); close() fails the jobs in flight and
waiting; stop_accepting() lets them finish while refusing new ones (SIGTERM's drain).

Events go back to the asyncio side through `loop.call_soon_threadsafe`:
    Token(choice, text, logprob, top)   a generated token; `text` may be "" (half of a UTF-8 character)
    Finish(choice, reason)              "stop" (a stop string was reached) or "length"
    Done(prompt_tokens, completion_tokens) or Failed(message)   the last event of a job
"""

from __future__ import annotations

import asyncio
import codecs
import collections
import itertools
import logging
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from nanogpt import memory
from nanogpt.device import autocast
from nanogpt.generate import sample_next, slide_window
from nanogpt.model import GPT, KVCache, activation_dtype
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
    """The queue and the worker thread. `max_batch`: the most jobs in one forward pass (0: all active jobs; 1:
    each job its own, the turn-taking of earlier versions, kept for side-by-side measurements).
    `kv_budget_bytes`: the memory for the active sequences' KV caches (None: half of what the device has)."""

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
        if max_active < 1 or queue_size < 0 or max_batch < 0:
            raise ValueError("max_active must be at least 1, queue_size and max_batch at least 0")
        self.model, self.tok, self.device, self.dtype = model, tok, device, dtype
        self.max_active, self.queue_size, self.max_batch = max_active, queue_size, max_batch
        param = model.lm_head.weight
        with autocast(device, dtype):  # the cache keeps keys and values in the dtype the forward pass makes them
            self.cache_dtype = activation_dtype(param)
        self.row_bytes = memory.kv_row_bytes(model.config, self.cache_dtype)
        self.kv_budget_bytes = memory.kv_budget_bytes(device) if kv_budget_bytes is None else kv_budget_bytes
        self.max_rows = self.kv_budget_bytes // self.row_bytes  # sequences whose caches fit the budget
        if self.max_rows < 1:
            raise ValueError(
                f"a KV-cache budget of {memory.gb(self.kv_budget_bytes)} holds no sequence: one needs "
                f"{memory.gb(self.row_bytes)} ({self.cache_dtype}, block_size {model.config.block_size})"
            )
        self.cache: KVCache | None = None  # the active jobs' rows are cache[:rows], in the order of self.active
        self.rows = 0
        self.waiting: collections.deque[Job] = collections.deque()
        self.starting: list[Job] = []  # taken from the queue, being prefilled
        self.active: list[_Running] = []
        self.cond = threading.Condition()
        self.closed = False  # close() was called: the worker fails what is left and returns
        self.accepting = True  # stop_accepting() turns it off: submit raises Stopped, jobs in flight finish
        self.counters = {"prompt_tokens_total": 0, "generated_tokens_total": 0, "requests_total": 0}
        self.thread = threading.Thread(target=self._run, name="nanogpt-engine", daemon=True)
        self.thread.start()

    # --------------------------------------------------------------- the asyncio side

    @property
    def alive(self) -> bool:
        """The worker thread is running: False after close() or if it ever stopped on an error."""
        return self.thread.is_alive() and not self.closed

    def submit(self, job: Job) -> None:
        """Queue `job`. Raises Stopped when the engine takes no more jobs, TooLarge when the job's sequences
        could never fit the memory budget, Busy when there is no room in the queue."""
        if job.n < 1 or job.max_tokens < 1 or not job.prompt_ids:
            raise ValueError("a job needs n >= 1, max_tokens >= 1 and at least one prompt token")
        with self.cond:
            if not self.accepting or not self.alive:
                raise Stopped("the server is not accepting requests")
            if job.n > self.max_rows:
                raise TooLarge(
                    f"{job.n} sequences need {memory.gb(job.n * self.row_bytes)} of KV cache "
                    f"({memory.gb(self.row_bytes)} each), more than the server's whole budget of "
                    f"{memory.gb(self.kv_budget_bytes)}, which holds {self.max_rows}. Ask for n <= {self.max_rows}, "
                    "or start the server with a larger --kv_budget_gb (or --dtype=bfloat16: half the memory each)."
                )
            # the waiting room holds queue_size jobs beyond those a free slot takes at once
            room = self.queue_size + max(0, self.max_active - len(self.active) - len(self.starting))
            if len(self.waiting) >= room:  # full: first drop the requests their clients left
                self.waiting = collections.deque(j for j in self.waiting if not j.cancelled.is_set())
            if len(self.waiting) >= room:
                raise Busy
            self.waiting.append(job)
            self.counters["requests_total"] += 1
            self.cond.notify_all()

    def stats(self) -> dict[str, int]:
        """Jobs generating and waiting, and the counters since the start (for /health and /metrics)."""
        with self.cond:
            waiting = sum(not j.cancelled.is_set() for j in self.waiting)
            return {"active": len(self.active) + len(self.starting), "waiting": waiting, **self.counters}

    def stop_accepting(self) -> None:
        """Refuse new jobs (submit raises Stopped) while the jobs in flight and waiting finish: SIGTERM's drain."""
        with self.cond:
            self.accepting = False

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no job is active or waiting (or the worker stopped); False if `timeout` passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.cond:
            while self._jobs() and self.thread.is_alive():
                wait = 0.05 if deadline is None else min(0.05, deadline - time.monotonic())
                if wait <= 0:
                    return False
                self.cond.wait(wait)  # woken when a job ends; polls too, since a client leaving notifies nobody
            return True

    def close(self) -> None:
        """Fail every job in flight or waiting with "the server is shutting down" and join the worker."""
        with self.cond:
            self.closed = True
            self.accepting = False
            self.cond.notify_all()
        if self.thread is not threading.current_thread():
            self.thread.join(timeout=10)

    def _jobs(self) -> list[Job]:
        """Every job in flight or waiting (not those whose clients left while they waited)."""
        return [r.job for r in self.active] + self.starting + [j for j in self.waiting if not j.cancelled.is_set()]

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
                jobs = self._jobs()
                self.active, self.starting, self.rows = [], [], 0
                self.waiting.clear()
                self.accepting = False
                self.cond.notify_all()
            for job in jobs:
                job.emit(Failed(message))

    def _step(self) -> bool:
        """Start the waiting jobs that fit, then one forward pass for every active sequence (one per group of
        max_batch jobs) and the next token of each; False once closed."""
        with self.cond:
            self.waiting = collections.deque(j for j in self.waiting if not j.cancelled.is_set())
            while not self.closed and not self.active and not self.waiting:
                self.cond.wait()
            if self.closed:
                return False
            self.starting = self._admit()
        for job in list(self.starting):
            self._start(job)
        self._leave()  # the clients that left while the others started
        size = self.max_batch if self.max_batch > 0 else max(1, len(self.active))  # jobs per forward pass
        for group in [self.active[i : i + size] for i in range(0, len(self.active), size)]:
            self._decode(group)
        self._leave()
        return True

    def _admit(self) -> list[Job]:
        """The waiting jobs that get a slot and whose sequences fit the budget now, first come first served
        (a large job at the head waits for room rather than being overtaken for ever)."""
        jobs, rows = [], self.rows
        while self.waiting and len(self.active) + len(jobs) < self.max_active:
            if rows + self.waiting[0].n > self.max_rows:
                break
            jobs.append(self.waiting.popleft())
            rows += jobs[-1].n
        return jobs

    def _start(self, job: Job) -> None:
        """Prefill the job's prompt into free rows of the cache and draw its first tokens (one job's failure
        fails it alone)."""
        running, over = None, None
        if not job.cancelled.is_set():  # its client may have left since _admit
            running = self._guarded(job, _Running, self, job, self.rows)
        if running is not None and self._guarded(job, self._reserve, running.rows.stop):
            over = self._guarded(job, running.start, self.cache[running.rows])  # None: it failed
        with self.cond:
            self.starting.remove(job)
            self.counters["prompt_tokens_total"] += len(job.prompt_ids)  # once per request, as usage counts
            if over is False:
                self.active.append(running)
                self.rows += job.n
            self.cond.notify_all()

    def _reserve(self, rows: int) -> bool:
        """Make the cache hold `rows` sequences, doubling it when it grows (never beyond the budget)."""
        if self.cache is not None and self.cache.batch_size >= rows:
            return True
        size = min(self.max_rows, max(rows, 2 * (self.cache.batch_size if self.cache is not None else 0)))
        bigger = KVCache(self.model.config, size, self.model.lm_head.weight.device, self.cache_dtype)
        if self.cache is not None and self.rows:
            bigger[: self.rows].copy_(self.cache[: self.rows])
        self.cache = bigger
        return True

    def _decode(self, group: list[_Running]) -> None:
        """One forward pass over the rows of `group` (consecutive jobs, so consecutive rows), then each job
        draws its next tokens from its own rows of the logits, with its own settings and generator."""
        a, b = group[0].rows.start, group[-1].rows.stop
        logits = None
        if not all(r.full for r in group):  # a job whose window is full is re-encoded by itself instead
            for r in group:
                if r.full:  # it rides along harmlessly at position 0; its rows are re-encoded right after
                    self.cache.pos[r.rows] = 0
            try:
                tokens = torch.cat([r.nxt for r in group])  # (b - a, 1) the tokens drawn last
                logits, _ = self.model(tokens, cache=self.cache[a:b])  # (b - a, 1, vocab)
            except Exception:
                log.exception("a batched forward pass failed; its %d requests fail", len(group))
                for r in group:
                    r.job.emit(Failed("generation failed"))
                    r.over = True
                return
        drawn = []
        for r in group:
            if r.job.cancelled.is_set():  # its client left: no more tokens, its rows go at the next _leave
                r.over = True
                continue
            mine = None if logits is None else logits[r.rows.start - a : r.rows.stop - a, -1]  # (n, vocab)
            if self._guarded(r.job, r.advance, mine, self.cache) is None:
                r.over = True  # it failed
            else:
                drawn.append(r)
        if drawn:  # one read of the device for every job's tokens: on a GPU, one wait instead of one per job
            ids = torch.cat([r.nxt for r in drawn])[:, 0].tolist()
            for r, first in zip(drawn, itertools.accumulate([0] + [r.job.n for r in drawn])):
                r.over = self._guarded(r.job, r.send, ids[first : first + r.job.n]) is not False

    def _leave(self) -> None:
        """Drop finished, failed and cancelled jobs, moving the rows of the others down so they stay cache[:rows]."""
        if not any(r.over or r.job.cancelled.is_set() for r in self.active):
            return
        keep = [r for r in self.active if not r.over and not r.job.cancelled.is_set()]
        self.cache.keep([i for r in keep for i in range(r.rows.start, r.rows.stop)])
        if not keep:  # idle: give the memory back (the next request allocates what it needs)
            self.cache = None
        rows = 0
        for r in keep:
            r.first, rows = rows, rows + r.job.n
        with self.cond:
            self.active, self.rows = keep, rows
            self.cond.notify_all()

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
    """A job being generated: its rows of the engine's cache, the tokens they hold (its window), its random
    generator, and per choice its decoder and stop strings."""

    def __init__(self, engine: Engine, job: Job, first: int):
        self.engine, self.job, self.first = engine, job, first
        self.gen = torch.Generator(device=engine.device)
        # any integer a client sends is a seed: folded into the 64 bits manual_seed accepts
        self.gen.manual_seed(job.seed % 2**64 if job.seed is not None else random.randrange(2**63))
        block = engine.model.config.block_size
        # (n, T) the tokens in this job's rows of the cache, as generate_stream's `context`
        self.context = torch.tensor([job.prompt_ids[-block:]] * job.n, dtype=torch.long, device=engine.device)
        self.nxt: torch.Tensor | None = None  # (n, 1) the tokens drawn last, fed at the next step
        self.logits: torch.Tensor | None = None  # (n, vocab) what they were drawn from, when logprobs are asked
        self.decoders = [codecs.getincrementaldecoder("utf-8")(errors="replace") for _ in range(job.n)]
        self.stops = [StopStrings(job.stop) for _ in range(job.n)]
        self.open = set(range(job.n))  # choices still generating
        self.generated = 0  # completion tokens, summed over choices
        self.steps = 0
        self.over: bool | None = False  # True: done, stopped or failed; the engine drops it

    @property
    def rows(self) -> slice:
        return slice(self.first, self.first + self.job.n)

    @property
    def full(self) -> bool:
        """Its rows hold block_size tokens: the next step slides the window instead of decoding."""
        return self.context.size(1) == self.engine.model.config.block_size

    def start(self, cache: KVCache) -> bool:
        """Prefill the prompt into its rows (`cache`, a view) and draw the first tokens; True when already over."""
        cache.reset()
        logits, _ = self.engine.model(self.context, cache=cache)
        self.draw(logits[:, -1])
        return self.send(self.nxt[:, 0].tolist())

    def advance(self, logits: torch.Tensor | None, cache: KVCache) -> bool:
        """Draw the next tokens from `logits` (n, vocab) of the forward pass that fed the last ones (the engine
        then sends them). A full window slides exactly as generate_stream slides it: the newest
        block_size // 2 + 1 tokens are kept and re-encoded in the job's rows of `cache`, by themselves."""
        self.context = torch.cat((self.context, self.nxt), dim=1)
        if self.context.size(1) > self.engine.model.config.block_size:
            self.context = slide_window(self.context, self.engine.model.config.block_size)
            mine = cache[self.rows]
            mine.reset()
            logits = self.engine.model(self.context, cache=mine)[0][:, -1]
        self.draw(logits)
        return True

    def draw(self, logits: torch.Tensor) -> None:
        """Sample one token per choice from logits (n, vocab) with the job's settings and generator."""
        job = self.job
        self.nxt = sample_next(logits, job.temperature, job.top_k, job.top_p, self.gen)  # (n, 1)
        self.logits = logits if job.logprobs is not None else None  # for send's log-probabilities

    def send(self, ids: list[int]) -> bool:
        """Send the tokens drawn, `ids` (one per choice), as text; True when the job is complete."""
        job = self.job
        self.steps += 1
        logprobs = top = None
        if self.logits is not None:  # the model's own distribution, before temperature and filtering
            lp = torch.log_softmax(self.logits.float(), dim=-1)
            logprobs = lp.gather(1, self.nxt).squeeze(1).tolist()
            values, indices = lp.topk(min(job.logprobs, lp.size(-1)), dim=-1)
            top = [
                [(self.engine.tok.decode([i]), v) for i, v in zip(row_i, row_v)]
                for row_i, row_v in zip(indices.tolist(), values.tolist())
            ]
        last = self.steps >= job.max_tokens
        for c in sorted(self.open):
            self.generated += 1
            self.engine.counters["generated_tokens_total"] += 1  # only the worker thread writes it
            text = self.decoders[c].decode(self.engine.tok.decode_bytes([ids[c]]), final=last)
            token = Token(c, text, logprobs[c] if logprobs else None, top[c] if top is not None else None)
            released, stopped = self.stops[c].push(token)
            if last and not stopped:
                released += self.stops[c].flush()
            for t in released:
                job.emit(t)
            if stopped or last:
                job.emit(Finish(c, "stop" if stopped else "length"))
                self.open.discard(c)
        if not self.open:
            job.emit(Done(len(job.prompt_ids), self.generated))
            return True
        return False
