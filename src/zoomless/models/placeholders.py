"""Where the image features go in the text, known on the CPU.

Qwen-VL's backbone finds its image (and video) placeholder tokens with `get_placeholder_mask`,
which checks that their count matches the vision tower's output. The count is a GPU sum, and the
check and its error message read it back: two host syncs per forward, after each of which the GPU
idles until the CPU has queued new work (docs/PERFORMANCE_LOG.md). The training batch still has its
token ids on the CPU, so `placeholders_on_host` makes the same masks and the same check there and
sends the masks without blocking. Backbones without the method, or a call with other ids, are left
as they are.

The image features then go into the text embeddings by `masked_scatter`, whose backward finds the
features' gradient with `masked_select`: an output of data-dependent size, so a host sync in the
middle of the backward, right before the vision tower's. With the GPU's queue drained there, the
vision backward runs at the pace of the CPU launching its many small kernels (docs/PERFORMANCE_LOG.md).
`image_gradients_by_index` keeps the values and moves the gradient: transformers scatters a
detached copy of the features, and the language model's input gets `features - detached` added at
the image positions, known on the CPU: zero in value, the features' gradient in the backward (a
gather by index, no sync).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

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


@contextlib.contextmanager
def image_gradients_by_index(backbone: nn.Module | None, host_ids: Tensor | None) -> Iterator[None]:
    """Within the block, the image features reach `backbone`'s language model with their gradient
    routed by index (see above); `host_ids` is the CPU copy of the `input_ids` of the call. A vision
    output that does not match the image tokens in number is left to transformers."""
    visual = getattr(backbone, "visual", None)
    language_model = getattr(backbone, "language_model", None)
    token_id = getattr(getattr(backbone, "config", None), "image_token_id", None)
    if visual is None or language_model is None or token_id is None or host_ids is None or \
            host_ids.device.type != "cpu":
        yield
        return
    where = (host_ids == token_id).nonzero().unbind(1)  # (rows, columns) of the image tokens, in mask order
    detached: list[Tensor] = []  # the features whose copy went to transformers' scatter

    def after_visual(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        features = getattr(output, "pooler_output", None)  # the merged tokens get_image_features scatters
        if not isinstance(features, Tensor) or not features.requires_grad or features.shape[0] != len(where[0]):
            return None
        detached.append(features)
        return type(output)(**{**output, "pooler_output": features.detach()})

    def before_language_model(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if not detached:
            return None
        features, embeds = detached.pop(), kwargs.get("inputs_embeds")
        if embeds is None or detached:  # the features' gradient would be lost: refuse
            raise RuntimeError("image_gradients_by_index: the language model did not get the image features "
                               "as inputs_embeds, once per vision call")
        grad_path = (features - features.detach()).to(embeds.dtype)  # zeros that carry the gradient
        at = [to_device(i, embeds.device) for i in where]
        # index_put without its bounds check (a host read on a GPU; the indices come from the ids
        # themselves), out of place and not a view (else the first decoder layer gets a graph of its own)
        return args, {**kwargs, "inputs_embeds": torch.ops.aten._unsafe_index_put(embeds, at, grad_path, True)}

    handles = [visual.register_forward_hook(after_visual, with_kwargs=True),
               language_model.register_forward_pre_hook(before_language_model, with_kwargs=True)]
    try:
        yield
        if detached:
            raise RuntimeError("image_gradients_by_index: image features were never given to the language model")
    finally:
        for h in handles:
            h.remove()
