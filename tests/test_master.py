"""bf16 compute weights with fp32 master weights: fp32 accumulation, small updates kept (the recipe
with `bf16_weights`: tests/test_train_opd.py)."""

import weakref

import pytest
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


def _model_and_batches(micro_batches: int, device: str = "cpu") -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 16), nn.Linear(16, 4)).to(device)
    return model, [torch.randn(8, 16, device=device) for _ in range(micro_batches)]


def _backward(model: nn.Module, xs: list[torch.Tensor]) -> None:
    for x in xs:
        model(x.to(next(model.parameters()).dtype)).float().pow(2).sum().backward()


def test_one_micro_batch_holds_bf16_gradients_and_steps_a_chunk_at_a_time() -> None:
    model, xs = _model_and_batches(1)
    master = MasterWeights(model)
    _backward(model, xs)
    # nothing in fp32 at the end of the backward: each gradient held as autograd made it, in bf16
    assert all(m.grad is None for m in master.masters)
    held = master.grads()
    assert len(held) == len(master.masters) and all(g.dtype == torch.bfloat16 for g in held)

    alive = [weakref.ref(g) for g in held]  # one per master, in order
    del held
    seen = []
    for run in master.in_chunks(3):
        with_grad = [m for m in master.masters if m.grad is not None]
        assert with_grad == run and all(m.grad.dtype == torch.float32 for m in run)  # only this run's, in fp32
        seen += [id(m) for m in run]
        # the bf16 gradients of this run and the ones before are freed, the later ones still held
        assert [ref() is None for ref in alive] == [id(m) in seen for m in master.masters]
    assert sorted(seen) == sorted(id(m) for m in master.masters)  # every master once
    assert all(m.grad is None for m in master.masters) and master.grads() == []  # all freed after


def test_runs_grow_by_half_and_cover_every_master() -> None:
    model = nn.Sequential(*[nn.Linear(16, 16, bias=False) for _ in range(200)])  # 200 equal tensors
    master = MasterWeights(model)
    runs = master._runs(4)
    assert [i for r in runs for i in r] == list(range(len(master.masters)))  # in order, each once
    sizes = [len(r) for r in runs]
    # 1 : 1.5 : 2.25 : 3.375 of 200, to a tensor: 24.6, 36.9, 55.4, 83.1
    assert len(runs) == 4 and all(abs(s - e) <= 1 for s, e in zip(sizes, (24.6, 36.9, 55.4, 83.1))), sizes


def test_the_optimizer_step_holds_at_most_two_and_a_half_bytes_of_gradient_per_parameter() -> None:
    """Measured with torch's MemTracker: over the bf16 weights, fp32 masters and AdamW moments at
    rest, the chunked step's transient peak is 2 bytes of held gradient per parameter plus a first
    run's fp32 buffer (4 x 0.123), where runs of equal size would reach 3 and fp32 gradients 4."""
    from torch.distributed._tools.mem_tracker import MemTracker

    from zoomless.train.optim import build_optimizer, clip_inside_fused_step, total_norm

    model = nn.Sequential(*[nn.Linear(64, 64, bias=False) for _ in range(64)])
    master = MasterWeights(model)
    opt = build_optimizer(master.masters, lr=0.01, weight_decay=0.0, fused=True)

    def step() -> None:
        _backward(model, [torch.randn(4, 64)])
        clip_inside_fused_step(opt, total_norm(master.grads()), 1.0, master.in_chunks())

    step()  # the moments exist from here on
    _backward(model, [torch.randn(4, 64)])
    held = master.grads()
    tracker = MemTracker()
    tracker.track_external(model, opt, *master.masters, *held)
    del held
    with tracker:
        rest = sum(d["Total"] for d in tracker.get_tracker_snapshot("current").values())
        clip_inside_fused_step(opt, total_norm(master.grads()), 1.0, master.in_chunks())
        peak = sum(d["Total"] for d in tracker.get_tracker_snapshot("peak").values())
    params = sum(m.numel() for m in master.masters)
    held_bytes = 2 * params
    assert 2.4 < (peak - rest + held_bytes) / params < 2.6  # `rest` already holds the bf16 gradients


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no GPU"))])
def test_chunked_fused_step_is_the_one_step_update(device: str) -> None:
    """The masters stepped in chunks from held bf16 gradients end where one fused AdamW step on
    the same gradients cast to fp32 ends, bit for bit, over steps of one and of three micro-batches."""
    from zoomless.train.optim import build_optimizer, clip_inside_fused_step, total_norm

    for micro_batches in (1, 3):
        model, xs = _model_and_batches(micro_batches, device)
        master = MasterWeights(model)
        reference = [nn.Parameter(m.detach().clone()) for m in master.masters]
        opt_ours = build_optimizer(master.masters, lr=0.01, weight_decay=0.1, fused=True)
        opt_ref = build_optimizer(reference, lr=0.01, weight_decay=0.1, fused=True)
        for step in range(3):
            grads = []
            for x in xs:  # the bf16 gradients each micro-batch makes, summed in fp32 as the masters should
                probe = [p.register_hook(lambda g, i=i: grads.append((i, g.clone())))
                         for i, p in enumerate(model.parameters())]
                _backward(model, [x * (step + 1)])
                for h in probe:
                    h.remove()
            for i, r in enumerate(reference):
                r.grad = sum(g.float() for j, g in grads if j == i)
            norm_ref = total_norm([r.grad for r in reference])
            clip_inside_fused_step(opt_ref, norm_ref, 1.0)
            norm = total_norm(master.grads())
            clip_inside_fused_step(opt_ours, norm, 1.0, master.in_chunks(3))
            master.copy_to_model()
            torch.testing.assert_close(norm, norm_ref, rtol=1e-6, atol=0)
            for m, r in zip(master.masters, reference):
                torch.testing.assert_close(m, r, rtol=0, atol=0)
                assert float(opt_ours.state[m]["step"]) == step + 1  # each master stepped once per step
