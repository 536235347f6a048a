"""The vision tower's bookkeeping, computed from the image grid on the CPU.

From `grid_thw` Qwen2.5-VL's vision tower derives its rotary position ids, the attention cuts
(`cu_seqlens`, per image and per 112-px window) and the window order; Qwen3-VL's and Qwen3.5's
also the taps that interpolate their learned position embeddings. In a training batch the grid is
a GPU tensor, and transformers computes all this with `.tolist()` loops and `repeat_interleave`
over its values: 13 host syncs per forward at the Qwen2.5-VL-3B shape, after each of which the GPU
idles until the CPU has queued new work (docs/PERFORMANCE_LOG.md).

transformers' own helpers (`transformers.vision_utils`, the same in 5.17 and 5.25) take these
values precomputed from the tower's keyword arguments. `bookkeeping_on_host` runs the same helpers
on the batch's CPU copy of the grid, sends their results to the GPU without blocking, and tells
`fast_vision` the cuts' values, so that no layer reads them back either. Towers other than the
three known ones are left to compute their own.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from zoomless.models import fast_vision
from zoomless.transfer import to_device

# The towers whose forward pops these keyword arguments (transformers 5.17 to 5.25): any other
# key would flow on into the blocks' attention.
WINDOWED = ("Qwen2_5_VisionTransformerPretrainedModel",)  # rotary ids, cuts, windows
INTERPOLATED = ("Qwen3VLVisionModel", "Qwen3_5VisionModel")  # rotary ids, cuts, position-embedding taps
CUTS = ("cu_seqlens", "cu_window_seqlens")


def knows(visual: nn.Module | None) -> bool:
    return visual is not None and type(visual).__name__ in WINDOWED + INTERPOLATED


def _longest(cuts: Tensor) -> int:
    return int((cuts[1:] - cuts[:-1]).max()) if len(cuts) > 1 else 0


def host_kwargs(visual: nn.Module, grid: Tensor) -> dict[str, Any]:
    """What `visual`'s forward would compute from `grid` (on the CPU), by transformers' own helpers."""
    from transformers import vision_utils as vu

    merge = visual.spatial_merge_size
    # the longest chunk only for flash attention, which would .item() it; given to the others, the
    # int would reach the compiled blocks, which would specialise on its value
    flash = "flash" in str(getattr(visual.config, "_attn_implementation", ""))
    cuts = vu.get_vision_cu_seqlens(grid)
    kw: dict[str, Any] = {"position_ids": vu.get_vision_position_ids(grid, merge), "cu_seqlens": cuts}
    if flash:
        kw["max_seqlen"] = _longest(cuts)
    if type(visual).__name__ in WINDOWED:
        index, windows = vu.get_vision_window_index(
            grid, spatial_merge_size=merge, window_size=visual.window_size, patch_size=visual.patch_size
        )
        kw.update(window_index=index, cu_window_seqlens=windows)
        if flash:
            kw["max_window_seqlen"] = _longest(windows)
    else:
        indices, weights = vu.get_vision_interpolation_indices_and_weights(
            grid, num_grid_per_side=visual.num_grid_per_side, mode=visual.interpolation_mode,
            align_corners=visual.interpolation_align_corners, spatial_merge_size=visual.config.spatial_merge_size,
        )
        kw.update(interp_indices=indices, interp_weights=weights)
    return kw


def send(kw: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """`kw` on `device`, the cuts' host values handed to fast_vision's attention plans."""
    out = {k: to_device(v, device) if isinstance(v, Tensor) else v for k, v in kw.items()}
    for key in CUTS:
        if key in out:
            fast_vision.plan_from_host(out[key], kw[key].tolist())
    return out


@contextlib.contextmanager
def bookkeeping_on_host(visual: nn.Module | None, grid: Tensor | None) -> Iterator[None]:
    """Within the block, `visual` gets its grid bookkeeping computed from `grid`, the CPU copy of
    the `grid_thw` it is called with (images it encodes, in order). Enter it after `encode_once`,
    whose hook changes that grid first. A call whose grid has another number of images, or that
    brings its own values, computes them as usual."""
    if not knows(visual) or grid is None or grid.device.type != "cpu":
        yield
        return

    def before(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        given = kwargs["grid_thw"] if "grid_thw" in kwargs else (args[1] if len(args) > 1 else None)
        if given is None or len(given) != len(grid) or any(k in kwargs for k in CUTS):
            return None
        pixels = args[0] if args else kwargs["hidden_states"]  # the grid may be on the CPU (grid_on_host)
        return args, {**kwargs, **send(host_kwargs(module, grid), pixels.device)}

    handle = visual.register_forward_pre_hook(before, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def grid_on_host(visual: nn.Module | None, inputs: dict[str, Tensor], grid: Tensor | None,
                 host_grid: Tensor | None) -> dict[str, Tensor]:
    """`inputs` with `image_grid_thw` replaced by `host_grid`, its CPU copy, when `bookkeeping_on_host`
    gives the tower everything it would compute from it: transformers then reads the grid only to
    split the image features per image (`.tolist()`, a host sync per forward on a GPU grid)."""
    if not knows(visual) or grid is None or grid.device.type != "cpu" or host_grid is None or \
            "pixel_values_videos" in inputs or "image_grid_thw" not in inputs:
        return inputs
    return {**inputs, "image_grid_thw": host_grid}
