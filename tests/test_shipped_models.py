"""The ZoomWorld models shipped in the package load as standard HF directories and show the gap
they were trained to have (docs/ZOOMWORLD.md): the BASE reads details from crops, not full images."""

from __future__ import annotations

import pytest

from zoomless.demo import AREA, SIZE, shipped_model_dir
from zoomless.engines.hf import HFEngine
from zoomless.eval.single_pass import evaluate
from zoomless.sample import read_samples
from zoomless.world import generate_split


@pytest.mark.parametrize("name", ["zoomworld-base", "zoomworld-ceiling"])
def test_shipped_model_is_a_small_standard_directory(name):
    path = shipped_model_dir(name)
    assert path is not None, f"src/zoomless/assets/{name} is missing"
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert size < 12.5e6  # two of them within the 25 MB the repository allows
    for f in ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json"):
        assert (path / f).exists(), f


def test_shipped_base_has_a_zooming_gap(tmp_path):
    samples = read_samples(generate_split(tmp_path, "test", 36, size=SIZE, min_area_fraction=AREA[0],
                                          max_area_fraction=AREA[1], progress=False))
    engine = HFEngine.from_dir(shipped_model_dir("zoomworld-base"), device="cpu", batch_size=36)
    result = evaluate(samples, engine, views=("full", "crop"), form="open", max_new_tokens=8,
                      max_pixels=SIZE * SIZE)
    full, crop = result.accuracy("full")["all"].acc, result.accuracy("crop")["all"].acc
    assert crop >= 0.35 and crop - full >= 0.2, (full, crop)
