"""The batched vision attention gives exactly HF's numbers (outputs, logits, gradients), with fewer calls."""

import copy
import itertools
import types

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from zoomless.engines.base import conversation
from zoomless.models import fast_vision as fv
from zoomless.models.loading import encode_conversations, load_processor, load_vlm
from zoomless.models.tiny import build_tiny_vlm

FAMILIES = ["qwen2_5_vl", "qwen3_vl", "qwen3_5"]
# Mixed sizes: Qwen2.5-VL's 112-px windows come out 8x8, 8x4, 4x6 ... patches long, and Qwen3-VL's
# per-image chunks differ too; two scenes of one size make a group of several equal chunks.
SIZES = [(448, 448), (280, 196), (448, 448), (150, 90), (224, 336)]
TOL = 1e-5


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fast_vision")
    return {f: build_tiny_vlm(root / f, family=f, size="test", seed=0) for f in FAMILIES}


def picture(w: int, h: int, seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())


def batch(model_dir):
    processor = load_processor(model_dir)
    convs = [conversation([picture(w, h, i)], f"question {i}?") for i, (w, h) in enumerate(SIZES)]
    return encode_conversations(processor, convs)


def load(model_dir, attn="sdpa"):
    return AutoModelForImageTextToText.from_pretrained(model_dir, attn_implementation=attn).float()


def chunk_lengths(model, inputs) -> list[list[int]]:
    """The chunk lengths each vision attention call receives."""
    seen, hooks = [], []
    for m in model.modules():
        if type(m).__name__ in fv.VISION_ATTENTION_CLASSES:
            hooks.append(m.register_forward_pre_hook(
                lambda mod, args, kw: seen.append(torch.diff(kw.get("cu_seqlens", args[1] if len(args) > 1 else None)).tolist()),
                with_kwargs=True,
            ))
    with torch.no_grad():
        model(**inputs)
    for h in hooks:
        h.remove()
    return seen


def forward_backward(model, inputs):
    """Vision tower output, logits and every parameter's gradient for a fixed random loss."""
    model.zero_grad()
    vis = model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).pooler_output
    logits = model(**inputs).logits
    g = torch.Generator().manual_seed(1)
    loss = (logits * torch.randn(logits.shape, generator=g)).sum() + (vis * torch.randn(vis.shape, generator=g)).sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return vis.detach(), logits.detach(), grads


def assert_same(a, b):
    (va, la, ga), (vb, lb, gb) = a, b
    assert (va - vb).abs().max() <= TOL
    assert (la - lb).abs().max() <= TOL
    assert ga.keys() == gb.keys() and any("visual" in n for n in ga)
    for n in ga:
        scale = max(1.0, ga[n].abs().max().item())
        assert (ga[n] - gb[n]).abs().max() <= TOL * scale, n


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_patched_model_matches_hf_outputs_and_gradients(model_dirs, family, attn):
    inputs = batch(model_dirs[family])
    model = load(model_dirs[family], attn)
    lengths = chunk_lengths(model, inputs)
    # The case worth testing: a layer with several chunk lengths, several chunks of one length.
    assert any(len(set(ls)) >= 3 and len(ls) > len(set(ls)) for ls in lengths)
    if family == "qwen2_5_vl":  # windows active: many more chunks than images in some layer
        assert max(len(ls) for ls in lengths) > 4 * len(SIZES)
    ref = forward_backward(model, inputs)
    assert fv.patch_vision_attention(model) == model.config.vision_config.depth
    assert_same(forward_backward(model, inputs), ref)


def test_grouped_attention_makes_one_call_per_length():
    g = torch.Generator().manual_seed(0)
    bounds = [0, 5, 9, 14, 14, 16, 21, 25]  # lengths 5, 4, 5, 0, 2, 5, 4
    q, k, v = (torch.randn(25, 3, 8, generator=g) for _ in range(3))
    calls = []

    def attend(qb, kb, vb):
        calls.append(qb.shape)
        w = torch.softmax(qb @ kb.transpose(-1, -2) / 8**0.5, dim=-1)
        return (w @ vb).transpose(1, 2)

    out = fv.grouped_attention(q, k, v, fv.chunk_plan(torch.tensor(bounds), 25), attend)
    assert sorted(s[0] * s[2] for s in calls) == [2, 8, 15] and len(calls) == 3  # lengths 2, 4 (x2), 5 (x3)
    for a, b in itertools.pairwise(bounds):
        if b > a:
            ref = attend(q[None, a:b].transpose(1, 2), k[None, a:b].transpose(1, 2), v[None, a:b].transpose(1, 2))[0]
            torch.testing.assert_close(out[a:b], ref, atol=1e-6, rtol=1e-6)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


def op_inputs(device: str, head_dim: int = 8):
    """Packed q, k, v in chunks of lengths 5, 4, 5, 0, 2, 5, 4 (bf16 on a GPU: flash attention's)."""
    g = torch.Generator().manual_seed(0)
    bounds = torch.tensor([0, 5, 9, 14, 14, 16, 21, 25], dtype=torch.int32, device=device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    qkv = [torch.randn(25, 3, head_dim, generator=g).to(device, dtype).requires_grad_() for _ in range(3)]
    return qkv, bounds, torch.randn(25, 3, head_dim, generator=g).to(device, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_compiled_path_op_gives_the_eager_numbers(attn, device):
    """The op torch.compile sees (`grouped_vision_attention`: fake shapes; sdpa: SDPA's flash kernels
    called directly, the backward from their log-sum-exp; eager: a backward that recomputes) gives
    the eager grouping's outputs and gradients: to the bit on the CPU; on a GPU to the rounding of
    flash attention's backward, which accumulates in no fixed order."""
    import transformers.models.qwen2_5_vl.modeling_qwen2_5_vl as hf

    (q, k, v), bounds, w = op_inputs(device)
    args = (attn, hf.__name__, 8**-0.5, 0.0, False)
    checks = torch.library.opcheck(fv._grouped_vision_attention, (q, k, v, bounds, *args))
    assert set(checks.values()) == {"SUCCESS"}
    module = types.SimpleNamespace(num_key_value_groups=1, is_causal=False, training=False)
    outs = [fv.grouped_vision_attention(q, k, v, bounds, *args),
            fv.grouped_attention(q, k, v, fv.chunk_plan(bounds, 25), fv._attend(module, *args))]
    grads = [torch.autograd.grad((o * w).sum(), (q, k, v)) for o in outs]
    if device == "cpu":
        assert torch.equal(outs[0], outs[1]) and all(torch.equal(a, b) for a, b in zip(*grads))
    else:
        torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)
    with pytest.raises(ValueError):  # HF's forward fails on such cuts too
        fv.grouped_vision_attention(q, k, v, torch.tensor([0, 5, 24], device=device), *args)


@pytest.mark.parametrize("device", DEVICES)
def test_op_backward_uses_the_kept_log_sum_exp_instead_of_recomputing(device):
    """With sdpa the op's backward runs only the flash kernels' backward (no forward again, no
    torch.func.vjp); HF's eager attention, or on a GPU a head size flash attention does not take,
    falls back to recomputing the forward in the backward."""
    import transformers.models.qwen2_5_vl.modeling_qwen2_5_vl as hf

    def ops(attn: str, head_dim: int) -> tuple[list[str], list[str]]:
        """The aten ops of the op's forward and of its backward."""
        (q, k, v), bounds, w = op_inputs(device, head_dim)
        with torch.profiler.profile() as fwd:
            out = fv.grouped_vision_attention(q, k, v, bounds, attn, hf.__name__, 8**-0.5, 0.0, False)
        with torch.profiler.profile() as bwd:
            (out * w).sum().backward()
        return [[e.name for e in p.events() if e.name.startswith("aten::")] for p in (fwd, bwd)]

    def attention(names: list[str], backward: bool) -> list[str]:
        return [n for n in names if "scaled_dot_product" in n and ("backward" in n) == backward]

    forward, backward = ops("sdpa", 8)
    assert attention(forward, False) and not attention(forward, True)
    assert attention(backward, True) and not attention(backward, False) and "aten::_softmax" not in backward
    _, backward = ops("eager", 8)  # HF's eager attention: matmuls and a softmax, recomputed
    assert "aten::_softmax" in backward
    if device == "cuda":  # 12 is no multiple of 8: SDPA's own choice through HF's function, recomputed
        _, backward = ops("sdpa", 12)
        assert attention(backward, False)


def test_chunk_plan_rejects_cuts_that_do_not_tile_the_sequence():
    assert fv.chunk_plan(torch.tensor([0, 4, 8]), 9) is None
    assert fv.chunk_plan(torch.tensor([1, 4, 8]), 8) is None
    assert fv.chunk_plan(torch.tensor([0, 6, 4, 8]), 8) is None
    groups, order = fv.chunk_plan(torch.tensor([0, 4, 8, 12]), 12)
    assert groups == [(4, None)] and order is None  # one length: a view, no gather


def test_patch_is_per_instance_idempotent_and_survives_deepcopy(model_dirs):
    d = model_dirs["qwen2_5_vl"]
    model, other = load(d), load(d)
    depth = model.config.vision_config.depth
    assert fv.patch_vision_attention(model) == depth
    assert fv.patch_vision_attention(model) == depth  # no double wrapping
    attn = [m for m in model.modules() if getattr(m, fv.PATCHED, False)]
    assert all(m.forward.__func__ is fv._grouped_forward for m in attn)
    assert not any(getattr(m, fv.PATCHED, False) for m in other.modules())  # the class is untouched
    twin = copy.deepcopy(model)  # the EMA teacher is made this way
    for m in twin.modules():
        if getattr(m, fv.PATCHED, False):
            assert m.forward.__self__ is m
    inputs = batch(d)
    with torch.no_grad():
        torch.testing.assert_close(twin(**inputs).logits, other(**inputs).logits, atol=TOL, rtol=0)
    assert fv.unpatch_vision_attention(model) == depth
    assert fv.patch_vision_attention(torch.nn.Linear(2, 2)) == 0


def test_flash_attention_falls_back_to_hf_forward(model_dirs, monkeypatch):
    model = load(model_dirs["qwen3_vl"])
    fv.patch_vision_attention(model)
    attn = next(m for m in model.modules() if getattr(m, fv.PATCHED, False))
    cls = type(attn)
    monkeypatch.setattr(cls, "forward", lambda self, *a, **kw: "hf forward")
    x, cu = torch.randn(8, attn.dim), torch.tensor([0, 8], dtype=torch.int32)
    pe = (torch.ones(8, attn.head_dim), torch.zeros(8, attn.head_dim))
    monkeypatch.setattr(attn.config, "_attn_implementation", "flash_attention_2")
    assert attn(x, cu_seqlens=cu, position_embeddings=pe) == "hf forward"
    monkeypatch.setattr(attn.config, "_attn_implementation", "sdpa")
    assert isinstance(attn(x, cu_seqlens=cu, position_embeddings=pe), torch.Tensor)
    assert attn(x, cu_seqlens=torch.tensor([0, 5]), position_embeddings=pe) == "hf forward"  # does not tile


def test_load_vlm_patches_unless_asked_not_to(model_dirs):
    d = model_dirs["qwen3_vl"]
    model, _ = load_vlm(d, device="cpu")
    depth = model.config.vision_config.depth
    assert sum(getattr(m, fv.PATCHED, False) for m in model.modules()) == depth
    plain, _ = load_vlm(d, device="cpu", fast_vision=False)
    assert not any(getattr(m, fv.PATCHED, False) for m in plain.modules())
