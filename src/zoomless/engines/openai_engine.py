"""An Engine that talks to any OpenAI-compatible chat-completions endpoint (vLLM, SGLang, providers).

Our own retry policy (the client's is switched off): exponential backoff with full jitter on 429,
408, 5xx, timeouts, connection errors and unreadable replies, honouring Retry-After; any other 4xx
fails at once. A conversation that could not be answered gets error placeholders
(`Generation(text="", finish_reason="error", error="HTTP 400: ...")`) that callers must never count
as answers. The engine runs its own asyncio loop in a daemon thread, so `generate` works from plain
code, from worker threads and from inside a running loop, and the concurrency bound holds across
all of them.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import io
import math
import random
import threading
import time
from typing import Any, Mapping, Sequence

import openai
from PIL import Image

from zoomless.engines.base import Conversation, Generation, SamplingParams

USAGE_KEYS = ("prompt_tokens", "completion_tokens", "requests", "retries", "errors")


class RequestFailed(Exception):
    """One request failed; `retryable` says whether another attempt may succeed."""

    def __init__(self, message: str, retryable: bool, retry_after: float | None = None, status: int | None = None):
        super().__init__(message)
        self.retryable = retryable
        self.retry_after = retry_after
        self.status = status


# ----------------------------------------------------------------------------- images


def downscale(image: Image.Image, max_pixels: int) -> Image.Image:
    """Shrink (keeping the aspect ratio) so width * height <= max_pixels; smaller images are returned as is."""
    w, h = image.size
    if w * h <= max_pixels:
        return image
    s = math.sqrt(max_pixels / (w * h))
    size = (max(1, int(w * s)), max(1, int(h * s)))
    return image.resize(size, Image.Resampling.LANCZOS)


def image_data_uri(image: Image.Image, max_pixels: int, fmt: str = "png") -> str:
    """A `data:image/...;base64,` URI of the image downscaled to the pixel budget.

    PNG (default) is lossless: the server sees exactly our pixels, which matters for small details.
    """
    image = downscale(image, max_pixels)
    fmt = fmt.lower()
    if fmt in ("jpg", "jpeg"):
        fmt, mime = "JPEG", "image/jpeg"
        if image.mode not in ("RGB", "L"):
            image = image.convert("RGB")
    elif fmt == "png":
        fmt, mime = "PNG", "image/png"
        if image.mode not in ("RGB", "RGBA", "L", "LA", "P", "1"):
            image = image.convert("RGB")
    else:
        raise ValueError(f"image format must be 'png' or 'jpeg', got {fmt!r}")
    buf = io.BytesIO()
    image.save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return f"data:{mime};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def to_openai_messages(conv: Conversation, max_pixels: int, fmt: str = "png") -> list[dict[str, Any]]:
    """engines/base.py conversation -> OpenAI chat messages (PIL images become data-URI image_url parts)."""
    out = []
    for msg in conv:
        content = msg["content"]
        if not isinstance(content, str):
            content = [_to_openai_part(item, max_pixels, fmt) for item in content]
        out.append({"role": msg["role"], "content": content})
    return out


def _to_openai_part(item: Mapping[str, Any], max_pixels: int, fmt: str) -> dict[str, Any]:
    if item["type"] == "text":
        return {"type": "text", "text": item["text"]}
    if item["type"] == "image":
        return {"type": "image_url", "image_url": {"url": image_data_uri(item["image"], max_pixels, fmt)}}
    return dict(item)  # already an OpenAI image_url part


def check_conversations(conversations: Sequence[Conversation]) -> None:
    """Fail fast, before any request, on a conversation that is not in engines/base.py's form."""
    if isinstance(conversations, Mapping) or (conversations and isinstance(conversations[0], Mapping)):
        raise TypeError("generate expects a list of conversations (each a list of messages), got one conversation")
    for c, conv in enumerate(conversations):
        for i, msg in enumerate(conv):
            where = f"conversation {c} message {i}"
            if not isinstance(msg, Mapping) or "role" not in msg:
                raise ValueError(f"{where}: a message must be a dict with 'role' and 'content'")
            content = msg.get("content")
            if isinstance(content, str):
                continue
            if not isinstance(content, list):
                raise ValueError(f"{where}: 'content' must be a string or a list of parts")
            for j, item in enumerate(content):
                kind = item.get("type") if isinstance(item, Mapping) else None
                if kind == "image" and not isinstance(item.get("image"), Image.Image):
                    got = type(item.get("image")).__name__
                    raise TypeError(f"{where} content {j}: 'image' must be a PIL image, got {got}")
                if kind not in ("text", "image", "image_url"):
                    raise ValueError(f"{where} content {j}: unknown part type {kind!r} (expected text or image)")


# ----------------------------------------------------------------------------- errors and backoff


def retry_after_seconds(headers: Mapping[str, str] | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP date); None if absent or unreadable."""
    value = (headers or {}).get("retry-after")
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _status_message(e: openai.APIStatusError) -> str:
    body = e.body
    if isinstance(body, Mapping):
        body = body.get("error", body)
        if isinstance(body, Mapping):
            body = body.get("message") or body.get("detail") or body
    text = " ".join(str(body if body not in (None, "") else e.response.reason_phrase).split())
    return text[:500]


def classify(e: BaseException) -> RequestFailed:
    """Turn a client exception into a RequestFailed that says whether to retry."""
    if isinstance(e, openai.APIStatusError):
        status = e.status_code
        retryable = status in (408, 429) or status >= 500
        after = retry_after_seconds(e.response.headers) if retryable else None
        return RequestFailed(f"HTTP {status}: {_status_message(e)}", retryable, after, status)
    if isinstance(e, (openai.APITimeoutError, TimeoutError)):
        return RequestFailed("timeout: no complete reply in time", True)
    if isinstance(e, openai.APIConnectionError):
        cause = e.__cause__ or e.__context__
        return RequestFailed(f"connection error: {cause or e}", True)
    # 200 with a body that is not a chat completion (bad JSON, HTML from a proxy, missing fields)
    return RequestFailed(f"invalid response: {type(e).__name__}: {e}"[:500], True)


def backoff_delay(attempt: int, base_s: float, max_s: float, retry_after: float | None) -> float:
    """Full jitter: uniform(0, min(max, base * 2**attempt)); a server's Retry-After wins (capped at max_s)."""
    if retry_after is not None:
        return min(retry_after, max_s)
    return random.uniform(0.0, min(max_s, base_s * 2.0**attempt))


# ----------------------------------------------------------------------------- the engine


class OpenAIEngine:
    """Engine over `{base_url}/chat/completions` (base_url as the openai client takes it, e.g. ".../v1").

    - At most `max_concurrency` conversations in flight (one engine-wide semaphore).
    - Each request: up to 1 + `max_retries` attempts, each under a `timeout_s` deadline.
    - Images are downscaled to `max_image_pixels` (aspect kept) and sent as PNG (or JPEG) data URIs.
    - `n > 1` is asked for in one request; a server that returns fewer choices (or rejects n with a
      400) gets the rest as single requests with seeds seed+1, seed+2, ... (`n_supported` remembers).
    - `usage`: prompt_tokens and completion_tokens (as the server reports them), requests (attempts
      made), retries, errors (requests that failed for good).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        *,
        max_concurrency: int = 8,
        timeout_s: float = 60,
        max_retries: int = 5,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 30,
        max_image_pixels: int = 1024 * 1024,
        image_format: str = "png",
        name: str | None = None,
    ):
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.base_url = base_url
        self.model = model
        self.name = name or f"openai:{model}"
        self.max_concurrency = max_concurrency
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.max_image_pixels = max_image_pixels
        self.image_format = image_format
        self.usage: dict[str, int] = dict.fromkeys(USAGE_KEYS, 0)
        self.n_supported: bool | None = None  # learnt from the first reply to a request with n > 1
        self._api_key = api_key
        self._client: openai.AsyncOpenAI | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._sem: asyncio.Semaphore | None = None
        self._start_lock = threading.Lock()

    # -- the loop thread

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._start_lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                self._thread = threading.Thread(target=loop.run_forever, name=f"{self.name}-loop", daemon=True)
                self._thread.start()
                self._loop, self._sem = loop, None
                # The client insists on a key; with none we send vLLM's placeholder "EMPTY".
                self._client = openai.AsyncOpenAI(
                    base_url=self.base_url, api_key=self._api_key or "EMPTY", max_retries=0, timeout=self.timeout_s
                )
            return self._loop

    def close(self) -> None:
        """Close the HTTP client and stop the loop thread (also fine to skip: the thread is a daemon)."""
        with self._start_lock:
            loop, self._loop = self._loop, None
        if loop is None:
            return
        asyncio.run_coroutine_threadsafe(self._client.close(), loop).result(timeout=10)
        self._client = None
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)
        loop.close()

    def __enter__(self) -> OpenAIEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- public API

    def generate(self, conversations: Sequence[Conversation], params: SamplingParams) -> list[list[Generation]]:
        """Blocking; safe from any thread. Returns `params.n` generations per conversation, in order."""
        check_conversations(conversations)
        loop = self._ensure_loop()
        if threading.current_thread() is self._thread:
            raise RuntimeError("OpenAIEngine.generate called from its own loop thread; use agenerate")
        fut = asyncio.run_coroutine_threadsafe(self._generate_all(conversations, params), loop)
        try:
            return fut.result()
        except BaseException:
            fut.cancel()  # e.g. KeyboardInterrupt: stop the requests still in flight
            raise

    async def agenerate(self, conversations: Sequence[Conversation], params: SamplingParams) -> list[list[Generation]]:
        """The same as `generate`, awaitable from any event loop."""
        check_conversations(conversations)
        fut = asyncio.run_coroutine_threadsafe(self._generate_all(conversations, params), self._ensure_loop())
        return await asyncio.wrap_future(fut)

    # -- on the loop thread

    async def _generate_all(self, conversations: Sequence[Conversation], params: SamplingParams) -> list[list[Generation]]:
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.max_concurrency)
        return list(await asyncio.gather(*(self._one(c, params) for c in conversations)))

    async def _one(self, conv: Conversation, params: SamplingParams) -> list[Generation]:
        # The slot is held for encoding, the requests and their backoff: at most max_concurrency
        # conversations are in flight, and no more than that many images sit encoded in memory.
        async with self._sem:
            messages = await asyncio.to_thread(to_openai_messages, conv, self.max_image_pixels, self.image_format)
            gens: list[Generation] = []
            n_rejected = False
            if params.n > 1 and self.n_supported is not False:
                try:
                    gens = await self._request(messages, params, params.n, params.seed)
                except RequestFailed as e:
                    if e.status != 400:
                        return [_error(str(e)) for _ in range(params.n)]
                    n_rejected = True  # maybe only "n > 1 unsupported": one single request tells
                else:
                    self.n_supported = len(gens) >= params.n
            while len(gens) < params.n:
                seed = None if params.seed is None else params.seed + len(gens)  # same seed would repeat the sample
                try:
                    gens += await self._request(messages, params, 1, seed)
                except RequestFailed as e:
                    gens += [_error(str(e)) for _ in range(params.n - len(gens))]
                else:
                    if n_rejected:
                        self.n_supported = False
            return gens[: params.n]

    async def _request(self, messages: list[dict], params: SamplingParams, n: int, seed: int | None) -> list[Generation]:
        """One chat completion with our retry policy; raises RequestFailed when out of attempts."""
        kwargs: dict[str, Any] = dict(
            model=self.model, messages=messages, max_tokens=params.max_new_tokens,
            temperature=params.temperature, top_p=params.top_p,
        )
        if n > 1:
            kwargs["n"] = n
        if seed is not None:
            kwargs["seed"] = seed
        if params.logprobs:
            kwargs["logprobs"] = True
        for attempt in range(self.max_retries + 1):
            self.usage["requests"] += 1
            try:
                async with asyncio.timeout(self.timeout_s):  # a whole-reply deadline, also for trickling servers
                    reply = await self._client.chat.completions.create(**kwargs)
                return self._parse(reply, params.logprobs)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - classify() sorts every failure into retry / fail
                failure = classify(e)
            if not failure.retryable or attempt == self.max_retries:
                break
            self.usage["retries"] += 1
            await asyncio.sleep(backoff_delay(attempt, self.backoff_base_s, self.backoff_max_s, failure.retry_after))
        self.usage["errors"] += 1
        raise failure

    def _parse(self, reply: Any, want_logprobs: bool) -> list[Generation]:
        choices = sorted(reply.choices, key=lambda c: c.index or 0)
        if not choices:
            raise ValueError("reply has no choices")
        gens = []
        prompt_tokens = (reply.usage.prompt_tokens or 0) if reply.usage is not None else 0
        for c in choices:
            text = c.message.content or ""
            logprobs = None
            if want_logprobs and c.logprobs is not None and c.logprobs.content is not None:
                logprobs = [t.logprob for t in c.logprobs.content]
            if c.finish_reason == "content_filter":
                gens.append(_error("the provider's content filter blocked the reply"))
            else:
                reason = "length" if c.finish_reason == "length" else "stop"
                gens.append(Generation(text=text, logprobs=logprobs, finish_reason=reason, prompt_tokens=prompt_tokens))
        if reply.usage is not None:  # counted only for replies we could read
            self.usage["prompt_tokens"] += prompt_tokens
            self.usage["completion_tokens"] += reply.usage.completion_tokens or 0
        return gens


def _error(message: str) -> Generation:
    return Generation(text="", finish_reason="error", error=message)
