"""The distillation teacher: an fp32 EMA copy of the student, the frozen base model, or the live student.

The EMA weights stay in fp32 (spec 3): with a small learning rate, 0.05 * (student - teacher) is
far below bf16 resolution, so a bf16 EMA would never move. Forwards may still run under bf16
autocast. Only parameters are averaged; buffers are copied as they are.
"""

from __future__ import annotations

import copy
from typing import Literal, Mapping

import torch
from torch import nn
from torch.distributed.tensor import DTensor

TeacherMode = Literal["ema", "frozen", "student"]


def make_teacher(
    student: nn.Module, mode: TeacherMode, init: nn.Module | None = None,
    weights: Mapping[str, torch.Tensor] | None = None,
) -> nn.Module:
    """The teacher module for `mode`.

    "ema" and "frozen" get a separate fp32 copy (of `init` when given, e.g. a teacher restored from a
    checkpoint, else of the student, loaded with `weights` when given: the fp32 masters of a bf16
    student) with requires_grad off, in eval mode. "student" returns the student itself: the caller
    runs it under no_grad.
    """
    if mode == "student":
        return student
    if mode not in ("ema", "frozen"):
        raise ValueError(f"teacher must be 'ema', 'frozen' or 'student', got {mode!r}")
    teacher = copy.deepcopy(init if init is not None else student).float()
    if init is None and weights is not None:
        teacher.load_state_dict(weights)
    teacher.requires_grad_(False)
    teacher.eval()
    return teacher


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module | Mapping[str, torch.Tensor], rate: float) -> None:
    """In place, parameter by parameter: teacher <- (1 - rate) * teacher + rate * student, in fp32.
    `student` is a module or its parameters by name (`Run.fp32_parameters()`: a bf16 student's masters).

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
    # FSDP shards) one by one, so that a cast never copies the whole model at once
    ts, ss = [], []
    for name, t in t_params.items():
        s = s_params[name].detach()
        if t.dtype == s.dtype and t.device == s.device and not isinstance(t, DTensor) and not isinstance(s, DTensor):
            ts.append(t)
            ss.append(s)
        else:
            t.lerp_(s.to(device=t.device, dtype=t.dtype), rate)
    if ts:
        torch._foreach_lerp_(ts, ss, rate)
