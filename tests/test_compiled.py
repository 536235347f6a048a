"""Compiled blocks give the eager model's hidden states and gradients, under checkpointing."""

import copy
from pathlib import Path

import torch

from zoomless.models.compiled import compile_blocks, uncompile_blocks
from zoomless.models.loading import load_vlm
from zoomless.models.tiny import build_tiny_vlm
from zoomless.sample import read_samples
from zoomless.train.batching import build_batch, encode_prompt, response_hidden
from zoomless.train.common import enable_activation_checkpointing, pad_id, view_conversation
from zoomless.world.generate import generate_split


def test_compiled_blocks_match_eager_under_checkpointing(tmp_path: Path) -> None:
    import torch._dynamo.utils as dynamo_utils

    model, processor = load_vlm(build_tiny_vlm(tmp_path / "m", size="test"), dtype=torch.float32, device="cpu")
    enable_activation_checkpointing(model)
    model.train()
    samples = read_samples(generate_split(tmp_path / "world", "train", 2, seed=1, size=448, progress=False))
    a = encode_prompt(processor, view_conversation(samples[0], "full", "open", max_pixels=112 * 112, crop_margin=0.25, zoom=2.0))
    b = encode_prompt(processor, view_conversation(samples[1], "crop", "mcq", max_pixels=56 * 112, crop_margin=0.25, zoom=2.0))
    batches = [build_batch([a, a, b], [[5, 6, 7], [8], [9, 10]], pad_id(processor)),
               build_batch([b, a], [[5, 6], [8, 9, 10, 11]], pad_id(processor))]  # another length: dynamic shapes

    def step(batch):
        model.zero_grad()
        h = response_hidden(model, batch)
        h.pow(2).sum().backward()
        return h.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    eager = [step(x) for x in batches]
    dynamo_utils.counters.clear()
    blocks = compile_blocks(model)
    n = len(blocks)
    compiled = [step(x) for x in batches]
    # decoder layers whole; vision blocks: MLP, 2 norms (their attention stays eager)
    assert n == model.config.text_config.num_hidden_layers + 3 * model.config.vision_config.depth
    assert dynamo_utils.counters["stats"]["unique_graphs"] > 0 and not dynamo_utils.counters["graph_break"]
    # the blocks share their graphs (a 36-layer model would otherwise exceed dynamo's recompile limit)
    assert dynamo_utils.counters["stats"]["unique_graphs"] < n
    for (h0, g0), (h1, g1) in zip(eager, compiled):
        torch.testing.assert_close(h1, h0, atol=1e-5, rtol=1e-4)
        assert g0.keys() == g1.keys()
        for name in g0:  # sums in another order: relative to the gradient's scale
            torch.testing.assert_close(g1[name], g0[name], atol=1e-3 * float(g0[name].abs().max()), rtol=1e-3, msg=name)

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


def test_uncheckpointed_layers_skip_the_recompute_and_keep_the_gradients(tmp_path: Path) -> None:
    model, processor = load_vlm(build_tiny_vlm(tmp_path / "m", size="test"), dtype=torch.float32, device="cpu")
    model.train()
    samples = read_samples(generate_split(tmp_path / "world", "train", 1, seed=1, size=448, progress=False))
    a = encode_prompt(processor, view_conversation(samples[0], "full", "open", max_pixels=112 * 112, crop_margin=0.25, zoom=2.0))
    batch = build_batch([a, a], [[5, 6, 7], [8]], pad_id(processor))
    layers = model.get_decoder().layers
    calls = [0] * len(layers)
    for i, layer in enumerate(layers):  # the MLP starts again in the backward of a checkpointed layer
        layer.mlp.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))

    def grads(uncheckpointed: int) -> tuple[list[int], dict[str, torch.Tensor]]:
        enable_activation_checkpointing(model, uncheckpointed)
        calls[:] = [0] * len(layers)
        model.zero_grad()
        response_hidden(model, batch).pow(2).sum().backward()
        return list(calls), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    n = len(layers)
    all_calls, all_grads = grads(0)
    last_calls, last_grads = grads(1)
    assert all_calls == [2] * n and last_calls == [2] * (n - 1) + [1]
    assert grads(n)[0] == [1] * n
    for name in all_grads:
        torch.testing.assert_close(last_grads[name], all_grads[name], msg=name)
