"""The ZoomWorld models shipped in the package load as standard HF directories and show the gap
they were trained to have (docs/ZOOMWORLD.md): the BASE reads details from crops, not full images."""

from __future__ import annotations

import pytest

from zoomless.demo import SIZE, WORLD, shipped_model_dir
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


def test_shipped_base_has_a_zooming_gap_that_the_ceiling_does_not(tmp_path):
    """In the demo's world the BASE reads the crop but not the full scene; the CEILING reads both."""
    samples = read_samples(generate_split(tmp_path, "test", 36, **WORLD, progress=False))
    acc = {}
    for name in ("zoomworld-base", "zoomworld-ceiling"):
        engine = HFEngine.from_dir(shipped_model_dir(name), device="cpu", batch_size=36)
        result = evaluate(samples, engine, views=("full", "crop"), form="open", max_new_tokens=8,
                          max_pixels=SIZE * SIZE)
        acc[name] = {v: result.accuracy(v)["all"].acc for v in ("full", "crop")}
    base, ceiling = acc["zoomworld-base"], acc["zoomworld-ceiling"]
    assert base["crop"] >= 0.7 and base["crop"] - base["full"] >= 0.4, acc
    assert ceiling["full"] - base["full"] >= 0.25, acc
