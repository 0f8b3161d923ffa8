"""nanogpt serve against what a careless or hostile client sends, and what an operator expects of it (issue 19).

Every bad request gets OpenAI's error shape and a status that says what went wrong, and the server answers the
next request as before; a job that fails, a worker that dies, a client that leaves, a SIGTERM: each ends in an
answer, never in a hang. Raw HTTP (http.client, sockets) sends what the openai client cannot.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import logging
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse

import pytest

openai = pytest.importorskip("openai", reason="the serve tests use the official openai client ([dev] extra)")
pytest.importorskip("fastapi", reason="nanogpt serve needs the [serve] extra")
parser = pytest.importorskip("prometheus_client.parser", reason="/metrics is read with prometheus_client")
from serverthread import MODEL_ID, Server, greedy, open_stream, request  # noqa: E402

import nanogpt.serve.app as app_module  # noqa: E402
from nanogpt.errors import UserError  # noqa: E402
from nanogpt.serve import ServeOptions, api_key_of, build_app, drain, exposure_warning  # noqa: E402
from nanogpt.serve.engine import TooLarge  # noqa: E402

LIMITS = dict(max_body_bytes=20_000, max_prompt_chars=2_000, max_stop_chars=20, max_messages=10)
COMPLETION = {"model": MODEL_ID, "prompt": "hi", "max_tokens": 4}


@pytest.fixture(scope="module")
def server():
    s = Server(max_n=8, **LIMITS)
    yield s
    s.stop()


@pytest.fixture
def own_server():
    """A server of the test's own: the failures tests provoke cannot reach the module's server."""
    s = Server()
    yield s
    s.stop()


def assert_openai_error(status: int, body: object, expected: int, fragment: str = "") -> None:
    assert status == expected, (status, body)
    assert isinstance(body, dict) and set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"} and fragment in body["error"]["message"], body


def assert_still_answers(s: Server) -> None:
    r = s.client().completions.create(model=MODEL_ID, prompt="ROMEO:", max_tokens=5, temperature=0)
    assert r.choices[0].text == greedy(s, "ROMEO:", 5)


def wait_for(condition, timeout: float = 10, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def health(s: Server) -> dict:
    return request("GET", s.url + "/health")[1]


def idle(s: Server) -> bool:
    stats = health(s)
    return stats["active"] == 0 and stats["waiting"] == 0


# ----------------------------------------------------------------------------- seeds


def test_any_integer_is_a_seed_and_the_server_survives_it(server):
    """A seed beyond 64 bits used to kill the engine's worker: now it is folded into 64 bits."""
    huge = 123456789012345678901234567
    status, body, _ = request("POST", server.url + "/v1/completions", {**COMPLETION, "seed": huge})
    assert status == 200 and body["usage"]["completion_tokens"] == 4, body
    folded = request("POST", server.url + "/v1/completions", {**COMPLETION, "seed": huge % 2**64})[1]
    assert folded["choices"][0]["text"] == body["choices"][0]["text"]
    status, body, _ = request("POST", server.url + "/v1/completions", {**COMPLETION, "seed": -1})
    assert status == 200, body
    # a number too long for the JSON parser (over 4300 digits) is a malformed body: 400, never a dead worker
    raw = json.dumps(COMPLETION)[:-1] + ', "seed": ' + "9" * 5000 + "}"
    status, body, _ = request("POST", server.url + "/v1/completions", raw=raw.encode(), headers={})
    assert_openai_error(status, body, 400)
    assert health(server)["status"] == "ok"
    assert_still_answers(server)


# ----------------------------------------------------------------------------- limits


def announce_body(url: str, length: int) -> tuple[int, dict]:
    """POST headers announcing a body of `length` bytes, and no body: the answer must not wait for it."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    conn.putrequest("POST", parts.path)
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(length))
    conn.endheaders()
    resp = conn.getresponse()
    status, body = resp.status, json.loads(resp.read())
    conn.close()
    return status, body


def post_chunked(url: str, chunks: list[bytes]) -> tuple[int, dict]:
    """POST a body sent in chunks (Transfer-Encoding: chunked), so no Content-Length announces its size."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    conn.request("POST", parts.path, iter(chunks), {"Content-Type": "application/json"}, encode_chunked=True)
    resp = conn.getresponse()
    status, body = resp.status, json.loads(resp.read())
    conn.close()
    return status, body


def test_a_body_larger_than_max_body_bytes_gets_413_before_it_is_read(server):
    big = json.dumps({**COMPLETION, "prompt": "a" * 30_000}).encode()
    status, body, _ = request("POST", server.url + "/v1/completions", raw=big, headers={"Content-Type": "text/json"})
    assert_openai_error(status, body, 413, "larger than this server accepts (20000 bytes; see --max_body_bytes)")
    # announced larger than allowed: refused on the header alone, the body never sent
    assert_openai_error(*announce_body(server.url + "/v1/completions", 10**10), 413)
    # no Content-Length at all: counted as it arrives
    status, body = post_chunked(server.url + "/v1/completions", [b'{"prompt": "'] + [b"a" * 1000] * 30 + [b'"}'])
    assert_openai_error(status, body, 413, "larger than this server accepts")
    status, body = post_chunked(server.url + "/v1/completions", [json.dumps(COMPLETION).encode()])
    assert status == 200 and body["usage"]["completion_tokens"] == 4, body
    assert_still_answers(server)


@pytest.mark.parametrize(
    ("path", "body", "fragment"),
    [
        (
            "/v1/completions",
            {"prompt": "a" * 2001},
            "The prompt has 2001 characters, more than this server reads (2000; see --max_prompt_chars)",
        ),
        ("/v1/completions", {"stop": "x" * 21}, "A stop string may be up to 20 characters long (see --max_stop_chars)"),
        ("/v1/completions", {"stop": ["x", "y", "z", "w", "v"]}, "up to 4"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}] * 11},
            "The conversation has 11 messages, more than this server reads (10; see --max_messages)",
        ),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a" * 2001}]}, "see --max_prompt_chars"),
    ],
)
def test_limits_get_400_in_openais_shape_and_the_server_answers_after(server, path, body, fragment):
    base = {"model": MODEL_ID, "max_tokens": 4}
    if path == "/v1/completions":
        base["prompt"] = "hi"
    status, answer, _ = request("POST", server.url + path, {**base, **body})
    assert_openai_error(status, answer, 400, fragment)
    assert_still_answers(server)


def test_the_chats_own_stop_string_is_not_held_to_max_stop_chars():
    s = Server(max_stop_chars=3)
    try:
        messages = [{"role": "user", "content": "Hello"}]
        r = s.client().chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=12, temperature=0)
        expected = greedy(s, "User: Hello\nAssistant:", 12).split("\nUser:")[0]
        assert r.choices[0].message.content == expected
        with pytest.raises(openai.BadRequestError, match="up to 3 characters"):
            s.client().chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=2, stop="four")
    finally:
        s.stop()


def test_a_long_prompt_is_encoded_off_the_event_loop(server, monkeypatch):
    """While one prompt is being encoded (held here for a second), the server answers other requests."""
    started, release = threading.Event(), threading.Event()
    encode = server.tok.encode

    def slow_encode(text):
        if text.startswith("SLOW"):
            started.set()
            release.wait(10)
        return encode(text)

    monkeypatch.setattr(server.tok, "encode", slow_encode)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        slow = pool.submit(request, "POST", server.url + "/v1/completions", {**COMPLETION, "prompt": "SLOW"})
        assert started.wait(10)
        assert health(server)["status"] == "ok"  # the event loop is free while the prompt is encoded
        assert_still_answers(server)
        release.set()
        assert slow.result(timeout=30)[0] == 200


# ----------------------------------------------------------------------------- the API key and the Host header


def test_the_api_key_guards_every_route_but_health_and_the_page():
    s = Server(api_key="sesame")
    routes = [
        ("GET", "/v1/models", None),
        ("POST", "/v1/completions", COMPLETION),
        ("POST", "/v1/chat/completions", {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}]}),
        ("GET", "/api/metrics", None),
        ("GET", "/metrics", None),
        ("GET", "/v1/nothing", None),
    ]
    try:
        for method, path, body in routes:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sesame"}):
                status, answer, _ = request(method, s.url + path, body, headers=headers)
                assert_openai_error(status, answer, 401, "Incorrect API key provided")
                assert answer["error"]["type"] == "authentication_error"
            status, _, _ = request(method, s.url + path, body, headers={"Authorization": "Bearer sesame"})
            assert status == (404 if path == "/v1/nothing" else 200), path
        # the key is checked before the body is read: no schema errors, no 413, for a caller without it
        status, answer, _ = request("POST", s.url + "/v1/completions", raw=b"{not json", headers={})
        assert status == 401, answer
        assert announce_body(s.url + "/v1/completions", 10**10)[0] == 401
        assert request("GET", s.url + "/health")[0] == 200
        assert request("GET", s.url + "/")[0] == 200  # the page, which sends the key typed into its field
        assert request("GET", s.url + "/static/app.js")[0] == 200
        with pytest.raises(openai.AuthenticationError):
            s.client(api_key="wrong").models.list()
        assert s.client(api_key="sesame").models.list().data[0].id == MODEL_ID
    finally:
        s.stop()


def test_the_api_key_comes_from_the_option_a_file_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("NANOGPT_API_KEY", raising=False)
    assert api_key_of(ServeOptions()) is None
    monkeypatch.setenv("NANOGPT_API_KEY", "from-env")
    assert api_key_of(ServeOptions()) == "from-env"
    assert api_key_of(ServeOptions(api_key="given")) == "given"
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    assert api_key_of(ServeOptions(api_key_file=str(key_file))) == "from-file"
    key_file.write_text("\n")
    with pytest.raises(UserError, match="is empty"):
        api_key_of(ServeOptions(api_key_file=str(key_file)))
    with pytest.raises(UserError, match="cannot read the API key file"):
        api_key_of(ServeOptions(api_key_file=str(tmp_path / "missing")))
    with pytest.raises(UserError, match="not both"):
        ServeOptions(api_key="a", api_key_file=str(key_file))


def test_options_accept_queue_size_0_and_refuse_empty_limits():
    assert ServeOptions(queue_size=0).queue_size == 0
    for name in ("max_body_bytes", "max_prompt_chars", "max_stop_chars", "max_messages"):
        with pytest.raises(UserError, match="at least 1"):
            ServeOptions(**{name: 0})


def test_build_app_hands_the_options_to_the_engine_and_the_app(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.delenv("NANOGPT_API_KEY", raising=False)
    key_file = tmp_path / "key"
    key_file.write_text("k\n")
    o = ServeOptions(
        out_dir=str(tiny_checkpoint),
        device="cpu",
        max_batch=1,
        kv_budget_gb=0.5,
        max_messages=3,
        api_key_file=str(key_file),
    )
    app, engine, _ = build_app(o)
    try:
        assert (engine.max_batch, engine.kv_budget_bytes) == (1, 2**29)
        server = app.state.server
        assert (server.max_messages, server.api_key, server.local_only) == (3, "k", True)
        exposed, exposed_engine, _ = build_app(ServeOptions(out_dir=str(tiny_checkpoint), device="cpu", host="0.0.0.0"))
        exposed_engine.close()
        assert exposed.state.server.local_only is False  # other names may reach it: no Host check
    finally:
        engine.close()


def test_a_request_too_large_for_the_memory_budget_gets_400_with_the_engines_words(own_server, monkeypatch):
    def too_large(job):
        raise TooLarge("8 sequences need 2.0 GB of KV cache, more than the server's whole budget. Ask for n <= 4.")

    monkeypatch.setattr(own_server.engine, "submit", too_large)
    status, body, _ = request("POST", own_server.url + "/v1/completions", {**COMPLETION, "n": 8})
    assert_openai_error(status, body, 400, "Ask for n <= 4")
    assert body["error"]["param"] == "n"
    monkeypatch.undo()
    assert_still_answers(own_server)


def test_a_server_beyond_loopback_without_a_key_is_warned_about():
    assert exposure_warning("127.0.0.1", None) is None and exposure_warning("::1", None) is None
    assert exposure_warning("localhost", None) is None and exposure_warning("0.0.0.0", "key") is None
    warning = exposure_warning("0.0.0.0", None)
    assert warning.startswith("warning: listening on 0.0.0.0 without an API key") and "NANOGPT_API_KEY" in warning


def test_on_loopback_foreign_host_headers_are_refused(server):
    for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example", "[::2]:80"):
        for path in ("/", "/health", "/v1/models"):
            status, body, _ = request("GET", server.url + path, headers={"Host": host})
            assert_openai_error(status, body, 403, "answers only requests addressed to localhost")
    for host in ("localhost", "LOCALHOST:8000", "127.0.0.1", "127.0.0.1:1", "[::1]", "[::1]:8000"):
        assert request("GET", server.url + "/health", headers={"Host": host})[0] == 200, host
    exposed = Server(local_only=False)  # a server meant to be reached by other names
    try:
        assert request("GET", exposed.url + "/health", headers={"Host": "gpu-box.lan:8000"})[0] == 200
    finally:
        exposed.stop()


# ----------------------------------------------------------------------------- failures


def test_a_job_that_raises_gets_a_generic_500_and_the_next_succeeds(own_server, caplog):
    server = own_server
    forward = server.model.forward
    calls = []

    def failing_forward(*args, **kwargs):
        if not calls:
            calls.append(1)
            raise RuntimeError("secret internal detail 1234")
        return forward(*args, **kwargs)

    server.model.forward = failing_forward
    try:
        with caplog.at_level(logging.ERROR, logger="nanogpt.serve"):
            status, body, _ = request("POST", server.url + "/v1/completions", COMPLETION)
        assert_openai_error(status, body, 500, "the details are in the server's log")
        assert "secret" not in json.dumps(body) and "RuntimeError" not in json.dumps(body)
        assert body["error"]["type"] == "server_error"
        assert "secret internal detail 1234" in caplog.text and "Traceback" in caplog.text
    finally:
        server.model.forward = forward
    assert_still_answers(server)


def test_a_streamed_job_that_raises_ends_its_stream_with_a_generic_error(own_server):
    server = own_server
    forward = server.model.forward
    calls = []

    def failing_forward(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # after the first tokens went out
            raise RuntimeError("secret internal detail 5678")
        return forward(*args, **kwargs)

    server.model.forward = failing_forward
    try:
        status, text, _ = request(
            "POST", server.url + "/v1/completions", {**COMPLETION, "max_tokens": 20, "stream": True}
        )
    finally:
        server.model.forward = forward
    assert status == 200 and text.endswith("data: [DONE]\n\n"), text
    last = json.loads(text.split("data: ")[-2])
    assert set(last) == {"error"} and "the details are in the server's log" in last["error"]["message"]
    assert "secret" not in text
    assert_still_answers(server)


def test_an_exception_in_a_handler_gets_a_generic_500(own_server, monkeypatch, caplog):
    server = own_server

    def broken(messages):
        raise ValueError("secret handler detail")

    monkeypatch.setattr(app_module, "render_chat", broken)
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}]}
    with caplog.at_level(logging.ERROR, logger="nanogpt.serve"):
        status, answer, _ = request("POST", server.url + "/v1/chat/completions", body)
    assert_openai_error(status, answer, 500, "the details are in the server's log")
    assert "secret" not in json.dumps(answer)
    assert "secret handler detail" in caplog.text and "Traceback" in caplog.text
    monkeypatch.undo()
    assert_still_answers(server)


class WorkerKiller(BaseException):
    """Not an Exception: it escapes the engine's per-job guard, as a bug in the engine itself would."""


def test_a_dead_worker_turns_health_to_503_and_requests_get_503_at_once():
    s = Server()
    try:
        assert_still_answers(s)

        def killing_forward(*args, **kwargs):
            raise WorkerKiller

        s.model.forward = killing_forward
        status, body, _ = request("POST", s.url + "/v1/completions", COMPLETION)  # answered, not left hanging
        assert status in (500, 503)
        assert_openai_error(status, body, status)
        wait_for(lambda: not s.engine.alive, what="the worker to stop")
        status, body, _ = request("GET", s.url + "/health")
        assert status == 503 and body["status"] == "stopped"
        for path, payload in [
            ("/v1/completions", COMPLETION),
            ("/v1/completions", {**COMPLETION, "stream": True}),
            ("/v1/chat/completions", {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}]}),
        ]:
            status, body, _ = request("POST", s.url + path, payload)
            assert_openai_error(status, body, 503, "generation worker has stopped")
        with pytest.raises(openai.InternalServerError):
            s.client(timeout=30).completions.create(model=MODEL_ID, prompt="a", max_tokens=2)
    finally:
        s.stop()


# ----------------------------------------------------------------------------- clients that leave


def post_and_leave_later(url: str, body: dict) -> socket.socket:
    """Send a POST on a raw socket and return the socket, to be closed (the client leaving) by the caller."""
    parts = urllib.parse.urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=30)
    data = json.dumps(body).encode()
    head = f"POST {parts.path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    sock.sendall(f"{head}Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def test_abandoned_whole_requests_free_their_slots(capsys):
    """20 non-streaming n=8, max_tokens=1024 requests whose clients hang up take all 16 slots and 4 queue places;
    once they leave, their jobs are cancelled at once and a 20-token request is answered (it used to wait 96 s)."""
    s = Server(step_seconds=0.02, max_active=16, queue_size=4)
    try:
        body = {"model": MODEL_ID, "prompt": "a", "max_tokens": 1024, "n": 8}
        socks = [post_and_leave_later(s.url + "/v1/completions", body) for _ in range(20)]
        wait_for(lambda: (st := health(s))["active"] + st["waiting"] == 20, what="20 jobs to be taken")
        time.sleep(1)  # the clients wait a second, then hang up
        for sock in socks:
            sock.close()
        wait_for(lambda: idle(s), timeout=10, what="the abandoned jobs to be cancelled")
        r = s.client(timeout=60).completions.create(model=MODEL_ID, prompt="ROMEO:", max_tokens=20, temperature=0)
        assert r.choices[0].text == greedy(s, "ROMEO:", 20)
    finally:
        s.stop()


def test_a_stream_whose_client_leaves_before_its_first_chunk_is_cancelled():
    s = Server(step_seconds=0.05, max_active=1, queue_size=1)
    try:
        body = {"model": MODEL_ID, "prompt": "a", "max_tokens": 90, "stream": True}
        first, _ = open_stream(s.url + "/v1/completions", body)  # holds the only slot
        second = post_and_leave_later(s.url + "/v1/completions", body)  # waits in the queue: no token yet
        wait_for(lambda: health(s)["waiting"] == 1, what="the second stream to wait")
        second.close()
        wait_for(lambda: health(s)["waiting"] == 0, timeout=5, what="the waiting stream to be cancelled")
        assert health(s)["active"] == 1  # the first stream goes on
        first.close()
        wait_for(lambda: idle(s), timeout=5, what="the first stream to be cancelled")
    finally:
        s.stop()


# ----------------------------------------------------------------------------- the queue


def test_queue_size_0_admits_into_a_free_slot_and_refuses_beyond():
    s = Server(step_seconds=0.02, max_active=1, queue_size=0)
    try:
        assert_still_answers(s)  # a free slot: admitted, not refused
        body = {"model": MODEL_ID, "prompt": "a", "max_tokens": 200, "stream": True}
        first, _ = open_stream(s.url + "/v1/completions", body)
        with pytest.raises(openai.RateLimitError) as e:
            s.client().completions.create(model=MODEL_ID, prompt="a", max_tokens=2)
        assert "busy" in e.value.body["message"]
        first.close()
        wait_for(lambda: idle(s), timeout=5, what="the slot to be freed")
        assert_still_answers(s)
    finally:
        s.stop()


# ----------------------------------------------------------------------------- what operators expect


def scrape(s: Server) -> dict[str, float]:
    """/metrics read by Prometheus' own parser: {sample name with its labels: value}."""
    status, text, headers = request("GET", s.url + "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain"), text
    samples = {}
    for family in parser.text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def test_metrics_count_the_requests_sent():
    s = Server()
    try:
        c = s.client()
        usages = [
            c.completions.create(model=MODEL_ID, prompt="ROMEO:", max_tokens=7, temperature=0).usage,
            c.completions.create(model=MODEL_ID, prompt="To be", max_tokens=5, n=3, seed=1).usage,
            c.chat.completions.create(
                model=MODEL_ID, messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0
            ).usage,
        ]
        chunks = list(
            c.completions.create(
                model=MODEL_ID,
                prompt="KING:",
                max_tokens=9,
                seed=2,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        usages.append(chunks[-1].usage)
        with pytest.raises(openai.BadRequestError):
            c.completions.create(model=MODEL_ID, prompt="a", max_tokens=2, n=100)
        expected = {
            "nanogpt_requests_total{endpoint=completions,status=200}": 3,
            "nanogpt_requests_total{endpoint=chat,status=200}": 1,
            "nanogpt_requests_total{endpoint=completions,status=400}": 1,
        }
        wait_for(lambda: all(scrape(s).get(k) == v for k, v in expected.items()), timeout=5, what=str(expected))
        m = scrape(s)
        assert m["nanogpt_prompt_tokens_total"] == sum(u.prompt_tokens for u in usages)
        assert m["nanogpt_generation_tokens_total"] == sum(u.completion_tokens for u in usages)
        assert m["nanogpt_requests_admitted_total"] == 4
        assert m["nanogpt_requests_running"] == 0 and m["nanogpt_requests_waiting"] == 0
        assert m["nanogpt_engine_alive"] == 1
        assert m["nanogpt_time_to_first_token_seconds_count"] == 4  # one first token per request answered
        # each choice's tokens after its first: 6 + 3 x 4 + 8, and the chat's (up to 5: a stop string ends it)
        assert 26 <= m["nanogpt_inter_token_latency_seconds_count"] <= 31
        assert m["nanogpt_time_to_first_token_seconds_bucket{le=+Inf}"] == 4
    finally:
        s.stop()


def test_chat_streams_end_with_usage_when_asked(server):
    c = server.client()
    messages = [{"role": "user", "content": "Hello"}]
    kwargs = dict(model=MODEL_ID, messages=messages, max_tokens=8, temperature=0, stream=True)
    chunks = list(c.chat.completions.create(**kwargs, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == len("User: Hello\nAssistant:")
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks[:-1])
    assert chunks[-1].usage.completion_tokens >= len(text) > 0
    assert all(ch.usage is None for ch in chunks[:-1])
    plain = list(c.chat.completions.create(**kwargs))
    assert all(ch.usage is None and ch.choices for ch in plain)


def test_chat_top_logprobs_are_the_models_in_openais_shape(server):
    c = server.client()
    messages = [{"role": "user", "content": "Hello"}]
    prompt = "User: Hello\nAssistant:"
    reference = c.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=4, temperature=0, logprobs=3)
    ref = reference.choices[0].logprobs
    r = c.chat.completions.create(
        model=MODEL_ID, messages=messages, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert [t.token for t in content] == ref.tokens
    for t, lp, top in zip(content, ref.token_logprobs, ref.top_logprobs):
        assert t.logprob == pytest.approx(lp, abs=1e-5) and t.bytes == list(t.token.encode())
        assert [a.token for a in t.top_logprobs] == sorted(top, key=top.get, reverse=True)
        assert [a.logprob for a in t.top_logprobs] == pytest.approx(sorted(top.values(), reverse=True), abs=1e-5)
        assert t.top_logprobs[0].token == t.token  # greedy: the chosen token is the likeliest
    stream = c.chat.completions.create(
        model=MODEL_ID, messages=messages, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3, stream=True
    )
    streamed = [t for ch in stream if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in content]
    assert all(len(t.top_logprobs) == 3 for t in streamed)


# ----------------------------------------------------------------------------- SIGTERM


def test_drain_lets_running_requests_finish_and_refuses_new_ones():
    s = Server(step_seconds=0.05, max_active=2)
    try:
        body = {"model": MODEL_ID, "prompt": "ROMEO:", "max_tokens": 30, "temperature": 0, "stream": True}
        conn, resp = open_stream(s.url + "/v1/completions", body)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            drained = pool.submit(drain, s.app, s.engine, 60)
            wait_for(lambda: request("GET", s.url + "/health")[0] == 503, what="/health to say draining")
            assert health(s)["status"] == "draining"
            status, answer, _ = request("POST", s.url + "/v1/completions", COMPLETION)
            assert_openai_error(status, answer, 503, "shutting down")
            rest = resp.read().decode()
            assert drained.result(timeout=30) is True
        conn.close()
        assert rest.endswith("data: [DONE]\n\n") and '"finish_reason": "length"' in rest and "error" not in rest
    finally:
        s.stop()


def test_drain_fails_what_is_left_at_its_deadline_cleanly():
    s = Server(step_seconds=0.05, max_active=1)
    try:
        body = {"model": MODEL_ID, "prompt": "a", "max_tokens": 1000, "stream": True}
        conn, resp = open_stream(s.url + "/v1/completions", body)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            waiting = pool.submit(request, "POST", s.url + "/v1/completions", {**COMPLETION, "max_tokens": 50})
            wait_for(lambda: health(s)["waiting"] == 1, what="the second request to wait")
            assert drain(s.app, s.engine, 0.5) is False
            status, answer, _ = waiting.result(timeout=30)
        assert_openai_error(status, answer, 503, "shutting down")
        rest = resp.read().decode()
        conn.close()
        assert rest.endswith("data: [DONE]\n\n") and "shutting down" in rest.split("data: ")[-2]
    finally:
        s.stop()


def test_sigterm_drains_a_real_server_and_it_exits(tiny_checkpoint, script_env):
    """`nanogpt serve` under a real SIGTERM, with its key from the environment: requests running finish or fail
    cleanly, new ones get 503 while it drains, and the process exits."""
    env = {**script_env, "NANOGPT_API_KEY": "from-env"}
    args = ["--port=0", "--device=cpu", "--max_active=1", "--drain_seconds=1.5"]
    cmd = [sys.executable, "-m", "nanogpt", "serve", f"--out_dir={tiny_checkpoint}", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        url = re.search(r"at (http://127\.0\.0\.1:\d+)", line)
        assert url, line + (proc.stderr.read() if proc.poll() is not None else "")
        url = url[1]
        model = tiny_checkpoint.name
        assert request("GET", url + "/v1/models")[0] == 401  # the key from the environment is required
        client = openai.OpenAI(base_url=url + "/v1", api_key="from-env", max_retries=0, timeout=60)
        assert client.models.list().data[0].id == model
        body = {"model": model, "prompt": "ROMEO:", "max_tokens": 1024, "n": 8}
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            jobs = [pool.submit(whole_or_error, client, body) for _ in range(6)]  # one runs, five wait
            wait_for(lambda: health_at(url)["waiting"] >= 1, what="requests to queue")
            proc.send_signal(signal.SIGTERM)
            wait_for(lambda: health_at(url)["status"] == "draining", what="/health to say draining")
            with pytest.raises(openai.APIStatusError) as refused:
                client.completions.create(model=model, prompt="a", max_tokens=2)
            assert refused.value.status_code == 503 and "shutting down" in refused.value.body["message"]
            outcomes = [job.result(timeout=60) for job in jobs]
        assert all(o in ("finished", "503 shutting down") for o in outcomes), outcomes
        assert proc.wait(timeout=60) in (-signal.SIGTERM, 0)
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def health_at(url: str) -> dict:
    return request("GET", url + "/health")[1]


def whole_or_error(client: openai.OpenAI, body: dict) -> str:
    """How one request sent before the SIGTERM ended: with all its tokens, or with a clean 503."""
    try:
        r = client.completions.create(**body)
    except openai.APIStatusError as e:
        return f"{e.status_code} shutting down" if "shutting down" in e.body["message"] else repr(e.body)
    ok = all(len(ch.text) == body["max_tokens"] and ch.finish_reason == "length" for ch in r.choices)
    return "finished" if ok and len(r.choices) == body["n"] else repr(r)
