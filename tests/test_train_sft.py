"""SFT recipe on a tiny real model and a tiny ZoomWorld set: overfitting, checkpoints, exact resume."""

import json
from pathlib import Path

import pytest
import torch

from zoomless.models.loading import load_vlm
from zoomless.sample import read_samples, write_samples
from zoomless.train.checkpoints import STATE_FILE, checkpoint_dir
from zoomless.train.config import SFTConfig
from zoomless.train.sft import check_views, pick_view, target_ids, target_text, train_sft
from zoomless.world.generate import generate_split


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_model) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("sft")
    model = tiny_model
    data = generate_split(root / "world", "train", 6, seed=0, size=448, progress=False)
    return model, data


def _cfg(assets, out: Path, **kw) -> SFTConfig:
    model, data = assets
    base = dict(
        model_dir=model, data=data, out_dir=out, lr=3e-3, max_steps=4, batch_size=4, micro_batch_size=2,
        max_pixels=112 * 112, tensorboard=False, progress=False, seed=0,
    )
    base.update(kw)
    return SFTConfig(**base)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_sft_overfits_a_fixed_batch(assets, tmp_path) -> None:
    model, data = assets
    few = tmp_path / "four.jsonl"
    write_samples(read_samples(data)[:4], few)
    out = tmp_path / "run"
    final = train_sft(_cfg((model, few), out, max_steps=20, batch_size=4, lr=5e-3, tensorboard=True))
    losses = [m["loss"] for m in _metrics(out)]
    assert len(losses) == 20
    assert losses[-1] < 0.5 * losses[0], losses
    # the final checkpoint is a standard HF directory holding the trained weights
    assert final == checkpoint_dir(out, 20) and (final / "config.json").exists() and (final / STATE_FILE).exists()
    assert any((out / "tb").iterdir())
    reloaded, processor = load_vlm(final, dtype=torch.float32, device="cpu")
    base, _ = load_vlm(model, dtype=torch.float32, device="cpu")
    name, p = next(iter(reloaded.named_parameters()))
    assert not torch.equal(p, dict(base.named_parameters())[name])


def test_resume_continues_exactly(assets, tmp_path) -> None:
    mix = {"full": 1.0, "overlay": 1.0, "zoom": 1.0}  # view draws must replay too
    straight = train_sft(_cfg(assets, tmp_path / "a", max_steps=4, save_every=2, view=mix))
    train_sft(_cfg(assets, tmp_path / "b", max_steps=2, view=mix))
    resumed = train_sft(_cfg(assets, tmp_path / "b", max_steps=4, save_every=2, view=mix, resume=True))
    m1, _ = load_vlm(straight, dtype=torch.float32, device="cpu")
    m2, _ = load_vlm(resumed, dtype=torch.float32, device="cpu")
    for (n1, p1), (n2, p2) in zip(m1.named_parameters(), m2.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    a, b = _metrics(tmp_path / "a"), _metrics(tmp_path / "b")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    s1 = torch.load(straight / STATE_FILE, weights_only=False)
    s2 = torch.load(resumed / STATE_FILE, weights_only=False)
    assert s1["data"] == s2["data"] and s1["step"] == s2["step"] == 4


def test_resume_without_checkpoint_fails_clearly(assets, tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train_sft(_cfg(assets, tmp_path / "empty", resume=True))


def test_targets_and_views(assets) -> None:
    _, data = assets
    s = read_samples(data)[0]
    _, processor = load_vlm(assets[0], dtype=torch.float32, device="cpu")
    assert target_text(s, "mcq") == s.answer_letter
    assert target_text(s, "open") == s.answer
    ids = target_ids(processor, s, "open", eos_id=7)
    assert ids[-1] == 7 and processor.tokenizer.decode(ids[:-1]) == s.answer
    with pytest.raises(ValueError, match=s.id):
        target_text(s.with_(answer=None, options=None), "open")
    assert pick_view("crop", 0, 1, 0) == "crop"
    draws = {pick_view({"full": 1.0, "zoom": 1.0}, 0, step, 0) for step in range(20)}
    assert draws == {"full", "zoom"}
    assert pick_view({"full": 1.0, "zoom": 0.0}, 0, 3, 2) == "full"


def test_views_that_need_a_box_fail_before_training(assets) -> None:
    s = read_samples(assets[1])[0].with_(box=None)
    check_views([s], "full")
    check_views([s], {"full": 1.0, "zoom": 0.0})
    with pytest.raises(ValueError, match=f"sample {s.id}: the 'zoom' view needs a 'box'"):
        check_views([s], {"full": 1.0, "zoom": 1.0})


def test_data_workers_give_the_same_run(assets, tmp_path) -> None:
    mix = {"full": 1.0, "crop": 1.0}
    one = train_sft(_cfg(assets, tmp_path / "inline", max_steps=3, save_every=1, view=mix))
    pooled = train_sft(_cfg(assets, tmp_path / "pooled", max_steps=3, save_every=1, view=mix, data_workers=2))
    for step in (1, 2, 3):  # the pool draws a batch ahead; checkpoints save the order as of the step
        s1 = torch.load(checkpoint_dir(tmp_path / "inline", step) / STATE_FILE, weights_only=False)
        s2 = torch.load(checkpoint_dir(tmp_path / "pooled", step) / STATE_FILE, weights_only=False)
        assert s1["data"] == s2["data"], step
    assert [r["loss"] for r in _metrics(tmp_path / "inline")] == [r["loss"] for r in _metrics(tmp_path / "pooled")]
    m1, _ = load_vlm(one, dtype=torch.float32, device="cpu")
    m2, _ = load_vlm(pooled, dtype=torch.float32, device="cpu")
    for (n1, p1), (n2, p2) in zip(m1.named_parameters(), m2.named_parameters()):
        assert torch.equal(p1, p2), n1


def test_compiled_blocks_and_vision_tower_train_as_eager(assets, tmp_path) -> None:
    """`compile_blocks` with `compile_vision_tower` (the tower one compiled region) trains the same
    run as eager, to the rounding of inductor's kernels; the tower flag alone is refused."""
    eager = train_sft(_cfg(assets, tmp_path / "eager", max_steps=2))
    compiled = train_sft(_cfg(assets, tmp_path / "compiled", max_steps=2, compile_blocks=True,
                              compile_vision_tower=True))
    a, b = _metrics(tmp_path / "eager"), _metrics(tmp_path / "compiled")
    assert len(a) == len(b) == 2
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) < 1e-3 * max(1.0, abs(x["loss"])), (x["loss"], y["loss"])
    assert eager.is_dir() and compiled.is_dir()
    with pytest.raises(ValueError, match="set compile_blocks: true too"):
        _cfg(assets, tmp_path / "x", compile_vision_tower=True)
