"""Batched vision attention for Qwen2.5-VL and Qwen3-VL: one SDPA call per distinct chunk length.

HF's vision attention packs every image (and, in Qwen2.5-VL, every 112-px window) of a batch
into one sequence cut by `cu_seqlens`. Without flash-attn's varlen kernel it splits the sequence
and calls attention once per chunk: 16 windows x 64 scenes is 1,024 calls per windowed layer,
forward and backward, and on a GPU the launches, not the math, take the step (issue 9).

Chunks of equal length need no mask: stacked, they are one batch [n_chunks, heads, L, head_dim].
`patch_vision_attention` gives each vision attention module a forward that groups the chunks by
length and runs one attention call per distinct length (windows come in a few lengths: the full
ones and those cut by the image border). The arithmetic is the same; only the launches change.

The patch is per instance (the class is untouched) and falls back to HF's own forward under
flash attention (already varlen) or any other backend, and when the inputs are not as expected.
On the CPU the numbers are HF's to the bit; on a GPU the batched call skips cuDNN attention (see
GPU_BACKENDS), so they match HF's to the rounding of the attention kernel.

Under torch.compile (`compiled.compile_blocks` compiles vision blocks whole) the grouping runs
inside a custom op, `grouped_vision_attention`: dynamo sees only its output's shape, and the op
plans at run time (same cache, same numbers), so the rest of the block traces into one graph that
no plan recompiles. Its backward recomputes the attention. Eager, the forward groups directly, as
above. Compiled, cu_seqlens that do not tile the sequence raise instead of falling back.
"""

from __future__ import annotations

import contextlib
import itertools
import sys
import types
import weakref
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from zoomless.transfer import to_device

VISION_ATTENTION_CLASSES = ("Qwen2_5_VLVisionAttention", "Qwen3VLVisionAttention")
# Backends whose attention takes any batch of dense [n, heads, L, d] tensors without a mask.
BATCHABLE = ("sdpa", "eager")
PATCHED = "_zoomless_fast_vision"
# On a GPU, torch prefers cuDNN attention, which builds (and caches) a graph for every new shape:
# the chunk count changes with every batch of crops, so it would build graphs all the time. The
# flash and memory-efficient kernels take any shape without a build.
GPU_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

Plan = tuple[list[tuple[int, torch.Tensor | None]], torch.Tensor | None]

# The grouping of a cu_seqlens tensor, shared by all layers of one forward (they read the same
# tensor), so the host sync and the index building happen once per tensor, not once per layer.
_plans: dict[int, tuple[weakref.ref, int, int, Plan | None]] = {}


def chunk_plan(cu_seqlens: torch.Tensor, seq: int) -> Plan | None:
    """Groups of equal-length chunks of a packed sequence of `seq` tokens, as (length, token index
    [n, L], or None when one length tiles the whole sequence), and the permutation that puts the
    groups' outputs back in token order (None when no reordering is needed). None when
    `cu_seqlens` does not cut [0, seq) into consecutive chunks."""
    if cu_seqlens.is_inference():  # no version counter to tell an in-place change: no cache
        return _make_plan(cu_seqlens.tolist(), seq, cu_seqlens.device)
    key = id(cu_seqlens)
    hit = _plans.get(key)
    if hit is not None and hit[0]() is cu_seqlens and hit[1:3] == (cu_seqlens._version, seq):
        return hit[3]
    plan = _make_plan(cu_seqlens.tolist(), seq, cu_seqlens.device)
    _remember(cu_seqlens, seq, plan)
    return plan


def plan_from_host(cu_seqlens: torch.Tensor, bounds: list[int]) -> None:
    """Plan `cu_seqlens` (a GPU tensor) from its values `bounds`, known on the host, so that no
    layer reads them back (`models/vision_plan.py`). The plan is for the sequence they tile."""
    if not cu_seqlens.is_inference() and bounds:
        _remember(cu_seqlens, bounds[-1], _make_plan(bounds, bounds[-1], cu_seqlens.device))


def _remember(cu_seqlens: torch.Tensor, seq: int, plan: Plan | None) -> None:
    if len(_plans) > 16:  # plans live for one forward; keep the cache from growing
        _plans.clear()
    _plans[id(cu_seqlens)] = (weakref.ref(cu_seqlens), cu_seqlens._version, seq, plan)


def _make_plan(bounds: list[int], seq: int, device: torch.device) -> Plan | None:
    lengths = [b - a for a, b in itertools.pairwise(bounds)]
    if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != seq or min(lengths) < 0:
        return None
    by_length: dict[int, list[int]] = {}
    for start, length in zip(bounds[:-1], lengths):
        if length:  # an empty chunk holds no token
            by_length.setdefault(length, []).append(start)
    if not by_length:
        return None
    if len(by_length) == 1:
        return [(next(iter(by_length)), None)], None
    groups, positions = [], []
    for length, starts in sorted(by_length.items()):  # built on the CPU, sent without blocking
        index = torch.tensor(starts)[:, None] + torch.arange(length)
        groups.append((length, to_device(index, device)))
        positions.append(index.reshape(-1))
    return groups, to_device(torch.argsort(torch.cat(positions)), device)


def grouped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Plan,
    attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Attention within each chunk of packed [seq, heads, d] tensors, one `attend` call per chunk
    length (`plan` from `chunk_plan`). `attend` maps [n, heads, L, d] q, k, v to [n, L, heads, d]
    (HF's attention output layout)."""
    seq, heads, dim = q.shape
    groups, order = plan
    outs = []
    for length, index in groups:
        if index is None:  # one length over the whole sequence: a view, no gather
            qb, kb, vb = (t.reshape(seq // length, length, heads, dim).transpose(1, 2) for t in (q, k, v))
        else:
            qb, kb, vb = (t[index].transpose(1, 2) for t in (q, k, v))
        outs.append(attend(qb, kb, vb).reshape(-1, heads, dim))
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return out if order is None else out[order]


def _plain_layout(module: nn.Module, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor, position_embeddings) -> bool:
    """The inputs are what the grouped forward assumes; anything else goes to HF's forward."""
    return (
        module.config._attn_implementation in BATCHABLE
        and hidden_states.dim() == 2
        and isinstance(cu_seqlens, torch.Tensor)
        and cu_seqlens.dim() == 1
        and cu_seqlens.numel() >= 2
        and not cu_seqlens.is_floating_point()
        and position_embeddings is not None
    )


def _attend(
    module, implementation: str, hf_module: str, scaling: float, dropout: float, is_causal: bool, **kwargs,
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """HF's attention function for `implementation` as `grouped_attention`'s `attend`."""
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, sys.modules[hf_module].eager_attention_forward)

    def attend(qb: torch.Tensor, kb: torch.Tensor, vb: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel(GPU_BACKENDS) if qb.is_cuda else contextlib.nullcontext():
            return interface(module, qb, kb, vb, attention_mask=None, scaling=scaling, dropout=dropout,
                             is_causal=is_causal, **kwargs)[0]

    return attend


def _grouped_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    cu_seqlens: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_seqlen: int | None = None,
    **kwargs,
) -> torch.Tensor:
    """HF's vision attention forward (qkv, 2D rotary, attention per chunk, proj) with the chunks batched."""
    if not _plain_layout(self, hidden_states, cu_seqlens, position_embeddings):
        return type(self).forward(self, hidden_states, cu_seqlens, position_embeddings, max_seqlen, **kwargs)
    seq = hidden_states.shape[0]
    plan = None
    if not torch.compiler.is_compiling():  # compiled, the op plans (at run time)
        plan = chunk_plan(cu_seqlens, seq)
        if plan is None:
            return type(self).forward(self, hidden_states, cu_seqlens, position_embeddings, max_seqlen, **kwargs)
    q, k, v = self.qkv(hidden_states).reshape(seq, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    hf = sys.modules[type(self).__module__]
    cos, sin = position_embeddings
    q, k = hf.apply_rotary_pos_emb_vision(q, k, cos, sin)
    args = (self.config._attn_implementation, hf.__name__, self.scaling,
            0.0 if not self.training else self.attention_dropout, False)
    if plan is None:  # kwargs (use_cache, ...) are nothing the batchable attention functions read
        out = grouped_vision_attention(q, k, v, cu_seqlens, *args)
    else:
        out = grouped_attention(q, k, v, plan, _attend(self, *args, **kwargs))
    return self.proj(out.reshape(seq, -1).contiguous())


# ----------------------------------------------------------------------------- under torch.compile
# The attention as one opaque op, so that dynamo traces the rest of a vision block (qkv, rotary,
# proj, MLP, norms) into one graph: the plan reads cu_seqlens' values on the host, which dynamo
# cannot trace, and it changes with every batch, which a traced plan would recompile for.


def _op_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
    implementation: str, hf_module: str, scaling: float, dropout: float, is_causal: bool,
) -> torch.Tensor:
    plan = chunk_plan(cu_seqlens, q.shape[0])
    if plan is None:  # HF's forward fails on such cuts too
        raise ValueError("cu_seqlens does not cut the sequence into consecutive chunks")
    # HF's attention functions read these of the module (its own carries the same)
    module = types.SimpleNamespace(num_key_value_groups=1, is_causal=is_causal, training=dropout > 0)
    attend = _attend(module, implementation, hf_module, scaling, dropout, is_causal)
    return grouped_attention(q, k, v, plan, attend).contiguous()


@torch.library.custom_op("zoomless::grouped_vision_attention", mutates_args=())
def grouped_vision_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
    implementation: str, hf_module: str, scaling: float, dropout: float, is_causal: bool,
) -> torch.Tensor:
    """Attention within each chunk of packed [seq, heads, d] q, k, v (rotary applied) cut by
    `cu_seqlens`, batched by chunk length; [seq, heads, d]. HF's attention function
    `implementation` (else `hf_module`'s eager one) with these scaling, dropout and is_causal."""
    return _op_attention(q, k, v, cu_seqlens, implementation, hf_module, scaling, dropout, is_causal)


@grouped_vision_attention.register_fake
def _(q, k, v, cu_seqlens, *args):
    return q.new_empty(q.shape)


@torch.library.custom_op("zoomless::grouped_vision_attention_backward", mutates_args=())
def _grouped_vision_attention_backward(
    grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
    implementation: str, hf_module: str, scaling: float, dropout: float, is_causal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Recomputes the attention rather than saving what each SDPA kernel's backward needs: at the
    # Qwen2.5-VL-3B shape the vision attention is ~2% of the tower's forward FLOPs (1% of a block
    # with 64-token windows, 13% of a full one with 1,024-token images), next to its matmuls. A
    # dropout mask would not be drawn again: compile_blocks compiles whole only blocks without
    # attention dropout. torch.func.vjp, not autograd.grad: an op's implementation runs below the
    # autograd dispatch key, where tensors record no graph.
    _, vjp = torch.func.vjp(
        lambda q, k, v: _op_attention(q, k, v, cu_seqlens, implementation, hf_module, scaling, dropout, is_causal),
        q, k, v,
    )
    return tuple(g.contiguous() for g in vjp(grad))


@_grouped_vision_attention_backward.register_fake
def _(grad, q, k, v, *args):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs[:4])
    ctx.args = inputs[4:]


def _backward(ctx, grad):
    return *_grouped_vision_attention_backward(grad, *ctx.saved_tensors, *ctx.args), *(None,) * (1 + len(ctx.args))


grouped_vision_attention.register_autograd(_backward, setup_context=_setup_context)


def compiles_whole(module: nn.Module) -> bool:
    """Whether a patched attention module goes through `grouped_vision_attention` under torch.compile
    (else compile_blocks leaves it eager)."""
    return module.config._attn_implementation in BATCHABLE and not module.attention_dropout


def _patchable(module: nn.Module) -> bool:
    hf = sys.modules.get(type(module).__module__)
    return (
        type(module).__name__ in VISION_ATTENTION_CLASSES
        and hf is not None
        and hasattr(hf, "apply_rotary_pos_emb_vision")
        and hasattr(hf, "eager_attention_forward")
        and all(hasattr(module, a) for a in ("qkv", "proj", "num_heads", "scaling", "config", "attention_dropout"))
    )


def patch_vision_attention(model: nn.Module) -> int:
    """Give every Qwen2.5-VL / Qwen3-VL vision attention module of `model` the grouped forward.
    Returns how many modules carry it (already patched ones count; other models give 0)."""
    n = 0
    for module in model.modules():
        if getattr(module, PATCHED, False):
            n += 1
        elif _patchable(module):
            # A bound method on the instance: deepcopy (the EMA teacher) rebinds it to the copy.
            module.forward = types.MethodType(_grouped_forward, module)
            setattr(module, PATCHED, True)
            n += 1
    return n


def unpatch_vision_attention(model: nn.Module) -> int:
    """Undo `patch_vision_attention`; returns how many modules were restored."""
    n = 0
    for module in model.modules():
        if getattr(module, PATCHED, False):
            del module.forward
            delattr(module, PATCHED)
            n += 1
    return n
