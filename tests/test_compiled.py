"""Compiled blocks give the eager model's hidden states and gradients, under checkpointing."""

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from zoomless.models import fast_vision as fv
from zoomless.models.compiled import compile_blocks, uncompile_blocks
from zoomless.models.loading import load_vlm
from zoomless.models.tiny import FAMILIES, build_tiny_vlm
from zoomless.sample import read_samples
from zoomless.train.batching import build_batch, encode_prompt, response_hidden
from zoomless.train.common import enable_activation_checkpointing, pad_id
from zoomless.train.views import view_conversation
from zoomless.world.generate import generate_split


def two_batches(tmp_path: Path, processor) -> list:
    """Two training batches of ZoomWorld prompts (full image and crop, one shared) of other lengths."""
    samples = read_samples(generate_split(tmp_path / "world", "train", 2, seed=1, size=448, progress=False))
    a = encode_prompt(processor, view_conversation(samples[0], "full", "open", max_pixels=112 * 112, crop_margin=0.25, zoom=2.0))
    b = encode_prompt(processor, view_conversation(samples[1], "crop", "mcq", max_pixels=56 * 112, crop_margin=0.25, zoom=2.0))
    return [build_batch([a, a, b], [[5, 6, 7], [8], [9, 10]], pad_id(processor)).to("cpu"),
            build_batch([b, a], [[5, 6], [8, 9, 10, 11]], pad_id(processor)).to("cpu")]  # another length: dynamic shapes


def forward_backward(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The response hidden states and every parameter's gradient of one forward+backward."""
    model.zero_grad()
    h = response_hidden(model, batch)
    h.pow(2).sum().backward()
    return h.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def eager_steps(tmp_path: Path, family: str = "qwen2_5_vl", **checkpointing: Any) -> tuple[Any, list, list]:
    """A tiny `family` model in training mode with activation checkpointing (`checkpointing`: its
    keyword arguments), `two_batches`, and the eager forward+backward of each."""
    model, processor = load_vlm(build_tiny_vlm(tmp_path / "m", family=family, size="test"), dtype=torch.float32,
                                device="cpu")
    enable_activation_checkpointing(model, **checkpointing)
    model.train()
    batches = two_batches(tmp_path, processor)
    return model, batches, [forward_backward(model, x) for x in batches]


def assert_same_steps(eager: list, compiled: list) -> None:
    for (h0, g0), (h1, g1) in zip(eager, compiled):
        torch.testing.assert_close(h1, h0, atol=1e-5, rtol=1e-4)
        assert g0.keys() == g1.keys()
        for name in g0:  # sums in another order: relative to the gradient's scale
            torch.testing.assert_close(g1[name], g0[name], atol=1e-3 * float(g0[name].abs().max()), rtol=1e-3, msg=name)


def test_compiled_blocks_match_eager_under_checkpointing(tmp_path: Path) -> None:
    import torch._dynamo.utils as dynamo_utils

    model, batches, eager = eager_steps(tmp_path)
    dynamo_utils.counters.clear()
    blocks = compile_blocks(model)
    n = len(blocks)
    compiled = [forward_backward(model, x) for x in batches]
    # decoder layers and vision blocks whole (the vision attention through fast_vision's op)
    assert n == model.config.text_config.num_hidden_layers + model.config.vision_config.depth
    assert dynamo_utils.counters["stats"]["unique_graphs"] > 0 and not dynamo_utils.counters["graph_break"]
    # the blocks of a kind share their graphs (a 36-layer model would otherwise exceed dynamo's
    # recompile limit): one for the decoder layers, two for the vision blocks (the first gets a view)
    assert dynamo_utils.counters["stats"]["unique_graphs"] <= 3
    assert_same_steps(eager, compiled)

    # a copy (as make_teacher's EMA teacher) compiled again runs its own weights, without gradients
    teacher = copy.deepcopy(model).eval()
    compile_blocks(teacher)
    uncompile_blocks(blocks)  # the model runs eagerly again
    assert all("forward" not in b.__dict__ and b._compiled_call_impl is None for b in blocks)
    model.eval()
    with torch.no_grad():
        eager_h = response_hidden(model, batches[0])
        teacher_h = response_hidden(teacher, batches[0])
        for p in model.parameters():
            p.mul_(0.5)
        assert not torch.allclose(response_hidden(model, batches[0]), eager_h)
        torch.testing.assert_close(response_hidden(teacher, batches[0]), teacher_h)
    torch.testing.assert_close(teacher_h, eager_h, atol=1e-5, rtol=1e-4)
    assert not dynamo_utils.counters["graph_break"]
    # whole=False compiles the parts of every block (as before 2026-12-07): attention, MLP, 2 norms per layer
    parts = compile_blocks(model, whole=False)
    assert len(parts) == 4 * model.config.text_config.num_hidden_layers + 3 * model.config.vision_config.depth
    uncompile_blocks(parts)
    # whole_vision=False, or an attention the op does not take (flash): vision blocks in parts
    # (MLP, 2 norms; the attention stays eager and falls back to HF's forward)
    n_parts = model.config.text_config.num_hidden_layers + 3 * model.config.vision_config.depth
    parts = compile_blocks(model, whole_vision=False)
    assert len(parts) == n_parts
    uncompile_blocks(parts)
    model.config.vision_config._attn_implementation = "flash_attention_2"
    parts = compile_blocks(model)
    assert len(parts) == n_parts
    uncompile_blocks(parts)


def picture(w: int, h: int, seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())


def test_hybrid_decoder_layers_compile_by_kind(tmp_path: Path) -> None:
    """Qwen3.5's decoder layers are one class with two bodies: the full-attention ones compile whole,
    under a compiled function of their own (a body of their own would share one with the other body
    and reach dynamo's recompile limit sooner); the linear-attention ones keep their Gated DeltaNet
    eager and compile their MLP and norms. The numbers are the eager ones."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    from zoomless.models.compiled import _kind

    model, batches, eager = eager_steps(tmp_path, "qwen3_5")
    torch._dynamo.reset()
    blocks = compile_blocks(model)
    layers = model.get_decoder().layers
    full = [layer for layer in layers if hasattr(layer, "self_attn")]
    linear = [layer for layer in layers if hasattr(layer, "linear_attn")]
    assert full and linear and all(layer in blocks for layer in full)
    assert all(layer not in blocks and layer.linear_attn not in blocks and layer.mlp in blocks for layer in linear)
    assert {_kind(layer)[1] for layer in layers} == {"linear_attn", "self_attn"}  # two kinds, apart
    compiled = [forward_backward(model, x) for x in batches]
    function = full[0].forward.args[1]
    assert len(_debug_get_cache_entry_list(function._torchdynamo_orig_callable.__code__)) == 1  # one graph
    assert_same_steps(eager, compiled)
    uncompile_blocks(blocks)


@pytest.mark.parametrize("family", FAMILIES)
def test_whole_vision_blocks_keep_their_graphs_and_numbers_over_changing_chunk_plans(
    tmp_path: Path, family: str, monkeypatch
) -> None:
    import torch._dynamo.utils as dynamo_utils

    model_dir = build_tiny_vlm(tmp_path / "m", family=family, size="test")
    model, processor = load_vlm(model_dir, dtype=torch.float32, device="cpu")
    enable_activation_checkpointing(model)
    model.train()
    visual = model.model.visual
    # other numbers of images, of Qwen2.5-VL's windows and of chunk lengths in each batch
    sizes = [[(448, 448), (280, 196)], [(150, 90), (224, 336), (448, 448)], [(336, 336)]]
    batches = [processor.image_processor(images=[picture(w, h, i) for i, (w, h) in enumerate(s)], return_tensors="pt")
               for s in sizes]
    plans = []
    make_plan = fv._make_plan
    monkeypatch.setattr(fv, "_make_plan", lambda *a: plans.append(tuple(a[0])) or make_plan(*a))

    def step(batch):
        fv._plans.clear()  # plans cached by an earlier test or step would hide this step's
        plans.clear()
        model.zero_grad()
        out = visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"]).pooler_output
        g = torch.Generator().manual_seed(1)
        (out * torch.randn(out.shape, generator=g)).sum().backward()
        grads = {n: p.grad.clone() for n, p in visual.named_parameters() if p.grad is not None}
        return out.detach(), grads, list(plans)

    eager = [step(b) for b in batches]
    assert len({frozenset(e[2]) for e in eager}) == len(batches)  # each batch cuts its sequence its own way
    torch._dynamo.reset()  # graphs of an earlier test's vision blocks would serve these
    dynamo_utils.counters.clear()
    blocks = compile_blocks(model)
    assert all(b in blocks for b in visual.blocks)  # every vision block whole
    graphs, compiled = [], []
    for b in batches:
        compiled.append(step(b))
        graphs.append(dynamo_utils.counters["stats"]["unique_graphs"])
    # no graph per plan (two at most: the first block gets a view); the op plans on the host once
    # per cu_seqlens tensor and step, its backward included, as the eager forward does
    assert graphs == [graphs[0]] * len(batches) and 0 < graphs[0] <= 2 and not dynamo_utils.counters["graph_break"]
    assert [c[2] for c in compiled] == [e[2] for e in eager]
    assert all(len(e[2]) == (2 if family == "qwen2_5_vl" else 1) for e in eager)  # windows, whole images
    for (h0, g0, _), (h1, g1, _) in zip(eager, compiled):
        torch.testing.assert_close(h1, h0, atol=1e-5, rtol=1e-4)
        assert g0.keys() == g1.keys() and any(".attn.qkv." in name for name in g0)
        for name in g0:
            torch.testing.assert_close(g1[name], g0[name], atol=1e-3 * float(g0[name].abs().max()), rtol=1e-3, msg=name)
    uncompile_blocks(blocks)


def test_uncheckpointed_layers_skip_the_recompute_and_keep_the_gradients(tmp_path: Path) -> None:
    model, processor = load_vlm(build_tiny_vlm(tmp_path / "m", size="test"), dtype=torch.float32, device="cpu")
    model.train()
    samples = read_samples(generate_split(tmp_path / "world", "train", 1, seed=1, size=448, progress=False))
    a = encode_prompt(processor, view_conversation(samples[0], "full", "open", max_pixels=112 * 112, crop_margin=0.25, zoom=2.0))
    batch = build_batch([a, a], [[5, 6, 7], [8]], pad_id(processor))
    layers = list(model.get_decoder().layers)
    blocks = list(model.model.visual.blocks)
    calls = [0] * (len(layers) + len(blocks))
    for i, layer in enumerate(layers + blocks):  # the MLP starts again in the backward of a checkpointed layer
        layer.mlp.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))

    def grads(uncheckpointed: int, vision: bool = True) -> tuple[list[int], dict[str, torch.Tensor]]:
        enable_activation_checkpointing(model, uncheckpointed, checkpoint_vision=vision)
        calls[:] = [0] * len(calls)
        model.zero_grad()
        response_hidden(model, batch).pow(2).sum().backward()
        return list(calls), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    n, v = len(layers), len(blocks)
    all_calls, all_grads = grads(0)
    last_calls, last_grads = grads(1)
    assert all_calls == [2] * (n + v) and last_calls == [2] * (n - 1) + [1] + [2] * v
    assert grads(n)[0] == [1] * n + [2] * v
    vision_calls, vision_grads = grads(0, vision=False)
    assert vision_calls == [2] * n + [1] * v
    for name in all_grads:
        torch.testing.assert_close(last_grads[name], all_grads[name], msg=name)
        torch.testing.assert_close(vision_grads[name], all_grads[name], msg=name)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "qwen3_5"])
@pytest.mark.parametrize("vision_checkpointed", [True, False])
def test_vision_tower_compiled_as_one_region_matches_eager(tmp_path: Path, family: str, vision_checkpointed: bool) -> None:
    """`compile_blocks(..., vision_tower=True)`: the tower's forward, all its blocks inside, is one
    graph (no break) over batches of other shapes; hidden states and gradients are the eager ones;
    its blocks are not compiled one by one; without ready-made bookkeeping the tower runs eagerly."""
    import torch._dynamo.utils as dynamo_utils

    model, batches, eager = eager_steps(tmp_path, family, checkpoint_vision=vision_checkpointed)
    torch._dynamo.reset()
    dynamo_utils.counters.clear()
    tower_calls = []
    compiled_fn = model.model.visual.register_forward_hook(lambda *_: tower_calls.append(1))
    modules = compile_blocks(model, vision_tower=True)
    assert model.model.visual in modules
    assert not any(m in modules for m in model.model.visual.blocks)  # inside the tower's region
    layers = model.get_decoder().layers  # whole, but Qwen3.5's linear-attention ones: their MLP and norms
    assert len(modules) == 1 + sum(3 if hasattr(layer, "linear_attn") else 1 for layer in layers)
    compiled = [forward_backward(model, x) for x in batches]
    assert len(tower_calls) == 2 and not dynamo_utils.counters["graph_break"]
    assert_same_steps(eager, compiled)
    graphs = dynamo_utils.counters["stats"]["unique_graphs"]
    with torch.no_grad():  # the tower called without its bookkeeping: eager, no new graph
        visual = model.model.visual
        visual(batches[0].inputs["pixel_values"], grid_thw=batches[0].vision_grid)
    assert dynamo_utils.counters["stats"]["unique_graphs"] == graphs
    compiled_fn.remove()
    uncompile_blocks(modules)
    assert "forward" not in vars(model.model.visual)
