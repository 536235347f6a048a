"""Load any local HF vision-language model directory with its processor; encode conversations.

Only local directories: nothing is downloaded. The processor is set up for batched generation
(left padding) and, on request, with a different pixel budget than the one saved.

`encode_conversations` is the one way prompts become model inputs (the HF engine and the
training recipes both use it, so a teacher-forced prompt is token for token the generation prompt):
the processor's chat template renders each conversation to text (with the generation prompt,
`<|im_start|>assistant\n` for Qwen), the images are taken from the content in order, and the
processor expands the image placeholders and left-pads the batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, BatchFeature, PreTrainedModel, ProcessorMixin
from transformers.utils import logging as hf_logging

from zoomless.models.fast_vision import patch_vision_attention

# Our jobs draw their own progress bars; the per-shard loading bars of transformers are noise.
hf_logging.disable_progress_bar()

# Special tokens that only belong in prompts: a response holding one cannot be fed back to the
# model (image features would not match image tokens, or multimodal positions would shift).
# Grounding tokens (<|box_start|>, <|object_ref_start|> ...) are legitimate output and not here.
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """'auto' (or None) means the GPU when there is one, else the CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """'auto' means bfloat16 on a GPU that supports it, float32 otherwise (CPU bf16 is slow and inexact)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected 'auto' or one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def check_model_dir(model_dir: str | Path) -> Path:
    path = Path(model_dir).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist (models are loaded from local directories only)")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model directory {path} has no config.json: not a HF model directory")
    return path


def set_pixel_budget(processor: ProcessorMixin, min_pixels: int | None = None, max_pixels: int | None = None) -> None:
    """Resize bounds of the image processor, in pixels per image (Qwen-VL style `size` fields)."""
    ip = processor.image_processor
    for key, value in (("shortest_edge", min_pixels), ("longest_edge", max_pixels)):
        if value is None:
            continue
        if isinstance(ip.size, dict):
            ip.size[key] = value
        else:
            setattr(ip.size, key, value)
    # Older processors also keep the bounds as attributes, and read them first.
    if min_pixels is not None and getattr(ip, "min_pixels", None) is not None:
        ip.min_pixels = min_pixels
    if max_pixels is not None and getattr(ip, "max_pixels", None) is not None:
        ip.max_pixels = max_pixels


def load_processor(model_dir: str | Path, *, min_pixels: int | None = None, max_pixels: int | None = None) -> ProcessorMixin:
    processor = AutoProcessor.from_pretrained(check_model_dir(model_dir), local_files_only=True)
    processor.tokenizer.padding_side = "left"  # generation appends on the right
    if processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    set_pixel_budget(processor, min_pixels, max_pixels)
    return processor


def load_vlm(
    model_dir: str | Path,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device | None = "auto",
    attn_implementation: str | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    fast_vision: bool = True,
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """The model (in eval mode, on `device`) and its processor (left padding) from a local directory.

    `fast_vision` batches the Qwen-VL vision attention by chunk length (same numbers, far fewer
    attention calls: see `fast_vision.py`); flash attention and other models are left as they are."""
    path = check_model_dir(model_dir)
    dev = resolve_device(device)
    kwargs: dict[str, Any] = {"dtype": resolve_dtype(dtype, dev), "local_files_only": True}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if dev.type == "cuda":
        kwargs["device_map"] = str(dev)  # load straight onto the GPU, not through CPU memory
    model = AutoModelForImageTextToText.from_pretrained(path, **kwargs).to(dev).eval()
    if fast_vision:
        patch_vision_attention(model)
    return model, load_processor(path, min_pixels=min_pixels, max_pixels=max_pixels)


def vision_token_ids(processor_or_tokenizer: Any) -> list[int]:
    """Ids of the vision special tokens the vocabulary has (image/video pads, vision start/end/pad).

    Suppress them at generation and reject responses that contain them.
    """
    tokenizer = getattr(processor_or_tokenizer, "tokenizer", processor_or_tokenizer)
    vocab = tokenizer.get_vocab()
    return sorted({vocab[t] for t in VISION_TOKENS if t in vocab})


def conversation_images(conversation: list[dict[str, Any]]) -> list[Image.Image]:
    """The images of a conversation in the order the chat template places their placeholders."""
    images = []
    for m, message in enumerate(conversation):
        content = message.get("content")
        if isinstance(content, str):
            continue
        for item in content or []:
            if item.get("type") != "image" and "image" not in item and "image_url" not in item:
                continue
            image = item.get("image")
            if isinstance(image, (str, Path)):
                image = Image.open(image)
            if not isinstance(image, Image.Image):
                raise ValueError(f"message {m}: an image item needs 'image' as a PIL image or a file path, got {type(image).__name__}")
            images.append(image.convert("RGB") if image.mode != "RGB" else image)
    return images


def render_prompts(processor: ProcessorMixin, conversations: list[list[dict[str, Any]]], add_generation_prompt: bool = True) -> list[str]:
    """Each conversation as prompt text through the processor's chat template (image placeholders unexpanded)."""
    return [
        processor.apply_chat_template(c, tokenize=False, add_generation_prompt=add_generation_prompt)
        for c in conversations
    ]


def encode_conversations(
    processor: ProcessorMixin, conversations: list[list[dict[str, Any]]], add_generation_prompt: bool = True
) -> BatchFeature:
    """Model inputs for a batch of conversations: input_ids, attention_mask (left padded, as the
    processor's tokenizer pads), pixel_values, image_grid_thw and the processor's extras
    (mm_token_type_ids for Qwen-VL), as CPU tensors."""
    texts = render_prompts(processor, conversations, add_generation_prompt)
    images = [im for c in conversations for im in conversation_images(c)]
    return processor(text=texts, images=images or None, padding=True, return_tensors="pt")
