"""The optimizer and its step: AdamW with weight decay on matrices only, a warmup schedule, and
the clipped step (fused with the clip for fp32 master weights, `train/master.py`)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import torch

from zoomless.train.distributed import reshard

if TYPE_CHECKING:
    from zoomless.train.common import Run


def build_optimizer(
    params: Iterable[torch.Tensor], lr: float, weight_decay: float, fused: bool = False
) -> torch.optim.AdamW:
    """AdamW (betas 0.9/0.999) over `params` (e.g. `model.parameters()`); weight decay on matrices
    only, not on norms and biases. `fused`: torch's one-kernel AdamW (CUDA or CPU tensors)."""
    decay, no_decay = [], []
    for p in params:
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.999), fused=fused or None)


def warmup_constant_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over `warmup_steps` updates (the first already has lr/warmup, not 0), then constant."""
    if warmup_steps == 0:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 1.0)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: min(1.0, (k + 1) / warmup_steps))


def clip_and_step(run: "Run", grad_clip: float) -> tuple[float, bool]:
    """Clip gradients, step the optimizer and scheduler; skip the update if the norm is not finite.
    With several processes the norm is that of the reduced gradients, the same on every process.

    Returns (grad norm before clipping, whether the update was applied).
    """
    from torch.distributed.tensor import DTensor

    if run.dist.fsdp:
        reshard(run.policy)  # the optimizer updates the fp32 shards: no gathered copy may outlive them
    if run.master:  # whose AdamW is torch's fused one (start_run)
        # the update and the copy to the bf16 weights are queued before the norm is read (a skipped
        # update leaves the masters as they were: copying them changes nothing); the masters are
        # stepped a chunk at a time, so that only a chunk's gradients exist in fp32 at once
        norm_t = total_norm(run.master.grads())  # the list dies here: each held gradient is freed in its chunk
        clip_inside_fused_step(run.optimizer, norm_t, grad_clip, run.master.in_chunks())
        run.master.copy_to_model()
        norm = float(norm_t)
    else:
        params = [p for p in run.policy.parameters() if p.requires_grad]
        norm_t = run.dist.accelerator.clip_grad_norm_(params, grad_clip)
        norm = float(norm_t.full_tensor() if isinstance(norm_t, DTensor) else norm_t)
        if math.isfinite(norm):
            run.optimizer.step()
    applied = math.isfinite(norm)
    if applied:
        run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return norm, applied


def total_norm(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all `grads` together, in fp32 whatever their dtype (bf16 ones held by
    MasterWeights)."""
    norms = torch._foreach_norm(list(grads), 2, dtype=torch.float32) if grads else [torch.zeros(())]
    return torch.linalg.vector_norm(torch.stack(norms))


def clip_inside_fused_step(
    optimizer: Any, norm: torch.Tensor, max_norm: float, chunks: Iterable[Any] = (None,)
) -> None:
    """Step a fused AdamW (`fused=True`, one process) on its parameters' gradients, whose norm is
    `norm` (`total_norm`), clipped to `max_norm` (`norm` stays a tensor: no wait for the GPU before
    the step is queued). `chunks`: the step runs once per item, each time on the parameters whose
    gradients are set then (`MasterWeights.in_chunks`); by default once.

    The kernel divides each gradient by `grad_scale` and skips the update (step count included)
    where `found_inf` is set: the hooks GradScaler uses. Passing the clip coefficient's inverse
    there saves `clip_grad_norm_`'s pass over every gradient (11 ms of a 3B step) and its host sync
    on the norm: the same update as clipping first (tests/test_train_common.py)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    inner.grad_scale = torch.clamp((norm + 1e-6) / max_norm, min=1.0)  # clip_grad_norm_'s coefficient, inverted
    inner.found_inf = (~torch.isfinite(norm)).float()
    try:
        for _ in chunks:
            optimizer.step()
    finally:
        del inner.grad_scale, inner.found_inf
