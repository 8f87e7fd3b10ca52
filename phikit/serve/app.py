"""The HTTP layer: an OpenAI-compatible API (FastAPI + pydantic) in front of the engine thread.

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health. Requests
are validated here, before they reach the engine: every problem (malformed JSON, a wrong type, an
unknown role, an unsupported parameter, a prompt that does not fit the context, a body over the size
cap, a missing or wrong API key) comes back as a 4xx with OpenAI's error body
`{"error": {"message", "type", "param", "code"}}`, never a traceback.

Choices where the servers differ, and ours:
- max_tokens defaults to the context left for chat and to 16 for /v1/completions (OpenAI's legacy
  default, as vLLM); a larger value is capped by the context left (llama-server), not refused.
- temperature defaults to 1.0 (OpenAI, vLLM). presence/frequency penalties follow OpenAI's formula
  over the generated tokens (as vLLM). top_k, min_p, repetition_penalty and ignore_eos are accepted
  as extensions (llama-server, vLLM). Unknown fields are ignored (vLLM); fields we cannot honour
  (n > 1, logprobs, logit_bias, tools, echo, suffix, a JSON response_format) are a 400.
- A streamed response's last chunk (the one with finish_reason) carries usage (llama-server);
  with stream_options.include_usage an OpenAI-style usage chunk with no choices follows.
- The `model` field of a request picks a LoRA adapter when it names one (vLLM); any other value, or
  none, means the model itself (not checked: llama-server). /v1/models lists the model, then the adapters.
- phikit extensions of the request body: `"speculate": "prompt-lookup"` (or `"draft-model"` when the
  server has a --draft-model, or `"none"`) decodes that request speculatively (speculate.py; the same
  output, greedy token for token), default: the server's --speculate; `"show_special": true` keeps the
  text of special tokens that are not stop ids (<|endoftext|>, <|im_start|>, ...), hidden by default as in
  llama-server and transformers' skip_special_tokens; default: the server's --show-special.

References: OpenAI API reference (chat/completions, completions, error codes); vLLM
`entrypoints/openai/protocol.py` and `serving_chat.py`; llama.cpp `tools/server/server.cpp`;
mlx-lm `server.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid
from typing import Literal

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.background import BackgroundTask
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from ..chat_format import ChatFormatError, encode_chat, stop_ids
from ..generate import Sampling
from .engine import Engine, EngineClosed, Event, Request

MAX_BODY_BYTES = 4 * 1024 * 1024  # a prompt of 128k tokens is ~0.5 MB of text; JSON escapes can double it
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


# ---- request models ----------------------------------------------------------------------------

class Unsupported(ValueError):
    """A parameter we understand but cannot honour; `param` names it in the error body."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def _reject_unsupported(data):
    """Refuse the OpenAI parameters whose meaning we would silently ignore."""
    if not isinstance(data, dict):
        return data
    harmless = {"n": 1, "best_of": 1, "response_format": {"type": "text"}, "tool_choice": "none"}
    for key in ("n", "best_of", "logprobs", "top_logprobs", "logit_bias", "echo", "suffix", "tools", "functions",
                "response_format", "tool_choice"):
        value = data.get(key)
        if value in (None, False, [], {}) or (key in harmless and value == harmless[key]):
            continue
        if key in ("n", "best_of"):
            raise Unsupported(key, f"only {key}=1 is supported; send one request per completion")
        raise Unsupported(key, f"{key} is not supported by this server")
    return data


class _Params(BaseModel):
    """Sampling and stopping parameters shared by both endpoints. None means "the default"."""
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: list[str] | None = Field(None, max_length=16)
    seed: int | None = Field(None, ge=-2**63, le=2**64 - 1)
    stream: bool | None = False
    stream_options: dict | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    top_k: int | None = Field(None, ge=0)                        # extensions: llama-server, vLLM
    min_p: float | None = Field(None, ge=0, lt=1)
    repetition_penalty: float | None = Field(None, gt=0)
    ignore_eos: bool | None = False                            # run to max_tokens (llama-server, vLLM; benchmarks)
    speculate: Literal["prompt-lookup", "draft-model", "none"] | None = None  # phikit: see the module docstring
    show_special: bool | None = None

    _check_unsupported = model_validator(mode="before")(_reject_unsupported)

    @field_validator("stop", mode="before")
    @classmethod
    def _one_or_many(cls, v):
        if isinstance(v, str):
            return [v]
        if v is None or (isinstance(v, list) and all(isinstance(s, str) for s in v)):
            return v
        raise ValueError("must be a string or a list of strings")

    def sampling(self) -> Sampling:
        return Sampling(temperature=1.0 if self.temperature is None else self.temperature,
                        top_p=self.top_p or 1.0, top_k=self.top_k or 0, min_p=self.min_p or 0.0,
                        repetition_penalty=self.repetition_penalty or 1.0,
                        seed=None if self.seed is None else self.seed & (2**64 - 1))


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, v):
        """OpenAI's list-of-parts form: text parts are joined, anything else is refused."""
        if not isinstance(v, list):
            return v
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in v):
            raise ValueError("only text content parts ({'type': 'text', 'text': ...}) are supported")
        return "".join(p["text"] for p in v)


class ChatRequest(_Params):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens


class CompletionRequest(_Params):
    prompt: str | list[int]

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list) and len(v) == 1 and isinstance(v[0], str):
            return v[0]
        if isinstance(v, str) or (isinstance(v, list) and v and all(type(t) is int for t in v)):
            return v
        raise ValueError("must be a string, a list of one string, or a non-empty list of token ids "
                         "(batched prompts are not supported: send one request per prompt)")


# ---- errors ------------------------------------------------------------------------------------

def error(status: int, message: str, param: str | None = None, code: str | None = None,
          type_: str = "invalid_request_error", headers: dict | None = None) -> JSONResponse:
    """An OpenAI-style error response."""
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _describe(err: dict) -> tuple[str, str | None]:
    """(message, param) for one pydantic error, e.g. ("messages[0].role: Input should be ...", "messages[0].role")."""
    loc = list(err.get("loc", ()))
    if loc and loc[0] == "body":
        loc = loc[1:]
    if err.get("type") == "json_invalid":  # loc is (character offset,)
        where = f" at character {loc[0]}" if loc else ""
        return f"request body is not valid JSON: {err.get('ctx', {}).get('error', 'decode error')}{where}", None
    if not loc and err.get("type") in ("model_attributes_type", "dict_type", "model_type"):
        return "request body must be a JSON object", None
    param = ""
    for part in loc:
        param += f"[{part}]" if isinstance(part, int) else (f".{part}" if param else str(part))
    cause = err.get("ctx", {}).get("error")
    if isinstance(cause, Unsupported):
        return str(cause), cause.param
    msg = err.get("msg", "invalid value").removeprefix("Value error, ")
    if err.get("type") == "missing":
        return (f"missing required parameter '{param}'", param) if param else ("request body is missing", None)
    got = err.get("input")
    if err.get("type") != "missing" and isinstance(got, (str, int, float, bool)) and len(repr(got)) <= 40:
        msg += f" (got {got!r})"
    return (f"{param}: {msg}" if param else f"request body: {msg}"), param or None


async def _validation_error(request: HTTPRequest, exc: RequestValidationError) -> JSONResponse:
    message, param = _describe(exc.errors()[0])
    return error(400, message, param)


async def _http_error(request: HTTPRequest, exc: HTTPException) -> JSONResponse:
    messages = {404: f"no such endpoint: {request.method} {request.url.path}",
                405: f"method {request.method} is not allowed on {request.url.path}"}
    return error(exc.status_code, messages.get(exc.status_code, str(exc.detail)), headers=exc.headers)


async def _internal_error(request: HTTPRequest, exc: Exception) -> JSONResponse:
    return error(500, "internal server error", type_="server_error")


class BearerAuth:
    """ASGI middleware: every request must carry `Authorization: Bearer <key>` (constant-time compare)."""

    def __init__(self, app, api_key: str):
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.key):
                response = error(401, "missing or incorrect API key: send 'Authorization: Bearer <key>'",
                                 code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


class BodyLimit:
    """ASGI middleware: read the whole request body, answering 413 once it passes `max_bytes`.

    Checking here (rather than with FastAPI's own `max_body_size`) keeps the 413 in OpenAI's error
    format. The body is then replayed to the app; later `receive` calls (disconnect) pass through.
    """

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length", "")
        size = int(declared) if declared.isdigit() else 0  # refuse a declared size before reading it
        chunks, read, more = [], 0, size <= self.max_bytes
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending its body
                return
            chunks.append(message.get("body", b""))
            read += len(chunks[-1])
            more = message.get("more_body", False) and read <= self.max_bytes
        if max(size, read) > self.max_bytes:
            return await error(413, f"request body is larger than {self.max_bytes} bytes",
                               code="request_too_large")(scope, receive, send)
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        async def replay():
            nonlocal body
            if body is None:
                return await receive()
            message, body = body, None
            return message

        await self.app(scope, replay, send)


# ---- the app -----------------------------------------------------------------------------------

def create_app(engine: Engine, model_id: str, api_key: str | None = None,
               max_body_bytes: int = MAX_BODY_BYTES, speculate: str | None = None,
               show_special: bool = False) -> FastAPI:
    """The FastAPI app serving `engine`; the engine is closed when the app shuts down.

    speculate (one of engine.drafters) and show_special are the defaults of requests that do not say.
    """
    if speculate is not None and speculate not in engine.drafters:
        raise ValueError(f"speculate={speculate!r} is not one of the engine's drafters ({', '.join(engine.drafters)})")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        # uvicorn has let in-flight requests finish (or cancelled them after its grace period)
        await asyncio.to_thread(engine.close, True, 60.0)

    app = FastAPI(title="phikit", lifespan=lifespan, docs_url=None, redoc_url=None,
                  exception_handlers={RequestValidationError: _validation_error, HTTPException: _http_error,
                                      Exception: _internal_error})
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    if api_key:  # added last, so it runs first: no body is read for an unauthenticated request
        app.add_middleware(BearerAuth, api_key=api_key)
    tokenizer = engine.tokenizer
    chat_stop_ids = frozenset(stop_ids(tokenizer))
    created = int(time.time())

    @app.get("/health")
    async def health():
        if engine.closed:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        card = {"object": "model", "created": created, "owned_by": "phikit", "max_model_len": engine.max_context}
        return {"object": "list", "data": [{"id": model_id, **card}] +
                [{"id": name, **card, "parent": model_id} for name in engine.adapters]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: HTTPRequest):
        try:  # off the event loop: a long prompt must not stall the other streams
            ids = await asyncio.to_thread(encode_chat, [m.model_dump() for m in body.messages], tokenizer)
        except ChatFormatError as e:
            return error(400, str(e), "messages")
        limit = body.max_completion_tokens or body.max_tokens
        return await _complete(request, body, ids, limit, "messages", chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: HTTPRequest):
        if isinstance(body.prompt, str):
            ids = await asyncio.to_thread(tokenizer.encode, body.prompt, True)
        else:
            ids = body.prompt
            if min(ids) < 0 or max(ids) >= engine.vocab:
                return error(400, f"prompt: token ids must be in 0..{engine.vocab - 1}", "prompt")
        return await _complete(request, body, ids, body.max_tokens or COMPLETIONS_DEFAULT_MAX_TOKENS, "prompt",
                               chat=False)

    async def _complete(request: HTTPRequest, body: _Params, ids: list[int], max_tokens: int | None, param: str,
                        chat: bool):
        if not ids:
            return error(400, f"{param}: the prompt encodes to no tokens", param)
        left = engine.max_context - len(ids)
        if left < 1:
            return error(400, f"this model's maximum context length is {engine.max_context} tokens, but the "
                              f"prompt has {len(ids)} tokens", param, code="context_length_exceeded")
        spec = speculate if body.speculate is None else None if body.speculate == "none" else body.speculate
        if spec is not None and spec not in engine.drafters:
            return error(400, f"speculate: this server has no {spec} drafter (phikit serve --draft-model M loads "
                              "one)", "speculate")
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        adapter = body.model if body.model in engine.adapters else None
        req = Request(prompt=ids, max_tokens=min(max_tokens or left, left), sampling=body.sampling(),
                      stop_ids=frozenset() if body.ignore_eos else chat_stop_ids, stop_strings=tuple(s for s in body.stop or () if s),
                      presence_penalty=body.presence_penalty or 0.0, frequency_penalty=body.frequency_penalty or 0.0,
                      adapter=adapter, speculate=spec,
                      show_special=show_special if body.show_special is None else body.show_special,
                      emit=lambda event: loop.call_soon_threadsafe(queue.put_nowait, event))
        try:
            engine.submit(req)
        except EngineClosed as e:
            return error(503, str(e), type_="server_error", code="shutting_down")
        kind = "chat.completion" if chat else "text_completion"
        meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": adapter or model_id}
        events = _events(engine, req, queue)
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            # the background task also cancels a request whose client left before the first chunk
            return StreamingResponse(_sse(events, meta, kind, chat, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                     background=BackgroundTask(_cancel, engine, req))
        watcher = asyncio.create_task(_cancel_on_disconnect(request, engine, req, queue))
        try:
            text, last = [], Event()
            async for event in events:
                text.append(event.text)
                last = event
        finally:
            watcher.cancel()
        if last.finish_reason == "cancelled":
            return error(503, last.error or "cancelled", type_="server_error", code="cancelled")
        if last.finish_reason == "error":
            return error(500, f"generation failed: {last.error}", type_="server_error")
        text = "".join(text)
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                   "finish_reason": last.finish_reason} if chat else
                  {"index": 0, "text": text, "logprobs": None, "finish_reason": last.finish_reason})
        return {**meta, "object": kind, "choices": [choice], "usage": _usage(last)}

    return app


async def _events(engine: Engine, req: Request, queue: asyncio.Queue):
    """The request's events until its finish; leaving early (client gone) cancels it in the engine."""
    try:
        while True:
            event = await queue.get()
            yield event
            if event.finish_reason is not None:
                return
    finally:
        engine.cancel(req)  # a no-op for a finished request


async def _cancel(engine: Engine, req: Request) -> None:
    engine.cancel(req)


async def _cancel_on_disconnect(request: HTTPRequest, engine: Engine, req: Request, queue: asyncio.Queue):
    """For a non-streamed request: when the client hangs up, cancel the request and wake the waiter."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    engine.cancel(req)
    queue.put_nowait(Event(finish_reason="cancelled", error="client disconnected"))


def _usage(event: Event) -> dict:
    return {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
            "total_tokens": event.prompt_tokens + event.completion_tokens}


async def _sse(events, meta: dict, kind: str, chat: bool, include_usage: bool):
    """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`."""
    kind += ".chunk" if chat else ""

    def chunk(text: str | None, finish: str | None, **extra) -> str:
        if chat:
            delta = {} if text is None else {"content": text}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return _data({**meta, "object": kind, "choices": [choice], **extra})

    if chat:  # OpenAI's first chunk announces the role
        yield _data({**meta, "object": kind, "choices": [
            {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]})
    async for event in events:
        if event.finish_reason in ("error", "cancelled"):
            yield _data({"error": {"message": f"generation failed: {event.error}", "type": "server_error",
                                   "param": None, "code": event.finish_reason}})
            break
        if event.text:
            yield chunk(event.text, None)
        if event.finish_reason is not None:
            yield chunk(None, event.finish_reason, usage=_usage(event))
            if include_usage:
                yield _data({**meta, "object": kind, "choices": [], "usage": _usage(event)})
    yield "data: [DONE]\n\n"


def _data(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
