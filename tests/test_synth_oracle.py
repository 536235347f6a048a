"""`zoomless synth` end to end against a scripted "oracle" server that knows ZoomWorld's ground truth,
so that items survive every stage and land in the exported parquet; plus the boxes backend, real
photographs, transient server errors (429, 500) and a server that is down.

The oracle is a real HTTP server on loopback (FastAPI + uvicorn via zoomless.serve.running). It
recognises which scene (and which panel) it is shown by comparing small thumbnails, and answers
each role's prompt as a careful model would, with deliberate variety: several answer formats
(\\boxed{}, GLM box tokens, <answer> tags, number words), a question the validator rejects, a
question the teachers disagree on, distractors that repeat the answer, and scenes the student
finds easy.

Other synth test files import `Oracle`, `oracle_server` and `make_world` from here.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import socket
import time
from contextlib import contextmanager
from pathlib import Path

import matplotlib
import numpy as np
import pyarrow.parquet as pq
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from PIL import Image

from zoomless.imaging import expand_box
from zoomless.sample import read_samples
from zoomless.serve import running
from zoomless.synth.config import load_synth_config
from zoomless.synth import SynthError
from zoomless.synth.runner import run_synth
from zoomless.world import generate_split
from zoomless.world.dimensions import QUESTIONS, reference, value_pool

MODEL = "oracle"
PHOTOS = Path(matplotlib.get_data_path()) / "sample_data"  # real photographs shipped with matplotlib
FEW = {"regions.max_per_image": 3}  # fewer calls where the test is not about counts
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six"]


def thumb(im: Image.Image, side: int = 12) -> np.ndarray:
    return np.asarray(im.convert("RGB").resize((side, side), Image.Resampling.BILINEAR), dtype=np.float32)


def decode(url: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")


class Oracle:
    """Answers every synth role about ZoomWorld scenes from their records; generic answers for
    anything else (real photographs).

    `script`: failures served first, in arrival order: ("status", code) or ("sleep", seconds).
    `easy`: scene ids the student always gets right (so the difficulty filter drops them).
    """

    def __init__(self, samples=(), images=(), easy=(), script=(), delay: float = 0.0):
        self.scenes = list(zip(samples, images))
        self.full_thumbs = [thumb(im) for _, im in self.scenes]
        self.panels = []  # (scene index, panel meta, thumbnail of the panel crop)
        for s_idx, (sample, im) in enumerate(self.scenes):
            for p in sample.meta["panels"]:
                self.panels.append((s_idx, p, thumb(im.crop(tuple(p["box"])))))
        self.easy = set(easy)
        self.script = list(script)
        self.delay = delay
        self.calls: dict[str, int] = {}
        self.app = FastAPI()
        self.app.post("/v1/chat/completions")(self.chat)

    # -- recognition

    def scene(self, im: Image.Image) -> int | None:
        if not self.scenes:
            return None
        d = [np.abs(t - thumb(im)).mean() for t in self.full_thumbs]
        return int(np.argmin(d)) if min(d) < 20 else None

    def panel(self, crop: Image.Image):
        if not self.panels:
            return None
        d = [np.abs(t - thumb(crop)).mean() for _, _, t in self.panels]
        k = int(np.argmin(d))
        return (self.panels[k][0], self.panels[k][1]) if d[k] < 25 else None

    def panel_by_frame(self, s_idx: int, text: str):
        for p in self.scenes[s_idx][0].meta["panels"]:
            if f"the {p['frame']} border" in text:
                return p
        return None

    # -- the roles

    def reply(self, text: str, images: list[Image.Image], n: int, seed: int) -> list[str]:
        if "clearly identifiable objects" in text:
            return [self.lister(images[0], text)] * n
        if "questions about what this crop shows" in text:
            return [self.questioner(images[0])] * n
        if "VALID: Yes or No" in text:
            return [self.validator(text)] * n
        if "Write 3 wrong answers" in text:
            return [self.distractors(images[0], text)] * n
        if "Group the answers that mean the same thing" in text:
            return [self.judge(text)] * n
        if "put the letter of your answer" in text:
            return [self.student(images[0], text, i) for i in range(n)]
        if "inside \\boxed{}" in text and text.startswith("Question:"):
            return [self.teacher(images[0], text, seed, i) for i in range(n)]
        return ["I do not understand the request."] * n

    def role_of(self, text: str) -> str:
        for key, role in (("Group the answers", "judge"), ("clearly identifiable", "lister"),
                          ("questions about what this crop", "questioner"),
                          ("VALID: Yes or No", "validator"), ("wrong answers", "distractor"),
                          ("letter of your answer", "student"), ("Question:", "teacher")):
            if key in text:
                return role
        return "other"

    def lister(self, im: Image.Image, text: str) -> str:
        s = self.scene(im)
        if s is None:
            return "```json\n[]\n```"
        sample = self.scenes[s][0]
        size = sample.meta["size"]
        objs = [{"label": f"panel with the {p['frame']} border",
                 "bbox_2d": [round(v * 1000 / size) for v in p["box"]]} for p in sample.meta["panels"]]
        objs += [{"label": "dot", "bbox_2d": [10, 10, 30, 30]}, {"label": "Dot", "bbox_2d": [50, 50, 70, 70]}]
        return "Here are the objects:\n```json\n" + json.dumps(objs) + "\n```"

    def questioner(self, crop: Image.Image) -> str:
        found = self.panel(crop)
        if found is None:
            qs = [{"question": "What color is the largest object in this crop?", "dimension": "color"},
                  {"question": "What is written on the sign behind the largest object?", "dimension": "ocr"}]
            return "```json\n" + json.dumps(qs) + "\n```"
        s_idx, p = found
        dim = self.scenes[s_idx][0].dimension
        ref = reference(p["frame"])
        qs = [
            {"question": QUESTIONS[dim][0].format(ref=ref), "dimension": dim},
            {"question": f"What is written on the sign behind {ref}?", "dimension": "ocr"},
            {"question": f"Is {ref} the largest panel in the picture?", "dimension": "structure"},
        ]
        return "Sure.\n```json\n" + json.dumps(qs) + "\n```"

    def validator(self, text: str) -> str:
        if "sign behind" in text.split("Decide whether")[0]:
            return "The sign is not in the crop.\nVALID: No\nREASON: needs context outside the crop."
        return "Step 1: the crop shows the target.\n**VALID:** Yes\nREASON: answerable from the crop."

    def value(self, crop: Image.Image, text: str) -> str | None:
        found = self.panel(crop)
        return None if found is None else found[1]["value"]

    def teacher(self, crop: Image.Image, text: str, seed: int, i: int) -> str:
        """Sample i of a request: the 4th sample of each teacher gives no answer (6 of 8 votes remain)."""
        if "largest panel" in text:
            return "\\boxed{yes}" if i % 2 else "\\boxed{no}"
        v = self.value(crop, text)
        if v is None:
            return "\\boxed{blue}"
        if i == 3:
            return "Hard to say from this view."
        spoken = NUMBER_WORDS[int(v)] if v.isdigit() else v
        forms = [[f"Counting carefully, the answer is \\boxed{{{v}}}.", f"\\boxed{{{spoken}}}"],
                 [f"<|begin_of_box|>{v}<|end_of_box|>"] * 2,
                 [f"<answer>{v}</answer>", f"Answer: {v}"]]
        return forms[i][seed % 2]

    def judge(self, text: str) -> str:
        answers = dict(re.findall(r"^Answer (\d+): (.*)$", text, re.MULTILINE))
        spoken = {w: str(i) for i, w in enumerate(NUMBER_WORDS)}
        norm = {k: spoken.get(v.lower(), v.lower()) for k, v in answers.items() if v != "(no answer)"}
        top = max(set(norm.values()), key=lambda v: list(norm.values()).count(v))
        group = [k for k, v in norm.items() if v == top]
        return f"The largest group says {top}.\n**GROUP:** {', '.join(group)}\nBEST: {group[-1]}"

    def distractors(self, im: Image.Image, text: str) -> str:
        answer = re.search(r"Correct answer: (.*)", text).group(1).strip()
        s = self.scene(im)
        if s is None:  # a photograph: the generic teachers say "blue"
            pool = ["red", "green", "yellow", "purple"]
        else:  # ocr has no closed set of values: invent look-alike readings
            pool = value_pool(self.scenes[s][0].dimension) or [answer[::-1] + "X", answer + "7", "Z" + answer[1:] + "K"]
        wrong = [v for v in pool if v != answer][:3]
        return "```json\n" + json.dumps([answer.upper(), wrong[0], *wrong]) + "\n```"  # repeats must be removed

    def student(self, im: Image.Image, text: str, i: int) -> str:
        options = dict(re.findall(r"^([A-J])\. (.*)$", text, re.MULTILINE))
        s = self.scene(im)
        truth = "blue"  # what the generic teachers say about photographs
        if s is not None:
            truth = self.panel_by_frame(s, text)["value"]
        right = next((k for k, v in options.items() if v == truth), None)
        wrong = next(k for k in options if k != right)
        pick = right if s in self.easy and right else wrong
        return f"The box shows it. \\boxed{{{pick}}}"

    # -- HTTP

    async def chat(self, request: Request):
        body = await request.json()
        if self.script:
            action = self.script.pop(0)
            if action[0] == "status":
                return JSONResponse({"error": {"message": f"scripted {action[1]}"}}, status_code=action[1])
            await asyncio.sleep(action[1])
        if self.delay:
            await asyncio.sleep(self.delay)
        parts = [p for m in body["messages"] for p in (m["content"] if isinstance(m["content"], list) else [])]
        text = "\n".join(p["text"] for p in parts if p["type"] == "text")
        images = [decode(p["image_url"]["url"]) for p in parts if p["type"] == "image_url"]
        role = self.role_of(text)
        self.calls[role] = self.calls.get(role, 0) + 1
        n = body.get("n") or 1
        texts = self.reply(text, images, n, body.get("seed") or 0)
        choices = [{"index": i, "finish_reason": "stop", "message": {"role": "assistant", "content": t}}
                   for i, t in enumerate(texts)]
        usage = {"prompt_tokens": 100, "completion_tokens": 10 * n, "total_tokens": 100 + 10 * n}
        return {"id": "x", "object": "chat.completion", "created": 0, "model": MODEL, "choices": choices,
                "usage": usage}


@contextmanager
def oracle_server(oracle: Oracle, port: int = 0):
    with running(oracle.app, port=port) as url:
        yield url + "/v1"


def make_world(root: Path, n: int = 2, size: int = 448):
    """n ZoomWorld scenes in root/images; returns (samples, images)."""
    path = generate_split(root, "train", n, size=size, progress=False)
    samples = read_samples(path)
    return samples, [Image.open(s.image).convert("RGB") for s in samples]


def synth_config(tmp: Path, images, url: str, **overrides):
    """A small, fast config: every role at `url`, tiny backoff, no progress bar."""
    base = {
        "images": [str(images)], "out_dir": str(tmp / "out"), "progress": False, "chunk_size": 4,
        "endpoint": {"base_url": url, "model": MODEL, "max_retries": 3, "backoff_base_s": 0.01,
                     "backoff_max_s": 0.05, "timeout_s": 10, "max_image_pixels": 224 * 224,
                     "image_format": "jpeg"},  # small and fast to encode: the oracle only needs thumbnails
        "intake": {"min_width": 256, "min_height": 256},
        "regions": {"backend": "teacher"},
        "roles": {"teachers": [{"name": "qwen"}, {"name": "glm"}]},
    }
    for key, value in overrides.items():
        node = base
        *path, last = key.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = value
    tmp.mkdir(parents=True, exist_ok=True)
    cfg_path = tmp / "synth.yaml"
    import yaml

    cfg_path.write_text(yaml.safe_dump(base))
    return load_synth_config(cfg_path)


def funnel(out: Path, suffix: str = "") -> dict:
    report = json.loads((out / f"funnel{suffix}.json").read_text())
    for s in report["stages"]:  # the funnel's invariant: every item is accounted for
        assert s["in"] == s["out"] + sum(s["dropped"].values()) + sum(s["pending"].values()), s
    return report


def stage(report: dict, name: str) -> dict:
    return next(s for s in report["stages"] if s["stage"] == name)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("zw")
    samples, images = make_world(root, n=2)
    return root, samples, images


# ----------------------------------------------------------------------------- the keep path


def test_oracle_items_survive_every_stage_and_load_as_samples(tmp_path, world):
    root, samples, images = world
    oracle = Oracle(samples, images, easy={0})
    with oracle_server(oracle) as url:
        out = run_synth(synth_config(tmp_path, root / "images", url))
    report = funnel(out)

    panels = {(s.meta["index"], tuple(p["box"])): (s, p) for s in samples for p in s.meta["panels"]}
    n_panels = len(panels)
    assert stage(report, "intake")["out"] == 2
    assert stage(report, "region_filter")["dropped"] == {"object not unique (label listed more than once)": 4}
    assert stage(report, "questions")["out"] == n_panels
    assert stage(report, "validation")["dropped"] == {"the validator said No": n_panels}
    assert stage(report, "consensus")["dropped"] == {"agreement under 75% of 8 votes": n_panels}
    easy = len(samples[0].meta["panels"])  # the student solves every item of scene 0
    assert stage(report, "difficulty")["dropped"] == {"too easy: the student is right 4 of 4 times": easy}
    assert stage(report, "export")["out"] == n_panels - easy > 0
    assert report["pending_total"] == 0
    assert set(report["tokens"]) == {"lister", "questioner", "validator", "qwen", "glm", "distractor", "student"}
    assert report["tokens"]["qwen"]["completion_tokens"] > 0

    kept = read_samples(out / "samples.parquet")
    assert len(kept) == n_panels - easy
    for s in kept:
        scene, panel = next(v for (i, box), v in panels.items() if box == s.box)  # exact box round trip
        assert scene.meta["index"] == 1
        assert s.answer == panel["value"] and s.dimension == scene.dimension
        assert len(s.options) == 4 and len({o.lower() for o in s.options}) == 4  # "SQUARE" was deduplicated
        assert s.answer_letter == s.meta["letter"] and s.meta["votes"] == 6 and s.meta["total"] == 8
        assert s.meta["student_correct"] == 0 and Path(s.image) == Path(scene.image)
        assert "red bounding box" in s.meta["problem"] and "red bounding box" not in s.question
        overlay = Image.open(out / s.meta["overlay"])
        ex1, ey1, _, _ = expand_box(s.box, 0.05, 448, 448)  # the outline lies just inside the grown box
        assert overlay.size == (448, 448) and overlay.getpixel((ex1 + 2, ey1 + 6)) == (255, 0, 0)
        teacher = Image.open(s.teacher_image)
        assert teacher.size == ((s.box[2] - s.box[0]) * 2, (s.box[3] - s.box[1]) * 2)

    r1 = pq.read_table(out / "easyr1.parquet").to_pylist()
    assert len(r1) == len(kept)
    for row in r1:
        assert row["problem"].startswith("<image>") and "red bounding box" in row["problem"]
        assert row["answer"] in "ABCD" and Path(row["images"][0]).is_file()
        assert row["data_source"] == "general" and row["extra_info"]["question"] in row["problem"]
    opd = pq.read_table(out / "vision_opd.parquet").to_pylist()
    assert [r["answer"] for r in opd] == [r["answer"] for r in r1]
    assert all(Path(r["teacher_images"][0]).is_file() for r in opd)


def test_boxes_file_backend_keeps_exact_boxes(tmp_path, world):
    root, samples, images = world
    boxes = tmp_path / "boxes.jsonl"
    rows = []
    for s in samples:
        for p in s.meta["panels"]:
            rows.append({"image": os.path.relpath(s.image, tmp_path),  # relative to the boxes file
                         "box": p["box"], "label": f"panel {p['frame']}", "score": 0.93})
        rows.append({"image": s.image, "box": [5, 5, 30, 30], "label": "speck", "score": 0.5})
        rows.append({"image": s.image, "box": [0, 0, 300, 300], "label": "big", "score": 0.99})
    boxes.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    oracle = Oracle(samples, images)
    with oracle_server(oracle) as url:
        out = run_synth(synth_config(tmp_path, root / "images", url, **{
            "regions.backend": "boxes", "regions.boxes_file": str(boxes), "difficulty.enabled": False}))
    report = funnel(out)
    assert stage(report, "region_filter")["dropped"] == {"score under 0.75": 2, "covers 10% of the image or more": 2}
    assert "lister" not in oracle.calls
    kept = read_samples(out / "samples.parquet")
    truth = {tuple(p["box"]): p["value"] for s in samples for p in s.meta["panels"]}
    assert len(kept) == len(truth)
    assert {s.box: s.answer for s in kept} == truth


def test_real_photographs(tmp_path):
    """matplotlib's sample photographs: the large one is used, the small and the broken ones are not."""
    photos = tmp_path / "photos"
    (photos / "more").mkdir(parents=True)
    (photos / "grace_hopper.jpg").write_bytes((PHOTOS / "grace_hopper.jpg").read_bytes())
    (photos / "more" / "logo.png").write_bytes((PHOTOS / "logo2.png").read_bytes())  # 542 x 130: too small
    (photos / "more" / "broken.jpg").write_bytes((PHOTOS / "grace_hopper.jpg").read_bytes()[:5000])
    (photos / "notes.txt").write_text("not an image")
    oracle = Oracle()
    with oracle_server(oracle) as url:
        cfg = synth_config(tmp_path, photos, url, **{"regions.backend": "opencv", "regions.max_per_image": 3})
        out = run_synth(cfg)
    report = funnel(out)
    assert stage(report, "intake") == {"stage": "intake", "unit": "image", "in": 3, "out": 1, "pending": {},
                                       "dropped": {"smaller than 256x256": 1, "unreadable image": 1}}
    assert stage(report, "region_filter")["out"] == 3
    kept = read_samples(out / "samples.parquet")
    assert len(kept) == 3  # the generic oracle agrees on "blue" and the student never gets it right
    hopper = Image.open(photos / "grace_hopper.jpg")
    for s in kept:
        assert s.answer == "blue" and Path(s.image).name == "grace_hopper.jpg"
        x1, y1, x2, y2 = s.box
        assert 0 <= x1 < x2 <= hopper.width and 0 <= y1 < y2 <= hopper.height
        crop = Image.open(s.teacher_image)
        assert crop.size == (max(28, x2 - x1) * 2, max(28, y2 - y1) * 2)


def test_llm_judge_consensus_and_vision_opd_options(tmp_path, world):
    root, samples, images = world
    oracle = Oracle(samples, images)
    with oracle_server(oracle) as url:
        out = run_synth(synth_config(tmp_path, root / "images", url, **FEW, **{
            "consensus.method": "judge", "export.opd_student": "full", "export.opd_teacher": "overlay_crop"}))
    report = funnel(out)
    assert oracle.calls["judge"] == stage(report, "consensus")["in"] > 0
    assert stage(report, "consensus")["dropped"] == {"agreement under 75% of 8 votes": 6}  # yes/no split 4/4
    kept = read_samples(out / "samples.parquet")
    truth = {tuple(p["box"]): p["value"] for s in samples for p in s.meta["panels"]}
    assert kept and all(s.answer == truth[s.box] and s.meta["votes"] == 6 for s in kept)
    for row in pq.read_table(out / "vision_opd.parquet").to_pylist():
        assert Path(row["images"][0]).parent == root / "images"  # the plain full image ...
        assert "red bounding box" not in row["problem"] and row["problem"].startswith("<image>")  # ... so no pointer
        teacher = Image.open(row["teacher_images"][0]).convert("RGB")
        assert (255, 0, 0) in {c for _, c in teacher.getcolors(1 << 16)}  # the zoomed overlay shows the box


# ----------------------------------------------------------------------------- failures


def test_transient_429_then_500_are_retried(tmp_path, world):
    root, samples, images = world
    clean = Oracle(samples, images)
    with oracle_server(clean) as url:
        out = run_synth(synth_config(tmp_path / "a", root / "images", url, **FEW))
        expected = read_samples(out / "samples.parquet")
    flaky = Oracle(samples, images, script=[("status", 429), ("status", 500)])
    with oracle_server(flaky) as url:
        out = run_synth(synth_config(tmp_path / "b", root / "images", url, **FEW))
    report = funnel(out)
    assert report["pending_total"] == 0
    assert not flaky.script  # the server did answer 429, then 500 ...
    assert report["tokens"]["lister"]["retries"] == 2 and report["tokens"]["lister"]["errors"] == 0  # ... then 200
    assert sum(u["retries"] for u in report["tokens"].values()) == 2
    assert read_samples(out / "samples.parquet") == [s.with_(teacher_image=s.teacher_image.replace(
        str(tmp_path / "a"), str(tmp_path / "b"))) for s in expected]


def test_a_failing_student_never_lets_an_item_through(tmp_path, world):
    root, samples, images = world
    dead = f"http://127.0.0.1:{free_port()}/v1"
    with oracle_server(Oracle(samples, images)) as url:
        cfg = synth_config(tmp_path, root / "images", url, **FEW, **{"roles.student": {"base_url": dead}})
        with pytest.raises(SynthError, match="roles.student"):
            run_synth(cfg)
    report = funnel(tmp_path / "out")
    assert stage(report, "difficulty")["in"] > 0 and stage(report, "difficulty")["out"] == 0
    assert stage(report, "export")["out"] == 0 and read_samples(tmp_path / "out" / "samples.parquet") == []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_down_stops_clearly_and_the_store_resumes(tmp_path, world):
    root, samples, images = world
    dead = f"http://127.0.0.1:{free_port()}/v1"
    oracle = Oracle(samples, images)
    with oracle_server(oracle) as url:
        cfg = synth_config(tmp_path, root / "images", url, **FEW, **{
            "roles.teachers": [{"name": "qwen", "base_url": dead}, {"name": "glm"}]})
        start = time.monotonic()
        with pytest.raises(SynthError) as err:
            run_synth(cfg)
        assert time.monotonic() - start < 20  # bounded retries, no hour-long loop
        msg = str(err.value)
        assert "roles.teachers[0]" in msg and dead in msg and "connection error" in msg and "rerun" in msg
        report = funnel(tmp_path / "out")  # the funnel is written before the error is raised
        assert "call failed (connection error)" in stage(report, "answers")["pending"]
        before = dict(oracle.calls)

        # fix the endpoint: only the missing calls are made
        cfg.roles.teachers[0].base_url = url
        out = run_synth(cfg)
    report = funnel(out)
    assert report["pending_total"] == 0 and stage(report, "export")["out"] > 0
    assert oracle.calls["questioner"] == before["questioner"] and oracle.calls["validator"] == before["validator"]
    assert oracle.calls["teacher"] > before.get("teacher", 0)
