"""Where the image features go in the text, known on the CPU.

Qwen-VL's backbone finds its image (and video) placeholder tokens with `get_placeholder_mask`,
which checks that their count matches the vision tower's output. The count is a GPU sum, and the
check and its error message read it back: two host syncs per forward, after each of which the GPU
idles until the CPU has queued new work (docs/PERFORMANCE.md). The training batch still has its
token ids on the CPU, so `placeholders_on_host` makes the same masks and the same check there and
sends the masks without blocking. Backbones without the method, or a call with other ids, are left
as they are.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor, nn

from zoomless.transfer import to_device


def _mask(ids: Tensor, token_id: int | None) -> Tensor:
    return ids == (-1 if token_id is None else token_id)


def _check(kind: str, mask: Tensor, embeds: Tensor, features: Tensor | None) -> None:
    """transformers' own check, with the count taken on the CPU."""
    if features is None:
        return
    tokens = int(mask.sum())
    if tokens * embeds.shape[-1] != features.numel():
        raise ValueError(f"{kind} features and {kind.lower()} tokens do not match, tokens: {tokens}, "
                         f"features: {features.shape[0]}")


@contextlib.contextmanager
def placeholders_on_host(backbone: nn.Module | None, host_ids: Tensor | None) -> Iterator[None]:
    """Within the block, `backbone.get_placeholder_mask` takes its masks from `host_ids`, the CPU
    copy of the `input_ids` the backbone is called with."""
    original = getattr(backbone, "get_placeholder_mask", None)
    config = getattr(backbone, "config", None)
    if original is None or host_ids is None or host_ids.device.type != "cpu" or \
            getattr(config, "image_token_id", None) is None:
        yield
        return
    image = _mask(host_ids, config.image_token_id)
    video = _mask(host_ids, getattr(config, "video_token_id", None))
    sent: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def from_host(input_ids: Tensor | None, inputs_embeds: Tensor, image_features: Tensor | None = None,
                  video_features: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if input_ids is None or input_ids.shape != host_ids.shape:  # not the call the ids are for
            return original(input_ids, inputs_embeds, image_features=image_features, video_features=video_features)
        _check("Image", image, inputs_embeds, image_features)
        _check("Video", video, inputs_embeds, video_features)
        device = inputs_embeds.device
        if device not in sent:  # once per forward, though transformers asks once per modality
            sent[device] = (to_device(image, device).unsqueeze(-1), to_device(video, device).unsqueeze(-1))
        return sent[device]

    shadowed = vars(backbone).get("get_placeholder_mask")  # an enclosing block's
    backbone.get_placeholder_mask = from_host  # an instance attribute shadows the class's method
    try:
        yield
    finally:
        if shadowed is None:
            del backbone.get_placeholder_mask
        else:
            backbone.get_placeholder_mask = shadowed
