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
from zoomless.train.common import pad_id
from zoomless.train.losses import chunked_logprobs
from zoomless.train.shared_images import vision_module
from zoomless.train.views import view_conversation
from zoomless.world.generate import generate_split


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return generate_split(tmp_path_factory.mktemp("world"), "train", 3, seed=1, size=448, progress=False)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "qwen3_5"])
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


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "qwen3_5"])
def test_rollouts_of_one_prompt_encode_its_image_once(family: str, data: Path, tmp_path: Path) -> None:
    """Rows that share a PromptEncoding (the rollouts of one prompt) run the vision tower once per
    distinct image, with the same hidden states and the same gradients as encoding every copy."""
    from zoomless.train.shared_images import vision_module

    model, processor = load_vlm(build_tiny_vlm(tmp_path / family, family=family, size="test"), dtype=torch.float32, device="cpu")
    samples = read_samples(data)
    a = encode_prompt(processor, view_conversation(samples[0], "full", "open", max_pixels=112 * 112, crop_margin=0.25, zoom=2.0))
    b = encode_prompt(processor, view_conversation(samples[1], "crop", "open", max_pixels=56 * 112, crop_margin=0.25, zoom=2.0))
    responses = [[5, 6, 7], [8], [9, 10], [11, 12], [13]]
    shared = build_batch([a, a, b, a, b], responses, pad_id(processor))  # 3 rollouts of a, 2 of b
    assert shared.sharing is not None and shared.sharing.keep.tolist() == [0, 2]
    assert shared.sharing.source.tolist() == [0, 0, 1, 0, 1]
    assert shared.sharing.patches.tolist() == shared.inputs["image_grid_thw"].prod(-1).tolist()  # on the CPU
    copies = [encode_prompt(processor, c) for c in
              [view_conversation(s, v, "open", max_pixels=m, crop_margin=0.25, zoom=2.0)
               for s, v, m in [(samples[0], "full", 112 * 112)] * 3 + [(samples[1], "crop", 56 * 112)] * 2]]
    every = build_batch([copies[0], copies[1], copies[3], copies[2], copies[4]], responses, pad_id(processor))
    assert every.sharing is None  # distinct objects: nothing is assumed shared
    # each shared image's pixels once; distinct_pixels=False (stock forwards) sends every row's
    torch.testing.assert_close(shared.inputs["pixel_values"], torch.cat([a.vision["pixel_values"], b.vision["pixel_values"]]))
    full = build_batch([a, a, b, a, b], responses, pad_id(processor), distinct_pixels=False)
    torch.testing.assert_close(every.inputs["pixel_values"], full.inputs["pixel_values"])
    for key in ("input_ids", "image_grid_thw"):
        assert torch.equal(shared.inputs[key], every.inputs[key]), key
    rollouts = build_batch([a, a, a], responses[:3], pad_id(processor))  # one prompt: its pixels, not a copy
    assert rollouts.inputs["pixel_values"] is a.vision["pixel_values"]

    seen = []  # patches entering the vision tower
    hook = vision_module(model).patch_embed.register_forward_pre_hook(lambda m, args: seen.append(len(args[0])))
    results = []
    for batch in (shared, full, every):
        model.zero_grad()
        h = response_hidden(model, batch)
        h.pow(2).sum().backward()
        results.append((h.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    hook.remove()
    pa, pb = len(a.vision["pixel_values"]), len(b.vision["pixel_values"])
    assert seen == [pa + pb, pa + pb, 3 * pa + 2 * pb]  # the shared batches encoded 2 images, the other all 5 copies
    grads_every = results[2][1]
    for h, grads_shared in results[:2]:
        torch.testing.assert_close(h, results[2][0], atol=1e-5, rtol=1e-5)
        assert grads_shared.keys() == grads_every.keys() and any("visual" in n for n in grads_shared)
        for name in grads_every:
            torch.testing.assert_close(grads_shared[name], grads_every[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "qwen3_5"])
def test_positions_built_before_the_forward_are_the_models_own(family: str, data: Path, tmp_path: Path) -> None:
    """`with_positions` gives the 3D M-RoPE ids that the forward would build (padding, text-only rows
    and two image sizes included), so the hidden states do not change; wrappers are seen through."""
    from zoomless.train.batching import ResponseModel, with_positions

    model, processor = load_vlm(build_tiny_vlm(tmp_path / family, family=family, size="test"), dtype=torch.float32, device="cpu")
    samples = read_samples(data)
    a = encode_prompt(processor, view_conversation(samples[0], "full", "open", max_pixels=112 * 112, crop_margin=0.25, zoom=2.0))
    b = encode_prompt(processor, view_conversation(samples[1], "crop", "mcq", max_pixels=56 * 112, crop_margin=0.25, zoom=2.0))
    text = encode_prompt(processor, conversation([], "a text-only prompt"))
    batch = build_batch([a, b, a, text], [[5, 6, 7], [8], [9, 10, 11, 12, 13], [14, 15]], pad_id(processor))
    given = with_positions(ResponseModel(model), batch)
    ids = given.inputs["position_ids"]
    assert "position_ids" not in batch.inputs and ids.shape[:2] == (3, 4) and ids.shape[-1] == batch.inputs["input_ids"].shape[1]
    assert not ids[0, 0].equal(ids[1, 0])  # image tokens carry 2D positions: a real M-RoPE layout
    wrong = build_batch([a, b, a, text], [[5, 6, 7], [8], [9, 10, 11, 12, 13], [14, 15]], pad_id(processor))
    wrong.inputs["position_ids"] = ids.flip(-1)  # to show that the forward reads the ids it is given
    with torch.no_grad():
        own, ours, other = (response_hidden(model, x) for x in (batch, given, wrong))
    torch.testing.assert_close(ours, own, atol=0, rtol=0)
    assert not torch.allclose(other, own)
    assert with_positions(model, given) is given  # ids already there: nothing to do


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "qwen3_5"])
def test_vision_bookkeeping_from_the_cpu_grid_is_the_towers_own(family: str, data: Path, tmp_path: Path) -> None:
    """The vision tower given its rotary ids, cuts, windows or interpolation taps computed from the
    batch's CPU grid (`models/vision_plan.py`) gives the same hidden states as computing them
    itself, with and without shared images; a wrong grid changes them, so they are read."""
    from dataclasses import replace

    from zoomless.models import fast_vision

    model, processor = load_vlm(build_tiny_vlm(tmp_path / family, family=family, size="test"), dtype=torch.float32, device="cpu")
    assert fast_vision.patch_vision_attention(model) > 0
    samples = read_samples(data)
    a = encode_prompt(processor, view_conversation(samples[0], "full", "open", max_pixels=112 * 112, crop_margin=0.25, zoom=2.0))
    b = encode_prompt(processor, view_conversation(samples[1], "crop", "open", max_pixels=56 * 112, crop_margin=0.25, zoom=2.0))
    for prompts in ([a, b, a], [a, b]):  # shared images, then none
        batch = build_batch(prompts, [[5, 6, 7], [8], [9, 10]][: len(prompts)], pad_id(processor))
        grid = batch.inputs["image_grid_thw"]
        assert torch.equal(batch.vision_grid, grid[:2]) and batch.vision_grid.device.type == "cpu"
        wrong_grid = batch.vision_grid.clone()
        wrong_grid[:, 1:] = wrong_grid[:, 1:].flip(-1)  # h and w swapped: same patch counts
        assert not torch.equal(wrong_grid, batch.vision_grid)
        with torch.no_grad():
            own, ours, wrong = (response_hidden(model, replace(batch, vision_grid=g))
                                for g in (None, batch.vision_grid, wrong_grid))
        torch.testing.assert_close(ours, own, atol=0, rtol=0)
        assert not torch.allclose(wrong, own)
        # the grid's CPU copy goes in place of the device one (there on the CPU too: a new object)
        host_grid, seen = grid.clone(), []
        hook = vision_module(model).register_forward_pre_hook(
            lambda m, args, kwargs: seen.append(kwargs.get("grid_thw")), with_kwargs=True, prepend=True)
        with torch.no_grad():
            hosted = response_hidden(model, replace(batch, host={"image_grid_thw": host_grid}))
        hook.remove()
        torch.testing.assert_close(hosted, own, atol=0, rtol=0)
        assert seen == [host_grid] and seen[0] is host_grid  # before encode_once's hook: transformers' own call


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "qwen3_5"])
def test_placeholder_masks_from_the_cpu_ids_are_the_backbones_own(family: str, data: Path, tmp_path: Path) -> None:
    """The image placeholders found in the batch's CPU ids (`models/placeholders.py`) give the same
    hidden states as the backbone finding them on the device, without its own search running;
    ids with the image moved change the output (they are read), and a count that does not match
    the vision features fails with transformers' message."""
    from dataclasses import replace

    model, processor = load_vlm(build_tiny_vlm(tmp_path / family, family=family, size="test"), dtype=torch.float32, device="cpu")
    samples = read_samples(data)
    a = encode_prompt(processor, view_conversation(samples[0], "full", "open", max_pixels=112 * 112, crop_margin=0.25, zoom=2.0))
    batch = build_batch([a, a], [[5, 6, 7], [8]], pad_id(processor))
    ids = batch.inputs["input_ids"]
    assert batch.host is None and batch.to("cpu").host["input_ids"] is ids  # `to` keeps the CPU ids
    backbone, calls = model.model, []
    own_search = type(backbone).get_placeholder_mask
    backbone.get_placeholder_mask = lambda *a, **k: calls.append(1) or own_search(backbone, *a, **k)
    with torch.no_grad():
        own = response_hidden(model, batch)
        assert len(calls) == 1
        ours = response_hidden(model, replace(batch, host={"input_ids": ids}))
        assert len(calls) == 1  # the backbone's own search did not run
        image = int(model.config.image_token_id)
        moved = ids.clone()
        row = moved[0]
        first, count = int((row == image).nonzero()[0]), int((row == image).sum())
        row[first - 1], row[first + count - 1] = image, row[first - 1].clone()  # the span one token earlier
        assert int((moved == image).sum()) == int((ids == image).sum()) and not torch.equal(moved, ids)
        shifted = response_hidden(model, replace(batch, host={"input_ids": moved}))
        fewer = ids.clone()
        fewer[0, first] = 0
        with pytest.raises(ValueError, match="Image features and image tokens do not match"):
            response_hidden(model, replace(batch, host={"input_ids": fewer}))
    del backbone.get_placeholder_mask
    torch.testing.assert_close(ours, own, atol=0, rtol=0)
    assert not torch.allclose(shifted, own)
    assert "get_placeholder_mask" not in vars(backbone)  # the block took its masks away again


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "qwen3_5"])
def test_image_gradients_routed_by_index_are_masked_scatters(family: str, data: Path, tmp_path: Path) -> None:
    """With the CPU ids, the image features' gradient reaches the vision tower by index
    (`image_gradients_by_index`) instead of `masked_scatter`'s backward (a `masked_select`, a host
    sync): the same hidden states to the bit and the same gradients, with shared images; no
    `masked_select` runs in the backward."""
    from dataclasses import replace

    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.selects = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.selects += func.overloadpacket.__name__ in ("masked_select", "masked_scatter_backward")
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    model, processor = load_vlm(build_tiny_vlm(tmp_path / family, family=family, size="test"), dtype=torch.float32, device="cpu")
    samples = read_samples(data)
    a = encode_prompt(processor, view_conversation(samples[0], "full", "open", max_pixels=112 * 112, crop_margin=0.25, zoom=2.0))
    b = encode_prompt(processor, view_conversation(samples[1], "crop", "open", max_pixels=56 * 112, crop_margin=0.25, zoom=2.0))
    batch = build_batch([a, b, a], [[5, 6, 7], [8], [9, 10]], pad_id(processor))
    weight = torch.randn(3 + 1 + 2, model.config.get_text_config().hidden_size)

    def run(host):
        model.zero_grad()
        hidden = response_hidden(model, replace(batch, host=host))
        with Count() as count:
            (hidden * weight).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return hidden.detach(), grads, count.selects

    own, own_grads, own_selects = run(None)
    ours, our_grads, our_selects = run({"input_ids": batch.inputs["input_ids"]})
    assert own_selects >= 1 and our_selects == 0
    torch.testing.assert_close(ours, own, atol=0, rtol=0)
    assert own_grads.keys() == our_grads.keys() and any(n.startswith("model.visual.") for n in own_grads)
    for name in own_grads:
        torch.testing.assert_close(our_grads[name], own_grads[name], atol=1e-6, rtol=1e-5, msg=name)
