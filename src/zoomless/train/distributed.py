"""Data parallelism under the training core, through HF accelerate (DDP or FSDP2).

`accelerate launch -m zoomless.cli train opd CONFIG` starts one process per GPU; a plain
`zoomless train opd CONFIG` is one process, and accelerate is then a thin wrapper that changes
nothing. With several processes the result is still the single-process result:

- Data: every process draws the same global batch from the same seeded order and keeps its own
  contiguous slice (`DataIterator.shard`); the union over processes is the single-process batch.
- Loss: recipes backpropagate sum(per-token loss) / denominator micro-batch by micro-batch. The
  denominator is the step's token count summed over processes, divided by the number of processes,
  because DDP and FSDP average gradients over processes (`Dist.denominator`): the averaged gradient
  is then exactly the gradient of the single-process global token mean.
- Lockstep: FSDP gathers parameters in every forward and reduces gradients in every backward, so
  all processes run the same number of passes per step; a process with fewer rollouts runs
  zero-weight padding micro-batches (`even_micro_batches`). DDP reduces gradients once per
  optimizer step (`Dist.grad_sync`: `no_sync` on the other micro-batches); FSDP reduce-scatters
  after every micro-batch, so its gradients stay sharded.
- Forwards go through `ResponseModel`, the module DDP and FSDP wrap: their hooks act only through
  the wrapped module's own forward, never through `model.model(...)` called from outside.
- Generation uses the unwrapped model with no collective inside `generate`, so processes may
  sample different lengths. Under FSDP every parameter is gathered for the rollout
  (`gathered_for_generation`) and resharded after: one all-gather per step, not one per token.
- Under FSDP a frozen copy (the EMA teacher, the KL reference) is sharded with the student's own
  plan (`shard_like_policy`), so each EMA update is a local op between matching fp32 shards.
- Metrics are summed over processes before ratios are taken (`Dist.sum`); only the main process
  logs and writes files. Checkpoints keep a standard HF directory (under FSDP the full state dict
  is gathered to the main process) and, under FSDP, the optimizer state sharded with
  torch.distributed.checkpoint, one file per process.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from zoomless.train.batching import ResponseModel

WRAPPED_PREFIX = "vlm."  # parameter names of a ResponseModel: the HF model's, behind this prefix


def unwrap(module: nn.Module) -> nn.Module:
    """The HF model inside a (DDP-wrapped) ResponseModel, or the module itself."""
    module = getattr(module, "module", module)  # DistributedDataParallel
    return module.vlm if isinstance(module, ResponseModel) else module


# ----------------------------------------------------------------------------- the accelerator


def make_accelerator(device: str, dtype: str) -> Any:
    """The run's Accelerator: mixed precision from `dtype` on CUDA ("auto" is bf16), none on CPU.

    DDP does not broadcast buffers (Qwen's rotary tables are constants; a broadcast in every forward
    would have to run in lockstep, also in no-grad passes), and its gradients are views into its
    communication buckets (one copy of the gradients, not two). Process groups wait 30 minutes,
    not the default 10, since a process can wait on a collective while another one samples.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    cpu = device == "cpu" or not torch.cuda.is_available()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available")
    if device not in ("auto", "cpu", "cuda"):
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError(f"device {device!r}: with several processes each one uses its own GPU; set device: auto")
        torch.cuda.set_device(torch.device(device))
    precision = "no"
    if not cpu and dtype in ("auto", "bfloat16"):
        precision = "bf16"
    _fresh_state_outside_launchers()
    return Accelerator(
        cpu=cpu, mixed_precision=precision, step_scheduler_with_optimizer=False,
        kwargs_handlers=[
            DistributedDataParallelKwargs(broadcast_buffers=False, gradient_as_bucket_view=True),
            InitProcessGroupKwargs(timeout=timedelta(minutes=30)),
        ],
    )


def _fresh_state_outside_launchers() -> None:
    """accelerate keeps one process-wide state and refuses a second Accelerator with another device
    or precision. A process outside any launcher may train several runs in a row (tests, benchmarks,
    notebooks), so each of its runs starts from a fresh state; launched processes keep theirs."""
    import torch.distributed as tdist
    from accelerate.state import AcceleratorState, GradientState

    if tdist.is_available() and tdist.is_initialized():
        return
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def prepare_policy(dist: "Dist", model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, Any]:
    """Hand the policy (wrapped in a ResponseModel) and its optimizer to accelerate: as they are on
    one process, in DDP, or sharded by FSDP2. Returns (policy, optimizer)."""
    policy = ResponseModel(model)
    if dist.fsdp:
        _reduce_in_fp32(dist.accelerator)
    with warnings.catch_warnings(), _head_in_root(policy, dist.fsdp):
        # newer torch renames the DDP flag; the old one works everywhere
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.*deprecated", category=FutureWarning)
        return dist.accelerator.prepare(policy, optimizer)


def _no_module() -> None:
    return None


@contextlib.contextmanager
def _head_in_root(wrapper: ResponseModel, fsdp: bool = True) -> Iterator[None]:
    """While accelerate shards `wrapper` with FSDP2, keep the input embedding and the LM head in the
    root unit (accelerate otherwise carves them out into a unit of their own, one when tied).

    The recipes call the LM head outside the wrapped forward, chunk by chunk. FSDP counts a unit of
    several modules as done with its forward once each of them has run; head calls after the root's
    forward reopen the embedding+head unit and leave it half-way (torch 2.11: from the second call
    on, i.e. more than `logits_chunk_size` response tokens in a micro-batch; torch 2.14: from the
    first). Its `reshard()` then does nothing, so a frozen copy keeps a gathered embedding and the EMA
    update fails on every process ("aten.lerp_.Scalar got mixed torch.Tensor and DTensor"), and it
    stays the forward root, so the next root forward skips its once-per-forward set-up. Inside the
    root unit they are plain modules, gathered from the root's forward to the end of the backward
    as accelerate's unit kept them too (untied, the embedding now also stays gathered: 1 GB in bf16
    at 7B)."""
    if not fsdp:
        yield
        return
    # accelerate asks for these to find the modules to carve out; instance attributes shadow the methods
    wrapper.get_input_embeddings = wrapper.get_output_embeddings = _no_module
    try:
        yield
    finally:
        del wrapper.get_input_embeddings, wrapper.get_output_embeddings


def _reduce_in_fp32(accelerator: Any) -> None:
    """FSDP2: compute in bf16 but average gradients in fp32 (accelerate reduces in the compute dtype),
    and leave outputs in the dtype they are computed in (the losses upcast what they read)."""
    plugin = accelerator.state.fsdp_plugin
    policy = plugin.mixed_precision_policy
    if policy is not None and getattr(policy, "param_dtype", None) is not None:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        plugin.mixed_precision_policy = MixedPrecisionPolicy(param_dtype=policy.param_dtype, reduce_dtype=torch.float32)


@dataclass
class Dist:
    """Where this process stands among the training processes, and the collectives recipes need."""

    accelerator: Any

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def fsdp(self) -> bool:
        from accelerate.utils import DistributedType

        return self.accelerator.distributed_type == DistributedType.FSDP

    def denominator(self, global_tokens: float) -> float:
        """What each process divides its token sum by, so the gradients DDP/FSDP average over
        processes are those of sum(all tokens) / global_tokens."""
        return global_tokens / self.world

    def sum(self, values: dict[str, float]) -> dict[str, float]:
        """Each value summed over processes (in float64). Every process must pass the same keys."""
        return self._reduce(values, "sum")

    def max(self, values: dict[str, float]) -> dict[str, float]:
        return self._reduce(values, "max")

    def _reduce(self, values: dict[str, float], op: str) -> dict[str, float]:
        if self.world == 1:
            return dict(values)
        import torch.distributed as tdist

        t = torch.tensor([float(v) for v in values.values()], dtype=torch.float64, device=self.accelerator.device)
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM if op == "sum" else tdist.ReduceOp.MAX)
        return dict(zip(values, t.tolist()))

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def grad_sync(self, policy: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
        """Around one micro-batch's forward and backward: DDP reduces gradients only when `sync`
        (the step's last micro-batch). FSDP reduce-scatters in every backward, so its gradients
        stay sharded; one process has nothing to sync."""
        from torch.nn.parallel import DistributedDataParallel

        if sync or not isinstance(policy, DistributedDataParallel):
            return contextlib.nullcontext()
        return policy.no_sync()


def even_micro_batches(dist: Dist, items: Sequence[Any], size: int, pad: Any) -> list[list[Any]]:
    """`items` in micro-batches of `size`, followed by `[pad]` micro-batches up to the largest count
    over processes, so every process runs the same number of forward/backward passes. `pad` is a
    placeholder the caller gives zero weight (`is_padding`)."""
    micro = [list(items[i : i + size]) for i in range(0, len(items), size)]
    if dist.world > 1:
        most = int(dist.max({"n": float(len(micro))})["n"])
        micro += [[pad] for _ in range(most - len(micro))]
    return micro


# ----------------------------------------------------------------------------- FSDP


def fsdp_units(module: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def reshard(module: nn.Module) -> None:
    """Free every gathered parameter of an FSDP module: its modules hold their fp32 shards again
    (the root, with the embedding and the head, stays gathered after a forward; an EMA update or an
    export needs shards)."""
    for unit in fsdp_units(module):
        unit.reshard()


def shard_like_policy(dist: Dist, vlm: nn.Module) -> nn.Module:
    """A frozen copy (EMA teacher, KL reference) as the recipes run it: under FSDP a ResponseModel
    sharded with the student's own plan (same layer units, mesh and precision), so its parameters
    are DTensors matching the student's shard for shard; otherwise `vlm` itself."""
    if not dist.fsdp:
        return vlm
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    vlm.requires_grad_(False)
    wrapper = ResponseModel(vlm)
    with _head_in_root(wrapper):
        wrapped = fsdp2_prepare_model(dist.accelerator, wrapper)
    return wrapped.eval()


def _reshards_after_forward(unit: nn.Module) -> bool:
    """A unit's current reshard-after-forward setting (FSDP2 has a setter and no getter; older torch
    keeps one parameter group per unit, newer a list)."""
    state = unit._get_fsdp_state()
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:
        groups = [g for g in [getattr(state, "_fsdp_param_group", None)] if g is not None]
    return any(g.post_forward_mesh_info is not None for g in groups)


@contextlib.contextmanager
def gathered_for_generation(policy: nn.Module) -> Iterator[None]:
    """Under FSDP: every parameter gathered for the block and kept gathered from one forward to
    the next, with `model.generate` routed through the root's forward (FSDP's per-iteration hooks
    then run once around the whole call). Processes sample independently, with no collective
    inside `generate`. A no-op without FSDP."""
    units = fsdp_units(policy)
    if not units:
        yield
        return
    vlm = unwrap(policy)
    # the root keeps its parameters after a forward (fully_shard's default for the root)
    settings = {unit: unit is not policy and _reshards_after_forward(unit) for unit in units}
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    vlm.generate = lambda **kw: policy(None, generate=kw)  # an instance attribute shadows the method
    try:
        yield
    finally:
        del vlm.generate
        for unit, setting in settings.items():
            unit.set_reshard_after_forward(setting, recurse=False)
        reshard(policy)


def export_pretrained(dist: Dist, module: nn.Module, path: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write `module` (an HF model; under FSDP the sharded ResponseModel around one) as a standard HF
    directory, with `state_dict` in place of its own when given (one process). Under FSDP every
    process must call this: the full state dict is gathered to the main process (on CPU), which
    writes it."""
    if dist.fsdp and fsdp_units(module):
        reshard(module)
        state = dist.accelerator.get_state_dict(module)
        if dist.is_main:
            state = {k.removeprefix(WRAPPED_PREFIX): v for k, v in state.items()}
            unwrap(module).save_pretrained(path, state_dict=state)
    elif dist.is_main:
        unwrap(module).save_pretrained(path, state_dict=state_dict)


def save_sharded_optimizer(policy: nn.Module, optimizer: Any, path: Path) -> None:
    """FSDP: each process writes its shard of the optimizer state (torch.distributed.checkpoint)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    dcp.save({"optimizer": get_optimizer_state_dict(policy, _inner(optimizer))}, checkpoint_id=str(path))


def load_sharded_optimizer(policy: nn.Module, optimizer: Any, path: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    inner = _inner(optimizer)
    state = {"optimizer": get_optimizer_state_dict(policy, inner)}  # the layout to load into
    dcp.load(state, checkpoint_id=str(path))
    set_optimizer_state_dict(policy, inner, optim_state_dict=state["optimizer"])


def _inner(optimizer: Any) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
