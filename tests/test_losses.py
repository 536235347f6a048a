"""The training losses against brute-force float64 references with explicit loops."""

import math

import pytest
import torch

from zoomless.train.losses import (
    add_tail,
    chunked_logprobs,
    chunked_map,
    gather_logprobs,
    generalized_jsd,
    masked_token_mean,
    token_cross_entropy,
    topk_generalized_jsd,
    topk_ids,
    truncated_is_weights,
)

N, V = 5, 11


def _logits(seed: int, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, V, generator=g) * scale


def _log_softmax_loop(z: torch.Tensor) -> list[torch.Tensor]:
    norm = torch.log(sum(torch.exp(z[j]) for j in range(len(z))))
    return [z[j] - norm for j in range(len(z))]


def _reference_row(zs: torch.Tensor, zt: torch.Tensor, k: int, alpha: float, tail: bool = True) -> torch.Tensor:
    """One row of the top-k + tail generalized JSD, written out bucket by bucket in float64."""
    ls, lt = _log_softmax_loop(zs), _log_softmax_loop(zt)
    ids = sorted(range(len(zs)), key=lambda j: -zs[j].item())[:k]
    s = [ls[i] for i in ids]
    t = [lt[i] for i in ids]
    if tail:
        for dist in (s, t):
            mass = sum(torch.exp(x) for x in dist)
            dist.append(torch.log(1.0 - torch.clamp(mass, max=math.exp(-1e-7))))
    ps = [torch.exp(x) for x in s]
    pt = [torch.exp(x) for x in t]
    if alpha == 0.0:
        return sum(pt[j] * (t[j] - s[j]) for j in range(len(s)))
    if alpha == 1.0:
        return sum(ps[j] * (s[j] - t[j]) for j in range(len(s)))
    m = [(1 - alpha) * ps[j] + alpha * pt[j] for j in range(len(s))]
    kl_s = sum(ps[j] * (s[j] - torch.log(m[j])) for j in range(len(s)))
    kl_t = sum(pt[j] * (t[j] - torch.log(m[j])) for j in range(len(s)))
    return (1 - alpha) * kl_s + alpha * kl_t


def _reference(zs: torch.Tensor, zt: torch.Tensor, k: int, alpha: float, tail: bool = True) -> torch.Tensor:
    return torch.stack([_reference_row(zs[i], zt[i], k, alpha, tail) for i in range(len(zs))])


def _ours(zs: torch.Tensor, zt: torch.Tensor, k: int, alpha: float) -> torch.Tensor:
    ids = topk_ids(zs.detach(), k)
    return topk_generalized_jsd(zs, ids, gather_logprobs(zt, ids), alpha)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 0.3])
@pytest.mark.parametrize("k", [4, V])
def test_topk_jsd_matches_brute_force_values_and_grads(alpha: float, k: int) -> None:
    zs, zt = _logits(0), _logits(1)
    zs_ours = zs.clone().requires_grad_(True)
    loss = _ours(zs_ours, zt, k, alpha)
    zs_ref = zs.double().requires_grad_(True)
    ref = _reference(zs_ref, zt.double(), k, alpha)
    assert loss.dtype == torch.float32 and loss.shape == (N,)
    torch.testing.assert_close(loss.double(), ref, atol=1e-5, rtol=1e-4)
    (g_ours,) = torch.autograd.grad(loss.sum(), zs_ours)
    (g_ref,) = torch.autograd.grad(ref.sum(), zs_ref)
    torch.testing.assert_close(g_ours.double(), g_ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 0.3])
def test_k_equal_vocab_is_the_full_vocab_divergence(alpha: float) -> None:
    zs, zt = _logits(2), _logits(3)
    full = _reference(zs.double(), zt.double(), V, alpha, tail=False)
    torch.testing.assert_close(_ours(zs, zt, V, alpha).double(), full, atol=1e-5, rtol=1e-4)


def test_alpha_endpoints_are_the_two_kls() -> None:
    s = torch.log_softmax(_logits(4), -1)
    t = torch.log_softmax(_logits(5), -1)
    kl_ts = torch.nn.functional.kl_div(s, t, log_target=True, reduction="none").sum(-1)  # KL(T||S)
    kl_st = torch.nn.functional.kl_div(t, s, log_target=True, reduction="none").sum(-1)  # KL(S||T)
    torch.testing.assert_close(generalized_jsd(s, t, 0.0), kl_ts)
    torch.testing.assert_close(generalized_jsd(s, t, 1.0), kl_st)
    assert not torch.allclose(kl_ts, kl_st)
    jsd = generalized_jsd(s, t, 0.5)
    assert (jsd > 0).all() and (jsd <= math.log(2) + 1e-6).all()
    # the interior formula is symmetric under swapping the roles with alpha -> 1 - alpha
    torch.testing.assert_close(generalized_jsd(s, t, 0.3), generalized_jsd(t, s, 0.7))


def test_jsd_is_zero_when_teacher_equals_student() -> None:
    z = _logits(6).requires_grad_(True)
    for alpha in (0.0, 0.5, 1.0, 0.3):
        loss = _ours(z, z.detach(), 4, alpha)
        assert loss.abs().max().item() < 1e-6
    (g,) = torch.autograd.grad(_ours(z, z.detach(), 4, 0.5).sum(), z)
    assert g.abs().max().item() < 1e-5


def test_gradient_flows_only_through_the_student() -> None:
    zs = _logits(7).requires_grad_(True)
    t = gather_logprobs(_logits(8), topk_ids(zs.detach(), 3)).requires_grad_(True)
    topk_generalized_jsd(zs, topk_ids(zs.detach(), 3), t).sum().backward()
    assert zs.grad is not None and zs.grad.abs().sum() > 0
    assert t.grad is None


def test_tail_bucket_completes_the_distribution() -> None:
    lp = torch.log_softmax(_logits(9), -1)
    top = lp.gather(-1, topk_ids(lp, 3))
    full = add_tail(top)
    assert full.shape == (N, 4)
    torch.testing.assert_close(full.exp().sum(-1), torch.ones(N))
    assert torch.isfinite(add_tail(lp)).all()  # all the mass in the top-k: tail stays finite


def test_temperature_divides_both_sides() -> None:
    zs, zt = _logits(10), _logits(11)
    ids = topk_ids(zs, 4)
    a = topk_generalized_jsd(zs, ids, gather_logprobs(zt, ids, 2.0), 0.5, temperature=2.0)
    b = topk_generalized_jsd(zs / 2, ids, gather_logprobs(zt / 2, ids), 0.5)
    torch.testing.assert_close(a, b)


def test_chunked_map_equals_unchunked_with_grads() -> None:
    torch.manual_seed(0)
    head = torch.nn.Linear(6, V, bias=False)
    h = torch.randn(13, 6, requires_grad=True)
    y = torch.randint(0, V, (13,))
    direct = torch.log_softmax(head(h), -1).gather(-1, y[:, None]).squeeze(-1)
    chunked = chunked_logprobs(h, head, y, chunk_size=4)
    torch.testing.assert_close(chunked, direct)
    (g1,) = torch.autograd.grad(direct.sum(), h)
    (g2,) = torch.autograd.grad(chunked.sum(), h)
    torch.testing.assert_close(g1, g2)
    # tuple outputs and empty inputs
    ids, lp = chunked_map(h.detach(), head, lambda z: (z.argmax(-1), z.max(-1).values), chunk_size=5)
    assert ids.shape == (13,) and lp.shape == (13,)
    empty = chunked_logprobs(h[:0], head, y[:0])
    assert empty.shape == (0,)


def test_token_losses_and_weights() -> None:
    z, y = _logits(12), torch.tensor([0, 3, 5, 1, 2])
    ce = token_cross_entropy(z, y)
    torch.testing.assert_close(ce, -gather_logprobs(z, y))
    mask = torch.tensor([1, 0, 1, 1, 0])
    torch.testing.assert_close(masked_token_mean(ce, mask), (ce[0] + ce[2] + ce[3]) / 3)
    torch.testing.assert_close(masked_token_mean(ce, mask, 10.0), (ce[0] + ce[2] + ce[3]) / 10)
    new = torch.tensor([0.0, -1.0, -3.0], requires_grad=True)
    old = torch.tensor([-2.0, -1.0, -1.0])
    w = truncated_is_weights(new, old, clip=2.0)
    torch.testing.assert_close(w, torch.tensor([2.0, 1.0, math.exp(-2.0)]))
    assert not w.requires_grad
