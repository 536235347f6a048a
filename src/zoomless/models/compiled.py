"""Compile the parts of each transformer block with torch.compile, to fuse their small kernels.

At the Qwen2.5-VL-3B shape a training step spends more GPU time in copy, cast and elementwise
kernels (RMSNorm in several passes, SwiGLU's silu and product, rotary's cat and multiplies,
autocast's casts) than in its matmuls, and the CPU spends the rest of the step launching them
(docs/PERFORMANCE.md). Inductor fuses each such run of elementwise work into one kernel.

Only the parts of a block (attention, MLP, norms) are compiled, not the block itself: HF's
activation checkpointing wraps whole blocks, and dynamo cannot trace a checkpointed block that
touches transformers' context variables (it falls back to eager). Vision attention patched by
`fast_vision` stays eager: it plans its batching in Python. Shapes are dynamic (sequence lengths
change every step), and every block shares one compiled graph per part, as modules are inlined.
"""

from __future__ import annotations

from torch import nn

from zoomless.models.fast_vision import PATCHED


def compile_blocks(model: nn.Module) -> list[nn.Module]:
    """Compile every child of each repeated block (`model._no_split_modules`: the decoder layers
    and the vision blocks of HF's VLMs) in place. Returns the modules compiled."""
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    parts = [part for module in model.modules() if type(module).__name__ in blocks
             for part in module.children() if not getattr(part, PATCHED, False)]
    for part in parts:
        part.compile(dynamic=True)
    return parts
