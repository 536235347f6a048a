"""Encode each distinct image of a batch once.

On-policy methods teacher-force several rollouts of one prompt (8 in GRPO, 2-8 in Vision-OPD):
every row of such a group carries the same image, and HF's forward runs the vision tower on each
copy. At the Qwen2.5-VL-3B shape the vision tower is 40% of a Vision-OPD step's model FLOPs
(docs/PERFORMANCE_LOG.md), so most of that is repeated work. Here the vision tower sees only the first
copy of each image and its output is gathered back to every row; autograd adds the rows' gradients
into the one encoding, which is the same gradient as encoding every copy.

It works through forward hooks on the model's vision module (`model.model.visual`, as in Qwen2-VL,
Qwen2.5-VL, Qwen3-VL and Qwen3.5), so HF's own forward, position ids and scatter are untouched. A model
without such a module, or a batch without repeated images, runs as before. The pixels may come
with every copy (the hook keeps the first ones) or, as `batching.build_batch` sends them, with
each distinct image once: then nothing is dropped on the GPU and nothing extra crossed to it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from zoomless.transfer import to_device


@dataclass
class ImageSharing:
    """Which images of a batch are copies: `keep` [U] indices of the first copy of each distinct
    image (in batch image order), `source` [I] the position in `keep` that image i is a copy of.
    `patches` [I], when known, is each image's patch count on the CPU: the gather indices are then
    built there, with no GPU value read back (each read would stall the GPU)."""

    keep: Tensor
    source: Tensor
    patches: Tensor | None = None

    def to(self, device: torch.device | str) -> "ImageSharing":
        return self  # stays on the CPU: the hooks build their indices there and send only those


def sharing_of(image_owners: list[int], patches: Tensor | None = None) -> ImageSharing | None:
    """`image_owners[i]` names what image i is (equal names: the same pixels); None without repeats.
    `patches`: each image's patch count (see ImageSharing)."""
    first: dict[int, int] = {}
    keep, source = [], []
    for i, owner in enumerate(image_owners):
        if owner not in first:
            first[owner] = len(keep)
            keep.append(i)
        source.append(first[owner])
    if len(keep) == len(image_owners):
        return None
    if patches is not None and len(patches) != len(image_owners):
        raise ValueError(f"{len(patches)} patch counts for {len(image_owners)} images")
    return ImageSharing(torch.tensor(keep, dtype=torch.long), torch.tensor(source, dtype=torch.long),
                        None if patches is None else patches.detach().to("cpu", torch.long))


def vision_module(model: nn.Module) -> nn.Module | None:
    """The vision tower that HF's multimodal backbone calls (`model.model.visual`), if any."""
    backbone = getattr(model, "model", None)
    return getattr(backbone, "visual", None)


def _blocks(sizes: Tensor, pick: Tensor) -> Tensor:
    """Row indices of the blocks `pick` of a tensor made of consecutive blocks of `sizes` rows."""
    starts = torch.cumsum(sizes, 0) - sizes
    lengths = sizes[pick]
    offsets = torch.arange(int(lengths.sum()), device=sizes.device) - torch.repeat_interleave(
        torch.cumsum(lengths, 0) - lengths, lengths)
    return torch.repeat_interleave(starts[pick], lengths) + offsets


@contextlib.contextmanager
def encode_once(visual: nn.Module | None, sharing: ImageSharing | None) -> Iterator[None]:
    """Within the block, `visual` encodes only `sharing.keep` and its outputs are expanded back."""
    if visual is None or sharing is None:
        yield
        return
    merge = int(getattr(visual, "spatial_merge_size", 2)) ** 2
    state: dict[str, Tensor] = {}

    def before(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        # HF calls visual(pixel_values, grid_thw=...) (or both positional, or hidden_states=...)
        pixels, rest = (args[0], args[1:]) if args else (kwargs.pop("hidden_states"), ())
        grid, rest = (kwargs.pop("grid_thw"), rest) if "grid_thw" in kwargs else (rest[0], rest[1:])
        known = sharing.patches is not None and len(sharing.patches) == len(grid)
        patches = sharing.patches if known else grid.prod(-1)  # on the CPU when known: no host sync below
        state["patches"] = patches
        kept_grid = grid[to_device(sharing.keep, grid.device)]
        if known and pixels.shape[0] == int(patches[sharing.keep].sum()):  # build_batch sent the kept images only
            return (pixels, *rest), {**kwargs, "grid_thw": kept_grid}
        rows = _blocks(patches, to_device(sharing.keep, patches.device))
        return (pixels[to_device(rows, pixels.device)], *rest), {**kwargs, "grid_thw": kept_grid}

    def after(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        patches = state["patches"]
        kept = patches[to_device(sharing.keep, patches.device)]
        source = to_device(sharing.source, patches.device)
        per_patch = _blocks(kept, source)  # rows of the kept encodings, for every image of the batch
        per_token = _blocks(kept // merge, source)
        return _expand(output, int(kept.sum()), per_patch, int(kept.sum()) // merge, per_token)

    handles = [visual.register_forward_pre_hook(before, with_kwargs=True),
               visual.register_forward_hook(after, with_kwargs=True)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def vision_once(visual: nn.Module | None) -> Iterator[None]:
    """Within the block, every call of `visual` returns (a copy of) what its first call returned:
    for a decode loop without a KV cache, which feeds the same images at every step. No grad."""
    if visual is None:
        yield
        return
    original, memo = visual.forward, []

    def forward(*args: Any, **kwargs: Any) -> Any:
        if not memo:
            memo.append(original(*args, **kwargs))
        return _map_tensors(memo[0], lambda t: t)  # a new container: HF rewrites the one it gets

    visual.forward = forward  # an instance attribute: nn.Module.__call__ (and its hooks) call it
    try:
        yield
    finally:
        del visual.forward


def _expand(value: Any, n_patches: int, per_patch: Tensor, n_tokens: int, per_token: Tensor) -> Any:
    """Every tensor in `value` whose first dimension counts the kept images' patches or merged
    tokens, gathered out to every image."""

    def gather(t: Tensor) -> Tensor:
        if t.dim() and t.shape[0] == n_tokens:
            return t[to_device(per_token, t.device)]
        if t.dim() and t.shape[0] == n_patches:
            return t[to_device(per_patch, t.device)]
        return t

    return _map_tensors(value, gather)


def _map_tensors(value: Any, fn: Any) -> Any:
    """`value` (a tensor, a transformers ModelOutput or dict, a tuple or list of them) rebuilt with
    `fn` applied to every tensor; containers are new, never changed in place."""
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, dict):  # transformers' ModelOutput is a dict whose items are its fields
        return type(value)(**{k: _map_tensors(v, fn) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        items = [_map_tensors(v, fn) for v in value]
        return items if isinstance(value, list) else tuple(items)
    return value
