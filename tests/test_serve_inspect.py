"""POST /api/inspect on a real server (uvicorn on a loopback port, plain HTTP with a 30 s timeout per request):
the answer is inspect_model.inspect's on the served model, the API key guards it, bad text gets OpenAI-shaped
400s. What the numbers mean is tested in test_inspect_model.py."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("fastapi", reason="nanogpt serve needs the [serve] extra")
from serverthread import BLOCK, MODEL_ID, Server, greedy, open_stream, request  # noqa: E402

from nanogpt.inspect_model import inspect  # noqa: E402


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    s.stop()


def post(server: Server, body: object, key: str | None = None):
    headers = {"Authorization": f"Bearer {key}"} if key is not None else None
    return request("POST", server.url + "/api/inspect", body, headers=headers)


def test_inspect_answers_one_forward_pass_over_the_text(server):
    status, body, _ = post(server, {"text": "ROMEO:"})
    assert status == 200, body
    ids = server.tok.encode("ROMEO:")
    assert body["object"] == "inspection" and body["model"] == MODEL_ID
    assert body["tokens"] == [{"id": i, "text": c} for i, c in zip(ids, "ROMEO:")]
    assert body == {"object": "inspection", "model": MODEL_ID, **inspect(server.model, server.tok, ids)}
    attention = torch.tensor(body["attention"])
    assert attention.shape == (1, 2, 6, 6) and body["layers"] == [0]  # tiny_model: 1 layer, 2 heads
    assert torch.equal(attention.triu(1), torch.zeros_like(attention))
    with torch.no_grad():  # the lens after the last block: the model's own next-token distribution
        logits, _ = server.model(torch.tensor([ids]), targets=torch.tensor([ids]))
    probs, top = logits[0].softmax(-1).topk(5)
    assert [[e["id"] for e in row] for row in body["lens"][-1]] == top.tolist()
    got = torch.tensor([[e["prob"] for e in row] for row in body["lens"][-1]])
    torch.testing.assert_close(got, probs, atol=6e-5, rtol=0)


GREEDY = {"model": MODEL_ID, "max_tokens": 40, "temperature": 0, "stream": True}


def test_inspecting_while_the_engine_generates_mixes_nothing():
    """The forward pass runs in its own thread on the model the engine's worker is generating with: the stream
    still gets the model's greedy text, and the inspection the model's own figures."""
    s = Server(step_seconds=0.01)  # each generation step takes 10 ms: the stream is mid-way while we inspect
    try:
        conn, resp = open_stream(s.url + "/v1/completions", {**GREEDY, "prompt": "KING:"})
        status, body, _ = post(s, {"text": "ROMEO:"})
        assert status == 200 and body["lens"] == inspect(s.model, s.tok, s.tok.encode("ROMEO:"))["lens"]
        lines = [line[6:] for line in resp.read().decode().splitlines() if line.startswith("data: {")]
        conn.close()
        text = "".join(json.loads(line)["choices"][0]["text"] for line in lines)
        assert text == greedy(s, "KING:", 40)[1:]  # open_stream read the first token's line
    finally:
        s.stop()


def test_one_layer_and_a_whole_context(server):
    status, body, _ = post(server, {"text": "a" * BLOCK, "layer": 0})
    assert status == 200, body
    assert body["layers"] == [0] and len(body["attention"]) == 1 and len(body["attention"][0][0]) == BLOCK
    status, body, _ = post(server, {"text": "ab", "layer": 1})
    assert status == 400 and body["error"]["param"] == "layer"


@pytest.mark.parametrize(
    "text, words",
    [
        ("", "empty"),
        ("a" * (BLOCK + 1), f"maximum context length is {BLOCK} tokens"),
        ("caf\u00e9 \u2603", "not in the model's vocabulary"),
    ],
)
def test_bad_text_gets_a_400_in_openais_shape(server, text, words):
    status, body, _ = post(server, {"text": text})
    assert status == 400
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert words in body["error"]["message"]
    assert (body["error"]["type"], body["error"]["param"]) == ("invalid_request_error", "text")


def test_unknown_fields_and_other_models_are_refused(server):
    status, body, _ = post(server, {"text": "ab", "temperature": 1})
    assert status == 400 and "temperature" in body["error"]["message"]
    status, body, _ = post(server, {"text": "ab", "model": "gpt-4"})
    assert status == 404 and body["error"]["param"] == "model"
    status, body, _ = post(server, {"text": "ab", "model": MODEL_ID})
    assert status == 200


def test_the_api_key_guards_it():
    s = Server(api_key="sesame")
    try:
        for key in (None, "wrong"):
            status, body, _ = post(s, {"text": "ab"}, key)
            assert status == 401 and body["error"]["type"] == "authentication_error"
        status, body, _ = post(s, {"text": "ab"}, "sesame")
        assert status == 200 and len(body["tokens"]) == 2
    finally:
        s.stop()


def test_top_sets_how_many_tokens_the_lens_lists(server):
    """The playground's step view asks for the 20 likeliest next tokens ("top": 1..50, default 5)."""
    status, body, _ = post(server, {"text": "ROMEO:", "top": 20})
    assert status == 200, body
    assert all(len(row) == 20 for layer in body["lens"] for row in layer)
    ids = server.tok.encode("ROMEO:")
    assert body["lens"] == inspect(server.model, server.tok, ids, top=20)["lens"]
    five = post(server, {"text": "ROMEO:"})[1]["lens"]
    assert [[row[:5] for row in layer] for layer in body["lens"]] == five  # the same ranking, longer
    for top in (0, 51):
        status, body, _ = post(server, {"text": "ab", "top": top})
        assert status == 400 and body["error"]["param"] == "top", body
