"""Batched vision attention for Qwen2.5-VL, Qwen3-VL and Qwen3.5: one SDPA call per distinct chunk length.

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
no plan recompiles. With SDPA it calls the flash kernels itself and its backward starts from
their log-sum-exp; otherwise its backward recomputes the attention. Eager, the forward groups
directly, as above. Compiled, cu_seqlens that do not tile the sequence raise instead of falling back.
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

VISION_ATTENTION_CLASSES = ("Qwen2_5_VLVisionAttention", "Qwen3VLVisionAttention", "Qwen3_5VisionAttention")
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


def _chunks(t: torch.Tensor, length: int, index: torch.Tensor | None) -> torch.Tensor:
    """The chunks of `length` of a packed [seq, heads, d] tensor as one batch [n, heads, L, d]
    (`index` from the plan; None: one length over the whole sequence, a view, no gather)."""
    if index is None:
        return t.reshape(t.shape[0] // length, length, *t.shape[1:]).transpose(1, 2)
    return t[index].transpose(1, 2)


def _unchunk(outs: list[torch.Tensor], order: torch.Tensor | None) -> torch.Tensor:
    """Each group's [n, L, heads, d] back to one packed [seq, heads, d], in token order."""
    outs = [o.reshape(-1, *o.shape[2:]) for o in outs]
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return out if order is None else out[order]


def grouped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Plan,
    attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Attention within each chunk of packed [seq, heads, d] tensors, one `attend` call per chunk
    length (`plan` from `chunk_plan`). `attend` maps [n, heads, L, d] q, k, v to [n, L, heads, d]
    (HF's attention output layout)."""
    groups, order = plan
    return _unchunk([attend(*(_chunks(t, length, index) for t in (q, k, v))) for length, index in groups], order)


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
#
# Where it can (`_flash_kernels`), the op calls SDPA's flash kernels itself, the ones SDPA picks
# there anyway: the forward keeps each chunk's log-sum-exp, and the backward runs their backward
# from it. Otherwise the op calls HF's attention function and its backward recomputes it through
# torch.func.vjp, which costs about 0.7 ms of host time per call (GPU profile, 2026-12-07): 22 ms
# per backward of the 3B's 32 vision blocks, while the GPU waits on the host there.


def _flash_kernels(q: torch.Tensor, implementation: str, dropout: float) -> bool:
    """Whether the op calls SDPA's flash kernels directly: HF's sdpa implementation without
    dropout, on the CPU or on a GPU where SDPA runs flash attention (half precision, a head size of
    a multiple of 8 up to 256, compute capability 8.0 or more)."""
    if implementation != "sdpa" or dropout:
        return False
    if q.device.type == "cpu":
        return True
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256
            and torch.cuda.get_device_capability(q.device) >= (8, 0))


def _flash_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float, is_causal: bool):
    """[n, heads, L, d] q, k, v -> the output [n, L, heads, d] and the log-sum-exp [n, heads, L] (fp32)."""
    if q.is_cuda:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, is_causal, False, scale=scaling)[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, is_causal, scale=scaling)
    return out.transpose(1, 2), lse


def _flash_backward(grad, q, k, v, out, lse, scaling: float, is_causal: bool) -> tuple[torch.Tensor, ...]:
    """The gradients of [n, heads, L, d] q, k, v from the output's `grad`, and `out` and `lse` as
    `_flash_forward` gave them (`out` transposed back to [n, heads, L, d])."""
    if not q.is_cuda:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad, q, k, v, out, lse, 0.0, is_causal, scale=scaling)
    # as torch's own derivative passes them: no cumulative lengths (one length), and a random
    # state that no dropout reads
    length, rng = q.shape[2], torch.empty(0, dtype=torch.uint64, device=q.device)
    return torch.ops.aten._scaled_dot_product_flash_attention_backward(
        grad, q, k, v, out, lse, None, None, length, length, 0.0, is_causal, rng, rng, scale=scaling)


def _op_plan(cu_seqlens: torch.Tensor, seq: int) -> Plan:
    plan = chunk_plan(cu_seqlens, seq)
    if plan is None:  # HF's forward fails on such cuts too
        raise ValueError("cu_seqlens does not cut the sequence into consecutive chunks")
    return plan


def _op_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
    implementation: str, hf_module: str, scaling: float, dropout: float, is_causal: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention output [seq, heads, d] and, from the flash kernels, the chunks' log-sum-exp
    (flat, group by group; an empty tensor when HF's attention function ran)."""
    groups, order = plan = _op_plan(cu_seqlens, q.shape[0])
    if _flash_kernels(q, implementation, dropout):
        outs, lses = zip(*(_flash_forward(*(_chunks(t, length, index) for t in (q, k, v)), scaling, is_causal)
                           for length, index in groups))
        return _unchunk(list(outs), order).contiguous(), torch.cat([lse.reshape(-1) for lse in lses])
    # HF's attention functions read these of the module (its own carries the same)
    module = types.SimpleNamespace(num_key_value_groups=1, is_causal=is_causal, training=dropout > 0)
    attend = _attend(module, implementation, hf_module, scaling, dropout, is_causal)
    return grouped_attention(q, k, v, plan, attend).contiguous(), q.new_empty(0, dtype=torch.float32)


@torch.library.custom_op("zoomless::grouped_vision_attention", mutates_args=())
def _grouped_vision_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
    implementation: str, hf_module: str, scaling: float, dropout: float, is_causal: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _op_attention(q, k, v, cu_seqlens, implementation, hf_module, scaling, dropout, is_causal)


@_grouped_vision_attention.register_fake
def _(q, k, v, cu_seqlens, implementation, hf_module, scaling, dropout, is_causal):
    # every token is in one chunk: heads x seq log-sum-exps
    lse_size = q.shape[0] * q.shape[1] if _flash_kernels(q, implementation, dropout) else 0
    return q.new_empty(q.shape), q.new_empty(lse_size, dtype=torch.float32)


def grouped_vision_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
    implementation: str, hf_module: str, scaling: float, dropout: float, is_causal: bool,
) -> torch.Tensor:
    """Attention within each chunk of packed [seq, heads, d] q, k, v (rotary applied) cut by
    `cu_seqlens`, batched by chunk length; [seq, heads, d]. HF's attention function
    `implementation` (else `hf_module`'s eager one) with these scaling, dropout and is_causal."""
    return _grouped_vision_attention(q, k, v, cu_seqlens, implementation, hf_module, scaling, dropout, is_causal)[0]


@torch.library.custom_op("zoomless::grouped_vision_attention_backward", mutates_args=())
def _grouped_vision_attention_backward(
    grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    cu_seqlens: torch.Tensor, implementation: str, hf_module: str, scaling: float, dropout: float, is_causal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if lse.numel():  # the forward ran the flash kernels: their backward, from what it kept
        groups, order = _op_plan(cu_seqlens, q.shape[0])
        grads, start = [], 0
        for length, index in groups:
            qb, kb, vb, ob, gb = (_chunks(t, length, index) for t in (q, k, v, out, grad))
            size = qb.shape[0] * qb.shape[1] * length
            lb = lse[start:start + size].view(qb.shape[0], qb.shape[1], length)
            start += size
            grads.append([g.transpose(1, 2) for g in _flash_backward(gb, qb, kb, vb, ob, lb, scaling, is_causal)])
        return tuple(_unchunk(list(g), order).contiguous() for g in zip(*grads))
    # Recomputes the attention rather than saving what each kernel's backward needs: at the
    # Qwen2.5-VL-3B shape the vision attention is ~2% of the tower's forward FLOPs (1% of a block
    # with 64-token windows, 13% of a full one with 1,024-token images), next to its matmuls. A
    # dropout mask would not be drawn again: compile_blocks compiles whole only blocks without
    # attention dropout. torch.func.vjp, not autograd.grad: an op's implementation runs below the
    # autograd dispatch key, where tensors record no graph.
    _, vjp = torch.func.vjp(
        lambda q, k, v: _op_attention(q, k, v, cu_seqlens, implementation, hf_module, scaling, dropout, is_causal)[0],
        q, k, v,
    )
    return tuple(g.contiguous() for g in vjp(grad))


@_grouped_vision_attention_backward.register_fake
def _(grad, q, k, v, *args):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs[:4], *output)  # q, k, v, cu_seqlens, out, lse
    ctx.args = inputs[4:]


def _backward(ctx, grad, _lse_grad):
    q, k, v, cu_seqlens, out, lse = ctx.saved_tensors
    grads = _grouped_vision_attention_backward(grad, q, k, v, out, lse, cu_seqlens, *ctx.args)
    return *grads, *(None,) * (1 + len(ctx.args))


_grouped_vision_attention.register_autograd(_backward, setup_context=_setup_context)


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
    """Give every Qwen2.5-VL / Qwen3-VL / Qwen3.5 vision attention module of `model` the grouped forward.
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
