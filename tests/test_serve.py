"""The OpenAI-compatible server: a tiny real model served on loopback, talked to with OpenAIEngine and
the raw openai client; protocol details (auth, limits, errors, batching) with a recording engine."""

from __future__ import annotations

import base64
import io
import random
import threading
import time

import httpx
import openai
import pytest
from PIL import Image

from zoomless.engines.base import Generation, SamplingParams, conversation
from zoomless.engines.openai_engine import OpenAIEngine
from zoomless.serve import create_app, running

KEY = "sekret"


def png_uri(im: Image.Image) -> str:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.frombytes("RGB", (w, h), random.Random(seed).randbytes(w * h * 3))


def user(*parts) -> list[dict]:
    return [{"role": "user", "content": list(parts)}]


# ----------------------------------------------------------------------------- protocol, with a recording engine


class RecordingEngine:
    """Answers "<last text> #<sample>" (or an error for the text "fail"), recording every batch."""

    name = "recording"

    def __init__(self, delay: float = 0.0):
        self.delay = delay
        self.batches: list[tuple[int, SamplingParams]] = []
        self.images: list[Image.Image] = []
        self.active = 0
        self.max_active = 0
        self._lock = threading.Lock()

    def generate(self, conversations, params):
        with self._lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        time.sleep(self.delay)
        self.batches.append((len(conversations), params))
        out = []
        for conv in conversations:
            parts = conv[-1]["content"]
            self.images += [p["image"] for p in parts if p["type"] == "image"]
            text = [p["text"] for p in parts if p["type"] == "text"][-1]
            if text == "fail":
                out.append([Generation(text="", finish_reason="error", error="boom")] * params.n)
            else:
                out.append([Generation(text=f"{text} #{i}", token_ids=[1, 2], logprobs=[-0.1, -0.2])
                            for i in range(params.n)])
        with self._lock:
            self.active -= 1
        return out


@pytest.fixture
def recorded():
    eng = RecordingEngine()
    app = create_app(eng, "rec", api_key=KEY, max_request_bytes=100_000, max_image_pixels=64 * 64)
    with running(app) as url:
        yield eng, url


def post(url: str, body: dict, key: str | None = KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=10)


def test_response_shape_and_params(recorded):
    eng, url = recorded
    body = {"model": "rec", "messages": [{"role": "user", "content": "hi"}], "n": 2, "max_completion_tokens": 5,
            "temperature": 0.3, "top_p": 0.8, "seed": 4, "logprobs": True, "frequency_penalty": 0}
    r = post(url, body)
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["object"] == "chat.completion" and data["model"] == "rec" and data["id"].startswith("chatcmpl-")
    assert [c["message"] for c in data["choices"]] == [{"role": "assistant", "content": f"hi #{i}"} for i in range(2)]
    assert [c["index"] for c in data["choices"]] == [0, 1]
    assert [t["logprob"] for t in data["choices"][0]["logprobs"]["content"]] == [-0.1, -0.2]
    assert data["usage"]["completion_tokens"] == 4
    assert eng.batches[-1][1] == SamplingParams(max_new_tokens=5, temperature=0.3, top_p=0.8, n=2, seed=4, logprobs=True)
    # OpenAI's defaults when the request names nothing
    post(url, {"messages": [{"role": "user", "content": "x"}]})
    assert eng.batches[-1][1] == SamplingParams(max_new_tokens=512, temperature=1.0, top_p=1.0, n=1)


def test_api_key_models_and_health(recorded):
    _, url = recorded
    assert httpx.get(url + "/health").json() == {"status": "ok"}  # no key needed
    r = httpx.get(url + "/v1/models")
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert post(url, {"messages": [{"role": "user", "content": "x"}]}, key="wrong").status_code == 401
    models = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0).models.list()
    assert [m.id for m in models.data] == ["rec"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError, match="'other' not found"):
        openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0).chat.completions.create(
            model="other", messages=[{"role": "user", "content": "x"}])


def test_bad_requests_get_clear_400s(recorded):
    eng, url = recorded

    def error(body) -> tuple[int, str]:
        r = post(url, body)
        return r.status_code, r.json()["error"]["message"]

    ok_text = {"type": "text", "text": "q"}
    status, msg = error({"messages": [{"role": "user", "content": [
        ok_text, {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]})
    assert status == 400 and msg.startswith("messages[0].content[1]: image URLs are not fetched")
    status, msg = error({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": png_uri(noise(65, 64))}}]}]})
    assert status == 400 and msg == "messages[1].content[0]: image is 65x64 = 4,160 pixels, over the cap of 4,096"
    status, msg = error({"messages": user({"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}})})
    assert status == 400 and msg == "messages[0].content[0]: the image data is not valid base64"
    not_image = "data:image/png;base64," + base64.b64encode(b"hello").decode()
    status, msg = error({"messages": user({"type": "image_url", "image_url": {"url": not_image}})})
    assert status == 400 and "messages[0].content[0]" in msg and "not a recognised image" in msg
    assert error({"messages": [{"role": "robot", "content": "x"}]})[1].startswith("messages[0].role")
    assert error({"messages": [{"role": "user", "content": "x"}], "n": 99})[1] == "n must be between 1 and 16"
    assert error({"messages": [{"role": "user", "content": "x"}], "stream": True})[1].startswith("stream is not")
    assert error({"messages": []})[0] == 400
    r = httpx.post(url + "/v1/chat/completions", content=b"{not json", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    assert eng.batches == []  # none of these reached the engine


def test_body_size_limit_413(recorded):
    _, url = recorded
    big = {"messages": user({"type": "image_url", "image_url": {"url": png_uri(noise(200, 200))}})}
    r = post(url, big)
    assert r.status_code == 413 and "100,000 bytes" in r.json()["error"]["message"]


def test_small_image_reaches_engine_intact(recorded):
    eng, url = recorded
    im = noise(40, 30)
    r = post(url, {"messages": user({"type": "image_url", "image_url": {"url": png_uri(im)}},
                                    {"type": "text", "text": "q"})})
    assert r.status_code == 200 and eng.images[-1].tobytes() == im.tobytes()


def test_engine_error_is_a_400_not_retried(recorded):
    _, url = recorded
    r = post(url, {"messages": [{"role": "user", "content": "fail"}]})
    assert r.status_code == 400 and r.json()["error"] == {
        "message": "the model could not process this request: boom", "type": "invalid_request_error",
        "param": None, "code": None}
    client = OpenAIEngine(url + "/v1", "rec", api_key=KEY, max_retries=3, backoff_base_s=0.01, backoff_max_s=0.01)
    [[g]] = client.generate([conversation([], "fail")], SamplingParams())
    assert g.finish_reason == "error" and g.error.startswith("HTTP 400: ") and "boom" in g.error
    assert client.usage["requests"] == 1
    client.close()


def test_engine_crash_is_a_500(recorded):
    eng, url = recorded
    eng.generate = lambda convs, params: 1 / 0
    r = post(url, {"messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert "ZeroDivisionError" in r.json()["error"]["message"]


def test_concurrent_requests_are_micro_batched():
    eng = RecordingEngine(delay=0.3)
    with running(create_app(eng, "rec")) as url:
        client = OpenAIEngine(url + "/v1", "rec", max_concurrency=8)
        convs = [conversation([], f"q{i}") for i in range(8)]
        out = client.generate(convs, SamplingParams(temperature=0.0))
        client.close()
    assert [gens[0].text for gens in out] == [f"q{i} #0" for i in range(8)]
    assert eng.max_active == 1  # one batch at a time
    assert sum(n for n, _ in eng.batches) == 8 and len(eng.batches) < 8  # later arrivals were merged


# ----------------------------------------------------------------------------- a real tiny model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Qwen2.5-VL served on loopback: (app, base url, the in-process HFEngine it serves)."""
    from zoomless.models.tiny import build_tiny_vlm
    from zoomless.serve import load_app

    model_dir = build_tiny_vlm(tmp_path_factory.mktemp("m") / "tiny-vl", size="test")
    app = load_app(model_dir, api_key=KEY, max_image_pixels=128 * 128, device="cpu")
    with running(app) as url:
        yield app, url, app.state.engine


def pattern(w: int, h: int, color) -> Image.Image:
    im = Image.new("RGB", (w, h), (240, 240, 240))
    im.paste(color, (w // 4, h // 4, w // 2, h // 2))
    return im


def test_greedy_answers_equal_the_in_process_engine(tiny):
    app, url, hf = tiny
    assert app.state.model_name == "tiny-vl"  # named after the folder
    convs = [
        conversation([pattern(56, 84, (200, 0, 0))], "What colour is the square?"),
        conversation([], "Hello there", system="Answer briefly."),
        conversation([pattern(84, 56, (0, 0, 200)), pattern(56, 56, (0, 200, 0))], "Compare the two images."),
    ]
    params = SamplingParams(max_new_tokens=12, temperature=0.0, logprobs=True)
    direct = [hf.generate([c], params)[0][0] for c in convs]  # one at a time, as the server runs them below
    client = OpenAIEngine(url + "/v1", "tiny-vl", api_key=KEY, max_concurrency=1)
    served = [gens[0] for gens in client.generate(convs, params)]
    client.close()
    assert [g.text for g in served] == [g.text for g in direct]
    assert [g.prompt_tokens for g in served] == [g.prompt_tokens for g in direct]
    assert [g.finish_reason for g in served] == [g.finish_reason for g in direct]
    for s, d in zip(served, direct):
        assert s.logprobs == pytest.approx(d.logprobs, abs=1e-5)
    assert any(g.text for g in direct)  # the comparison is not between empty strings only

    raw = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    reply = raw.chat.completions.create(
        model="tiny-vl", temperature=0, max_tokens=12, logprobs=True,
        messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": png_uri(pattern(56, 84, (200, 0, 0)))}},
            {"type": "text", "text": "What colour is the square?"}]}],
    )
    assert reply.choices[0].message.content == direct[0].text
    assert reply.usage.completion_tokens == len(direct[0].token_ids)
    # the prompt's tokens, its image's included: what the model was fed
    assert reply.usage.prompt_tokens == direct[0].prompt_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    content = reply.choices[0].logprobs.content
    assert [t.logprob for t in content] == pytest.approx(direct[0].logprobs, abs=1e-5)
    assert [t.token for t in content] == [hf.tokenizer.decode([i]) for i in direct[0].token_ids]
    assert [m.id for m in raw.models.list().data] == ["tiny-vl"]


def test_seeded_sampling_matches_and_repeats(tiny):
    _, url, hf = tiny
    conv = conversation([pattern(56, 56, (0, 120, 0))], "Describe.")
    params = SamplingParams(max_new_tokens=8, temperature=1.0, n=2, seed=7)
    direct = [g.text for g in hf.generate([conv], params)[0]]
    client = OpenAIEngine(url + "/v1", "tiny-vl", api_key=KEY)
    first = [g.text for g in client.generate([conv], params)[0]]
    again = [g.text for g in client.generate([conv], params)[0]]
    client.close()
    assert first == direct == again


def test_served_model_rejects_what_it_must(tiny):
    _, url, _ = tiny
    raw = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError, match=r"messages\[0\]\.content\[0\]: image is 200x100"):
        raw.chat.completions.create(model="tiny-vl", messages=user(
            {"type": "image_url", "image_url": {"url": png_uri(pattern(200, 100, (1, 2, 3)))}}))
    with pytest.raises(openai.BadRequestError, match="not fetched by this server"):
        raw.chat.completions.create(model="tiny-vl", messages=user(
            {"type": "image_url", "image_url": {"url": "http://127.0.0.1:1/cat.png"}}))
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).chat.completions.create(
            model="tiny-vl", messages=[{"role": "user", "content": "hi"}])
