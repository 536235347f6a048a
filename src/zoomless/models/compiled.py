"""Compile each transformer block with torch.compile, to fuse its small kernels.

At the Qwen2.5-VL-3B shape a training step spends more GPU time in copy, cast and elementwise
kernels (RMSNorm in several passes, SwiGLU's silu and product, rotary's cat and multiplies,
autocast's casts) than in its matmuls, and the CPU spends the rest of the step launching them
(docs/PERFORMANCE_LOG.md). Inductor fuses each such run of elementwise work into one kernel.

Decoder layers are compiled whole. Newer transformers (5.25) checkpoint inside the layer's
`forward`: dynamo traces the checkpointed forward as one graph whose backward recomputes the layer.
Inside it, the `kernels` package (transformers' hub kernels) sets a context variable in every
layer's forward; a checkpoint would replay that in the backward, and dynamo refuses such side
effects unless told to skip them (harmless here: the variable is set and reset within the
forward). Older ones (5.17) checkpoint in `__call__`, around the compiled forward, which the
backward then runs again.

Qwen3.5's linear-attention layers are the exception: their Gated DeltaNet stays eager, their MLP
and norms are compiled (`EAGER_PARTS`); its full-attention layers compile whole, under a compiled
function of their own (`_kind`).

Vision blocks are compiled whole too: their `fast_vision` attention plans its batching in Python
from cu_seqlens' values, so under compile it is one opaque op (`grouped_vision_attention`) that
plans at run time, and a batch's plan neither breaks the graph nor recompiles it. Where that op
does not apply (flash attention, attention dropout) or with `whole_vision=False`, a vision block
keeps its attention eager and compiles its other parts (MLP, norms). Shapes are dynamic (sequence
lengths change every step), and all blocks of a kind share their graphs, one per grad mode and
training flag (two for vision blocks: the tower's first block gets a view as input): modules are
graph inputs, not constants. Blocks run eagerly when generating (a KV cache, one token per call).

With `vision_tower=True` the vision tower's whole forward (its rotary ids and window order, all
its blocks, checkpointed or not, and the merger) is one compiled region instead: a GPU step waits
for the host through the tower's forward, where each separately compiled block costs about 1.5 ms
of host time for 0.44 ms of kernels at the Qwen2.5-VL-3B shape (docs/PERFORMANCE_LOG.md).
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from zoomless.models.fast_vision import PATCHED, compiles_whole


# Parts that stay eager, their block compiled in parts around them: Qwen3.5's Gated DeltaNet linear
# attention. Its kernels are flash-linear-attention's Triton ones where that package is installed;
# otherwise transformers' reference code, whose padding to 64-token chunks inductor could not
# compile with dynamic shapes under transformers 5.17 (torch 2.14, CPU).
EAGER_PARTS = ("linear_attn",)


def _call_forward(block: nn.Module, *args: Any, **kwargs: Any) -> Any:
    # the class's forward (checkpointing wrapper included), not the instance attribute set below
    return type(block).forward(block, *args, **kwargs)


def _kind(block: nn.Module) -> tuple[str, ...]:
    """What makes blocks share graphs: their class and the names of their children. Blocks of one
    class can differ in those (Qwen3.5's decoder layers: linear attention in three of four,
    full attention in the fourth), and each such kind traces its own graphs."""
    return (type(block).__name__, *(name for name, _ in block.named_children()))


@functools.cache
def _compiled_forward(kind: tuple[str, ...]) -> Callable[..., Any]:
    """`_call_forward` compiled for the blocks of one kind (`_kind`), under a code object of its
    own: dynamo counts its recompile limit (8) per code object, and a kind takes one or two graphs
    per grad mode and training flag (a vision tower's first block gets a view as input)."""
    code = _call_forward.__code__.replace(co_name="compiled_" + "_".join(kind))
    return torch.compile(types.FunctionType(code, globals()), dynamic=True)


def _block_forward(block: nn.Module, compiled: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """The compiled block on teacher-forced forwards (the training step's student and teacher);
    eager when generating: a KV cache and one new token per call would recompile it every step."""
    if kwargs.get("use_cache") or torch.is_inference_mode_enabled():
        return type(block).forward(block, *args, **kwargs)
    return compiled(block, *args, **kwargs)


def _tower_forward(tower: nn.Module, compiled: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """The compiled vision tower when its bookkeeping comes ready-made (`models/vision_plan.py`, as
    the training batches bring it); eager otherwise: it would compute it from the grid's values,
    which a graph cannot read, and when generating."""
    if "cu_seqlens" not in kwargs or torch.is_inference_mode_enabled():
        return type(tower).forward(tower, *args, **kwargs)
    return compiled(tower, *args, **kwargs)


def compile_blocks(model: nn.Module, whole: bool = True, whole_vision: bool = True,
                   vision_tower: bool = False) -> list[nn.Module]:
    """Compile each repeated block (`model._no_split_modules`: the decoder layers and the vision
    blocks of HF's VLMs) in place: whole, or its parts (MLP, norms) where its `fast_vision`
    attention cannot go through the compiled op (flash attention, attention dropout) or where
    `whole_vision=False`, or everywhere with `whole=False` (as before 2026-12-07):
    benchmarks/perf_3b_train.py and benchmarks/host_overhead.py compare them. With `vision_tower`
    (and vision blocks that compile whole) the vision tower's forward is compiled as one region,
    its 32 blocks inside: one guard check and one wrapper per forward instead of one per block,
    whose host time a GPU waits for (docs/PERFORMANCE_LOG.md). Calling it again (on a copy of a
    compiled model, say) compiles the copy's own blocks. Returns the modules compiled."""
    torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True  # see the module docstring
    kinds = set(getattr(model, "_no_split_modules", None) or ())
    compiled = []
    tower = _whole_tower(model) if whole and whole_vision and vision_tower else None
    if tower is not None:
        tower.forward = functools.partial(_tower_forward, tower, _compiled_forward(_kind(tower)))
        compiled.append(tower)
    inside = set(map(id, tower.modules())) if tower is not None else set()
    for block in [m for m in model.modules() if type(m).__name__ in kinds and id(m) not in inside]:
        patched = [m for m in block.modules() if getattr(m, PATCHED, False)]
        eager = [m for name, m in block.named_children() if name in EAGER_PARTS]
        if whole and not eager and (not patched or whole_vision and all(compiles_whole(m) for m in patched)):
            block.forward = functools.partial(_block_forward, block, _compiled_forward(_kind(block)))
            compiled.append(block)
        else:
            for part in block.children():
                if not getattr(part, PATCHED, False) and part not in eager:
                    part.compile(dynamic=True)
                    compiled.append(part)
    return compiled


def _whole_tower(model: nn.Module) -> nn.Module | None:
    """The vision tower (`model.model.visual`) when all of its attention goes through fast_vision's
    compiled op (else its blocks are compiled one by one, in parts where needed)."""
    tower = getattr(getattr(model, "model", None), "visual", None)
    patched = [m for m in tower.modules() if getattr(m, PATCHED, False)] if tower is not None else []
    return tower if patched and all(compiles_whole(m) for m in patched) else None


def uncompile_blocks(modules: list[nn.Module]) -> None:
    """Undo `compile_blocks` on the modules it returned: they run eagerly again."""
    for module in modules:
        module._compiled_call_impl = None  # nn.Module.compile's switch
        module.__dict__.pop("forward", None)  # the whole-block wrapper
