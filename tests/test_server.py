"""`ktx serve` against a live uvicorn on loopback, driven by the official `openai` client.

The model is the `dsv3-tiny` synthetic preset (random weights; its output is gibberish, which is fine:
the checks are that the HTTP paths give exactly what `Model.generate` / `Model.chat` give).
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import socket
import time

import pytest
from live_server import running_server

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

MODEL_ID = "tiny"
KEY = "sk-test-key"
CACHE_LEN = 96


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    import ktx
    from ktx.synthetic import PRESETS, write_synthetic

    path = write_synthetic(PRESETS["dsv3-tiny"], tmp_path_factory.mktemp("synthetic") / "dsv3-tiny.gguf")
    return ktx.load(path, cache_len=CACHE_LEN, experts="reference")


@pytest.fixture(scope="module")
def app(model):
    from ktx.server import create_app

    return create_app(model, MODEL_ID, api_key=KEY)


@pytest.fixture(scope="module")
def server(app):
    with running_server(app) as port:
        yield f"http://127.0.0.1:{port}"


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=60)


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "the model will think"}]


def test_health_and_models(server, client):
    status, _, body = _request(server, "GET", "/health", key=None)
    assert status == 200 and json.loads(body)["status"] == "ok"
    ids = [m.id for m in client.models.list().data]
    assert ids == [MODEL_ID]
    assert client.models.retrieve(MODEL_ID).id == MODEL_ID


def test_completion_matches_generate(model, client):
    prompt = "the system will find"
    ref = model.generate(prompt, 12)
    ref_stats = (model.stats.prompt_tokens, model.stats.new_tokens, model.stats.finish_reason)
    r = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=12, temperature=0)
    assert r.choices[0].text == ref
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.choices[0].finish_reason) == ref_stats
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    chunks = list(client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == ref_stats[2]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == ref_stats[1]


def test_completion_from_token_ids(model, client):
    ids = model.tokenizer.encode("water and light")
    r = client.completions.create(model=MODEL_ID, prompt=ids, max_tokens=6, temperature=0)
    assert r.choices[0].text == model.generate(ids, 6)


def test_chat_stream_equals_plain_equals_model_chat(model, client):
    ref = model.chat(MESSAGES, 10)
    n_new = model.stats.new_tokens
    r = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=10, temperature=0)
    assert r.choices[0].message.content == ref and r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens == n_new
    stream = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == n_new
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_ends_with_done(server):
    body = {"model": MODEL_ID, "prompt": "the", "max_tokens": 3, "temperature": 0, "stream": True}
    status, headers, raw = _request(server, "POST", "/v1/completions", body)
    lines = [ln for ln in raw.decode().split("\n") if ln]
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert all(ln.startswith("data: ") for ln in lines) and lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")


def test_concurrent_requests_equal_sequential(client):
    prompts = ["the model", "small water", "time and data", "we think that"]
    kw = dict(model=MODEL_ID, max_tokens=8, temperature=0.8, seed=7)
    alone = [client.completions.create(prompt=p, **kw).choices[0].text for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda p: client.completions.create(prompt=p, **kw).choices[0].text, prompts))
    assert together == alone


def test_stop_string_and_length(model, client):
    full = model.generate("the model will", 12)
    r = client.completions.create(model=MODEL_ID, prompt="the model will", max_tokens=12, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.choices[0].text == full
    stop = full[3:6]
    assert stop.strip(), "the tiny model's greedy text is too short to pick a stop string"
    r = client.completions.create(model=MODEL_ID, prompt="the model will", max_tokens=12, temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == full[: full.index(stop)]


def test_kv_cache_exhaustion_is_length(model, client):
    ids = model.tokenizer.encode("the model")
    r = client.completions.create(model=MODEL_ID, prompt=ids, max_tokens=1000, temperature=0)
    assert r.choices[0].finish_reason == "length"
    # the cache holds prompt + all but the last token (sampled from the final logits, never fed back)
    assert CACHE_LEN - 2 <= len(ids) + r.usage.completion_tokens <= CACHE_LEN + 1


def test_client_disconnect_stops_generation(server, app):
    body = {"model": MODEL_ID, "prompt": "the", "max_tokens": 80, "temperature": 0, "stream": True}
    host, port = server.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("POST", "/v1/completions", body=json.dumps(body).encode(),
                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    r = conn.getresponse()
    while not r.readline().startswith(b"data: {"):
        pass
    conn.sock.shutdown(socket.SHUT_RDWR)  # first token arrived: hang up
    conn.close()
    deadline = time.time() + 30
    while not (app.state.worker.last and app.state.worker.last.finish_reason == "cancelled"):
        assert time.time() < deadline, f"generation was not cancelled: {app.state.worker.last}"
        time.sleep(0.02)
    assert app.state.worker.last.completion_tokens < 80


def _request(server, method, path, body=None, key=KEY):
    """(status, headers, body bytes) of one plain HTTP request (stdlib client: no dependency on the openai stack)."""
    host, port = server.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if body is not None:
        headers["Content-Type"] = "application/json"
        body = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request(method, path, body=body, headers=headers)
    r = conn.getresponse()
    out = (r.status, dict(r.getheaders()), r.read())
    conn.close()
    return out


class _Resp:
    def __init__(self, status, headers, body):
        self.status_code, self.headers, self.text = status, headers, body.decode()

    def json(self):
        return json.loads(self.text)


def _post(server, path, body, key=KEY):
    return _Resp(*_request(server, "POST", path, body, key))


def _error(r, status):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


@pytest.mark.parametrize("body, param", [
    ({"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "temperature": 3}, "temperature"),
    ({"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
    ({"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "top_p": 0}, "top_p"),
    ({"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "top_k": -1}, "top_k"),
    ({"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"}, "max_tokens"),
    ({"model": MODEL_ID, "messages": []}, "messages"),
    ({"model": MODEL_ID, "messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
])
def test_bad_parameters_are_400(server, body, param):
    assert _error(_post(server, "/v1/chat/completions", body), 400)["param"] == param


def test_error_cases(server, client):
    _error(_post(server, "/v1/chat/completions", b"{not json"), 400)
    _error(_post(server, "/v1/completions", [1, 2]), 400)
    assert _error(_post(server, "/v1/completions", {"model": "gpt-4", "prompt": "x"}), 404)["code"] == "model_not_found"
    assert _error(_post(server, "/v1/completions", {"prompt": "x"}, key=None), 401)["code"] == "invalid_api_key"
    assert _error(_post(server, "/v1/completions", {"prompt": "x"}, key="wrong"), 401)["code"] == "invalid_api_key"
    long_prompt = list(range(1, CACHE_LEN + 5))
    assert _error(_post(server, "/v1/completions", {"prompt": long_prompt}), 400)["code"] == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=MESSAGES, max_tokens=1)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=str(client.base_url), api_key="bad", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL_ID, prompt="x", max_tokens=-1)
