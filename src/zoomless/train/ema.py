"""The distillation teacher: an EMA copy of the student, the frozen base model, or the live student.

The EMA weights stay in fp32 by default (spec 3): with a small learning rate, 0.05 * (student -
teacher) is far below bf16 resolution, so a bf16 EMA rounded to nearest would never move. Forwards
may still run under bf16 autocast. Only parameters are averaged; buffers are copied as they are.

`teacher_dtype: bfloat16` halves the copy (7.5 GB instead of 15 GB at 3.75B parameters: the
Vision-OPD recipe with `bf16_weights` then fits one 80 GB H100 at the 3B shape, peak 72-75 GiB,
docs/PERFORMANCE_LOG.md) and rounds each EMA update *stochastically*: up with the probability of the
discarded fraction, so that the expected teacher is the fp32 EMA and small moves accumulate instead
of vanishing. The price is noise around the fp32
EMA: 0.75 bf16 steps RMS under a steady drift of lr-sized updates, where an EMA rounded to nearest
falls 4.7 steps behind and keeps falling (tests/test_train_common.py). A bf16 student's own
weights are rounded to nearest, 0.29 steps RMS. The random bits are a hash of each element's index
and a seed the recipe derives from its step count, so that a resumed run rounds as the
uninterrupted one did, and the update compiled for a GPU (one kernel per weight tensor) draws the
same bits as the eager one.
"""

from __future__ import annotations

import copy
import functools
import warnings
from typing import Literal, Mapping

import torch
from torch import nn
from torch.distributed.tensor import DTensor

TeacherMode = Literal["ema", "frozen", "student"]


def make_teacher(
    student: nn.Module, mode: TeacherMode, init: nn.Module | None = None,
    weights: Mapping[str, torch.Tensor] | None = None, dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """The teacher module for `mode`.

    "ema" and "frozen" get a separate copy in `dtype` (fp32 or bf16) of `init` when given (e.g. a
    teacher restored from a checkpoint), else of the student, loaded with `weights` when given (the
    fp32 masters of a bf16 student; rounded to nearest for a bf16 teacher), with requires_grad off,
    in eval mode. "student" returns the student itself: the caller runs it under no_grad.
    """
    if mode == "student":
        return student
    if mode not in ("ema", "frozen"):
        raise ValueError(f"teacher must be 'ema', 'frozen' or 'student', got {mode!r}")
    teacher = copy.deepcopy(init if init is not None else student).to(dtype)
    if init is None and weights is not None:
        teacher.load_state_dict(weights)  # copied into the teacher's dtype
    teacher.requires_grad_(False)
    teacher.eval()
    return teacher


def _noise16(shape: torch.Size, seed: torch.Tensor) -> torch.Tensor:
    """16 pseudo-random bits per element: a hash of the element's index and `seed` (an int64
    tensor, so that a compiled caller does not recompile for every seed). Counter-based, unlike
    torch's generators, so that eager and compiled code draw the same bits: int64 arithmetic whose
    products stay below 2^63 (a 32-bit value times a 27-bit constant)."""
    x = (torch.arange(shape.numel(), device=seed.device).view(shape) ^ seed) & 0xFFFFFFFF
    for _ in range(2):  # Thomas Mueller's 32-bit integer hash
        x = (((x >> 16) ^ x) * 0x45D9F3B) & 0xFFFFFFFF
    return ((x >> 16) ^ x) & 0xFFFF


def round_stochastically(x: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """fp32 `x` in bf16, each value rounded up (away from zero) with the probability of the part of
    its mantissa that bf16 drops, else down: E[result] = x. bf16 keeps an fp32's upper 16 bits, so
    16 random bits added to the lower ones carry into the kept part with that probability (the
    sign bit is apart: negative values round symmetrically). Infinities and torch's NaN stay what
    they are. The bits come from `_noise16(seed)`."""
    bits = x.float().contiguous().view(torch.int32) + _noise16(x.shape, seed).to(torch.int32)
    return (bits & -65536).view(torch.float32).to(torch.bfloat16)  # -65536: 0xFFFF0000; exact in bf16


def _ema_bf16_(t: torch.Tensor, s: torch.Tensor, rate: float, seed: torch.Tensor) -> None:
    t.copy_(round_stochastically(t.float().lerp_(s.float(), rate), seed))


@functools.cache
def _compiled_ema_bf16():
    """`_ema_bf16_` as one fused kernel per tensor: it reads the bf16 teacher and the fp32 student
    and writes the teacher (8 bytes per weight), where the eager steps, the hash's int64 passes
    among them, move some 270."""
    return torch.compile(_ema_bf16_, dynamic=True)


_NO_COMPILER: list[str] = []  # why torch.compile failed here, once it has


def _update_bf16_(t: torch.Tensor, s: torch.Tensor, rate: float, seed: torch.Tensor, compiled: bool) -> None:
    """`_ema_bf16_`, compiled when asked and possible: where torch.compile cannot build it (no
    Triton for this GPU, say), the eager update from then on, which draws the same bits."""
    if compiled and not _NO_COMPILER:
        try:
            return _compiled_ema_bf16()(t, s, rate, seed)
        except torch._dynamo.exc.BackendCompilerFailed as e:  # fails before it writes anything
            _NO_COMPILER.append(str(e))
            warnings.warn(f"the bf16 EMA teacher's update runs eagerly (slower): torch.compile failed: {e}",
                          stacklevel=2)
    _ema_bf16_(t, s, rate, seed)


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module | Mapping[str, torch.Tensor], rate: float,
                seed: int = 0, compiled: bool | None = None) -> None:
    """In place, parameter by parameter: teacher <- (1 - rate) * teacher + rate * student, in fp32;
    a bf16 teacher gets the result rounded stochastically (`round_stochastically`; `seed` picks the
    random bits, one stream per parameter; `compiled`: fused by torch.compile, by default on GPUs).
    `student` is a module or its parameters by name (`Run.fp32_parameters()`: a bf16 student's
    masters).

    Parameters are matched by name, so a different module order or wrapping fails loudly instead of
    silently averaging the wrong tensors.
    """
    if rate == 0.0:
        return
    t_params = dict(teacher.named_parameters())
    s_params = dict(student.named_parameters() if isinstance(student, nn.Module) else student)
    if t_params.keys() != s_params.keys():
        missing = sorted(set(s_params) ^ set(t_params))[:3]
        raise ValueError(f"teacher and student parameters differ (e.g. {', '.join(missing)})")
    # plain tensors of one dtype and device (an fp32 student, or a bf16 student's masters) go in one
    # foreach call instead of a kernel launch per tensor (~800 at 3B); the rest (a bf16 student,
    # FSDP shards, a bf16 teacher) one by one, so that a cast never copies the whole model at once
    ts, ss, seeds = [], [], {}
    for i, (name, t) in enumerate(t_params.items()):
        s = s_params[name].detach()
        if t.dtype == torch.bfloat16 and not isinstance(t, DTensor):
            if t.device not in seeds:  # one seed per parameter, made on the device at once (no copy per tensor)
                seeds[t.device] = torch.arange(len(t_params), device=t.device).mul_(0x9E3779B1).add_(seed)
            # flat (parameters are contiguous): one compiled graph for every shape; by rank, the 3B's
            # 1- to 5-dimensional weights passed dynamo's limit of 8 graphs (H100, 2026-12-07)
            _update_bf16_(t.view(-1), s.to(t.device).reshape(-1), rate, seeds[t.device][i],
                          compiled if compiled is not None else t.is_cuda)
        elif t.dtype == s.dtype and t.device == s.device and not isinstance(t, DTensor) and not isinstance(s, DTensor):
            ts.append(t)
            ss.append(s)
        else:
            t.lerp_(s.to(device=t.device, dtype=t.dtype), rate)
    if ts:
        torch._foreach_lerp_(ts, ss, rate)
