"""Serve an in-process engine over an OpenAI-compatible HTTP API (the subset zoomless itself uses).

    POST /v1/chat/completions   messages (text + data-URI images), temperature, top_p, max_tokens /
                                max_completion_tokens, n, seed, logprobs
    GET  /v1/models             the one model served
    GET  /health                liveness, no key needed

Safe defaults: loopback only, optional Bearer key, a request-size limit (413), a pixel limit per
image (400 naming the message), and images only inline as data: URIs (the server never downloads).
Errors are OpenAI-shaped JSON, `{"error": {"message", "type", "param", "code"}}`, so the openai
client raises its usual exceptions.

The engine runs one batch at a time in a worker thread; requests with the same sampling parameters
that arrive while a batch runs are merged into the next batch (micro-batching).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import hmac
import ipaddress
import json
import logging
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from zoomless.engines.base import Conversation, Engine, Generation, SamplingParams
from zoomless.imaging import ImageError, load_image

log = logging.getLogger("zoomless.serve")

DEFAULT_MAX_REQUEST_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096
DEFAULT_MAX_TOKENS = 512  # when the request names none (OpenAI would run to the context length)


class APIError(Exception):
    """An error reply: HTTP status plus OpenAI's error object."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        body = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return JSONResponse({"error": body}, status_code=self.status)


# ----------------------------------------------------------------------------- request schema


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ImageURL(_Strict):
    url: str
    detail: str | None = None


class ContentPart(_Strict):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | str | None = None


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class ChatRequest(_Strict):
    model: str | None = None
    messages: list[ChatMessage]
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    n: int | None = None
    seed: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    stream: bool | None = None
    stop: str | list[str] | None = None
    tools: list[Any] | None = None


def _where(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def parse_request(body: bytes) -> ChatRequest:
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise APIError(400, f"request body is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object")
    try:
        return ChatRequest.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        # pydantic adds the union branch (e.g. "list[ContentPart]") to the location; drop those
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p in ("str", "ImageURL"))))
        where = _where(loc)
        raise APIError(400, f"{where}: {err['msg']}", param=where or None) from None


def sampling_params(req: ChatRequest, max_n: int, max_tokens_limit: int) -> SamplingParams:
    """The request's sampling fields as SamplingParams, with OpenAI's defaults (temperature 1, top_p 1, n 1)."""
    for field, bad in (("stream", req.stream), ("stop", req.stop), ("tools", req.tools), ("top_logprobs", req.top_logprobs)):
        if bad:
            raise APIError(400, f"{field} is not supported by this server", param=field)
    temperature = 1.0 if req.temperature is None else req.temperature
    top_p = 1.0 if req.top_p is None else req.top_p
    n = 1 if req.n is None else req.n
    max_tokens = req.max_completion_tokens or req.max_tokens or min(DEFAULT_MAX_TOKENS, max_tokens_limit)
    checks = (
        ("temperature", 0.0 <= temperature <= 2.0, "must be between 0 and 2"),
        ("top_p", 0.0 < top_p <= 1.0, "must be in (0, 1]"),
        ("n", 1 <= n <= max_n, f"must be between 1 and {max_n}"),
        ("max_tokens", 1 <= max_tokens <= max_tokens_limit, f"must be between 1 and {max_tokens_limit}"),
    )
    for field, ok, rule in checks:
        if not ok:
            raise APIError(400, f"{field} {rule}", param=field)
    return SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, n=n,
                          seed=req.seed, logprobs=bool(req.logprobs))


def decode_data_uri(url: str, max_pixels: int, where: str):
    """An inline `data:image/...;base64,...` URI -> RGB PIL image; anything else is a 400 naming `where`."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme in ("http", "https"):
        raise APIError(400, f"{where}: image URLs are not fetched by this server; send the image inline "
                            "as a data:image/...;base64 URI", param=where)
    if scheme != "data":
        raise APIError(400, f"{where}: expected a data:image/...;base64 URI, got {url[:40]!r}", param=where)
    header, sep, payload = url.partition(",")
    if not sep or not header.lower().endswith(";base64"):
        raise APIError(400, f"{where}: the data URI must be base64 encoded (data:image/png;base64,...)", param=where)
    try:
        raw = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{where}: the image data is not valid base64", param=where) from None
    try:
        return load_image(raw, max_pixels=max_pixels, name=where)
    except ImageError as e:
        raise APIError(400, str(e), param=where) from None


def to_conversation(req: ChatRequest, max_pixels: int) -> Conversation:
    """OpenAI messages -> engines/base.py conversation (images decoded, each checked against max_pixels)."""
    conv: Conversation = []
    for i, msg in enumerate(req.messages):
        if msg.content is None:
            raise APIError(400, f"messages[{i}].content: missing", param=f"messages[{i}].content")
        if isinstance(msg.content, str):
            conv.append({"role": msg.role, "content": [{"type": "text", "text": msg.content}]})
            continue
        parts = []
        for j, part in enumerate(msg.content):
            where = f"messages[{i}].content[{j}]"
            if part.type == "text":
                if part.text is None:
                    raise APIError(400, f"{where}: a text part needs 'text'", param=where)
                parts.append({"type": "text", "text": part.text})
            else:
                if part.image_url is None:
                    raise APIError(400, f"{where}: an image_url part needs 'image_url'", param=where)
                url = part.image_url if isinstance(part.image_url, str) else part.image_url.url
                parts.append({"type": "image", "image": decode_data_uri(url, max_pixels, where)})
        conv.append({"role": msg.role, "content": parts})
    if not conv:
        raise APIError(400, "messages: at least one message is needed", param="messages")
    return conv


# ----------------------------------------------------------------------------- batching


@dataclass
class _Job:
    conversations: list[Conversation]
    params: SamplingParams
    future: asyncio.Future


class Batcher:
    """Runs engine.generate one batch at a time in a worker thread, merging queued compatible requests.

    Requests merge only when their SamplingParams are equal and carry no seed (a seed fixes one
    request's samples; sharing a batch would make them depend on its neighbours).
    """

    def __init__(self, engine: Engine, max_batch: int = 64):
        self.engine = engine
        self.max_batch = max_batch
        self._pending: collections.deque[_Job] = collections.deque()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    async def generate(self, conversations: list[Conversation], params: SamplingParams) -> list[list[Generation]]:
        if self._wake is None:
            self._wake = asyncio.Event()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())
        job = _Job(conversations, params, asyncio.get_running_loop().create_future())
        self._pending.append(job)
        self._wake.set()
        return await job.future

    def _take_batch(self) -> list[_Job]:
        first = self._pending.popleft()
        batch, size, rest = [first], len(first.conversations), collections.deque()
        for job in self._pending:
            fits = size + len(job.conversations) <= self.max_batch
            if first.params.seed is None and job.params == first.params and fits and not job.future.done():
                batch.append(job)
                size += len(job.conversations)
            else:
                rest.append(job)
        self._pending = rest
        return [job for job in batch if not job.future.done()]  # drop requests whose client went away

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                batch = self._take_batch()
                if not batch:
                    continue
                convs = [c for job in batch for c in job.conversations]
                try:
                    results = await asyncio.to_thread(self.engine.generate, convs, batch[0].params)
                except Exception as e:  # noqa: BLE001 - reported to every request of the batch
                    for job in batch:
                        if not job.future.done():
                            job.future.set_exception(e)
                    continue
                start = 0
                for job in batch:
                    end = start + len(job.conversations)
                    if not job.future.done():
                        job.future.set_result(results[start:end])
                    start = end


# ----------------------------------------------------------------------------- the app


def _token_texts(engine: Engine, token_ids: list[int]) -> list[str]:
    """Each token id as text, if the engine exposes a tokenizer (HF engines do); else empty strings."""
    processor = getattr(engine, "processor", None)
    tokenizer = getattr(processor, "tokenizer", None) or getattr(engine, "tokenizer", None)
    if tokenizer is None:
        return [""] * len(token_ids)
    return [tokenizer.decode([t]) for t in token_ids]


def _choice(engine: Engine, index: int, gen: Generation, want_logprobs: bool) -> dict[str, Any]:
    choice: dict[str, Any] = {
        "index": index,
        "message": {"role": "assistant", "content": gen.text},
        "finish_reason": gen.finish_reason,
        "logprobs": None,
    }
    if want_logprobs and gen.logprobs is not None:
        tokens = _token_texts(engine, gen.token_ids[: len(gen.logprobs)])
        tokens += [""] * (len(gen.logprobs) - len(tokens))
        choice["logprobs"] = {
            "content": [
                {"token": tok, "logprob": lp, "bytes": list(tok.encode("utf-8")), "top_logprobs": []}
                for tok, lp in zip(tokens, gen.logprobs)
            ]
        }
    return choice


def _check_key(request: Request, api_key: str | None) -> None:
    if api_key is None:
        return
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise APIError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                       type="authentication_error", code="invalid_api_key")


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    too_big = APIError(413, f"request body is over the server limit of {limit:,} bytes "
                            "(send smaller images or raise the server's max_request_bytes)")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_big
    return bytes(body)


def create_app(
    engine: Engine,
    model_name: str,
    api_key: str | None = None,
    *,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    max_n: int = 16,
    max_tokens_limit: int = 4096,
    max_batch: int = 64,
) -> FastAPI:
    """The FastAPI app that serves `engine` under the name `model_name`."""
    app = FastAPI(title="zoomless", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.model_name = engine, model_name
    batcher = Batcher(engine, max_batch=max_batch)
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return APIError(e.status_code, str(e.detail), type="invalid_request_error").response()

    @app.exception_handler(Exception)
    async def _crash(_: Request, e: Exception) -> JSONResponse:  # starlette re-raises it, uvicorn logs it
        return APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error").response()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "zoomless"}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        _check_key(request, api_key)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request) -> dict[str, Any]:
        _check_key(request, api_key)
        if model_id != model_name:
            raise APIError(404, f"model {model_id!r} not found; this server serves {model_name!r}",
                           param="model", code="model_not_found")
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> dict[str, Any]:
        _check_key(request, api_key)
        req = parse_request(await _read_body(request, max_request_bytes))
        if req.model is not None and req.model != model_name:
            raise APIError(404, f"model {req.model!r} not found; this server serves {model_name!r}",
                           param="model", code="model_not_found")
        params = sampling_params(req, max_n, max_tokens_limit)
        conv = await asyncio.to_thread(to_conversation, req, max_image_pixels)  # decoding is CPU work
        gens = (await batcher.generate([conv], params))[0]
        failed = [g.error for g in gens if g.error or g.finish_reason == "error"]
        if failed:  # HFEngine reports only input problems this way (crashes raise): a client error
            raise APIError(400, f"the model could not process this request: {failed[0]}")
        completion_tokens = sum(len(g.token_ids) for g in gens)
        prompt_tokens = max((g.prompt_tokens for g in gens), default=0)  # one prompt, however many choices
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model_name,
            "choices": [_choice(engine, i, g, params.logprobs) for i, g in enumerate(gens)],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }

    return app


# ----------------------------------------------------------------------------- running it


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@contextmanager
def running(app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> Iterator[str]:
    """Run an ASGI app with uvicorn in a daemon thread; yields its base URL; stops it on exit.

    port=0 picks a free port; the socket is bound before the thread starts, so there is no race.
    """
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise RuntimeError(f"the server on {host}:{sock.getsockname()[1]} did not start")
        time.sleep(0.01)
    bound_port = sock.getsockname()[1]
    try:
        yield f"http://{'[' + host + ']' if ':' in host else host}:{bound_port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def load_app(
    model_dir: str | Path,
    api_key: str | None = None,
    *,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    model_name: str | None = None,
    **load_kwargs: Any,
) -> FastAPI:
    """Load a local HF model directory into an HFEngine and wrap it in the app (named after the folder)."""
    from zoomless.engines.hf import HFEngine

    engine = HFEngine.from_dir(model_dir, **load_kwargs)
    name = model_name or Path(model_dir).resolve().name
    return create_app(engine, name, api_key, max_request_bytes=max_request_bytes, max_image_pixels=max_image_pixels)


def serve(
    model_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    model_name: str | None = None,
    **load_kwargs: Any,
) -> None:
    """Load a local HF model directory and serve it until interrupted (blocks).

    `load_kwargs` go to HFEngine.from_dir (device, dtype, batch_size, min_pixels, max_pixels ...).
    """
    app = load_app(model_dir, api_key, max_request_bytes=max_request_bytes, max_image_pixels=max_image_pixels,
                   model_name=model_name, **load_kwargs)
    if not _is_loopback(host) and api_key is None:
        log.warning("serving on %s without an API key: anyone who can reach this address can use the model", host)
    print(f"zoomless: serving {app.state.model_name!r} at http://{host}:{port}/v1 (OpenAI-compatible)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info")
