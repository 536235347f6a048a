"""bf16 compute weights with fp32 master weights in the optimizer (one process).

Under bf16 autocast an fp32 model has each weight cast to bf16 in every forward (and again in each
checkpointed recompute), and AdamW reads and writes fp32 gradients of the model's own parameters.
`MasterWeights` keeps the model itself in bf16, so forwards and rollouts read bf16 weights as they
are, and holds an fp32 copy of every trainable parameter that the optimizer updates:

- each bf16 gradient is added into its master's fp32 gradient as soon as autograd has accumulated
  it (a post-accumulate-grad hook), and the bf16 one is freed: micro-batches accumulate in fp32;
- the optimizer steps the masters; `copy_to_model()` then rounds them into the bf16 weights;
- checkpoints, the EMA teacher and its first copy read the fp32 masters (`fp32_state_dict`), so
  an update of 1e-6, far below bf16 resolution, is never lost.

Memory is what fp32 weights take (6 + 12 + 12 + 24 bytes per parameter at rest, against 12 + 12
+ 24), the speed is that of a bf16 model. Under FSDP2 the sharded weights already stay fp32 and are
gathered in bf16 for compute, and DDP reduces the bf16 gradients itself: so one process only.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


class MasterWeights:
    """fp32 masters of `model`'s trainable parameters; casts its parameters (all of them, trainable
    or not) to `dtype` in place."""

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.masters = [nn.Parameter(p.detach().to(torch.float32, copy=True)) for p in self.params]
        self._master_of = {id(p): m for p, m in zip(self.params, self.masters)}
        with torch.no_grad():  # the same Parameter objects, now holding bf16 data; buffers keep their
            for p in model.parameters():  # dtype (`model.to` would round the rotary inv_freq to bf16)
                p.data = p.data.to(dtype)
        # by storage, not by name: a tied LM head is one parameter under two state-dict keys (the
        # storages stay put: `copy_to_model` writes into them)
        self._master_at = {p.data_ptr(): m.detach() for p, m in zip(self.params, self.masters)}
        self._hooks = [p.register_post_accumulate_grad_hook(self._accumulate) for p in self.params]

    def _accumulate(self, p: torch.Tensor) -> None:
        master = self._master_of[id(p)]
        if master.grad is None:
            master.grad = p.grad.to(torch.float32)
        else:
            master.grad.add_(p.grad)
        p.grad = None  # the bf16 gradient lives only until it is added

    @torch.no_grad()
    def copy_to_model(self) -> None:
        """Round the (just updated) masters into the model's bf16 weights."""
        torch._foreach_copy_(self.params, self.masters)

    def fp32_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """`model.state_dict()` with the fp32 masters in place of the bf16 trainable weights."""
        return self._with_masters(model.state_dict().items())

    def fp32_parameters(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """`model`'s parameters by name, the fp32 masters in place of the trainable ones."""
        return self._with_masters(model.named_parameters())

    def _with_masters(self, items: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {k: self._master_at.get(v.data_ptr(), v) for k, v in items}

    def remove(self) -> None:
        """Stop routing gradients to the masters (the model keeps its bf16 weights)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
