"""`ktx serve` under concurrent load, and the request-validation cases test_server.py does not cover.

The load checks: 8 streaming clients at once (chat and completions, greedy) each get exactly what
`Model.generate` / `Model.chat` give for that prompt alone, computed first in-process; a client that hangs
up mid-stream leaves the others intact. The short run of bench/soak_server.py checks the script itself
(a `ktx serve` subprocess, answers equal to the single-client pass, RSS sampling).
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from live_server import running_server

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

MODEL_ID = "tiny"
KEY = "sk-load"
CACHE_LEN = 128
CLIENTS = 8
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    from ktx.synthetic import PRESETS, write_synthetic

    return write_synthetic(PRESETS["dsv3-tiny"], tmp_path_factory.mktemp("synthetic") / "dsv3-tiny.gguf")


@pytest.fixture(scope="module")
def model(model_path):
    import ktx

    return ktx.load(model_path, cache_len=CACHE_LEN, experts="reference")


@pytest.fixture(scope="module")
def server(model):
    from ktx.server import create_app

    with running_server(create_app(model, MODEL_ID, api_key=KEY)) as port:
        yield port


def _client(port: int):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=120)


WORDS = "the model will find water and light in time we think that small data".split()


def _jobs() -> list[tuple[str, object, int]]:
    """(kind, prompt or messages, max_tokens): 8 clients x 3 requests, no two alike, some chats continuing others."""
    jobs = []
    for i in range(CLIENTS * 3):
        text = " ".join(WORDS[(i * 5 + j) % len(WORDS)] for j in range(1 + i % 9))
        n = 4 + i % 11
        if i % 2:
            msgs = [{"role": "user", "content": text}]
            if i % 4 == 3:
                msgs = [{"role": "user", "content": WORDS[i % 7]}, {"role": "assistant", "content": text}] + msgs
            jobs.append(("chat", msgs, n))
        else:
            jobs.append(("completion", text, n))
    return jobs


def _stream(client, kind: str, prompt, n: int) -> tuple[str, str]:
    kw = dict(model=MODEL_ID, max_tokens=n, temperature=0, stream=True)
    if kind == "chat":
        chunks = list(client.chat.completions.create(messages=prompt, **kw))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        chunks = list(client.completions.create(prompt=prompt, **kw))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
    return text, [c.choices[0].finish_reason for c in chunks if c.choices][-1]


def _hang_up(port: int) -> None:
    """Start a long stream, read its first chunk, and drop the connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    body = {"model": MODEL_ID, "prompt": "the model", "max_tokens": 60, "temperature": 0, "stream": True}
    conn.request("POST", "/v1/completions", body=json.dumps(body).encode(),
                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    r = conn.getresponse()
    while not r.readline().startswith(b"data: {"):
        pass
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()


def test_concurrent_streams_equal_the_library_alone(model, server):
    jobs = _jobs()
    want = []
    for kind, prompt, n in jobs:
        text = model.chat(prompt, n) if kind == "chat" else model.generate(prompt, n)
        want.append((text, model.stats.finish_reason))
    client = _client(server)
    barrier = threading.Barrier(CLIENTS)

    def run(c: int) -> list[tuple[str, str]]:
        barrier.wait()  # all clients start together, so requests queue up behind each other
        out = []
        for i in range(c, len(jobs), CLIENTS):
            if c == 0 and i == CLIENTS:
                _hang_up(server)
            out.append((i, _stream(client, *jobs[i])))
        return out

    with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
        results = [r for rs in pool.map(run, range(CLIENTS)) for r in rs]
    assert len(results) == len(jobs)
    for i, got in results:
        assert got == want[i], (i, jobs[i])


def test_soak_script_short(model_path):
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "soak_server.py"), "--model", str(model_path),
                          "--clients", "8", "--duration", "4", "--prompts", "6", "--disconnect-every", "3",
                          "--cache-len", "96", "--json"], capture_output=True, text=True, timeout=240)
    s = json.loads(out.stdout.strip().splitlines()[-1])
    assert (s["failed"], s["mismatched"]) == (0, 0), s["problems"]
    assert s["ok"] >= 8 and s["hung_up"] >= 1 and s["max_in_flight"] == 8 and s["rss_samples"] >= 3
    assert s["passed"] and out.returncode == 0, s


# ---- validation not covered by test_server.py -----------------------------------------------------


def _raw(port: int, method: str, path: str, body: bytes | None = None, key: str | None = KEY):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if body is not None:
        headers["Content-Type"] = "application/json"
    conn.request(method, path, body=body, headers=headers)
    r = conn.getresponse()
    status, ctype, data = r.status, r.getheader("content-type", ""), r.read()
    conn.close()
    return status, ctype, data


def _openai_error(status_ctype_data, status: int) -> dict:
    got, ctype, data = status_ctype_data
    assert got == status, data
    assert ctype.startswith("application/json"), ctype
    err = json.loads(data)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["type"]
    return err


CHAT = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("extra, param", [
    ({"temperature": -0.5}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"n": 2}, "n"),
    ({"n": True}, "n"),
    ({"max_tokens": -3}, "max_tokens"),
    ({"max_completion_tokens": 0}, "max_tokens"),
    ({"min_p": 1.0}, "min_p"),
    ({"repeat_penalty": 0}, "repeat_penalty"),
    ({"seed": "abc"}, "seed"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stream": "yes"}, "stream"),
    ({"stream": True, "temperature": -1}, "temperature"),  # a stream that never starts: a plain JSON error
    ({"stream_options": {"include_usage": "no"}}, "stream_options"),
    ({"logprobs": True}, "logprobs"),
    ({"logit_bias": {"5": 100}}, "logit_bias"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"model": 7}, "model"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
])
def test_out_of_range_parameters_are_400(server, extra, param):
    err = _openai_error(_raw(server, "POST", "/v1/chat/completions", json.dumps({**CHAT, **extra}).encode()), 400)
    assert err["param"] == param and err["type"] == "invalid_request_error"


@pytest.mark.parametrize("body", [b'{"prompt": "x", "temperature": NaN}', b'{"prompt": "x", "top_p": Infinity}',
                                  b"[" * 100_000, b'{"prompt": "x",}', b"\xff\xfe{}", b""])
def test_malformed_json_is_400(server, body):
    _openai_error(_raw(server, "POST", "/v1/completions", body), 400)


def test_prompt_validation_is_400(server):
    for prompt in ([], [-1], [10**9], [[1, 2], [3]], 5, None):
        err = _openai_error(_raw(server, "POST", "/v1/completions", json.dumps({"prompt": prompt}).encode()), 400)
        assert err["param"] == "prompt"


def test_unknown_model_and_routes(server):
    err = _openai_error(_raw(server, "POST", "/v1/chat/completions", json.dumps({**CHAT, "model": "gpt-4"}).encode()), 404)
    assert (err["param"], err["code"]) == ("model", "model_not_found")
    assert _openai_error(_raw(server, "GET", "/v1/models/gpt-4"), 404)["code"] == "model_not_found"
    _openai_error(_raw(server, "GET", "/v1/nothing-here"), 404)
    _openai_error(_raw(server, "GET", "/v1/chat/completions"), 405)


@pytest.mark.parametrize("key", [None, "sk-wrong", KEY + "x", "Bearer"])
def test_api_key_on_every_v1_route(server, key):
    for method, path, body in (("GET", "/v1/models", None), ("GET", f"/v1/models/{MODEL_ID}", None),
                               ("POST", "/v1/chat/completions", json.dumps(CHAT).encode()),
                               ("POST", "/v1/completions", b"{not json")):  # auth is checked before the body
        assert _openai_error(_raw(server, method, path, body, key=key), 401)["code"] == "invalid_api_key"
    assert _raw(server, "GET", "/health", key=None)[0] == 200  # health checks need no key
