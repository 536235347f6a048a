"""perf_3b's model-FLOP formulas (benchmarks/perf_3b_measure.py) against torch's FlopCounterMode on a
real forward of tiny Qwen2.5-VL and Qwen3-VL models, and the Qwen3-VL-4B shape's sizes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import distributed_common as dc  # noqa: E402
import perf_3b_measure as pm  # noqa: E402

from zoomless.models import tiny  # noqa: E402
from zoomless.models import tokenizer as tk  # noqa: E402


def counted(fn) -> dict[str, float]:
    """FLOPs by aten op of `fn()`; SDPA's math backend, so attention shows as `bmm` (the CPU's
    fused kernel has no FLOP formula)."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        fn()
    return {str(k): float(v) for k, v in counter.get_flop_counts()["Global"].items()}


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_forward_flops_equal_the_counted_ones(family: str) -> None:
    tokenizer = tk.build_tokenizer(tiny.SIZES["test"].vocab)
    config = tiny.make_config(family, "test", tokenizer)
    if family == "qwen3_vl":  # as in the 4B: heads x head_dim != hidden; two deepstack mergers
        config.text_config.head_dim = 32
        config.text_config.rope_parameters["mrope_section"] = [4, 6, 6]
        config.vision_config.deepstack_visual_indexes = [0, 1]
    model = tiny.make_model(config)
    processor = tiny.make_processor(family, tokenizer, 4 * 32 * 32, 1024 * 1024)
    text = "hi <|vision_start|><|image_pad|><|vision_end|> what is this?"
    side = {"qwen2_5_vl": 14, "qwen3_vl": 16}[family] * 2 * 12  # 24 x 32 patches: 3 x 4 windows in Qwen2.5-VL
    inputs = processor(text=[text], images=[Image.new("RGB", (side * 4 // 3, side))], return_tensors="pt")
    grid = tuple(inputs["image_grid_thw"][0].tolist())
    assert grid == (1, 24, 32)

    vision = counted(lambda: model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]))
    v = pm.vision_forward(config, grid)
    assert v["vision_attention"] == pytest.approx(vision.pop("aten.bmm"), rel=1e-9)
    assert v["vision_linear"] == pytest.approx(sum(vision.values()), rel=1e-9)  # patch embedding, blocks, mergers

    whole = counted(lambda: model.model(**inputs))  # backbone: no LM head
    f = pm.forward_flops(config, pm.Seq(inputs["input_ids"].shape[1], 0, [grid]), causal=False)
    assert sum(f.values()) == pytest.approx(sum(whole.values()), rel=1e-9)


def test_qwen3_vl_4b_shape() -> None:
    config = dc.shaped_config("qwen3-vl-4b", tk.build_tokenizer(4096))
    assert config.model_type == "qwen3_vl" and config.text_config.head_dim == 128
    assert dc.parameter_count(config) == 4_437_815_808  # Qwen3-VL-4B-Instruct's 4.44B
    v = config.vision_config
    assert (v.depth, v.hidden_size, v.intermediate_size, v.deepstack_visual_indexes) == (24, 1024, 4096, [5, 11, 17])
    # one 896 px image: 56 x 56 patches, each through 24 blocks of 4 d^2 + 2 d x inter weights
    f = pm.vision_forward(config, (1, 56, 56))
    block = 4 * 1024**2 + 2 * 1024 * 4096
    merger = 4096**2 + 4096 * 2560
    assert f["vision_linear"] == 2 * 56 * 56 * (3 * 2 * 16 * 16 * 1024 + 24 * block) + 2 * 28 * 28 * 4 * merger
    assert f["vision_attention"] == 4 * 1024 * 24 * (56 * 56) ** 2


def test_idle_gaps_find_the_longest_stretches_without_a_kernel_and_what_the_cpu_did() -> None:
    S = pm.Span
    events = [
        S("k1", 0, 100, gpu=True), S("k2", 50, 300, gpu=True),  # overlapping: busy until 300
        S("k3", 1300, 1400, gpu=True),  # a 1 ms gap before it
        S("k4", 1500, 1600, gpu=True),  # 100 us: below the threshold
        S("k5", 5600, 5700, gpu=True),  # a 4 ms gap
        S("aten::item", 250, 310, gpu=False), S("cudaLaunchKernel", 1290, 1295, gpu=False),
        S("aten::mm", 1280, 1299, gpu=False), S("aten::copy_", 1620, 1650, gpu=False),
        S("aten::add", 5590, 5595, gpu=False),
        S("phase:student", 0, 2000, gpu=False, annotation=True), S("phase:step", 2000, 6000, gpu=False, annotation=True),
    ]
    gaps = pm.idle_gaps(events, top=1)
    assert gaps["gaps"] == 2 and gaps["idle_ms"] == pytest.approx(5.0)
    (longest,) = gaps["longest"]
    assert longest["ms"] == pytest.approx(4.0) and longest["at_ms"] == pytest.approx(1.6)
    assert longest["in"] == [] and longest["after_cpu_op"] == "aten::mm" and longest["first_cpu_op_inside"] == "aten::copy_"
    first = pm.idle_gaps(events)["longest"][0]
    assert first["in"] == ["phase:student"] and first["after_cpu_op"] == "aten::item"
    assert first["first_cpu_op_inside"] == "aten::mm"  # the launch call itself is skipped
    assert gaps["by_range"] == {"-": {"ms": pytest.approx(4.0), "gaps": 1},  # 1.6-5.6 ms spans both phases
                                "phase:student": {"ms": pytest.approx(1.0), "gaps": 1}}
    # on a real (CPU) profile the events read without error: no kernels, no gaps
    with torch.profiler.profile() as prof:
        torch.ones(8) @ torch.ones(8)
    assert pm.guarded_gaps(prof) == {"idle_ms": 0.0, "gaps": 0, "min_gap_us": 200.0, "longest": [], "by_range": {}}
