"""OpenAIEngine against a real HTTP stub server on loopback that serves scripted replies."""

from __future__ import annotations

import asyncio
import base64
import email.utils
import io
import socket
import time

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from PIL import Image

from zoomless.engines.base import SamplingParams, conversation
from zoomless.engines.openai_engine import OpenAIEngine, backoff_delay, downscale, retry_after_seconds
from zoomless.serve import running

GREEDY = SamplingParams(max_new_tokens=8, temperature=0.0)


class Stub:
    """Each request pops the next scripted action; with the script empty it answers normally.

    Actions: ("status", code, headers), ("sleep", seconds), ("garbage",), ("ok",).
    A normal answer is "echo:<last text part>", with min(n, max_choices) choices.
    """

    def __init__(self, script=(), delay: float = 0.0, max_choices: int = 99, reject_n: bool = False):
        self.script = list(script)
        self.delay = delay
        self.max_choices = max_choices
        self.reject_n = reject_n
        self.requests: list[dict] = []
        self.arrivals: list[float] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.app = FastAPI()
        self.app.post("/v1/chat/completions")(self.chat)

    async def chat(self, request: Request):
        body = await request.json()
        self.requests.append(body)
        self.arrivals.append(time.monotonic())
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self._answer(body)
        finally:
            self.in_flight -= 1

    async def _answer(self, body: dict):
        action = self.script.pop(0) if self.script else ("ok",)
        if action[0] == "status":
            error = {"error": {"message": f"scripted {action[1]}", "type": "test"}}
            return JSONResponse(error, status_code=action[1], headers=action[2] if len(action) > 2 else None)
        if action[0] == "garbage":
            return PlainTextResponse("<html>not json", media_type="application/json")
        if action[0] == "sleep":
            await asyncio.sleep(action[1])
        if self.reject_n and body.get("n", 1) > 1:
            return JSONResponse({"error": {"message": "n must be 1"}}, status_code=400)
        await asyncio.sleep(self.delay)
        text = [p["text"] for p in body["messages"][-1]["content"] if p["type"] == "text"][-1]
        n = min(body.get("n", 1), self.max_choices)
        choices = []
        for i in range(n):
            logprobs = {"content": [{"token": "a", "logprob": -0.5, "bytes": [97], "top_logprobs": []}]}
            choices.append({
                "index": i, "finish_reason": "length" if body["max_tokens"] <= 2 else "stop",
                "message": {"role": "assistant", "content": f"echo:{text}"},
                "logprobs": logprobs if body.get("logprobs") else None,
            })
        usage = {"prompt_tokens": 10, "completion_tokens": 2 * n, "total_tokens": 10 + 2 * n}
        return {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": choices, "usage": usage}


@pytest.fixture
def serve_stub():
    started = []

    def start(stub: Stub) -> str:
        ctx = running(stub.app)
        started.append(ctx)
        return ctx.__enter__() + "/v1"

    yield start
    for ctx in started:
        ctx.__exit__(None, None, None)


_engines: list[OpenAIEngine] = []


def engine(url: str, **kw) -> OpenAIEngine:
    """An engine with tiny backoff settings, closed after the test."""
    settings = dict(timeout_s=5, max_retries=3, backoff_base_s=0.01, backoff_max_s=0.05)
    settings.update(kw)
    _engines.append(OpenAIEngine(url, "stub-model", **settings))
    return _engines[-1]


@pytest.fixture(autouse=True)
def _close_engines():
    yield
    while _engines:
        _engines.pop().close()


def image(w: int, h: int) -> Image.Image:
    im = Image.new("RGB", (w, h), (10, 20, 30))
    im.putpixel((0, 0), (255, 0, 0))
    return im


def test_request_fields_and_reply_mapping(serve_stub):
    stub = Stub()
    eng = engine(serve_stub(stub))
    params = SamplingParams(max_new_tokens=7, temperature=0.5, top_p=0.9, seed=3, logprobs=True)
    out = eng.generate([conversation([], "q1"), conversation([], "q2", system="be brief")], params)
    assert [[g.text for g in gens] for gens in out] == [["echo:q1"], ["echo:q2"]]
    g = out[0][0]
    assert g.finish_reason == "stop" and g.error is None and g.token_ids == [] and g.logprobs == [-0.5]
    sent = sorted(stub.requests, key=lambda b: len(b["messages"]))[0]
    assert sent["model"] == "stub-model" and sent["max_tokens"] == 7 and sent["temperature"] == 0.5
    assert sent["top_p"] == 0.9 and sent["seed"] == 3 and sent["logprobs"] is True and "n" not in sent
    assert eng.usage == {"prompt_tokens": 20, "completion_tokens": 4, "requests": 2, "retries": 0, "errors": 0}
    # no logprobs asked: none returned; a tiny max_tokens gives finish_reason "length"
    g = eng.generate([conversation([], "q")], SamplingParams(max_new_tokens=2))[0][0]
    assert g.logprobs is None and g.finish_reason == "length" and "logprobs" not in stub.requests[-1]


def test_429_retry_after_is_honoured(serve_stub):
    stub = Stub([("status", 429, {"Retry-After": "1"})])
    eng = engine(serve_stub(stub), backoff_max_s=5)
    g = eng.generate([conversation([], "q")], GREEDY)[0][0]
    assert g.text == "echo:q"
    assert len(stub.requests) == 2
    assert stub.arrivals[1] - stub.arrivals[0] >= 1.0
    assert eng.usage["retries"] == 1 and eng.usage["errors"] == 0


def test_retry_after_parsing():
    assert retry_after_seconds({"retry-after": "2.5"}) == 2.5
    assert retry_after_seconds({}) is None
    assert retry_after_seconds({"retry-after": "soon"}) is None
    now = time.time()
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert 28 <= retry_after_seconds({"retry-after": date}, now=now) <= 30
    assert retry_after_seconds({"retry-after": email.utils.formatdate(now - 60, usegmt=True)}, now=now) == 0.0
    # full jitter stays within [0, min(max, base * 2**attempt)]; Retry-After wins but is capped
    delays = [backoff_delay(3, 0.5, 30, None) for _ in range(200)]
    assert 0 <= min(delays) and max(delays) <= 4.0 and max(delays) > 1.0
    assert backoff_delay(10, 0.5, 3, None) <= 3
    assert backoff_delay(0, 0.5, 30, 7.0) == 7.0 and backoff_delay(0, 0.5, 5, 7.0) == 5


def test_500_then_success(serve_stub):
    stub = Stub([("status", 500), ("status", 503)])
    eng = engine(serve_stub(stub))
    g = eng.generate([conversation([], "q")], GREEDY)[0][0]
    assert g.text == "echo:q" and len(stub.requests) == 3 and eng.usage["retries"] == 2


def test_400_is_not_retried(serve_stub):
    stub = Stub([("status", 400)])
    eng = engine(serve_stub(stub))
    [[g]] = eng.generate([conversation([], "q")], GREEDY)
    assert len(stub.requests) == 1
    assert g.text == "" and g.finish_reason == "error" and g.error == "HTTP 400: scripted 400"
    assert eng.usage["errors"] == 1 and eng.usage["retries"] == 0


def test_timeout_is_retried_then_reported(serve_stub):
    stub = Stub([("sleep", 1.0), ("sleep", 1.0)])
    eng = engine(serve_stub(stub), timeout_s=0.3, max_retries=1)
    t0 = time.monotonic()
    [[g]] = eng.generate([conversation([], "q")], GREEDY)
    assert time.monotonic() - t0 < 1.5
    assert len(stub.requests) == 2 and g.finish_reason == "error" and g.error.startswith("timeout")


def test_connection_refused_gives_error_without_hanging():
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    eng = engine(f"http://127.0.0.1:{port}/v1", max_retries=2)
    t0 = time.monotonic()
    out = eng.generate([conversation([], "a"), conversation([], "b")], SamplingParams(n=2))
    assert time.monotonic() - t0 < 5
    assert all(g.finish_reason == "error" and g.text == "" and g.error.startswith("connection error")
               for gens in out for g in gens)
    assert [len(gens) for gens in out] == [2, 2]
    assert eng.usage["requests"] == 6 and eng.usage["errors"] == 2


def test_malformed_reply_is_retried(serve_stub):
    stub = Stub([("garbage",)])
    eng = engine(serve_stub(stub))
    assert eng.generate([conversation([], "q")], GREEDY)[0][0].text == "echo:q"
    assert len(stub.requests) == 2
    stub.script = [("garbage",)] * 5
    [[g]] = eng.generate([conversation([], "q")], GREEDY)
    assert g.finish_reason == "error" and g.error.startswith("invalid response")


def test_concurrency_bound(serve_stub):
    stub = Stub(delay=0.15)
    eng = engine(serve_stub(stub), max_concurrency=3)
    out = eng.generate([conversation([], f"q{i}") for i in range(12)], GREEDY)
    assert [gens[0].text for gens in out] == [f"echo:q{i}" for i in range(12)]  # order kept
    assert stub.max_in_flight == 3


def _sent_images(body: dict) -> list[Image.Image]:
    out = []
    for part in body["messages"][-1]["content"]:
        if part["type"] == "image_url":
            url = part["image_url"]["url"]
            assert url.startswith("data:image/png;base64,")
            out.append(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))
    return out


def test_images_go_as_data_uris_within_the_pixel_budget(serve_stub):
    stub = Stub()
    eng = engine(serve_stub(stub), max_image_pixels=20_000)
    small, big = image(12, 7), image(1000, 500)
    eng.generate([conversation([small, big], "what?")], GREEDY)
    content = stub.requests[0]["messages"][0]["content"]
    assert [p["type"] for p in content] == ["image_url", "image_url", "text"]
    got_small, got_big = _sent_images(stub.requests[0])
    assert got_small.convert("RGB").tobytes() == small.tobytes()  # lossless, untouched
    w, h = got_big.size
    assert w * h <= 20_000 and w * h > 19_000 and abs(w / h - 2.0) < 0.05
    assert downscale(big, 20_000).size == (w, h)


def test_n_native_is_one_request(serve_stub):
    stub = Stub()
    eng = engine(serve_stub(stub))
    out = eng.generate([conversation([], "q")], SamplingParams(n=3, temperature=1.0))
    assert len(out[0]) == 3 and len(stub.requests) == 1 and stub.requests[0]["n"] == 3
    assert eng.n_supported is True


def test_n_falls_back_to_single_requests(serve_stub):
    stub = Stub(max_choices=1)
    eng = engine(serve_stub(stub))
    out = eng.generate([conversation([], "q")], SamplingParams(n=3, temperature=1.0, seed=5))
    assert [g.text for g in out[0]] == ["echo:q"] * 3
    assert [(b.get("n", 1), b["seed"]) for b in stub.requests] == [(3, 5), (1, 6), (1, 7)]
    assert eng.n_supported is False
    eng.generate([conversation([], "q")], SamplingParams(n=2, temperature=1.0))  # learnt: no n any more
    assert [b.get("n", 1) for b in stub.requests[3:]] == [1, 1]


def test_n_rejected_with_400_falls_back(serve_stub):
    stub = Stub(reject_n=True)
    eng = engine(serve_stub(stub))
    out = eng.generate([conversation([], "q")], SamplingParams(n=2, temperature=1.0))
    assert [g.text for g in out[0]] == ["echo:q"] * 2 and len(stub.requests) == 3
    assert eng.n_supported is False


def test_works_inside_a_running_loop_and_async(serve_stub):
    stub = Stub()
    eng = engine(serve_stub(stub))

    async def main():
        blocking = eng.generate([conversation([], "sync")], GREEDY)
        awaited = await eng.agenerate([conversation([], "async")], GREEDY)
        return blocking[0][0].text, awaited[0][0].text

    assert asyncio.run(main()) == ("echo:sync", "echo:async")
    eng.close()
    assert eng.generate([conversation([], "again")], GREEDY)[0][0].text == "echo:again"  # reopens


def test_bad_conversations_fail_before_any_request(serve_stub):
    stub = Stub()
    eng = engine(serve_stub(stub))
    with pytest.raises(TypeError, match="list of conversations"):
        eng.generate(conversation([], "q"), GREEDY)
    with pytest.raises(TypeError, match="conversation 1 message 0 content 0: 'image' must be a PIL image"):
        eng.generate([conversation([], "ok"), [{"role": "user", "content": [{"type": "image", "image": "x.png"}]}]],
                     GREEDY)
    assert stub.requests == []
