"""The synth stages as plain functions: config, store, parsers, filters, consensus, options, intake."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest
import yaml
from PIL import Image

from zoomless.engines.base import Generation
from zoomless.synth import answers as ans
from zoomless.synth import distill as dst
from zoomless.synth import questions as qs
from zoomless.synth import regions as rg
from zoomless.synth.config import (
    Endpoint, RegionsConfig, SynthConfigError, load_synth_config, parse_overrides, parse_shard,
)
from zoomless.synth.difficulty import count_correct
from zoomless.synth import SynthError
from zoomless.synth.intake import find_images, in_shard, intake
from zoomless.synth.store import Store
from zoomless.synth.validate import parse_verdict
from zoomless.world import generate_sample

# ----------------------------------------------------------------------------- config


def write_cfg(tmp_path: Path, data: dict) -> Path:
    p = tmp_path / "cfg" / "synth.yaml"
    p.parent.mkdir(exist_ok=True)
    p.write_text(yaml.safe_dump(data))
    return p


def test_config_defaults_are_the_reference(tmp_path):
    cfg = load_synth_config(write_cfg(tmp_path, {"images": "photos", "out_dir": "out"}))
    assert cfg.images == [tmp_path / "cfg" / "photos"] and cfg.out_dir == tmp_path / "cfg" / "out"
    assert (cfg.intake.min_width, cfg.regions.max_area_fraction, cfg.regions.min_score) == (1200, 0.10, 0.75)
    assert (cfg.crop.zoom, cfg.questions.per_crop, cfg.questions.n_seeds) == (2.0, 3, 15)
    assert [t.samples for t in cfg.roles.teachers] == [4, 4] and cfg.consensus.min_agreement == 0.75
    assert (cfg.roles.questioner.temperature, cfg.roles.questioner.top_p) == (0.9, 0.8)
    assert (cfg.roles.validator.temperature, cfg.roles.student.temperature, cfg.roles.student.samples) == (0.3, 1.0, 4)
    assert (cfg.distill.n_distractors, cfg.distill.overlay_width, cfg.difficulty.max_correct) == (3, 5, 1)


def test_the_documented_example_config_loads(tmp_path):
    import textwrap

    from zoomless.synth import config

    example = textwrap.dedent(config.__doc__.split("local student proxy:\n")[1])
    cfg = load_synth_config(write_cfg(tmp_path, yaml.safe_load(example)))
    glm = cfg.roles.teachers[1].endpoint(cfg.endpoint)
    assert (glm.base_url, glm.model, glm.api_key_env) == ("http://gpu2:8000/v1", "GLM-4.5V", "VLLM_KEY")
    student = cfg.roles.student.endpoint(cfg.endpoint)
    assert student.model_dir == Path("/models/Qwen3-VL-8B-Instruct") and student.base_url is None
    with pytest.raises(SynthConfigError, match="not both"):
        load_synth_config(None, {"images": ["x"], "out_dir": "o", "roles.student": {"model_dir": "m", "base_url": "u"}})


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(SynthConfigError, match=r"synth.yaml: regions.backnd: unknown key"):
        load_synth_config(write_cfg(tmp_path, {"images": "x", "out_dir": "o", "regions": {"backnd": "opencv"}}))
    with pytest.raises(SynthConfigError, match=r"roles.teachers.1.samples"):
        load_synth_config(write_cfg(tmp_path, {"images": "x", "out_dir": "o",
                                               "roles": {"teachers": [{}, {"samples": 0}]}}))
    with pytest.raises(SynthConfigError, match="shard"):
        load_synth_config(write_cfg(tmp_path, {"images": "x", "out_dir": "o"}), {"shard": "2/2"})
    with pytest.raises(SynthConfigError, match="teacher names must be distinct"):
        load_synth_config(None, {"images": ["x"], "out_dir": "o", "roles.teachers": [{"name": "a"}, {"name": "a"}]})
    with pytest.raises(SynthConfigError, match="not an index"):
        load_synth_config(None, {"images": ["x"], "out_dir": "o", "roles": {"teachers": [{}]},
                                 "roles.teachers.3.model": "m"})
    with pytest.raises(SynthConfigError, match="no such config file"):
        load_synth_config(tmp_path / "missing.yaml")


def test_overrides_and_role_endpoints(tmp_path):
    path = write_cfg(tmp_path, {
        "images": ["photos"], "out_dir": "out",
        "endpoint": {"base_url": "http://h:1/v1", "model": "big", "api_key_env": "KEY"},
        "roles": {"teachers": [{"name": "qwen"}, {"name": "glm", "model": "glm-4.5v"}],
                  "student": {"model_dir": "student-model"}},
    })
    cfg = load_synth_config(path, parse_overrides(["roles.teachers.0.samples=2", "shard=1/4", "out_dir=elsewhere"]))
    assert cfg.roles.teachers[0].samples == 2 and cfg.shard_index == (1, 4)
    assert cfg.out_dir == Path("elsewhere")  # an override is relative to the working folder, not the file
    glm = cfg.roles.teachers[1].endpoint(cfg.endpoint)
    assert (glm.base_url, glm.model, glm.api_key_env) == ("http://h:1/v1", "glm-4.5v", "KEY")
    student = cfg.roles.student.endpoint(cfg.endpoint)
    assert student.base_url is None and student.model_dir == tmp_path / "cfg" / "student-model"
    assert cfg.roles.teacher_names() == ["qwen", "glm"]
    assert parse_shard("0/1") == (0, 1)
    with pytest.raises(SynthConfigError, match="key=value"):
        parse_overrides(["oops"])


# ----------------------------------------------------------------------------- store


def test_store_is_append_only_first_record_wins_and_survives_a_torn_line(tmp_path):
    store = Store(tmp_path)
    store.put("s", [("a", {"v": 1}), ("b", {"v": 2})])
    store.put("s", [("a", {"v": 99})])  # already done: not written again
    path = tmp_path / "s.jsonl"
    assert path.read_text().count("\n") == 2
    with path.open("a") as f:
        f.write('{"key": "c", "v": 3, "half')  # a crash in the middle of a line
    again = Store(tmp_path)
    assert set(again.table("s")) == {"a", "b"} and again.torn_lines == 1
    again.put("s", [("c", {"v": 3})])  # starts on a fresh line
    third = Store(tmp_path)
    assert third.get("s", "c")["v"] == 3 and third.get("s", "a")["v"] == 1 and third.torn_lines == 1


def test_store_shards_write_their_own_files_and_read_all(tmp_path):
    Store(tmp_path, (0, 2)).put("s", [("a", {"v": 1})])
    Store(tmp_path, (1, 2)).put("s", [("b", {"v": 2})])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.0of2.jsonl", "s.1of2.jsonl"]
    assert set(Store(tmp_path).table("s")) == {"a", "b"}
    store = Store(tmp_path)
    store.log("usage", {"role": "x", "requests": 2})
    store.log("usage", {"role": "x", "requests": 3})
    assert [r["requests"] for r in store.rows("usage")] == [2, 3]


# ----------------------------------------------------------------------------- regions


def test_lister_boxes_in_both_qwen_conventions():
    size = (2000, 1000)
    reply = '```json\n[{"label": "cup", "bbox_2d": [100, 200, 300, 400]}, {"label": "sign", "bbox_2d": [0, 0, 50]}]\n```'
    props, problem = rg.parse_objects(reply, "rel1000", size, size)  # Qwen3-VL: 0..1000 of each side
    assert problem is None and props == [rg.Proposal((200, 200, 600, 400), "cup")]
    # Qwen2.5-VL: absolute pixels of the (downscaled, 28-aligned) image it was sent
    pixels = '[{"label": "cup", "bbox_2d": [100, 50, 300, 150]}]'
    assert rg.parse_objects(pixels, "pixels", (700, 350), size)[0][0].box == (286, 143, 857, 429)
    assert rg.parse_objects(reply, "pixels", (700, 350), size)[1]  # y2 = 400 lies outside a 350 px high image
    assert rg.parse_objects('[{"label": "cup", "bbox_2d": [0.1, 0.2, 0.3, 0.4]}]', "rel1", size, size)[0][0].box == (
        200, 200, 600, 400)
    # a box far outside the frame is the wrong convention, not an object
    assert rg.parse_objects('[{"label": "cup", "bbox_2d": [100, 200, 3000, 400]}]', "rel1000", size, size)[1]
    for garbage in ("", "lorem ipsum", "[1, 2", '{"label": "cup"}', '[{"label": "x", "bbox_2d": [1, 2, 3, 4]}]',
                    '[{"label": "None", "bbox_2d": [1, 2, 3, 4]}]', '[{"label": "cup", "bbox_2d": [1, 2, true, 4]}]'):
        assert rg.parse_objects(garbage, "rel1000", size, size)[0] == []


def test_lister_image_is_aligned_for_pixel_coordinates():
    im = Image.new("RGB", (1000, 700))
    sent = rg.lister_image(im, "pixels", 400 * 400, 28)
    assert sent.width % 28 == 0 and sent.height % 28 == 0 and sent.width * sent.height <= 400 * 400
    assert rg.lister_image(im, "rel1000", 400 * 400, 28) is im


def test_region_filters_say_why():
    cfg = RegionsConfig(min_side=16, max_per_image=2)
    props = [
        rg.Proposal((10, 10, 50, 50), "cup", 0.9),
        rg.Proposal((10, 10, 50, 50), "mug", 0.9),  # same box again
        rg.Proposal((0, 0, 500, 500), "table", 0.9),
        rg.Proposal((60, 60, 70, 90), "pen", 0.9),
        rg.Proposal((100, 100, 140, 140), "dog", 0.5),
        rg.Proposal((200, 200, 240, 240), "car"), rg.Proposal((300, 300, 340, 340), "Car."),
        rg.Proposal((900, 900, 999, 999), "ghost"),
        rg.Proposal((400, 400, 440, 440), "hat"), rg.Proposal((450, 450, 490, 490), "bag"),
    ]
    kept, dropped = rg.filter_regions(props, 600, 600, cfg)
    assert [p.label for p in kept] == ["cup", "hat"]
    assert Counter(r for _, r in dropped) == Counter({
        "duplicate box": 1, "covers 10% of the image or more": 1, "side under 16 px": 1, "score under 0.75": 1,
        "object not unique (label listed more than once)": 2, "box empty or outside the image": 1,
        "over max_per_image": 1})


def test_opencv_finds_zoomworld_panels():
    im, sample = generate_sample(1, size=448)
    props = rg.propose_opencv(im, RegionsConfig().opencv, 0.10, 16)
    assert 1 <= len(props) <= 8
    hits = [max(rg._iou(p.box, tuple(q["box"])) for p in props) for q in sample.meta["panels"]]
    assert sum(h > 0.7 for h in hits) >= len(hits) - 1
    big = im.resize((1792, 1792))  # proposals come back in original pixels
    props_big = rg.propose_opencv(big, RegionsConfig().opencv, 0.10, 16)
    assert max(max(p.box) for p in props_big) > 448


def test_boxes_file_rows_are_checked(tmp_path):
    f = tmp_path / "boxes.jsonl"
    f.write_text('{"image": "a.jpg", "box": [1, 2, 30.5, 40], "label": "cup", "score": 0.8}\n\n'
                 '{"image": "/abs/b.jpg", "bbox": [0, 0, 10, 10]}\n')
    boxes = rg.load_boxes(f)
    assert boxes[(tmp_path / "a.jpg").resolve()] == [rg.Proposal((1, 2, 31, 40), "cup", 0.8)]
    assert boxes[Path("/abs/b.jpg")] == [rg.Proposal((0, 0, 10, 10))]
    for line, msg in (('{"image": "a.jpg", "box": [1, 2, 3]}', "boxes.jsonl:1: 'box' must be four numbers"),
                      ('{"image": "a.jpg", "box": [5, 5, 1, 9]}', "is empty"),
                      ('{"box": [1, 2, 3, 4]}', "'image' must be a path"),
                      ("not json", "not valid JSON"),
                      ('{"image": "a.jpg", "box": [1, 2, 3, 4], "score": "high"}', "'score' must be a number")):
        f.write_text(line + "\n")
        with pytest.raises(SynthError, match=msg):
            rg.load_boxes(f)


# ----------------------------------------------------------------------------- questions, validation


def test_seeds_cover_every_dimension_and_are_seeded():
    picked = qs.pick_seeds(qs.SEED_QUESTIONS, 15, seed=7)
    assert len(picked) == 15 and len(set(picked)) == 15
    assert set(d for d, _ in picked[:6]) == set(qs.SEED_QUESTIONS)
    assert picked == qs.pick_seeds(qs.SEED_QUESTIONS, 15, seed=7) != qs.pick_seeds(qs.SEED_QUESTIONS, 15, seed=8)
    assert all(q in qs.question_prompt(3, picked) for _, q in picked)


def test_seeds_file(tmp_path):
    f = tmp_path / "seeds.json"
    f.write_text(json.dumps([{"question": "How many cats are there?", "dimension": "count"}, {"question": "What?"}]))
    assert qs.load_seeds(f) == {"counting": ("How many cats are there?",), "object": ("What?",)}
    f.write_text(json.dumps([{"dimension": "ocr"}]))
    with pytest.raises(SynthError, match="item 0: 'question'"):
        qs.load_seeds(f)


def test_questions_are_parsed_strictly():
    reply = ('Here:\n```json\n[{"question": "How many dots are in the panel?", "dimension": "Count"},'
             ' "What color is the red car door?", {"question": "How many dots are in the panel?"},'
             ' {"question": "Why?"}, {"q": "no"}, {"question": "Which shape is the sign on the wall?", "dimension": "x"},'
             ' {"question": "One more question here?"}]\n```')
    found, problem = qs.parse_questions(reply, 3, 300)
    assert problem is None
    assert found == [qs.Question("How many dots are in the panel?", "counting"),
                     qs.Question("What color is the red car door?", None),
                     qs.Question("Which shape is the sign on the wall?", None)]
    assert qs.parse_questions("[]", 3, 300) == ([], "the model declined (empty list)")
    assert qs.parse_questions("no list at all", 3, 300)[1] == "no JSON list of questions in the reply"
    assert qs.parse_questions('[{"question": 5}]', 3, 300)[1] == "the model wrote no usable question"


@pytest.mark.parametrize("reply, verdict", [
    ("Reasoning...\nVALID: Yes\nREASON: clear.", "yes"),
    ("**VALID:** yes.\n**REASON:** fine", "yes"),
    ("VALID: No\nREASON: two boats", "no"),
    ("VALID: Yes or No\nREASON: one sentence", "missing"),  # an echo of the instruction
    ("The question is valid.", "missing"),
    ("VALID: Yes\nactually\nVALID: No", "conflicting"),
    ("", "missing"),
])
def test_validation_verdicts(reply, verdict):
    assert parse_verdict(reply)[0] == verdict


def test_validation_reason():
    assert parse_verdict("VALID: No\nREASON: the  answer needs\ncontext.\n\nextra")[1] == "the answer needs context."


# ----------------------------------------------------------------------------- answers and consensus


@pytest.mark.parametrize("reply, answer", [
    ("Let me count. \\boxed{5}", "5"),
    ("<|begin_of_box|>dark red<|end_of_box|>", "dark red"),
    ("<think>maybe 3</think><answer>4</answer>", "4"),
    ("The final answer is: STOP.", "STOP"),
    ("blue", "blue"),
    ("\\boxed{}", None),  # an empty box is no answer (not the string "None")
    ("", None),
    ("I am not sure what the image shows here at all", None),  # unmarked and long
    ("\\boxed{" + "x" * 100 + "}", None),
])
def test_answer_extraction(reply, answer):
    assert ans.extract_answer(reply) == answer


def test_answers_agree_by_rule():
    same = [("5", "five"), ("5", "5 people"), ("Twenty-one", "21"), ("dark red", "Red"), ("grey", "gray"),
            ("stripes", "striped"), ("A cat", "cat")]
    different = [("5", "6"), ("room 101", "room 102"), ("blue", "not blue"), ("red blue", "red"), ("cat", "dog"),
                 ("yes", "no")]
    assert all(ans.same_answer(a, b) for a, b in same)
    assert not any(ans.same_answer(a, b) for a, b in different)
    assert ans.same_answer("abc", "ABC", strict=True) and not ans.same_answer("N3YJ", "N3YJ7", strict=True)
    assert not ans.same_answer("dark red", "red", strict=True)


def test_consensus_keeps_a_teachers_own_answer_and_counts_failures_against():
    votes = ["3", "three", "3 dots", "\\boxed{3}", "3", "4", None, None]
    c = ans.rule_consensus([ans.extract_answer(v) if v else None for v in votes], total=8)
    assert c.answer == "3" and c.votes == 5 and not c.reached(0.75)
    c = ans.rule_consensus(["three", "3", "3", "3", "3", "3", "4", None], total=8)
    assert c.answer == "3" and c.votes == 6 and c.reached(0.75)  # the common wording, 6 of 8
    # failures and non-answers never agree with each other, so they can never make a majority
    assert ans.rule_consensus([None] * 8, total=8) == ans.Consensus(None, 0, 8)
    assert not ans.rule_consensus(["red"] + [None] * 7, total=8).reached(0.1 + 0.75)


def test_judge_grouping_is_parsed_strictly():
    answers = ["red", "dark red", None, "blue"]
    c = ans.parse_judge("Thinking...\n**GROUP:** 1, 2\nBEST: 1", answers, 8)
    assert c == ans.Consensus("red", 2, 8)
    assert "Answer 3: (no answer)" in ans.judge_prompt("q?", answers)
    for bad in ("GROUP: 1, 3\nBEST: 1", "GROUP: 1, 2\nBEST: 4", "GROUP: 1, 9\nBEST: 1", "Most common: red", ""):
        assert ans.parse_judge(bad, answers, 8) is None


# ----------------------------------------------------------------------------- distillation and difficulty


def test_distractors_are_deduplicated_against_the_answer():
    reply = '```json\n["Five", "4", "4", "6 dots", "seven", 8]\n```'
    ds, problem = dst.parse_distractors(reply, "5", 3)
    assert problem is None and ds == ["4", "6 dots", "seven"]
    assert dst.parse_distractors('["5", "five", "4"]', "5", 3) == ([], "fewer than 3 distinct distractors")
    assert dst.parse_distractors("nothing", "5", 3)[1] == "no JSON list of distractors in the reply"


def test_options_are_seeded_and_letters_balanced():
    assert dst.build_options("5", ["1", "2", "3"], seed=11) == dst.build_options("5", ["1", "2", "3"], seed=11)
    letters = Counter(dst.build_options("ans", ["x", "y", "z"], seed=s)[1] for s in range(2000))
    assert set(letters) == set("ABCD") and all(400 < n < 600 for n in letters.values())
    options, letter = dst.build_options("ans", ["x", "y", "z"], seed=3)
    assert options["ABCD".index(letter)] == "ans" and sorted(options) == ["ans", "x", "y", "z"]
    text = dst.mcq_problem("What color is the cup?", options)
    assert text.startswith("What color is the cup?\n\nOnly focus on the objects inside the red bounding box")
    assert "\n\nA. " in text and text.endswith("Answer with the option's letter from the given choices.")
    assert "red bounding box" not in dst.mcq_problem("What color?", options, pointing=False)


def test_student_answers_are_graded_by_rule():
    options = ("red", "blue", "green", "pink")
    replies = ["\\boxed{B}", "The answer is B.", "\\boxed{blue}", "\\boxed{A}", "I cannot see", ""]
    assert count_correct(replies, "blue", options, "mcq") == 3
    assert count_correct(["\\boxed{five}", "5", "six"], "5", None, "open") == 2


def test_overlay_crop_shows_the_outline():
    im = Image.new("RGB", (200, 200), (255, 255, 255))
    ov = dst.overlay(im, (80, 80, 120, 120))
    crop = dst.overlay_crop(ov, (80, 80, 120, 120), 0.05, 2.0)
    assert crop.width > 80 and (255, 0, 0) in {crop.getpixel((x, crop.height // 2)) for x in range(crop.width)}


# ----------------------------------------------------------------------------- intake


def test_intake_walks_verifies_filters_deduplicates_and_caches(tmp_path):
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    Image.new("RGB", (64, 48), (1, 2, 3)).save(photos / "a.png")
    Image.new("RGB", (64, 48), (1, 2, 3)).save(photos / "sub" / "copy.png")  # same bytes as a.png
    Image.new("RGB", (20, 48)).save(photos / "sub" / "narrow.jpg")
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    (photos / "readme.md").write_text("x")
    assert [name for _, name in find_images([photos], [".png", ".jpg"])] == [
        "a.png", "broken.jpg", "sub/copy.png", "sub/narrow.jpg"]
    cfg = load_synth_config(None, {"images": [str(photos)], "out_dir": str(tmp_path / "o"),
                                   "intake.min_width": 32, "intake.min_height": 32}).intake
    store = Store(tmp_path / "store")
    images, dropped = intake([photos], cfg, store, 0, (0, 1))
    assert [i.path.name for i in images] == ["a.png"] and images[0].width == 64
    assert sorted(r for _, r in dropped) == ["duplicate of another image", "smaller than 32x32", "unreadable image"]
    os.remove(photos / "broken.jpg")
    again, _ = intake([photos], cfg, store, 0, (0, 1))  # from the store: no decoding
    assert again == images and len(store.table("intake")) == 4
    with pytest.raises(SynthError, match="no such folder or file"):
        find_images([tmp_path / "nope"], [".png"])


def test_shards_partition_the_images():
    names = [f"img_{i}.jpg" for i in range(200)]
    parts = [{n for n in names if in_shard(n, (i, 3))} for i in range(3)]
    assert sum(len(p) for p in parts) == 200 and set().union(*parts) == set(names)
    assert all(len(p) > 40 for p in parts)


def test_long_replies_are_clipped_keeping_both_ends():
    from zoomless.synth.parsing import clip

    reply = '```json\n["q?"]\n```' + "blah " * 5000 + "VALID: Yes"
    short = clip(reply, 1000)
    assert len(short) < 1010 and short.startswith('```json\n["q?"]') and short.endswith("VALID: Yes")
    assert clip("short", 1000) == "short"


def test_error_generations_are_never_answers():
    # engines report failures as Generation(error=...); the runner never stores them (see
    # test_synth_oracle), and their text is empty, so extraction yields no vote either
    assert ans.extract_answer(Generation(text="", finish_reason="error", error="HTTP 500").text) is None
    assert Endpoint().max_retries == 5
