"""nanogpt.serve.engine without HTTP: what the server relies on when a request is bad, a client leaves or the
server stops, and continuous batching (one forward pass for every active sequence) against generate_stream."""

from __future__ import annotations

import string
import threading
import time
from dataclasses import dataclass, field

import pytest
import torch

from nanogpt.generate import generate_stream
from nanogpt.model import GPT, GPTConfig
from nanogpt.serve.engine import Busy, Done, Engine, Failed, Finish, Job, Stopped, Token
from nanogpt.tokenizer import CharTokenizer

CHARS = sorted(set(string.printable) - set("\t\r\x0b\x0c"))
BLOCK = 32


def tiny_model(**overrides) -> GPT:
    torch.manual_seed(0)
    config = dict(vocab_size=len(CHARS), block_size=BLOCK, n_layer=1, n_head=2, n_embd=32, **overrides)
    model = GPT(GPTConfig(**config)).eval()
    with torch.no_grad():  # sharper than at initialisation, so samples are not uniform noise
        model.lm_head.weight.mul_(8)
    return model


def slowed(model: GPT, seconds: float) -> GPT:
    """Every forward pass takes `seconds` longer: a job lasts long enough to be cancelled or shut down mid-way."""
    forward = model.forward

    def slow_forward(*args, **kwargs):
        time.sleep(seconds)
        return forward(*args, **kwargs)

    model.forward = slow_forward
    return model


@dataclass
class Recorded(Job):
    """A job that records its events here instead of sending them to an asyncio loop."""

    log: list = field(default_factory=list)
    over: threading.Event = field(default_factory=threading.Event)

    def emit(self, event) -> None:
        self.log.append(event)
        if isinstance(event, (Done, Failed)):
            self.over.set()

    def wait(self, timeout: float = 30.0) -> Recorded:
        assert self.over.wait(timeout), "the job did not end"
        return self

    @property
    def last(self):
        return self.log[-1]

    def texts(self) -> list[str]:
        return ["".join(e.text for e in self.log if isinstance(e, Token) and e.choice == c) for c in range(self.n)]


def job(prompt: str = "To be", max_tokens: int = 8, **kwargs) -> Recorded:
    tok = CharTokenizer(CHARS)
    return Recorded(prompt_ids=tok.encode(prompt), max_tokens=max_tokens, **kwargs)


@pytest.fixture
def engines():
    """Engines over the tiny model, closed after the test."""
    made = []

    def make(model: GPT | None = None, **kwargs) -> Engine:
        made.append(Engine(model or tiny_model(), CharTokenizer(CHARS), "cpu", "float32", **kwargs))
        return made[-1]

    yield make
    for e in made:
        e.close()


def alone(model: GPT, j: Recorded) -> list[str]:
    """The job's texts from generate_stream with its seed, as sample.py would produce them."""
    tok = CharTokenizer(CHARS)
    idx = torch.tensor([j.prompt_ids] * j.n)
    gen = torch.Generator().manual_seed(j.seed % 2**64)
    kwargs = dict(temperature=j.temperature, top_k=j.top_k, top_p=j.top_p, generator=gen)
    rows = torch.cat(list(generate_stream(model, idx, j.max_tokens, **kwargs)), dim=1)
    return [tok.decode(r) for r in rows.tolist()]


# ----------------------------------------------------------------------------- nothing a request sends stops it


def test_a_seed_beyond_64_bits_is_folded_not_fatal(engines):
    engine = engines()
    for seed in (123456789012345678901234567, -5):
        j = job(seed=seed)
        engine.submit(j)
        assert isinstance(j.wait().last, Done)
        assert j.texts() == alone(engine.model, j)
    assert engine.alive


def test_a_job_that_raises_fails_alone_and_the_next_succeeds(engines, caplog):
    engine = engines()
    bad, good = job(top_k=0, max_tokens=4), job(max_tokens=20, seed=1)  # top_k=0 raises inside sample_next
    engine.submit(bad)
    engine.submit(good)
    assert bad.wait().last == Failed("generation failed")  # generic: the detail is in the log
    assert isinstance(good.wait().last, Done) and good.texts() == alone(engine.model, good)
    assert "Traceback" in caplog.text or any(r.exc_info for r in caplog.records)
    after = job(seed=2)
    engine.submit(after)
    assert isinstance(after.wait().last, Done)
    assert engine.alive


class Boom(BaseException):
    """Not an Exception: nothing in the engine catches it per job, so it escapes the worker's loop."""


def test_a_dead_worker_fails_every_job_and_refuses_new_ones(engines):
    model = tiny_model()
    engine = engines(model, max_active=1)
    forward = model.forward

    def explode(*args, **kwargs):
        raise Boom

    model.forward = explode
    running, waiting = job(max_tokens=50), job(max_tokens=50)
    engine.submit(running)
    engine.submit(waiting)
    assert isinstance(running.wait().last, Failed) and isinstance(waiting.wait().last, Failed)
    engine.thread.join(5)
    assert not engine.alive
    model.forward = forward
    with pytest.raises(Stopped):
        engine.submit(job())


# ----------------------------------------------------------------------------- admission, cancellation, shutdown


def test_queue_size_zero_admits_into_a_free_slot_and_refuses_beyond(engines):
    engine = engines(slowed(tiny_model(), 0.02), max_active=1, queue_size=0)
    first = job(max_tokens=30)
    engine.submit(first)
    with pytest.raises(Busy):
        engine.submit(job())
    assert isinstance(first.wait().last, Done)
    assert engine.wait_idle(5)
    second = job(max_tokens=3)
    engine.submit(second)
    assert isinstance(second.wait().last, Done)


def test_a_cancelled_job_leaves_within_one_step_active_or_waiting(engines):
    engine = engines(slowed(tiny_model(), 0.02), max_active=1)
    running, waiting = job(max_tokens=1000), job(max_tokens=1000)
    engine.submit(running)
    engine.submit(waiting)
    while not any(isinstance(e, Token) for e in running.log):
        time.sleep(0.01)
    waiting.cancelled.set()
    assert engine.stats()["waiting"] == 0
    running.cancelled.set()
    assert engine.wait_idle(timeout=1.0)  # a step is ~0.02 s
    assert engine.stats()["active"] == 0
    assert len(running.log) < 1000


def test_close_fails_jobs_in_flight_and_waiting(engines):
    engine = engines(slowed(tiny_model(), 0.02), max_active=1)
    running, waiting = job(max_tokens=1000), job(max_tokens=1000)
    engine.submit(running)
    engine.submit(waiting)
    while not running.log:
        time.sleep(0.01)
    engine.close()
    assert running.wait(1).last == waiting.wait(1).last == Failed("the server is shutting down")
    assert not engine.alive
    with pytest.raises(Stopped):
        engine.submit(job())


def test_stop_accepting_lets_jobs_in_flight_finish(engines):
    engine = engines(slowed(tiny_model(), 0.01), max_active=1)
    running, waiting = job(max_tokens=20), job(max_tokens=20)
    engine.submit(running)
    engine.submit(waiting)
    engine.stop_accepting()
    with pytest.raises(Stopped):
        engine.submit(job())
    assert engine.wait_idle(timeout=10)
    assert isinstance(running.last, Done) and isinstance(waiting.last, Done)
    assert engine.alive  # draining is not stopping


def test_stats_count_requests_and_tokens(engines):
    engine = engines()
    a, b = job("abc", max_tokens=5, n=2), job("hello", max_tokens=7)
    for j in (a, b):
        engine.submit(j)
        j.wait()
    assert engine.wait_idle(5)
    stats = engine.stats()
    assert (stats["active"], stats["waiting"], stats["requests_total"]) == (0, 0, 2)
    assert stats["prompt_tokens_total"] == 3 + 5  # once per request, as the usage field counts them
    assert stats["generated_tokens_total"] == 5 * 2 + 7
    assert [isinstance(e, Finish) for e in a.log].count(True) == 2
