"""The Thinking-with-Images tool loop: call parsing, the zoom tool, the loop's rules, resume, speed vs
accuracy, and a tiny real model in-process and over HTTP."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from zoomless.engines.base import Generation, SamplingParams
from zoomless.eval.single_pass import evaluate
from zoomless.eval.tool_calls import MIN_SIDE, loads_lenient, parse_tool_call, strip_tool_calls, zoom_in
from zoomless.eval.tool_loop import evaluate_tool_loop, load_tool_result, speed_accuracy
from zoomless.imaging import crop_view, from_rel1000, zoom_view
from zoomless.sample import Sample

# ----------------------------------------------------------------------------- parsing


def call(args: str, name: str = "zoom_in") -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {args}}}\n</tool_call>'


@pytest.mark.parametrize(
    "text,box",
    [
        (call('{"bbox_2d": [10, 20, 300, 400]}'), (10, 20, 300, 400)),
        ("<tool_call>{'name': 'zoom_in', 'arguments': {'bbox_2d': [1, 2, 3, 4]}}</tool_call>", (1, 2, 3, 4)),
        ('<tool_call>{"name": "zoom_in", "arguments": {"bbox_2d": [1, 2, 3, 4],},}</tool_call>', (1, 2, 3, 4)),
        ('<tool_call>```json\n{"name": "zoom_in", "arguments": {"bbox_2d": [1, 2, 3, 4]}}\n```</tool_call>', (1, 2, 3, 4)),
        ('<tool_call>{"name": "zoom_in", "arguments": "{\\"bbox_2d\\": [5, 6, 7, 8]}"}</tool_call>', (5, 6, 7, 8)),
        ('Let me look. <tool_call>{"name": "zoom_in", "arguments": {"bbox_2d": [1, 2, 3, 4]', (1, 2, 3, 4)),  # cut off
        (call('{"bbox_2d": ["1", 2.5, 3, 4], "label": "sign"}', name="image_zoom_in_tool"), (1, 2.5, 3, 4)),
        (call('{"bbox_2d": [1, 2, 3, 4]}') + call('{"bbox_2d": [9, 9, 99, 99]}'), (1, 2, 3, 4)),  # first call wins
        ('<tool_call>{"name": "zoom_in", "arguments": {"bbox_2d": [1, 2, 3, 4]}} {"name": "zoom_in"}</tool_call>', (1, 2, 3, 4)),
        (call('{"bbox_2d": [[1, 2, 3, 4]]}'), (1, 2, 3, 4)),
    ],
)
def test_valid_and_repaired_calls(text, box):
    c = parse_tool_call(text)
    assert c is not None and c.error is None
    assert c.bbox == pytest.approx(box)


@pytest.mark.parametrize(
    "text,needle",
    [
        (call('{"bbox_2d": [1, 2, 3]}'), "four numbers"),
        (call('{"bbox_2d": [5, 5, 5, 9]}'), "empty"),
        (call('{"bbox_2d": [1, 2, "x", 4]}'), "four numbers"),
        (call('{"bbox_2d": [1, 2, 3, 4]}', name="crop"), "unknown tool"),
        ("<tool_call>zoom there please</tool_call>", "not a JSON object"),
        (call('[1, 2]'), "'arguments' must be an object"),
    ],
)
def test_malformed_calls_say_why(text, needle):
    c = parse_tool_call(text)
    assert c is not None and c.bbox is None and needle in c.error


def test_no_call_is_an_answer_and_strip():
    assert parse_tool_call("The answer is B.") is None
    assert strip_tool_calls("B " + call('{"bbox_2d": [1, 2, 3, 4]}')) == "B"
    assert loads_lenient("no json here") is None
    assert loads_lenient("{'a': True, 'b': null,}") == {"a": True, "b": None}
    # oracle mode only needs a zoom call, not a usable box
    c = parse_tool_call(call('{"bbox_2d": [1, 2]}'), need_box=False)
    assert c is not None and c.error is None


# ----------------------------------------------------------------------------- fixtures


def noise(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def make_samples(tmp_path, n: int = 3) -> list[Sample]:
    out = []
    for i in range(n):
        path = tmp_path / f"img{i}.png"
        noise(200, 120, i).save(path)
        out.append(Sample(f"s{i}", str(path), f"What is in region {i}?", "red", ("red", "blue", "green"),
                          (40 + i, 30, 90, 70), "colour" if i % 2 else "count"))
    return out


class ScriptedEngine:
    """An Engine that replies from a script by turn (the number of assistant messages so far) and
    records every conversation it was given, for deterministic loop tests."""

    name = "scripted"

    def __init__(self, script):
        self.script = script  # callable(turn, conversation) -> text
        self.calls: list[list] = []

    def generate(self, conversations, params: SamplingParams):
        self.calls.append([list(c) for c in conversations])
        out = []
        for conv in conversations:
            turn = sum(m["role"] == "assistant" for m in conv)
            out.append([Generation(text=self.script(turn, conv))])
        return out


def last_user_images(conv) -> list[Image.Image]:
    user = [m for m in conv if m["role"] == "user"][-1]
    return [p["image"] for p in user["content"] if p["type"] == "image"]


def last_user_text(conv) -> str:
    user = [m for m in conv if m["role"] == "user"][-1]
    return " ".join(p["text"] for p in user["content"] if p["type"] == "text")


# ----------------------------------------------------------------------------- the loop


def test_tool_call_then_answer_executes_the_exact_crop(tmp_path):
    samples = make_samples(tmp_path, 2)
    rel = [250, 100, 500, 600]
    eng = ScriptedEngine(lambda turn, conv: call(json.dumps({"bbox_2d": rel})) if turn == 0 else "A")
    res = evaluate_tool_loop(samples, eng, max_turns=4, progress=False, max_new_tokens=8, zoom_min_pixels=96 * 96)
    assert len(eng.calls) == 2 and [len(c) for c in eng.calls] == [2, 2]  # both samples batched per turn
    for s, item, conv in zip(samples, res.items, eng.calls[1]):
        full = Image.open(s.image).convert("RGB")
        crop, rect = crop_view(full, from_rel1000(rel, *full.size), margin=0.0, min_side=MIN_SIDE)
        assert item.boxes == [list(rect)] == [[50, 12, 100, 72]]
        (seen,) = last_user_images(conv)  # the image passed in the second turn
        assert seen.size[0] * seen.size[1] >= 96 * 96 - 200 and seen.size != crop.size  # enlarged
        assert np.array_equal(np.asarray(seen), np.asarray(zoom_view(crop, size=seen.size)))
        assert "<tool_response>" in last_user_text(conv)
        assert conv[0]["role"] == "system" and "zoom_in" in conv[0]["content"][0]["text"]
        assert (item.turns, item.tool_calls, item.malformed, item.hit_limit) == (2, 1, 0, False)
        assert item.correct and item.parsed == "A" and item.latency_s > 0
    assert res.accuracy()["all"].acc == 1.0
    assert res.tool_stats()["mean_tool_calls"] == 1.0


def test_zoom_keeps_32_px_and_clamps():
    full = noise(300, 200, 0)
    image, rect = zoom_in(full, [500, 500, 502, 501], zoom_min_pixels=1)
    assert (rect[2] - rect[0], rect[3] - rect[1]) == (MIN_SIDE, MIN_SIDE) and image.size == (MIN_SIDE, MIN_SIDE)
    image, rect = zoom_in(full, [-100, 900, 2000, 1500], zoom_min_pixels=1)
    assert rect == (0, 168, 300, 200)  # clamped, then grown to 32 px inside the image
    assert np.array_equal(np.asarray(image), np.asarray(full.crop(rect)))
    image, _ = zoom_in(full, [0, 0, 1000, 1000], zoom_min_pixels=1, max_pixels=56 * 56)
    assert image.size[0] * image.size[1] <= 56 * 56


def test_malformed_calls_are_counted_and_the_loop_ends(tmp_path):
    samples = make_samples(tmp_path, 1)
    eng = ScriptedEngine(lambda turn, conv: "<tool_call>{'name': 'zoom_in', 'arguments': {'bbox_2d': [1, 2]}}</tool_call>")
    res = evaluate_tool_loop(samples, eng, max_turns=3, progress=False, max_new_tokens=8)
    (item,) = res.items
    assert (item.turns, item.tool_calls, item.malformed, item.hit_limit) == (3, 0, 3, True)
    assert not item.correct and item.method == "unparsable" and item.error is None
    assert "Error: 'bbox_2d' must be four numbers" in last_user_text(eng.calls[1][0])
    assert "last reply" in last_user_text(eng.calls[2][0])
    assert res.tool_stats()["malformed_calls"] == 3


def test_turn_limit_and_the_answer_around_a_last_call(tmp_path):
    samples = make_samples(tmp_path, 1)
    eng = ScriptedEngine(lambda turn, conv: "C " + call('{"bbox_2d": [0, 0, 500, 500]}'))
    res = evaluate_tool_loop(samples, eng, max_turns=3, progress=False, max_new_tokens=8, zoom_min_pixels=1)
    (item,) = res.items
    assert len(eng.calls) == 3
    assert (item.turns, item.tool_calls, item.malformed, item.hit_limit) == (3, 2, 0, True)
    assert item.prediction == "C" and item.parsed == "C" and not item.correct
    assert len(last_user_images(eng.calls[2][0])) == 1 and "last reply" in last_user_text(eng.calls[2][0])
    # max_turns=1: a single glance, the call is never executed
    one = evaluate_tool_loop(samples, ScriptedEngine(eng.script), max_turns=1, progress=False, max_new_tokens=8)
    assert (one.items[0].turns, one.items[0].tool_calls, one.items[0].hit_limit) == (1, 0, True)


def test_oracle_box_zooms_on_the_evidence(tmp_path):
    samples = make_samples(tmp_path, 1)
    eng = ScriptedEngine(lambda turn, conv: call('{"bbox_2d": [900, 900, 1000, 1000]}') if turn == 0 else "A")
    res = evaluate_tool_loop(samples, eng, oracle_box=True, progress=False, max_new_tokens=8, zoom_min_pixels=1,
                             out_dir=tmp_path / "oracle")
    full = Image.open(samples[0].image).convert("RGB")
    _, rect = crop_view(full, samples[0].box, margin=0.0, min_side=MIN_SIDE)
    assert res.items[0].boxes == [list(rect)]
    assert "Oracle box" in (tmp_path / "oracle" / "summary.md").read_text()
    assert json.loads((tmp_path / "oracle" / "results.json").read_text())["tools"]["oracle_box"] is True
    with pytest.raises(ValueError, match="no evidence box"):
        evaluate_tool_loop([samples[0].with_(box=None)], eng, oracle_box=True, progress=False)


def test_resume_bad_images_and_settings(tmp_path):
    samples = make_samples(tmp_path, 3)
    broken = samples[2].with_(image=str(tmp_path / "missing.png"))
    out = tmp_path / "run"
    eng = ScriptedEngine(lambda turn, conv: "A")
    first = evaluate_tool_loop(samples[:2] + [broken], eng, progress=False, out_dir=out, max_new_tokens=8)
    assert first.items[2].method == "error" and "no such file" in first.items[2].error and first.items[2].turns == 0
    assert [len(c) for c in eng.calls] == [2]  # the broken sample never reached the model

    def boom(turn, conv):
        raise AssertionError("resumed run must not ask again")

    again = evaluate_tool_loop(samples[:2] + [broken], ScriptedEngine(boom), progress=False, out_dir=out, max_new_tokens=8)
    assert [it.correct for it in again.items] == [True, True, False]
    loaded = load_tool_result(out)
    assert {it.id for it in loaded.items} == {"s0", "s1", "s2"}
    with pytest.raises(ValueError, match="max_turns"):
        evaluate_tool_loop(samples, eng, progress=False, out_dir=out, max_new_tokens=8, max_turns=2)


def test_speed_accuracy_against_single_pass(tmp_path):
    samples = make_samples(tmp_path, 3)

    class Glance:
        name = "glance"

        def generate(self, conversations, params):
            return [[Generation(text="B")] for _ in conversations]

    single = evaluate(samples, Glance(), views=("full",), progress=False)
    tool = evaluate_tool_loop(samples[:2], ScriptedEngine(lambda t, c: call('{"bbox_2d": [0, 0, 9, 9]}') if t == 0 else "A"),
                              progress=False, max_new_tokens=8, zoom_min_pixels=1)
    cmp = speed_accuracy(single, tool)
    assert cmp["n"] == 2  # only the questions both answered
    assert cmp["single_pass"]["accuracy"] == 0.0 and cmp["tool_loop"]["accuracy"] == 1.0
    assert cmp["accuracy_delta"] == 1.0
    assert cmp["speedup"] == pytest.approx(cmp["single_pass"]["samples_per_s"] / cmp["tool_loop"]["samples_per_s"])
    with pytest.raises(ValueError, match="no 'crop' view"):
        speed_accuracy(single, tool, view="crop")


# ----------------------------------------------------------------------------- a tiny real model


class ForcedZoom:
    """Wraps a real engine: the first reply is a zoom call, every later one is the model's own.
    (A random tiny model never calls a tool by itself; this makes it read a zoomed crop.)"""

    def __init__(self, inner):
        self.inner, self.name = inner, inner.name

    def generate(self, conversations, params):
        first = [i for i, c in enumerate(conversations) if not any(m["role"] == "assistant" for m in c)]
        later = [i for i in range(len(conversations)) if i not in first]
        out: dict[int, list[Generation]] = {i: [Generation(text=call('{"bbox_2d": [100, 100, 600, 700]}'))] for i in first}
        if later:
            out.update(zip(later, self.inner.generate([conversations[i] for i in later], params)))
        return [out[i] for i in range(len(conversations))]


def test_tiny_model_in_process_and_over_http(tmp_path):
    from zoomless.engines.hf import HFEngine
    from zoomless.engines.openai_engine import OpenAIEngine
    from zoomless.models.loading import load_vlm
    from zoomless.models.tiny import build_tiny_vlm
    from zoomless.serve import create_app, running

    model, processor = load_vlm(build_tiny_vlm(tmp_path / "tiny", size="test"), device="cpu")
    hf = HFEngine(model, processor, batch_size=4)
    samples = make_samples(tmp_path, 2)
    kw = dict(max_turns=3, max_new_tokens=6, max_pixels=56 * 56, zoom_min_pixels=56 * 56, progress=False, batch_size=1)
    local = evaluate_tool_loop(samples, ForcedZoom(hf), out_dir=tmp_path / "local", **kw)
    with running(create_app(hf, "tiny")) as url:
        client = OpenAIEngine(url + "/v1", "tiny", max_concurrency=1)
        served = evaluate_tool_loop(samples, ForcedZoom(client), **kw)
        client.close()
    for a, b in zip(local.items, served.items):
        assert a.error is None and b.error is None
        assert a.tool_calls == 1 and a.turns >= 2 and a.boxes == b.boxes
        assert a.trace == b.trace and a.prediction == b.prediction and a.correct == b.correct
    assert hf.stats["prompts"] >= 4  # the model itself answered after each zoom, both ways
    assert (tmp_path / "local" / "results.json").exists()


def test_a_failed_generation_is_a_failed_item(tmp_path):
    class Failing:
        name = "failing"

        def generate(self, conversations, params):
            return [[Generation(text="", finish_reason="error", error="HTTP 400: image too large")] for _ in conversations]

    (item,) = evaluate_tool_loop(make_samples(tmp_path, 1), Failing(), progress=False).items
    assert (item.method, item.correct, item.turns, item.error) == ("error", False, 1, "HTTP 400: image too large")
