"""Models: load any local HF vision-language model; build tiny Qwen-VL ones offline; encode prompts."""

from zoomless.models.loading import (
    conversation_images,
    encode_conversations,
    load_processor,
    load_vlm,
    render_prompts,
    vision_token_ids,
)
from zoomless.models.tiny import build_tiny_vlm, count_parameters

__all__ = [
    "build_tiny_vlm",
    "conversation_images",
    "count_parameters",
    "encode_conversations",
    "load_processor",
    "load_vlm",
    "render_prompts",
    "vision_token_ids",
]
