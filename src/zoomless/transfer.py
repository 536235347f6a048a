"""Moving small host-built tensors to the GPU without making the CPU wait."""

from __future__ import annotations

import torch
from torch import Tensor


def to_device(t: Tensor, device: torch.device | str) -> Tensor:
    """`t` on `device`. A CPU tensor goes to a GPU from pinned memory without blocking: a plain
    `.to("cuda")` waits for everything queued on the GPU before it returns."""
    device = torch.device(device)
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
