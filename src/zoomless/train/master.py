"""bf16 compute weights with fp32 master weights in the optimizer (one process).

Under bf16 autocast an fp32 model has each weight cast to bf16 in every forward (and again in each
checkpointed recompute), and AdamW reads and writes fp32 gradients of the model's own parameters.
`MasterWeights` keeps the model itself in bf16, so forwards and rollouts read bf16 weights as they
are, and holds an fp32 copy of every trainable parameter that the optimizer updates:

- each bf16 gradient is taken from its parameter as soon as autograd has accumulated it (a
  post-accumulate-grad hook). The first micro-batch's is held as it is, in bf16; from the second
  on they are added into the master's fp32 gradient: micro-batches accumulate in fp32;
- the optimizer steps the masters in a few chunks (`in_chunks`), each chunk's held bf16 gradients
  cast to fp32 just before its step and freed after it. A step of one micro-batch, the usual
  on-policy step, so holds 2 bytes of gradient per parameter instead of 4 at the end of the
  backward, where activations are still alive, and at most 2.5 at the optimizer step (`_runs`):
  the same update, bit for bit (tests/test_master.py);
- `copy_to_model()` then rounds the masters into the bf16 weights;
- checkpoints, the EMA teacher and its first copy read the fp32 masters (`fp32_state_dict`), so
  an update of 1e-6, far below bf16 resolution, is never lost.

Memory, per parameter: 2 bytes of bf16 weight + 4 of fp32 master + 8 of AdamW moments at rest,
and 2 bytes of gradient at the end of a one-micro-batch backward (4 from the second micro-batch
on), against fp32 weights' 4 + 8 and 4 of gradient; the speed is that of a bf16 model. Under
FSDP2 the sharded weights already stay fp32 and are gathered in bf16 for compute, and DDP reduces
the bf16 gradients itself: so one process only.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch
from torch import nn

CHUNKS = 4  # optimizer steps per training step (`MasterWeights.in_chunks`)
GROWTH = 1.5  # each chunk this much larger than the one before: the same transient peak for all (`_runs`)


class MasterWeights:
    """fp32 masters of `model`'s trainable parameters; casts its parameters (all of them, trainable
    or not) to `dtype` in place."""

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.masters = [nn.Parameter(p.detach().to(torch.float32, copy=True)) for p in self.params]
        with torch.no_grad():  # the same Parameter objects, now holding bf16 data; buffers keep their
            for p in model.parameters():  # dtype (`model.to` would round the rotary inv_freq to bf16)
                p.data = p.data.to(dtype)
        # by storage, not by name: a tied LM head is one parameter under two state-dict keys (the
        # storages stay put: `copy_to_model` writes into them)
        self._master_at = {p.data_ptr(): m.detach() for p, m in zip(self.params, self.masters)}
        self._index = {id(p): i for i, p in enumerate(self.params)}
        self._held: dict[int, torch.Tensor] = {}  # index: a first micro-batch's bf16 gradient
        self._hooks = [p.register_post_accumulate_grad_hook(self._accumulate) for p in self.params]

    def _accumulate(self, p: torch.Tensor) -> None:
        i = self._index[id(p)]
        master = self.masters[i]
        if master.grad is not None:  # the third micro-batch on
            master.grad.add_(p.grad)
        elif i in self._held:  # the second: both in fp32 from now on (adding in bf16 would round)
            master.grad = self._held.pop(i).to(torch.float32).add_(p.grad)
        else:  # the first: kept in bf16 until the optimizer needs it
            self._held[i] = p.grad
        p.grad = None  # autograd accumulates the next micro-batch into a fresh tensor

    def grads(self) -> list[torch.Tensor]:
        """Every gradient of this step, held bf16 or fp32 on the master (for the norm)."""
        held = (self._held.get(i, m.grad) for i, m in enumerate(self.masters))
        return [g for g in held if g is not None]

    def in_chunks(self, chunks: int = CHUNKS) -> Iterator[list[nn.Parameter]]:
        """Yield the masters in `chunks` runs (growing: `_runs`), each time with only that run's
        gradients set, in fp32 (the others None: a torch optimizer's `step()` skips parameters
        without a gradient, so one step per yield steps every master once). A run's gradients
        are made just before it is yielded and freed before the next run's are made."""
        accumulated = {i: m.grad for i, m in enumerate(self.masters) if m.grad is not None}
        for m in self.masters:
            m.grad = None
        for run in self._runs(chunks):
            for i in run:
                self.masters[i].grad = accumulated.pop(i, None)
            self._cast_held([i for i in run if i in self._held])
            yield [self.masters[i] for i in run]
            for i in run:
                self.masters[i].grad = None

    def _cast_held(self, indices: list[int]) -> None:
        """The held gradients of `indices` onto their masters in fp32: views of one new buffer,
        filled by one multi-tensor copy (a launch per gradient would cost more host time than
        the copies take on the GPU), the bf16 ones freed."""
        if not indices:
            return
        masters = [self.masters[i] for i in indices]
        flat = torch.empty(sum(m.numel() for m in masters), dtype=torch.float32, device=masters[0].device)
        views = [v.view_as(m) for v, m in zip(flat.split([m.numel() for m in masters]), masters)]
        torch._foreach_copy_(views, [self._held.pop(i) for i in indices])
        for m, v in zip(masters, views):
            m.grad = v

    def _runs(self, chunks: int) -> list[list[int]]:
        """The masters' indices in order, cut into `chunks` runs that grow by GROWTH.

        While a run is cast, every held bf16 gradient not yet stepped (2 bytes per parameter) and
        the run's new fp32 buffer (4 bytes per parameter of the run) are alive at once: with runs of
        equal size the first one would set the peak, at 2 + 4 / chunks bytes per parameter (3.0 for
        4 runs; benchmarks/step_memory.py measures it). Each stepped run frees 2 bytes per parameter,
        so the next one may take 4 bytes for each of them, half its size: run k = run 1 + half of
        runs 1..k-1, which is GROWTH = 1.5 times the one before. Then every run reaches the same
        peak, 2 + 4 x run 1: 2.49 bytes per parameter for 4 runs (equal runs need 8 for that).
        The cuts fall between tensors, so a large one (the embedding) can make its run larger."""
        sizes = [GROWTH**k for k in range(chunks)]
        ends = [sum(sizes[: k + 1]) / sum(sizes) for k in range(chunks)]  # each run's end, a fraction of the total
        total = sum(m.numel() for m in self.masters)
        runs: list[list[int]] = [[]]
        size = 0
        for i, m in enumerate(self.masters):
            if runs[-1] and size >= total * ends[len(runs) - 1]:
                runs.append([])
            runs[-1].append(i)
            size += m.numel()
        return runs

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
