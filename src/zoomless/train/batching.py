"""Teacher forcing: prompt (images + text) followed by given response tokens, batched with right padding.

For a sequence whose prompt has P tokens and whose response has L tokens, the logits at positions
P-1 .. P+L-2 predict the response. A batch records, for every response token, its (row, position)
pair, so the hidden states there can be gathered into one [N, H] tensor and the LM head applied only
to them (see `losses.chunked_map`). The student and teacher views of a sequence are two batches with
different prompts (another image, perhaps another question) and the same response ids.

Position ids: Qwen-VL builds its 3D M-RoPE ids from input_ids, the image grid and the attention
mask, which is right for right padding. `with_positions` builds the same ids with the model's own
function on the CPU, before the batch goes to the GPU, where HF's per-row loop would stall it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from zoomless.engines.base import Conversation
from zoomless.train.shared_images import ImageSharing, encode_once, sharing_of, vision_module
from zoomless.models.placeholders import image_gradients_by_index, placeholders_on_host
from zoomless.models.vision_plan import bookkeeping_on_host, grid_on_host
from zoomless.transfer import to_device

_TEXT_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")


@dataclass
class PromptEncoding:
    """One tokenized prompt: its ids, multimodal token types, and the processor's vision tensors."""

    input_ids: Tensor  # [P]
    mm_token_type_ids: Tensor | None  # [P]: 1 on image tokens; extended with 0 for the response
    vision: dict[str, Tensor]  # e.g. pixel_values [patches, dim] and image_grid_thw [images, 3]


def encode_prompt(processor: Any, conversation: Conversation) -> PromptEncoding:
    """Tokenize one prompt exactly as the engines do: chat template + generation prompt + processor."""
    from zoomless.models.loading import encode_conversations

    enc = encode_conversations(processor, [conversation])
    mm = enc.get("mm_token_type_ids")
    vision = {k: v for k, v in enc.items() if k not in _TEXT_KEYS and isinstance(v, Tensor)}
    return PromptEncoding(enc["input_ids"][0], None if mm is None else mm[0], vision)


@dataclass
class TeacherForcingBatch:
    inputs: dict[str, Tensor]  # the model's keyword arguments
    rows: Tensor  # [N] batch row of each response token
    positions: Tensor  # [N] position whose logits predict that token
    targets: Tensor  # [N] the response token ids
    lengths: list[int]  # response length of each sequence (N = sum)
    sharing: ImageSharing | None = None  # rows that share a prompt share its images: encode them once
    vision_grid: Tensor | None = None  # on the CPU: the grids of the images the vision tower encodes
    host: dict[str, Tensor] | None = None  # on the CPU: input_ids and image_grid_thw, kept by `to` (models/placeholders.py)

    @property
    def num_tokens(self) -> int:
        return int(self.targets.numel())

    def to(self, device: torch.device | str) -> "TeacherForcingBatch":
        return TeacherForcingBatch(
            {k: to_device(v, device) for k, v in self.inputs.items()},
            to_device(self.rows, device), to_device(self.positions, device), to_device(self.targets, device),
            self.lengths, None if self.sharing is None else self.sharing.to(device), self.vision_grid,
            self._host_copies(),
        )

    def _host_copies(self) -> dict[str, Tensor] | None:
        if self.inputs["input_ids"].device.type != "cpu":
            return self.host
        return {k: v for k, v in self.inputs.items() if k in ("input_ids", "image_grid_thw")}


def build_batch(
    prompts: Sequence[PromptEncoding], responses: Sequence[Sequence[int]], pad_id: int, distinct_pixels: bool = True
) -> TeacherForcingBatch:
    """Right-padded prompt+response batch; vision tensors concatenated in row order. Rows given the
    same PromptEncoding object (the rollouts of one prompt) share its images: with `distinct_pixels`
    `pixel_values` holds each shared image once (the rows `batch.sharing.keep` names, which
    `backbone_hidden` encodes), not once per row; the grids still list every row's images. For a
    forward without `backbone_hidden` (stock transformers), pass False: every row's pixels."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if any(len(r) == 0 for r in responses):
        raise ValueError("every response needs at least one token to teacher-force")
    seqs = [torch.cat([p.input_ids, torch.as_tensor(list(r), dtype=p.input_ids.dtype)]) for p, r in zip(prompts, responses)]
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    has_mm = any(p.mm_token_type_ids is not None for p in prompts)
    mm = torch.zeros((len(seqs), width), dtype=torch.long)
    rows, positions = [], []
    for b, (p, s) in enumerate(zip(prompts, seqs)):
        input_ids[b, : len(s)] = s
        attention_mask[b, : len(s)] = 1
        if p.mm_token_type_ids is not None:
            mm[b, : len(p.input_ids)] = p.mm_token_type_ids  # response tokens are text: 0
        start, n = len(p.input_ids), len(s) - len(p.input_ids)
        rows.append(torch.full((n,), b, dtype=torch.long))
        positions.append(torch.arange(start - 1, start + n - 1))
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if has_mm:
        inputs["mm_token_type_ids"] = mm
    sharing = _sharing(prompts)
    # 8 rollouts of one 896-px image would copy, pin and send 8 x 19 MB of pixels: the step's host
    # time, for rows that encode_once drops on the GPU (docs/PERFORMANCE_LOG.md)
    distinct = list({id(p): p for p in prompts}.values()) if sharing is not None and distinct_pixels else prompts
    for key in dict.fromkeys(k for p in prompts for k in p.vision):  # prompts without images add nothing
        given = distinct if key == "pixel_values" else prompts
        parts = [p.vision[key] for p in given if key in p.vision]
        # one prompt's pixels as they are: a cat would copy 19 MB (896 px) on the step's critical path
        inputs[key] = parts[0] if key == "pixel_values" and len(parts) == 1 else torch.cat(parts)
    targets = torch.cat([torch.as_tensor(list(r), dtype=torch.long) for r in responses])
    grid = inputs.get("image_grid_thw")
    if grid is not None and sharing is not None:
        grid = grid[sharing.keep]  # encode_once hands the tower the first copy of each image
    return TeacherForcingBatch(inputs, torch.cat(rows), torch.cat(positions), targets, [len(r) for r in responses],
                               sharing, grid)


def with_positions(model: nn.Module, batch: TeacherForcingBatch) -> TeacherForcingBatch:
    """`batch` (still on the CPU) with the position ids the model would build in its forward.

    Qwen-VL's `get_rope_index` loops over the rows in Python and reads GPU values back several times
    per row: about 8 host syncs per row and forward, after each of which the GPU idles until the
    CPU has queued new work (docs/PERFORMANCE_LOG.md). The same function on the CPU tensors gives the
    same ids without a sync. Models without it (or batches without images) are left as they are."""
    inputs = batch.inputs
    backbone = getattr(_unwrap(model), "model", None)
    rope = getattr(backbone, "get_rope_index", None)
    if rope is None or inputs["input_ids"].device.type != "cpu" or "mm_token_type_ids" not in inputs or \
            "image_grid_thw" not in inputs or "position_ids" in inputs:
        return batch
    grids = {k: inputs[k] for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts") if k in inputs}
    position_ids, _ = rope(inputs["input_ids"], inputs["mm_token_type_ids"], attention_mask=inputs["attention_mask"],
                           **grids)
    return replace(batch, inputs={**inputs, "position_ids": position_ids})


def _unwrap(model: nn.Module) -> nn.Module:
    """The HF model inside DDP (`.module`) and `ResponseModel` (`.vlm`)."""
    model = getattr(model, "module", model)
    return getattr(model, "vlm", model)


def _sharing(prompts: Sequence[PromptEncoding]) -> ImageSharing | None:
    """Rows given the same PromptEncoding object (the rollouts of one prompt) have the same images."""
    owners, names, grids = [], {}, []
    for p in prompts:
        grid = p.vision.get("image_grid_thw")
        name = names.setdefault(id(p), len(names))
        owners += [(name, k) for k in range(0 if grid is None else len(grid))]
        grids += [] if grid is None else [grid]
    ids = {o: i for i, o in enumerate(dict.fromkeys(owners))}
    return sharing_of([ids[o] for o in owners], torch.cat(grids).prod(-1) if grids else None)


# ----------------------------------------------------------------------------- the forward


def lm_head(model: nn.Module) -> nn.Module:
    """The output projection of an HF model, or of the training wrapper around one (`train/distributed.py`)."""
    return getattr(model, "module", model).get_output_embeddings()  # `.module`: inside DDP


def backbone_hidden(model: nn.Module, inputs: dict[str, Tensor], rows: Tensor, positions: Tensor,
                    sharing: ImageSharing | None = None, vision_grid: Tensor | None = None,
                    host: dict[str, Tensor] | None = None) -> Tensor:
    """Final hidden states of an HF VLM's backbone at (rows, positions): [N, H], without the LM head.
    With `sharing`, each distinct image is encoded once (`train/shared_images.py`); with
    `vision_grid` (the CPU copy of the encoded images' grids) the vision tower's bookkeeping is
    done on the CPU (`models/vision_plan.py`), and with `host` (the CPU copies of the input ids and
    grids) the image placeholders are found there, the features' gradient is routed by index
    (`models/placeholders.py`), and the grid is read there."""
    visual = vision_module(model)
    host = host or {}
    ids = host.get("input_ids")
    with encode_once(visual, sharing), bookkeeping_on_host(visual, vision_grid), \
            placeholders_on_host(model.model, ids), image_gradients_by_index(model.model, ids):  # encode_once first
        out = model.model(**grid_on_host(visual, inputs, vision_grid, host.get("image_grid_thw")), use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return hidden[rows, positions]


class ResponseModel(nn.Module):
    """The policy as the data-parallel wrappers see it (`train/distributed.py`): its forward gives
    the final hidden states at the response-predicting positions, [N, H], as `response_hidden`.
    DDP and FSDP act only through the wrapped module's own forward, so every training forward
    goes through this one; the LM head is applied outside, in chunks, by the losses."""

    def __init__(self, vlm: nn.Module) -> None:
        super().__init__()
        self.vlm = vlm

    @property
    def _no_split_modules(self) -> list[str] | None:  # FSDP auto-wrap shards these layer classes
        return getattr(self.vlm, "_no_split_modules", None)

    def get_input_embeddings(self) -> nn.Module:
        return self.vlm.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.vlm.get_output_embeddings()

    def forward(
        self, inputs: dict[str, Tensor] | None, rows: Tensor | None = None, positions: Tensor | None = None,
        generate: dict[str, Any] | None = None, sharing: ImageSharing | None = None,
        vision_grid: Tensor | None = None, host: dict[str, Tensor] | None = None,
    ) -> Any:
        if generate is not None:  # a whole `generate` call inside the root's forward hooks (FSDP)
            return type(self.vlm).generate(self.vlm, **generate)
        return backbone_hidden(self.vlm, inputs, rows, positions, sharing, vision_grid, host)


def response_hidden(model: nn.Module, batch: TeacherForcingBatch) -> Tensor:
    """Final hidden states at the response-predicting positions: [N, H], without the LM head.

    Runs the multimodal backbone (`model.model` in HF's *ForConditionalGeneration classes), so the
    [tokens x vocab] logits of the whole sequence are never formed. `model` is an HF model or a
    `ResponseModel` around one (maybe inside DDP, or sharded by FSDP), called through its forward.
    """
    if isinstance(getattr(model, "module", model), ResponseModel):
        return model(batch.inputs, batch.rows, batch.positions, sharing=batch.sharing, vision_grid=batch.vision_grid,
                     host=batch.host)
    return backbone_hidden(model, batch.inputs, batch.rows, batch.positions, batch.sharing, batch.vision_grid,
                           batch.host)
