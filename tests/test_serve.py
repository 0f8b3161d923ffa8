"""nanogpt serve: the official `openai` client against a real server on a loopback port.

Outputs are checked against the model itself: greedy text equals model.generate's, a seeded sample equals
generate_stream with the same seed, log-probabilities equal a forward pass's, so nothing can be mixed up
between concurrent requests without a test noticing.
"""

from __future__ import annotations

import asyncio
import http.client as http_client
import json
import re
import sys
import time
import urllib.parse
from pathlib import Path

import pytest
import torch

openai = pytest.importorskip("openai", reason="the serve tests use the official openai client ([dev] extra)")
pytest.importorskip("fastapi", reason="nanogpt serve needs the [serve] extra")
from serverthread import BLOCK, MODEL_ID, Server, greedy, open_stream, request, seeded  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import serve_load  # noqa: E402

from nanogpt.serve.engine import StopStrings, Token  # noqa: E402


@pytest.fixture(scope="module")
def server():
    s = Server(max_n=8)
    yield s
    s.stop()


# ----------------------------------------------------------------------------- completions


def test_models_lists_the_served_model(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL_ID]


def test_greedy_completion_is_the_models_greedy_text(server):
    r = server.client().completions.create(model=MODEL_ID, prompt="ROMEO:", max_tokens=20, temperature=0)
    assert r.choices[0].text == greedy(server, "ROMEO:", 20)
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (6, 20, 26)
    assert r.object == "text_completion" and r.model == MODEL_ID


def test_generation_goes_past_the_context_as_sample_py_does(server):
    r = server.client().completions.create(model=MODEL_ID, prompt="ROMEO:", max_tokens=2 * BLOCK, temperature=0)
    assert r.choices[0].text == greedy(server, "ROMEO:", 2 * BLOCK)  # the window slid past block_size
    card = server.client().models.list().data[0]
    assert (card.max_model_len, card.max_tokens) == (BLOCK, 1024)


def test_seeded_samples_are_reproducible_and_n_gives_distinct_choices(server):
    c = server.client()
    kwargs = dict(model=MODEL_ID, prompt="To be", max_tokens=24, temperature=1.0, seed=7, n=3)
    a, b = c.completions.create(**kwargs), c.completions.create(**kwargs)
    texts = [ch.text for ch in a.choices]
    assert texts == [ch.text for ch in b.choices]
    assert texts == seeded(server, "To be", 24, seed=7, samples=3)  # one batch of 3, drawn with that seed
    assert len(set(texts)) == 3
    assert [ch.index for ch in a.choices] == [0, 1, 2] and a.usage.completion_tokens == 72
    other = c.completions.create(**{**kwargs, "seed": 8})
    assert [ch.text for ch in other.choices] != texts


def test_top_k_and_top_p_reach_the_sampler(server):
    c = server.client()
    r = c.completions.create(model=MODEL_ID, prompt="a", max_tokens=16, seed=3, top_p=0.5, extra_body={"top_k": 5})
    assert r.choices[0].text == seeded(server, "a", 16, seed=3, top_k=5, top_p=0.5)[0]


def test_streaming_gives_the_same_text_token_by_token(server):
    c = server.client()
    kwargs = dict(model=MODEL_ID, prompt="KING:", max_tokens=30, seed=11)
    whole = c.completions.create(**kwargs).choices[0].text
    chunks = list(c.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    texts = [ch.choices[0].text for ch in chunks if ch.choices and ch.choices[0].finish_reason is None]
    assert len(texts) == 30 and "".join(texts) == whole
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 30 and chunks[-1].choices == []


def test_logprobs_are_the_models(server):
    r = server.client().completions.create(model=MODEL_ID, prompt="ab", max_tokens=5, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    text = r.choices[0].text
    ids = server.tok.encode("ab" + text)
    with torch.no_grad():
        logits, _ = server.model(torch.tensor([ids]), torch.tensor([ids]))
    ref = torch.log_softmax(logits[0].float(), -1)
    for i, (token, logprob, top) in enumerate(zip(lp.tokens, lp.token_logprobs, lp.top_logprobs)):
        pos = 1 + i  # the logits at position p predict token p + 1
        assert token == text[i]
        assert logprob == pytest.approx(ref[pos, ids[pos + 1]].item(), abs=1e-4)
        assert len(top) == 3 and max(top.values()) == pytest.approx(ref[pos].max().item(), abs=1e-4)
        assert token in top  # greedy: the chosen token is the most likely one
    assert lp.text_offset == list(range(2, 7))
    # logprobs=0: the chosen tokens' log-probabilities, no alternatives (OpenAI's meaning)
    r0 = server.client().completions.create(model=MODEL_ID, prompt="ab", max_tokens=5, temperature=0, logprobs=0)
    assert r0.choices[0].logprobs.token_logprobs == pytest.approx(lp.token_logprobs)
    assert r0.choices[0].logprobs.top_logprobs == [{}] * 5


def test_stop_strings_end_the_text_before_them(server):
    c = server.client()
    full = greedy(server, "JULIET:", 40)
    stop = full[10:13]
    cut = full[: full.index(stop)]
    r = c.completions.create(model=MODEL_ID, prompt="JULIET:", max_tokens=40, temperature=0, stop=[stop, "\x00"])
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    chunks = list(
        c.completions.create(model=MODEL_ID, prompt="JULIET:", max_tokens=40, temperature=0, stop=stop, stream=True)
    )
    assert "".join(ch.choices[0].text for ch in chunks) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_stop_string_bookkeeping():
    s = StopStrings(["END", "xy"])
    released = []
    for ch in "abcENxaENDzz":
        out, stopped = s.push(Token(0, ch))
        released += [t.text for t in out]
        if stopped:
            break
    assert "".join(released) == "abcENxa" and stopped
    s = StopStrings(["long stop"])
    out = []
    for ch in "long st":
        out += s.push(Token(0, ch))[0]
    assert out == [] and [t.text for t in s.flush()] == list("long st")  # held back, then released at the end
    s = StopStrings(["cd"])
    out, stopped = s.push(Token(0, "abcde"))  # a stop string inside one token cuts the token
    assert [t.text for t in out] == ["ab"] and stopped


# ----------------------------------------------------------------------------- chat


def test_chat_completion_renders_the_conversation_as_text(server):
    c = server.client()
    messages = [{"role": "system", "content": "Speak."}, {"role": "user", "content": "Hello"}]
    r = c.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=12, temperature=0)
    text = greedy(server, "System: Speak.\nUser: Hello\nAssistant:", 12)
    expected = text.split("\nUser:")[0]
    assert r.choices[0].message.content == expected and r.choices[0].message.role == "assistant"
    assert r.object == "chat.completion" and r.usage.prompt_tokens == len("System: Speak.\nUser: Hello\nAssistant:")
    stream = c.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=12, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == expected
    r = c.chat.completions.create(
        model=MODEL_ID, messages=messages, max_tokens=3, temperature=0, logprobs=True, top_logprobs=2
    )
    content = r.choices[0].logprobs.content
    assert len(content) == 3 and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)


# ----------------------------------------------------------------------------- bad requests


@pytest.mark.parametrize(
    ("kwargs", "status", "fragment"),
    [
        (dict(extra_body={"frobnicate": 1}), 400, "Unrecognized request argument supplied: frobnicate"),
        (dict(max_tokens=1025), 400, "max_tokens=1025 is more than this server generates for one request (1024"),
        (dict(prompt="a" * (BLOCK + 1)), 400, "maximum context length is 96 tokens, and the prompt has 97"),
        (dict(prompt=[1, 2, 3]), 400, "prompt"),
        (dict(prompt=["one", "two"]), 400, "prompt"),
        (dict(prompt=""), 400, "The prompt is empty"),
        (dict(prompt="\u263a"), 400, "not in the model's vocabulary"),
        (dict(temperature=-1), 400, "temperature"),
        (dict(top_p=0), 400, "top_p"),
        (dict(n=10_000), 400, "n=10000 is more than this server allows (8"),
        (dict(max_tokens=0), 400, "max_tokens"),
        (dict(stop=["a", "b", "c", "d", "e"]), 400, "up to 4"),
        (dict(logprobs=6), 400, "logprobs"),
        (dict(model="gpt-4"), 404, "The model 'gpt-4' does not exist; this server serves 'tiny'"),
    ],
)
def test_bad_requests_get_openai_errors(server, kwargs, status, fragment):
    args = {"model": MODEL_ID, "prompt": "hi", "max_tokens": 4, **kwargs}
    with pytest.raises(openai.APIStatusError) as e:
        server.client().completions.create(**args)
    assert e.value.status_code == status
    body = e.value.body
    assert set(body) == {"message", "type", "param", "code"} and fragment in body["message"], body


def test_malformed_bodies_get_400_not_a_traceback(server):
    for raw, headers in [(b"{not json", {"Content-Type": "application/json"}), (b"[]", {})]:
        status, body, _ = request("POST", server.url + "/v1/completions", raw=raw, headers=headers)
        assert status == 400 and body["error"]["type"] == "invalid_request_error", body
    status, body, _ = request("GET", server.url + "/v1/nothing")
    assert status == 404 and "error" in body
    message = {"role": "user", "content": [{"type": "image_url"}]}
    status, body, _ = request("POST", server.url + "/v1/chat/completions", {"model": MODEL_ID, "messages": [message]})
    assert status == 400 and "messages.0.content" in body["error"]["message"], body


def test_the_openai_client_with_a_wrong_key_is_refused_and_with_the_right_key_served():
    """The official client's view of --api_key: a wrong key raises AuthenticationError on a completion, no key
    gets 401 from /api/metrics, the page loads without one, the right key completes. Every route against
    no key, a wrong key and a malformed header is test_serve_limits.py's
    test_the_api_key_guards_every_route_but_health_and_the_page."""
    s = Server(api_key="sesame")
    try:
        with pytest.raises(openai.AuthenticationError):
            s.client(api_key="wrong").completions.create(model=MODEL_ID, prompt="a", max_tokens=2)
        assert request("GET", s.url + "/api/metrics")[0] == 401
        assert request("GET", s.url + "/")[0] == 200  # the page itself asks for the key
        r = s.client(api_key="sesame").completions.create(model=MODEL_ID, prompt="a", max_tokens=2)
        assert r.usage.completion_tokens == 2
    finally:
        s.stop()


# ----------------------------------------------------------------------------- load


def wait_until_idle(server: Server, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while (stats := request("GET", server.url + "/health")[1])["active"] or stats["waiting"]:
        assert time.monotonic() < deadline, stats
        time.sleep(0.02)


@pytest.fixture
def slow_server():
    s = Server(step_seconds=0.05, max_active=1, queue_size=1)  # 90 tokens take 4.5 s
    yield s
    s.stop()


def test_a_client_that_disconnects_frees_its_slot(slow_server):
    s = slow_server
    body = {"model": MODEL_ID, "prompt": "a", "max_tokens": 90, "stream": True}
    conn, _ = open_stream(s.url + "/v1/completions", body)  # the first token arrived
    assert request("GET", s.url + "/health")[1]["active"] == 1
    conn.close()  # now hang up
    t0 = time.monotonic()
    wait_until_idle(s, timeout=2)  # well before the 90 tokens would have been generated
    print(f"slot freed {time.monotonic() - t0:.2f} s after the disconnect")


def test_a_full_queue_answers_429(slow_server):
    s = slow_server
    body = {"model": MODEL_ID, "prompt": "a", "max_tokens": 90, "stream": True}
    first, _ = open_stream(s.url + "/v1/completions", body)  # generating: holds the only slot
    parts = urllib.parse.urlsplit(s.url)
    second = http_client.HTTPConnection(parts.hostname, parts.port, timeout=30)  # waits in the queue
    second.request("POST", "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
    deadline = time.monotonic() + 5
    while request("GET", s.url + "/health")[1]["waiting"] != 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    with pytest.raises(openai.RateLimitError) as e:
        s.client().completions.create(model=MODEL_ID, prompt="a", max_tokens=2)
    assert e.value.response.headers["retry-after"] == "1"
    assert "busy" in e.value.body["message"]
    first.close()
    second.close()
    wait_until_idle(s, timeout=5)
    assert s.client().completions.create(model=MODEL_ID, prompt="a", max_tokens=2).usage.completion_tokens == 2


def test_50_concurrent_streams_complete_unmixed(server):
    """50 streaming requests at once, each with its own prompt and seed (scripts/serve_load.py): every stream
    carries exactly the text the model gives that prompt and seed alone, and all finish in bounded time."""
    prompts = [f"Request {i}:" for i in range(50)]
    r = asyncio.run(asyncio.wait_for(serve_load.load(server.url, MODEL_ID, prompts, 24), timeout=120))
    for i, text in enumerate(r["texts"]):
        assert text == seeded(server, prompts[i], 24, seed=i)[0], i
    assert r["tokens"] == 50 * 24
    print(f"50 streams x 24 tokens in {r['wall_s']:.1f} s; first token p50 {r['first_token_p50_s']:.3f} s")
    wait_until_idle(server)


# ----------------------------------------------------------------------------- the command


def test_serve_command_serves_the_run_its_metrics_and_the_page(tiny_checkpoint, script_env, tmp_path):
    """`nanogpt serve` as a user starts it: a real process, the URL it prints, the run's metrics."""
    import subprocess
    import sys
    import threading

    err_path = tmp_path / "serve.err"  # a file, not a pipe nobody reads: the server's log never fills it
    with open(err_path, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nanogpt", "serve", f"--out_dir={tiny_checkpoint}", "--port=0", "--device=cpu"],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=script_env,
        )
    try:
        first: list[str] = []
        reader = threading.Thread(target=lambda: first.append(proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(120)  # the first line is the URL; a server that never prints it fails here, not hangs
        line = first[0] if first else ""
        url = re.search(r"at (http://127\.0\.0\.1:\d+)", line)
        assert url, f"no URL within 120 s; stdout: {line!r}; stderr:\n{err_path.read_text()}"
        client = openai.OpenAI(base_url=url[1] + "/v1", api_key="none", max_retries=0, timeout=60)
        model = client.models.list().data[0].id
        assert model == Path(tiny_checkpoint).name
        r = client.completions.create(model=model, prompt="ROMEO:", max_tokens=10)
        assert len(r.choices[0].text) == 10
        records = request("GET", url[1] + "/api/metrics")[1]["records"]
        assert [r["iter"] for r in records if r["kind"] == "eval"] == [0, 2, 4]
        status, page, _ = request("GET", url[1] + "/")
        assert status == 200 and "nanogpt playground" in page
        assert request("GET", url[1] + "/static/app.js")[0] == 200
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_serve_refuses_a_busy_port_in_one_paragraph(tiny_checkpoint, run_script):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = run_script("-m", "nanogpt", "serve", f"--out_dir={tiny_checkpoint}", f"--port={port}", "--device=cpu")
    assert r.returncode == 2 and "cannot listen on 127.0.0.1" in r.stderr and "--port" in r.stderr
    assert "Traceback" not in r.stderr
