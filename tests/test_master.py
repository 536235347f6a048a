"""bf16 compute weights with fp32 master weights: fp32 accumulation, small updates kept, the recipe
saving, averaging and resuming from the masters."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from zoomless.train.common import checkpoint_dir
from zoomless.train.config import OPDConfig
from zoomless.train.master import MasterWeights
from zoomless.train.opd import train_opd
from zoomless.world.generate import generate_split


def test_gradients_accumulate_in_fp32_and_small_updates_survive() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.LayerNorm(16), nn.Linear(16, 4))
    model.register_buffer("inv_freq", torch.tensor([1 / 3]))  # like rotary tables: must stay fp32
    fp32 = [p.detach().clone() for p in model.parameters()]
    master = MasterWeights(model)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters()) and model.inv_freq.dtype == torch.float32
    assert all(torch.equal(m, w) for m, w in zip(master.masters, fp32))  # the masters keep the fp32 values

    xs = [torch.randn(8, 16, dtype=torch.bfloat16) for _ in range(2)]
    bf16_grads = []
    for x in xs:  # two micro-batches, each bf16 gradient recorded before the hook takes it
        model.zero_grad(set_to_none=True)
        probe = [p.register_hook(lambda g, i=i: bf16_grads.append((i, g.clone()))) for i, p in enumerate(model.parameters())]
        model(x).float().pow(2).sum().backward()
        for h in probe:
            h.remove()
    for p in model.parameters():
        assert p.grad is None  # freed as soon as it was added to the master
    for i, m in enumerate(master.masters):
        expected = sum(g.float() for j, g in bf16_grads if j == i)
        assert m.grad.dtype == torch.float32
        torch.testing.assert_close(m.grad, expected, rtol=0, atol=0)

    opt = torch.optim.SGD(master.masters, lr=1.0)
    for m in master.masters:
        m.grad = torch.full_like(m, 1e-6)  # far below bf16 resolution of weights near 0.1
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    master.copy_to_model()
    for m, w, p, b in zip(master.masters, fp32, model.parameters(), before):
        torch.testing.assert_close(m, w - 1e-6, rtol=0, atol=1e-9)
        assert torch.equal(p.data, m.detach().to(torch.bfloat16))
    assert any(torch.equal(p.data, b) for p, b in zip(model.parameters(), before))  # bf16 alone would lose it

    master.remove()
    model(xs[0]).float().sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_model) -> tuple[Path, Path]:
    data = generate_split(tmp_path_factory.mktemp("master") / "world", "train", 4, seed=0, size=448, progress=False)
    return tiny_model, data


def _cfg(assets, out: Path, **kw) -> OPDConfig:
    model, data = assets
    base = dict(
        model_dir=model, data=data, out_dir=out, lr=1e-3, warmup_steps=0, max_steps=2, batch_size=2, n=2,
        max_new_tokens=6, topk=16, micro_batch_size=1, max_pixels=112 * 112, tensorboard=False, progress=False,
        bf16_weights=True,
    )
    base.update(kw)
    return OPDConfig(**base)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def test_opd_with_bf16_weights_saves_averages_and_resumes_from_the_masters(assets, tmp_path) -> None:
    base = _weights(assets[0])
    straight = train_opd(_cfg(assets, tmp_path / "a", max_steps=2, save_every=1))
    first = checkpoint_dir(tmp_path / "a", 1)
    student, teacher = _weights(first), _weights(first / "teacher")
    off_grid = 0
    for name, w in student.items():
        assert w.dtype == torch.float32, name  # the masters, not the bf16 compute copy
        off_grid += not torch.equal(w, w.to(torch.bfloat16).float())
        torch.testing.assert_close(teacher[name], 0.95 * base[name].float() + 0.05 * w, atol=1e-7, rtol=1e-6)
    assert off_grid > 0
    assert _cfg(assets, tmp_path).bf16_weights and "bf16_weights" in (tmp_path / "a" / "train_config.json").read_text()

    train_opd(_cfg(assets, tmp_path / "b", max_steps=1))
    resumed = train_opd(_cfg(assets, tmp_path / "b", max_steps=2, resume=True))
    for sub in ("", "teacher"):
        p1, p2 = _weights(straight / sub), _weights(resumed / sub)
        for name, t in p1.items():
            assert torch.equal(t, p2[name]), f"{sub or 'student'}: {name}"
    jsd = [[json.loads(x)["jsd"] for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in "ab"]
    assert jsd[0] == jsd[1]


def test_bf16_weights_need_bf16_compute(assets, tmp_path) -> None:
    with pytest.raises(ValueError, match="bf16_weights computes in bf16"):
        _cfg(assets, tmp_path, dtype="float32")
