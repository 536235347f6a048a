"""bf16 compute weights with fp32 master weights: fp32 accumulation, small updates kept (the recipe
with `bf16_weights`: tests/test_train_opd.py)."""

import torch
from torch import nn

from zoomless.train.master import MasterWeights


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
