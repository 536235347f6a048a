"""ZoomWorld tensors and the on-device trainer: the model sees exactly what `zoomless eval` feeds it
(prompt ids, pixels, position ids, answers), and training on these batches learns."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from zoomless.demo import AREA, SIZE, shipped_model_dir
from zoomless.engines.base import conversation
from zoomless.imaging import render_view
from zoomless.models.loading import encode_conversations, load_vlm
from zoomless.prompts import format_question
from zoomless.train.batching import build_batch, encode_prompt, response_hidden
from zoomless.train.common import end_of_turn_id
from zoomless.world.scene import render_scene
from zoomless.world.tensors import WorldSpec, build_world, image_positions, image_stats, make_batch, parse_view, view_margin
from zoomless.world.trainer import (
    FitConfig,
    History,
    OPDConfig,
    evaluate,
    fit_opd,
    fit_sft,
    gap_closed,
    parse_schedule,
    stage_at,
)

VIEWS = ("full", "crop", "crop@1.5", "full:2")
SPEC = WorldSpec(split="test", size=SIZE, min_area_fraction=AREA[0], max_area_fraction=AREA[1])


@pytest.fixture(scope="module")
def base():
    return load_vlm(shipped_model_dir("zoomworld-base"), device="cpu", dtype=torch.float32, max_pixels=SIZE * SIZE)


@pytest.fixture(scope="module")
def world(base):
    model, processor = base
    return build_world(SPEC, 30, VIEWS, processor, end_of_turn_id(model, processor), progress=False)


def _eval_conversation(sample, view):
    """The conversation `zoomless eval` builds for one view of a sample."""
    margin, panels = parse_view(view)
    image, question = render_view(sample, "full" if margin is None else "crop", render_scene(SPEC.sample(
        sample.meta["index"])[0], panels), crop_margin=margin or 0.0, max_pixels=SIZE * SIZE)
    return conversation([image], format_question(sample, question, "open"))


def test_bad_view_names_fail_before_rendering():
    for bad in ("zoom", "crop@", "crop@-1", "crop@x"):
        with pytest.raises(ValueError, match="unknown view"):
            view_margin(bad)
    assert view_margin("full") is None and view_margin("crop") == 0.25 and view_margin("crop@2") == 2.0


def test_every_bucket_matches_the_processor(base, world):
    """Ids, pixel values and grid of one item of every bucket (crops under the processor's
    minimum size included) equal what the processor makes of the eval conversation."""
    _, processor = base
    stats = image_stats(processor)
    checked = 0
    for view in VIEWS:
        for bucket in world.buckets[view]:
            sample = world.samples[int(bucket.rows[0])]
            enc = encode_conversations(processor, [_eval_conversation(sample, view)])
            got = make_batch(world, bucket, torch.tensor([0]), stats, with_answer=False).inputs
            assert torch.equal(enc["input_ids"], got["input_ids"]), (view, bucket.grid)
            assert torch.equal(enc["image_grid_thw"], got["image_grid_thw"])
            torch.testing.assert_close(enc["pixel_values"], got["pixel_values"], atol=1e-5, rtol=0)
            checked += 1
    assert checked >= 5  # the crops come in several sizes


def test_positions_match_the_models_own_rope_index(base):
    """The batch's explicit 3D position ids give the logits the model computes without them."""
    model, processor = base
    sample = SPEC.sample(3)[1]
    enc = encode_conversations(processor, [_eval_conversation(sample, "crop")])
    grid = tuple(enc["image_grid_thw"][0, 1:].tolist())
    n_img = grid[0] * grid[1] // 4
    prefix = (enc["input_ids"][0] == processor.tokenizer.convert_tokens_to_ids(processor.image_token)).nonzero()[0, 0]
    pos = image_positions(int(prefix), grid, enc["input_ids"].shape[1] - int(prefix) - n_img)
    with torch.no_grad():
        want = model(**enc).logits
        got = model(**{k: v for k, v in enc.items() if k != "mm_token_type_ids"}, position_ids=pos[:, None]).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_teacher_forced_answers_match_the_training_batch_path(base, world):
    """A multi-row batch of one bucket (different question lengths, right padding) gives the same
    answer-token hidden states as `train/batching.py` on the processor's encodings."""
    model, processor = base
    stats = image_stats(processor)
    bucket = world.buckets["crop"][0]
    picks = torch.arange(min(6, len(bucket.rows)))
    batch = make_batch(world, bucket, picks, stats)
    rows = bucket.rows[picks]
    answers = [world.answer[r, : world.answer_len[r]].tolist() for r in rows]
    prompts = [encode_prompt(processor, _eval_conversation(world.samples[int(r)], "crop")) for r in rows]
    ref = build_batch(prompts, answers, world.pad_id)
    with torch.no_grad():
        want = response_hidden(model, ref)
        hidden = model.model(**batch.inputs, use_cache=False).last_hidden_state
    got = torch.cat([hidden[i, batch.answer_start[i] - 1 + torch.arange(len(a))] for i, a in enumerate(answers)])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_greedy_accuracy_matches_the_shipped_numbers(base, world):
    """The base answers from crops and not from the full scene (as `zoomless eval` measures)."""
    model, processor = base
    stats = image_stats(processor)
    crop = evaluate(model, world, "crop", stats, processor.tokenizer)
    full = evaluate(model, world, "full", stats, processor.tokenizer)
    assert crop["n"] == full["n"] == 30
    assert crop["accuracy"]["all"] >= 30 and crop["accuracy"]["all"] - full["accuracy"]["all"] >= 20, (crop, full)
    assert set(crop["accuracy"]) >= {"all", "counting", "object"}


def test_schedule_stages_split_the_run():
    stages = parse_schedule("0.2:crop=1;100:crop@1=.5,crop=.5;0:full=.75,crop=.25")
    assert [s.views for s in stages][1] == {"crop@1": 0.5, "crop": 0.5}
    assert stage_at(stages, 0, 1000) is stages[0] and stage_at(stages, 199, 1000) is stages[0]
    assert stage_at(stages, 200, 1000) is stages[1] and stage_at(stages, 299, 1000) is stages[1]
    assert stage_at(stages, 300, 1000) is stages[2] and stage_at(stages, 5000, 1000) is stages[2]
    assert parse_schedule("crop")[0].views == {"crop": 1.0}
    with pytest.raises(ValueError, match="bad weight"):
        parse_schedule("crop=lots")


def test_gap_closed():
    assert gap_closed(10.0, 55.0, 100.0) == 50.0
    assert gap_closed(10.0, 5.0, 100.0) == pytest.approx(-5.6)
    assert gap_closed(50.0, 60.0, 40.0) is None  # no gap to close


def test_sft_on_device_batches_learns(tiny_model):
    """Thirty steps on a handful of crops drive their answer loss down (memorised: the point is
    that the batches carry the right targets and gradients flow)."""
    model, processor = load_vlm(tiny_model, device="cpu", dtype=torch.float32, max_pixels=SIZE * SIZE)
    data = build_world(SPEC, 8, ("crop",), processor, end_of_turn_id(model, processor), progress=False)
    hist = History()
    cfg = FitConfig(lr=3e-3, batch=8, warmup=1, max_steps=30, seconds=600, eval_every=0)
    assert fit_sft(model, data, parse_schedule("crop=1"), image_stats(processor), cfg, hist) == 30
    losses = [r["loss"] for r in hist.rows if "loss" in r]
    assert losses[-1] < 0.5 * losses[0], losses


def test_opd_reads_no_labels_and_moves_the_student(base, world, tmp_path):
    """Vision-OPD with a crop anchor runs, logs both terms, and changes the student's weights;
    blanking every gold answer changes nothing (the method never reads them)."""
    model, processor = base
    stats = image_stats(processor)

    def run(data):
        student = copy.deepcopy(model)
        teacher = copy.deepcopy(model).requires_grad_(False)
        hist = History(tmp_path / "h.jsonl")
        cfg = OPDConfig(batch=4, rollouts=2, max_steps=2, seconds=600, eval_every=0, crop_anchor=1.0, max_new=4)
        fit_opd(student, teacher, data, stats, cfg, hist)
        return student, hist

    student, hist = run(world)
    assert {"jsd", "anchor_jsd", "response_len"} <= set(hist.rows[0])
    moved = max((a - b).abs().max().item() for a, b in zip(student.parameters(), model.parameters()))
    assert moved > 0
    blind = copy.copy(world)
    blind.answer = torch.full_like(world.answer, world.pad_id)
    student2, _ = run(blind)
    for a, b in zip(student.parameters(), student2.parameters()):
        torch.testing.assert_close(a, b)


def test_r2i_labels_and_grpo(base, world):
    """The BASE's crop answers, kept where its votes agree, are labels more accurate than its
    average crop answer; GRPO on them runs and rewards answers equal to a label."""
    from zoomless.world.trainer import GRPOConfig, fit_grpo, synthesize_labels

    model, processor = base
    stats = image_stats(processor)
    labelled, funnel = synthesize_labels(model, world, stats, votes=4, min_agree=0.75)
    assert funnel["scenes"] == 30 and 0 < funnel["kept"] <= 30
    kept = {int(r) for b in labelled.buckets["full"] for r in b.rows}
    assert len(kept) == funnel["kept"]
    assert funnel["label_accuracy"] >= 50, funnel
    hist = History()
    cfg = GRPOConfig(batch=2, rollouts=4, max_steps=2, seconds=600, eval_every=0, max_new=4)
    assert fit_grpo(copy.deepcopy(model), labelled, stats, cfg, hist) == 2
    assert 0.0 <= hist.rows[0]["reward"] <= 1.0


def test_full_views_with_fewer_panels():
    """"full:k" is the scene with only its first k panels drawn (panel 0 is the evidence); the
    variants share one clutter and equal separate renderings."""
    from zoomless.world.scene import render_scene_variants

    assert parse_view("full:2") == (None, 2) and parse_view("full") == (None, None)
    for bad in ("full:0", "full:", "full:x"):
        with pytest.raises(ValueError, match="unknown view"):
            parse_view(bad)
    scene, _ = SPEC.sample(3)
    variants = render_scene_variants(scene, [None, 1, 2])
    for k in (None, 1, 2):
        assert np.array_equal(np.asarray(variants[k]), np.asarray(render_scene(scene, k)))
    one, every = np.asarray(variants[1]), np.asarray(variants[None])
    x1, y1, x2, y2 = scene.panels[0].box  # the evidence is drawn in both; a distractor panel only in `every`
    assert np.array_equal(one[y1:y2, x1:x2], every[y1:y2, x1:x2])
    x1, y1, x2, y2 = scene.panels[1].box
    assert not np.array_equal(one[y1:y2, x1:x2], every[y1:y2, x1:x2])


def test_schedules_take_views_with_a_colon():
    from zoomless.world.trainer import parse_schedule

    stages = parse_schedule("0.2:full:1=.6,crop=.4;0:full=.7,full:2=.3")
    assert [s.steps for s in stages] == [0.2, 0.0]
    assert stages[0].views == {"full:1": 0.6, "crop": 0.4} and stages[1].views == {"full": 0.7, "full:2": 0.3}
    with pytest.raises(ValueError, match="unknown view"):
        parse_schedule("0:zoom=1")


def test_fresh_scenes_replace_the_training_set(base):
    """FreshScenes renders the next, never-seen scenes in the background and fit_sft trains on them."""
    from zoomless.world.stream import FreshScenes
    from zoomless.world.trainer import FitConfig, History, fit_sft, parse_schedule

    model, processor = base
    model = copy.deepcopy(model)
    spec = WorldSpec(split="train", size=SIZE, min_area_fraction=AREA[0], max_area_fraction=AREA[1])
    stream = FreshScenes(spec, 6, ("crop",), processor, end_of_turn_id(model, processor))
    first = [s.meta["index"] for s in stream.current.samples]
    second = [s.meta["index"] for s in stream.wait().samples]
    assert first == list(range(6)) and second == list(range(6, 12)) and stream.chunks == 2
    assert second[0] == stream.current.samples[0].meta["index"]

    hist = History()
    steps = fit_sft(model, stream.current, parse_schedule("crop=1"), image_stats(processor),
                    FitConfig(lr=1e-4, batch=4, warmup=1, max_steps=3, eval_every=0), hist, fresh=stream.wait)
    assert steps == 3 and stream.chunks == 5  # a new set before every step
    events = [r for r in hist.rows if r.get("event") == "fresh scenes"]
    assert [e["first_scene"] for e in events] == [12, 18, 24]
    stream.close()
    assert stream.poll() is None


def test_a_stopped_build_ends_its_workers_at_once(base):
    """build_world with its stop event set raises Cancelled and leaves no worker process behind
    (FreshScenes.close relies on it: a rendering thread alive at exit aborted a GPU run)."""
    import multiprocessing
    import threading

    from zoomless.world.tensors import Cancelled

    model, processor = base
    stop = threading.Event()
    stop.set()
    with pytest.raises(Cancelled, match="stopped"):
        build_world(SPEC, 400, ("full", "crop"), processor, end_of_turn_id(model, processor), workers=2,
                    progress=False, stop=stop)
    assert multiprocessing.active_children() == []


def test_locate_questions_ask_for_the_place_and_have_no_crop(base):
    """A locate scene asks where the named panel is (3 x 3 places) and appears in full views only."""
    from zoomless.world.locate import as_locate, is_locate, place

    assert place((0, 0, 10, 10), 224) == "top left" and place((100, 100, 124, 124), 224) == "middle center"
    assert place((200, 150, 224, 224), 224) == "bottom right"
    share = sum(is_locate(i, 0.3) for i in range(2000)) / 2000
    assert 0.25 < share < 0.35 and not any(is_locate(i, 0.0) for i in range(100))

    _, sample = SPEC.sample(0)
    loc = as_locate(sample)
    assert loc.answer == place(tuple(sample.meta["panels"][0]["box"]), SIZE) and loc.dimension == "locate"
    assert sample.meta["frame"] in loc.question and loc.answer in (loc.options or (loc.answer,))

    model, processor = base
    spec = WorldSpec(split="train", size=SIZE, min_area_fraction=AREA[0], max_area_fraction=AREA[1], locate_share=0.5)
    world = build_world(spec, 12, ("full", "crop"), processor, end_of_turn_id(model, processor), progress=False)
    located = {i for i, s in enumerate(world.samples) if s.dimension == "locate"}
    assert 0 < len(located) < 12
    crop_rows = {int(r) for b in world.buckets["crop"] for r in b.rows}
    full_rows = {int(r) for b in world.buckets["full"] for r in b.rows}
    assert full_rows == set(range(12)) and crop_rows == set(range(12)) - located


def test_decode_encodes_each_image_once_and_answers_as_a_plain_loop(base, world):
    """decode() runs the vision tower once per distinct image for the whole loop, and its greedy
    answers equal a plain token-by-token loop that encodes every image at every step."""
    from zoomless.train.shared_images import vision_module
    from zoomless.world.trainer import decode

    model, processor = base
    stats = image_stats(processor)
    bucket = world.buckets["full"][0]
    picks = torch.tensor([0, 0, 1, 2, 2, 2])
    seen = []
    hook = vision_module(model).patch_embed.register_forward_pre_hook(lambda m, args: seen.append(len(args[0])))
    out, length = decode(model, world, bucket, picks, stats, max_new=5)
    hook.remove()
    gh, gw = bucket.grid
    assert seen == [3 * gh * gw]  # one call, three distinct images

    for row, p in enumerate(picks.tolist()):
        ids = []
        with torch.no_grad():
            for _ in range(5):
                resp = torch.tensor([ids]) if ids else None
                b = make_batch(world, bucket, torch.tensor([p]), stats, with_answer=False, responses=resp,
                               response_len=torch.tensor([len(ids)]) if ids else None)
                h = model.model(**b.inputs, use_cache=False).last_hidden_state[0, b.lengths[0] - 1]
                logits = model.get_output_embeddings()(h).float()
                logits[world.banned] = float("-inf")
                ids.append(int(logits.argmax()))
                if ids[-1] == world.eos_id:
                    break
        assert out[row, : length[row]].tolist() == ids, (row, p)
