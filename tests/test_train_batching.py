"""Teacher forcing reproduces the engine's own per-token log-probs: prompt + response assembly is right."""

from pathlib import Path

import pytest
import torch

from zoomless.engines.base import SamplingParams, conversation
from zoomless.engines.hf import HFEngine
from zoomless.models.loading import load_vlm
from zoomless.models.tiny import build_tiny_vlm
from zoomless.sample import read_samples
from zoomless.train.batching import build_batch, encode_prompt, lm_head, response_hidden
from zoomless.train.common import pad_id, view_conversation
from zoomless.train.losses import chunked_logprobs
from zoomless.world.generate import generate_split


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return generate_split(tmp_path_factory.mktemp("world"), "train", 3, seed=1, size=448, progress=False)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_teacher_forced_logprobs_equal_the_engine_logprobs(family: str, data: Path, tmp_path: Path) -> None:
    model, processor = load_vlm(build_tiny_vlm(tmp_path / family, family=family, size="test"), dtype=torch.float32, device="cpu")
    samples = read_samples(data)
    # different views and question lengths: prompts of different lengths, so padding is exercised
    convs = [
        view_conversation(samples[0], "full", "mcq", max_pixels=112 * 112, crop_margin=0.25, zoom=2.0),
        view_conversation(samples[1], "overlay", "open", max_pixels=56 * 112, crop_margin=0.25, zoom=2.0),
        view_conversation(samples[2], "zoom", "mcq", max_pixels=84 * 84, crop_margin=0.25, zoom=2.0),
    ]
    engine = HFEngine(model, processor, batch_size=3)
    gens = [g[0] for g in engine.generate(convs, SamplingParams(max_new_tokens=7, temperature=0.0, logprobs=True))]
    prompts = [encode_prompt(processor, c) for c in convs]
    assert len({len(p.input_ids) for p in prompts}) == 3
    batch = build_batch(prompts, [g.token_ids for g in gens], pad_id(processor))
    with torch.no_grad():
        ours = chunked_logprobs(response_hidden(model, batch), lm_head(model), batch.targets, chunk_size=5)
    engine_logprobs = torch.tensor([lp for g in gens for lp in g.logprobs])
    assert ours.shape == engine_logprobs.shape == (sum(len(g.token_ids) for g in gens),)
    torch.testing.assert_close(ours, engine_logprobs, atol=1e-4, rtol=0)


def test_batch_layout(tmp_path: Path, data: Path) -> None:
    _, processor = load_vlm(build_tiny_vlm(tmp_path / "m", size="test"), dtype=torch.float32, device="cpu")
    s = read_samples(data)[0]
    short = encode_prompt(processor, view_conversation(s, "full", "open", max_pixels=56 * 56, crop_margin=0.25, zoom=2.0))
    long = encode_prompt(processor, conversation([], "a text-only prompt " * 3))
    b = build_batch([short, long], [[11, 12, 13], [14]], pad_id=0)
    P0, P1 = len(short.input_ids), len(long.input_ids)
    ids, mm = b.inputs["input_ids"], b.inputs["mm_token_type_ids"]
    assert ids.shape == mm.shape == (2, max(P0 + 3, P1 + 1))
    assert ids[0, P0 : P0 + 3].tolist() == [11, 12, 13] and ids[1, P1] == 14
    assert mm[0, P0:].eq(0).all() and mm[0, :P0].sum() > 0 and mm[1].eq(0).all()  # response tokens are text
    assert b.inputs["attention_mask"].sum(1).tolist() == [P0 + 3, P1 + 1]
    assert b.rows.tolist() == [0, 0, 0, 1]
    assert b.positions.tolist() == [P0 - 1, P0, P0 + 1, P1 - 1]  # the logits there predict the response
    assert b.targets.tolist() == [11, 12, 13, 14] and b.lengths == [3, 1]
    torch.testing.assert_close(b.inputs["pixel_values"], short.vision["pixel_values"])
    with pytest.raises(ValueError, match="at least one token"):
        build_batch([short], [[]], pad_id=0)
