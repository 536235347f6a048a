"""The distillation teacher: an EMA copy of the student, the frozen base model, or the live student.

The EMA weights stay in fp32 by default (spec 3): with a small learning rate, 0.05 * (student -
teacher) is far below bf16 resolution, so a bf16 EMA rounded to nearest would never move. Forwards
may still run under bf16 autocast. Only parameters are averaged; buffers are copied as they are.

`teacher_dtype: bfloat16` halves the copy (7.5 GB instead of 15 GB at 3.75B parameters: what lets
the Vision-OPD recipe fit one 80 GB GPU at the 3B shape) and rounds each EMA update
*stochastically*: up with the probability of the discarded fraction, so that the expected teacher
is the fp32 EMA and small moves accumulate instead of vanishing. The price is noise around the fp32
EMA: 0.7 bf16 steps RMS under a steady drift of lr-sized updates, where an EMA rounded to nearest
falls 4.7 steps behind and keeps falling (tests/test_train_common.py). A bf16 student's own
weights are rounded to nearest, 0.3 steps RMS.
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


def round_stochastically(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """fp32 `x` in bf16, each value rounded up (away from zero) with the probability of the part of
    its mantissa that bf16 drops, else down: E[result] = x. bf16 keeps an fp32's upper 16 bits, so a
    random 16-bit number added to the lower ones carries into the kept part with that probability
    (the sign bit is apart: negative values round symmetrically). Infinities and torch's NaN stay
    what they are. In place on one int32 buffer: a bf16 teacher's update reads and writes each
    weight a few times per step (memory-bound on a GPU)."""
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    noise.add_(x.float().contiguous().view(torch.int32)).bitwise_and_(-65536)  # -65536: 0xFFFF0000
    return noise.view(torch.float32).to(torch.bfloat16)  # the lower 16 bits are zero: exact


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module | Mapping[str, torch.Tensor], rate: float,
                generator: torch.Generator | None = None) -> None:
    """In place, parameter by parameter: teacher <- (1 - rate) * teacher + rate * student, in fp32;
    a bf16 teacher gets the result rounded stochastically (`round_stochastically`, drawing from
    `generator`). `student` is a module or its parameters by name (`Run.fp32_parameters()`: a bf16
    student's masters).

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
    ts, ss = [], []
    for name, t in t_params.items():
        s = s_params[name].detach()
        if t.dtype == torch.bfloat16 and not isinstance(t, DTensor):
            t.copy_(round_stochastically(t.float().lerp_(s.to(device=t.device, dtype=torch.float32), rate), generator))
        elif t.dtype == s.dtype and t.device == s.device and not isinstance(t, DTensor) and not isinstance(s, DTensor):
            ts.append(t)
            ss.append(s)
        else:
            t.lerp_(s.to(device=t.device, dtype=t.dtype), rate)
    if ts:
        torch._foreach_lerp_(ts, ss, rate)
