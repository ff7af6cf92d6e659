"""`ktx serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) for one model.

Endpoints: POST /v1/chat/completions, POST /v1/completions (both plain JSON or SSE streaming:
`data: {chunk}` lines, then `data: [DONE]`; `stream_options.include_usage` adds a last chunk with
usage and empty choices), GET /v1/models, GET /v1/models/{id}, GET /health.

One model, one engine, one KV cache: generations run one at a time on a single worker thread, in
arrival order (a FIFO queue), so a request gives the same result whether it ran alone or next to
others. The worker pushes text pieces into the request's asyncio queue; the request side turns them
into JSON or SSE chunks. A client that disconnects sets its cancel flag, and the worker stops that
generation at the next token (or skips it if it has not started).

finish_reason is "stop" for EOS or a stop string and "length" for max_tokens or a full KV cache.
Errors have OpenAI's body `{"error": {"message", "type", "param", "code"}}`: 400 for malformed JSON and
out-of-range parameters (and a prompt longer than the KV cache), 404 for an unknown model, 401 for a
missing or wrong API key when the server has one.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ktx.errors import KtxError


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


# ---- request parsing --------------------------------------------------------------------------------


@dataclass
class GenRequest:
    ids: list[int]
    max_tokens: int
    sampling: dict[str, Any]  # keyword arguments of Model.generate
    stop: list[str]
    stream: bool
    include_usage: bool
    chat: bool = False  # ids are a rendered conversation: Model.reply (the chat format's stop strings)


def _number(body: dict, name: str, default, lo: float | None = None, hi: float | None = None, *, integer: bool = False,
            lo_open: bool = False):
    v = body.get(name)
    if v is None:
        return default
    ok_type = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok_type:
        raise ApiError(400, f"'{name}' must be {'an integer' if integer else 'a number'}, got {json.dumps(v)}", name)
    if (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi):
        rng = f"{'(' if lo_open else '['}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise ApiError(400, f"'{name}' = {v} is out of range {rng}", name)
    return v


def _not_json(constant: str):
    """json.loads accepts NaN and Infinity, which are not JSON (and would reach the sampler as NaN)."""
    raise ValueError(f"{constant} is not a JSON value")


def _common(body: dict, capacity: int) -> dict:
    """Sampling, limits and streaming options shared by both endpoints."""
    if _number(body, "n", 1, integer=True) != 1:
        raise ApiError(400, "only n=1 is supported (one engine, one completion per request)", "n")
    for name in ("frequency_penalty", "presence_penalty"):
        if _number(body, name, 0.0, -2.0, 2.0) != 0:
            raise ApiError(400, f"'{name}' is not supported; use 'repeat_penalty' (llama.cpp-style, 1 = off)", name)
    if body.get("logprobs") not in (None, False, 0):
        raise ApiError(400, "'logprobs' is not supported", "logprobs")
    if body.get("logit_bias"):
        raise ApiError(400, "'logit_bias' is not supported", "logit_bias")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", capacity, 1, integer=True)
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "'stop' must be a non-empty string or a list of up to 4 of them", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", "stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict) or not isinstance(opts.get("include_usage", False), bool):
        raise ApiError(400, "'stream_options' must be an object with an optional boolean 'include_usage'", "stream_options")
    seed = _number(body, "seed", None, integer=True)
    sampling = dict(
        temperature=float(_number(body, "temperature", 1.0, 0.0, 2.0)),
        top_p=float(_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)),
        top_k=_number(body, "top_k", 0, 0, integer=True),
        min_p=float(_number(body, "min_p", 0.0, 0.0, 0.999999)),
        repeat_penalty=float(_number({"repeat_penalty": body.get("repeat_penalty", body.get("repetition_penalty"))},
                                     "repeat_penalty", 1.0, 0.0, lo_open=True)),
        seed=None if seed is None else int(seed) & 0xFFFFFFFFFFFFFFFF,
    )
    return dict(max_tokens=max_tokens, sampling=sampling, stop=stop, stream=stream,
                include_usage=opts.get("include_usage", False))


def _message_text(content: Any, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    if content is None:
        return ""
    raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content")


def chat_prompt_ids(body: dict, tokenizer) -> list[int]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
    clean = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant", "tool"):
            raise ApiError(400, f"messages[{i}] needs a role of system, user, assistant or tool", f"messages[{i}].role")
        role = "system" if m["role"] == "developer" else m["role"]
        clean.append({"role": role, "content": _message_text(m.get("content"), i)})
    try:
        prompt = tokenizer.apply_chat_template(clean, add_generation_prompt=True)
    except KtxError as e:
        raise ApiError(400, f"chat template failed: {e}", "messages") from None
    return tokenizer.encode(prompt)  # a template that writes BOS gets no second one


def completion_prompt_ids(body: dict, tokenizer) -> list[int]:
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]  # a batch of one
    if isinstance(p, str):
        return tokenizer.encode(p)
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        if not all(0 <= t < tokenizer.vocab_size for t in p):
            raise ApiError(400, f"'prompt' token ids must be in 0..{tokenizer.vocab_size - 1}", "prompt")
        return list(p)
    raise ApiError(400, "'prompt' must be a string or a list of token ids (batches of several prompts are not supported)", "prompt")


# ---- the single generation worker -----------------------------------------------------------------


@dataclass
class Finish:
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Job:
    queue: asyncio.Queue
    cancel: threading.Event = field(default_factory=threading.Event)


class Worker:
    """Runs generations one at a time, in submission order, on one thread."""

    def __init__(self, model):
        self.model = model
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ktx-generate")
        self.last: Finish | None = None  # how the latest generation ended (for logs and tests)

    def submit(self, req: GenRequest) -> Job:
        loop = asyncio.get_running_loop()
        job = Job(asyncio.Queue())

        def put(kind: str, value) -> None:
            if kind == "end":
                self.last = value
            loop.call_soon_threadsafe(job.queue.put_nowait, (kind, value))

        def run() -> None:
            if job.cancel.is_set():  # the client left while queued
                put("end", Finish("cancelled", len(req.ids), 0))
                return
            try:
                pieces = (self.model.reply(req.ids, req.max_tokens, stop=req.stop, **req.sampling) if req.chat else
                          self.model.generate(req.ids, req.max_tokens, stop=req.stop, stream=True, **req.sampling))
                for piece in pieces:
                    if job.cancel.is_set():
                        pieces.close()
                        break
                    put("text", piece)
                s = self.model.stats
                reason = "cancelled" if job.cancel.is_set() else s.finish_reason or "length"
                put("end", Finish(reason, s.prompt_tokens, s.new_tokens))
            except Exception as e:  # noqa: BLE001 - handed to the request, which answers with an error body
                put("error", e)

        self.pool.submit(run)
        return job


# ---- the app --------------------------------------------------------------------------------------


def _error_from(e: Exception) -> ApiError:
    if isinstance(e, ApiError):
        return e
    if isinstance(e, KtxError):
        return ApiError(400, str(e))
    return ApiError(500, f"internal error: {type(e).__name__}: {e}", kind="server_error")


def create_app(model, model_id: str, api_key: str | None = None) -> FastAPI:
    """The FastAPI app serving `model` (a `ktx.api.Model`) under the name `model_id`."""
    app = FastAPI(title="ktx", version="0.1.0")
    worker = Worker(model)
    app.state.worker = worker
    created = int(time.time())
    capacity = model.engine.capacity

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        code = "not_found" if e.status_code == 404 else None
        return ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", code=code).response()

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                code="invalid_api_key").response()
        return await call_next(request)

    def model_card() -> dict:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "ktx"}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model_info(name: str):
        if name != model_id:
            raise ApiError(404, f"model '{name}' does not exist; this server runs '{model_id}'", "model", "model_not_found")
        return model_card()

    async def parse(request: Request, prompt_ids: Callable[[dict, Any], list[int]]) -> GenRequest:
        try:
            body = json.loads(await request.body(), parse_constant=_not_json)
        except ValueError as e:  # also UnicodeDecodeError
            raise ApiError(400, f"request body is not valid JSON ({e})") from None
        except RecursionError:
            raise ApiError(400, "request body is not valid JSON (nested too deeply)") from None
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object")
        name = body.get("model")
        if name is not None and not isinstance(name, str):
            raise ApiError(400, "'model' must be a string", "model")
        if name is not None and name != model_id:
            raise ApiError(404, f"model '{name}' does not exist; this server runs '{model_id}'", "model", "model_not_found")
        opts = _common(body, capacity)
        ids = prompt_ids(body, model.tokenizer)
        if len(ids) >= capacity:
            raise ApiError(400, f"the prompt has {len(ids)} tokens but the KV cache holds {capacity}; "
                                "shorten it or restart the server with a larger --cache-len",
                           "messages" if prompt_ids is chat_prompt_ids else "prompt", "context_length_exceeded")
        return GenRequest(ids=ids, chat=prompt_ids is chat_prompt_ids, **opts)

    async def complete(request: Request, req: GenRequest, chat: bool):
        rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        obj = "chat.completion" if chat else "text_completion"
        now = int(time.time())
        job = worker.submit(req)

        def usage(f: Finish) -> dict:
            return {"prompt_tokens": f.prompt_tokens, "completion_tokens": f.completion_tokens,
                    "total_tokens": f.prompt_tokens + f.completion_tokens}

        if not req.stream:
            text = []
            try:
                while True:
                    try:
                        kind, value = await asyncio.wait_for(job.queue.get(), timeout=0.25)
                    except asyncio.TimeoutError:
                        if await request.is_disconnected():
                            job.cancel.set()
                            return JSONResponse({}, status_code=499)
                        continue
                    if kind == "text":
                        text.append(value)
                    elif kind == "error":
                        return _error_from(value).response()
                    else:
                        break
            finally:
                job.cancel.set()  # no-op once finished; stops the worker if this handler was cancelled
            content = "".join(text)
            choice = ({"index": 0, "message": {"role": "assistant", "content": content}, "logprobs": None,
                       "finish_reason": value.finish_reason} if chat else
                      {"index": 0, "text": content, "logprobs": None, "finish_reason": value.finish_reason})
            return {"id": rid, "object": obj, "created": now, "model": model_id, "choices": [choice], "usage": usage(value)}

        def chunk(choices: list, extra: dict | None = None) -> str:
            d = {"id": rid, "object": obj + ".chunk" if chat else obj, "created": now, "model": model_id, "choices": choices}
            if req.include_usage:
                d["usage"] = None
            d.update(extra or {})
            return f"data: {json.dumps(d, ensure_ascii=False)}\n\n"

        def piece(text: str | None, finish: str | None) -> dict:
            if chat:
                delta = {} if text is None else {"content": text}
                return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}

        async def events():
            try:
                if chat:
                    yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}])
                while True:
                    kind, value = await job.queue.get()
                    if kind == "text":
                        yield chunk([piece(value, None)])
                    elif kind == "error":
                        err = _error_from(value)
                        yield f"data: {json.dumps({'error': {'message': err.message, 'type': err.kind, 'param': err.param, 'code': err.code}})}\n\n"
                        break
                    else:
                        yield chunk([piece(None, value.finish_reason)])
                        if req.include_usage:
                            yield chunk([], {"usage": usage(value)})
                        break
                yield "data: [DONE]\n\n"
            finally:
                job.cancel.set()  # client gone (the stream was cancelled) or done: either way stop the worker

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, await parse(request, chat_prompt_ids), chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, await parse(request, completion_prompt_ids), chat=False)

    return app


def serve(path, *, host: str = "127.0.0.1", port: int = 8080, api_key: str | None = None, model_id: str | None = None,
          cache_len: int = 4096, threads: int | None = None, experts: str = "auto", verbose: bool = False,
          **load_kwargs) -> None:
    """Load the model at `path` and serve it until interrupted; load_kwargs go to `ktx.load` (placement...)."""
    from pathlib import Path

    import uvicorn

    import ktx

    model = ktx.load(path, cache_len=cache_len, threads=threads, experts=experts, verbose=verbose, **load_kwargs)
    name = model_id or Path(model.gguf.path).name.removesuffix(".gguf")
    app = create_app(model, name, api_key)
    print(f"ktx serve: {name} on http://{host}:{port}/v1 (KV cache {cache_len} tokens)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info" if verbose else "warning")
