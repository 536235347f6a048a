"""Attention coverage: the hooked one-layer attention equals eager attention maps, box-to-cell
weights, and a small end-to-end run with heatmaps, resume and per-dimension summary."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from zoomless.engines.base import conversation
from zoomless.eval.coverage import (
    cell_weights,
    coverage,
    image_token_span,
    last_token_attention,
    load_coverage,
    merged_grid,
    resolve_layer,
    attention_layers,
)
from zoomless.models.loading import encode_conversations, load_vlm
from zoomless.models.tiny import build_tiny_vlm
from zoomless.sample import Sample


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl", "qwen3_5"])
def tiny(request, tmp_path_factory):
    """(eager model, default-attention model, processor) of one family, same weights."""
    path = build_tiny_vlm(tmp_path_factory.mktemp(request.param) / "m", family=request.param, size="test")
    eager, processor = load_vlm(path, device="cpu", attn_implementation="eager")
    default, _ = load_vlm(path, device="cpu")
    return eager, default, processor


def pattern(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_hooked_attention_equals_eager_reference(tiny):
    eager, default, processor = tiny
    assert default.config._attn_implementation != "eager"  # the hook does not rely on eager attention
    inputs = dict(encode_conversations(processor, [conversation([pattern(112, 84, 0)], "Where is the red mark?")]))
    span = image_token_span(eager, inputs["input_ids"][0])
    rows, cols = merged_grid(eager, inputs["image_grid_thw"][0].tolist())
    assert span.numel() == rows * cols > 1
    with torch.no_grad():
        ref_all = eager(**inputs, output_attentions=True, use_cache=False).attentions
    n_layers = len(attention_layers(eager))
    assert len(ref_all) == n_layers
    for layer in [resolve_layer(n_layers), 0]:
        ref = ref_all[layer][0, :, -1, span].mean(0)
        for model in (eager, default):
            got = last_token_attention(model, inputs, layer)[0].mean(0)[span]
            assert torch.allclose(got, ref, atol=1e-5, rtol=0), (layer, (got - ref).abs().max())
        assert ref.sum() > 0.01  # a real share of attention reaches the image


def test_hooked_attention_with_left_padding(tiny):
    eager, default, processor = tiny
    convs = [conversation([pattern(56, 56, 1)], "Hi"), conversation([pattern(112, 84, 2)], "A longer question here?")]
    inputs = dict(encode_conversations(processor, convs))
    assert (inputs["attention_mask"] == 0).any()  # the first row is left padded
    last = len(attention_layers(eager)) - 1
    with torch.no_grad():
        ref = eager(**inputs, output_attentions=True, use_cache=False).attentions[last][:, :, -1, :]
    for model in (eager, default):
        got = last_token_attention(model, inputs, last)
        assert torch.allclose(got, ref, atol=1e-5, rtol=0)
        assert got[0][:, inputs["attention_mask"][0] == 0].abs().max() == 0  # padding gets nothing


def test_layer_choice():
    assert resolve_layer(36) == 18 and resolve_layer(2) == 1 and resolve_layer(36, relative_depth=0.64) == 22
    assert resolve_layer(36, layer=-1) == 35 and resolve_layer(36, layer=23) == 23
    with pytest.raises(ValueError, match="out of range"):
        resolve_layer(4, layer=4)
    with pytest.raises(ValueError, match="relative_depth"):
        resolve_layer(4, relative_depth=1.5)


def test_cell_weights_use_fractional_overlap():
    w = cell_weights((0.25, 0.0, 0.5, 0.5), 2, 4)  # exactly cell (0, 1)
    assert w.tolist() == [[0, 1, 0, 0], [0, 0, 0, 0]]
    w = cell_weights((0.125, 0.25, 0.375, 0.75), 2, 4)  # half of 4 cells in x, half in y
    assert np.allclose(w, [[0.25, 0.25, 0, 0], [0.25, 0.25, 0, 0]])
    w = cell_weights((0.1, 0.2, 0.7, 0.9), 7, 9)
    assert w.sum() / (7 * 9) == pytest.approx(0.6 * 0.7)  # the weights integrate to the box area
    # uniform attention: share = box area, so relative coverage is exactly 1
    att = np.full((7, 9), 1 / 63)
    assert (att * w).sum() / att.sum() / (0.6 * 0.7) == pytest.approx(1.0)
    # the reference's floor + inclusive slice would give a single-cell box 4 cells here
    assert cell_weights((0.25, 0.0, 0.5, 0.5), 2, 4).sum() == 1


def test_coverage_run_heatmaps_resume_and_summary(tiny, tmp_path):
    _, default, processor = tiny
    samples = []
    for i in range(3):
        path = tmp_path / f"{i}.png"
        pattern(112, 84, i).save(path)
        samples.append(Sample(f"id/{i}", str(path), "What colour?", "red", ("red", "blue"), (28, 28, 84, 56),
                              "colour" if i else "count"))
    samples.append(Sample("nobox", str(tmp_path / "0.png"), "What colour?", "red", ("red", "blue")))
    out = tmp_path / "cov"
    res = coverage(samples, default, processor, out_dir=out, heatmaps=2, progress=False, model_name="tiny")
    ok = [it for it in res.items if it.error is None]
    assert len(ok) == 3 and "no evidence box" in res.items[3].error
    for it in ok:
        assert it.layer == resolve_layer(len(attention_layers(default)))
        assert it.box_area == pytest.approx((56 * 28) / (112 * 84))
        assert 0 < it.share < 1 and it.relative == pytest.approx(it.share / it.box_area)
        assert 0 < it.image_mass <= 1
    pngs = sorted((out / "heatmaps").glob("*.png"))
    assert [p.name for p in pngs] == ["id_0.png", "id_1.png"]
    assert Image.open(pngs[0]).size == (500, round(100 * (5 * 84 / 112 + 0.6)))
    summary = json.loads((out / "results.json").read_text())["summary"]
    assert summary["n"] == 4 and summary["failed"] == 1 and summary["share"]["n"] == 3
    assert set(summary["by_dimension"]) == {"colour", "count"}
    assert summary["share"]["mean"] == pytest.approx(np.mean([it.share for it in ok]))
    # resume: nothing is recomputed (a model that would crash is not called), same numbers back
    calls: list[int] = []
    handle = default.register_forward_pre_hook(lambda *a: calls.append(1))
    again = coverage(samples, default, processor, out_dir=out, progress=False, model_name="tiny")
    handle.remove()
    assert calls == [] and [it.share for it in again.items] == [it.share for it in res.items]
    assert [it.share for it in load_coverage(out).items] == [it.share for it in res.items]
    changed = {"layer": 0} if len(attention_layers(default)) > 1 else {"form": "open"}  # tiny Qwen3.5: one such layer
    with pytest.raises(ValueError, match=next(iter(changed))):
        coverage(samples, default, processor, out_dir=out, progress=False, model_name="tiny", **changed)


def test_crop_view_box_fraction(tiny, tmp_path):
    _, default, processor = tiny
    path = tmp_path / "big.png"
    pattern(200, 150, 3).save(path)
    s = Sample("c", str(path), "What colour?", "red", ("red", "blue"), (100, 60, 140, 100))
    (item,) = coverage([s], default, processor, view="crop", progress=False).items
    # crop = box + 25% margin each side: the box is the middle (1/1.5)^2 of the crop
    assert item.error is None and item.box_area == pytest.approx((1 / 1.5) ** 2)
