"""Build small, randomly initialised Qwen-VL models from configs, fully offline.

`build_tiny_vlm` writes a standard HF directory (config, safetensors, generation config, tokenizer,
image/video processor, chat template) that reloads with `AutoModelForImageTextToText` and
`AutoProcessor`, so the sandbox and the real path run the same code. Three families (Qwen2.5-VL,
Qwen3-VL, and Qwen3.5, whose decoder is a hybrid of Gated DeltaNet linear attention and gated full
attention) and three sizes:

| size  | params (2.5-VL / 3-VL / 3.5) | vision (depth x width) | text (layers x width) | vocab asked |
|-------|------------------------------|------------------------|-----------------------|-------------|
| test  | 0.63M / 0.73M / 0.66M        | 2 x 64                 | 2 x 64                | 2000        |
| small | 5.3M / 6.0M / 5.5M           | 4 x 128                | 4 x 256               | 4096        |
| base  | 43M / 53M / 43M              | 8 x 384                | 8 x 512               | 4096        |

The tokenizer's vocabulary can come out smaller than asked (the built-in corpus runs out of
merges at 3,693 tokens); the model's vocab is the tokenizer's length rounded up to a multiple of
64, so, as in real Qwen checkpoints, the logits have a few columns no token maps to. Small models
tie the input and output embeddings (as Qwen2.5-VL-3B and Qwen3-VL-2B/4B do); the test size
does not, so that code which reads `lm_head` separately is exercised on untied weights too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
    Qwen3_5Config,
    Qwen3_5ForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)

from zoomless.models import tokenizer as tk

FAMILIES = ("qwen2_5_vl", "qwen3_vl", "qwen3_5")


@dataclass(frozen=True)
class TinySize:
    vocab: int
    vision_depth: int
    vision_hidden: int
    vision_heads: int
    text_layers: int
    text_hidden: int
    text_heads: int
    text_kv_heads: int
    text_intermediate: int
    tie_embeddings: bool


SIZES = {
    "test": TinySize(2000, 2, 64, 2, 2, 64, 4, 2, 256, tie_embeddings=False),
    "small": TinySize(4096, 4, 128, 4, 4, 256, 4, 2, 768, tie_embeddings=True),
    "base": TinySize(4096, 8, 384, 6, 8, 512, 8, 4, 1536, tie_embeddings=True),
}

# Real Qwen-VL layouts the tiny ones keep: Qwen2.5-VL sees 14-pixel patches and normalises with the
# CLIP statistics; Qwen3-VL sees 16-pixel patches normalised to [-1, 1]. Both merge 2x2 patches.
PATCH_SIZE = {"qwen2_5_vl": 14, "qwen3_vl": 16, "qwen3_5": 16}
IMAGE_STATS = {
    "qwen2_5_vl": ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]),
    "qwen3_vl": ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),
    "qwen3_5": ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),
}


def count_parameters(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied weights count once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _mrope_section(head_dim: int) -> list[int]:
    """Split head_dim/2 rotary frequencies over (time, height, width) as Qwen does (about 1/4, 3/8, 3/8)."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def _round_up(n: int, multiple: int = 64) -> int:
    return (n + multiple - 1) // multiple * multiple


def _token_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    ids = tokenizer.convert_tokens_to_ids
    return {
        "image_token_id": ids(tk.IMAGE_PAD),
        "video_token_id": ids(tk.VIDEO_PAD),
        "vision_start_token_id": ids(tk.VISION_START),
        "vision_end_token_id": ids(tk.VISION_END),
    }


def _text_config(s: TinySize, vocab_size: int, rope_theta: float, **extra) -> dict:
    head_dim = s.text_hidden // s.text_heads
    return dict(
        vocab_size=vocab_size,
        hidden_size=s.text_hidden,
        intermediate_size=s.text_intermediate,
        num_hidden_layers=s.text_layers,
        num_attention_heads=s.text_heads,
        num_key_value_heads=s.text_kv_heads,
        max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta, "mrope_section": _mrope_section(head_dim)},
        **extra,
    )


def make_config(family: str, size: str, tokenizer: PreTrainedTokenizerBase):
    """The model config for a family and size, wired to `tokenizer`'s special token ids."""
    s = SIZES[size]
    vocab_size = _round_up(len(tokenizer))
    eos, pad = tokenizer.convert_tokens_to_ids(tk.IM_END), tokenizer.convert_tokens_to_ids(tk.ENDOFTEXT)
    vision = dict(
        depth=s.vision_depth,
        hidden_size=s.vision_hidden,
        intermediate_size=2 * s.vision_hidden,
        num_heads=s.vision_heads,
        out_hidden_size=s.text_hidden,
        patch_size=PATCH_SIZE[family],
        spatial_merge_size=2,
        temporal_patch_size=2,
    )
    if family == "qwen2_5_vl":
        vision.update(
            window_size=112,  # 8x8 patches = 4x4 merged tokens per attention window
            fullatt_block_indexes=[s.vision_depth - 1],
            tokens_per_second=2,
            hidden_act="silu",
        )
        text = _text_config(s, vocab_size, 1e6, bos_token_id=pad, eos_token_id=eos, pad_token_id=pad)
        config_cls = Qwen2_5_VLConfig
    elif family == "qwen3_vl":
        vision.update(
            num_position_embeddings=256,  # a 16x16 learned grid, interpolated to each image
            deepstack_visual_indexes=list(range(min(s.text_layers, s.vision_depth) // 2)) or [0],
            hidden_act="gelu_pytorch_tanh",
        )
        text = _text_config(s, vocab_size, 5e6, head_dim=s.text_hidden // s.text_heads, pad_token_id=pad)
        text["rope_parameters"]["mrope_interleaved"] = True
        config_cls = Qwen3VLConfig
    elif family == "qwen3_5":
        # a hybrid: Gated DeltaNet linear attention in three layers of four, full attention (gated
        # output, rotary on a quarter of each head) in the fourth and in the last
        vision.update(num_position_embeddings=256, hidden_act="gelu_pytorch_tanh")
        head_dim = s.text_hidden // s.text_heads
        layer_types = ["full_attention" if i % 4 == 3 or i == s.text_layers - 1 else "linear_attention"
                       for i in range(s.text_layers)]
        text = _text_config(s, vocab_size, 1e7, head_dim=head_dim, pad_token_id=pad, eos_token_id=eos,
                            layer_types=layer_types, linear_num_key_heads=s.text_kv_heads,
                            linear_num_value_heads=s.text_heads, linear_key_head_dim=head_dim,
                            linear_value_head_dim=head_dim)
        text["rope_parameters"].update(partial_rotary_factor=0.25, mrope_interleaved=True,
                                       mrope_section=_mrope_section(head_dim // 4))
        config_cls = Qwen3_5Config
    else:
        raise ValueError(f"unknown model family {family!r}; expected one of {', '.join(FAMILIES)}")
    return config_cls(
        text_config=text,
        vision_config=vision,
        tie_word_embeddings=s.tie_embeddings,
        **_token_ids(tokenizer),
    )


def make_processor(family: str, tokenizer: PreTrainedTokenizerBase, min_pixels: int, max_pixels: int):
    """Tokenizer + image processor + video processor (required to construct the processor)."""
    mean, std = IMAGE_STATS[family]
    common = dict(patch_size=PATCH_SIZE[family], temporal_patch_size=2, merge_size=2, image_mean=mean, image_std=std)
    image_processor = Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels, **common)
    if family == "qwen2_5_vl":
        video_processor = Qwen2VLVideoProcessor(**common)
        return Qwen2_5_VLProcessor(image_processor, tokenizer, video_processor, chat_template=tk.CHAT_TEMPLATE)
    video_processor = Qwen3VLVideoProcessor(**common)
    return Qwen3VLProcessor(image_processor, tokenizer, video_processor, chat_template=tk.CHAT_TEMPLATE)


MODEL_CLASSES = {"qwen2_5_vl": Qwen2_5_VLForConditionalGeneration, "qwen3_vl": Qwen3VLForConditionalGeneration,
                 "qwen3_5": Qwen3_5ForConditionalGeneration}


def make_model(config, seed: int = 0) -> PreTrainedModel:
    model_cls = MODEL_CLASSES[config.model_type]
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(seed)
        model = model_cls(config)
    return model.float().eval()


def build_tiny_vlm(
    out_dir: str | Path,
    family: str = "qwen2_5_vl",
    size: str = "test",
    seed: int = 0,
    min_pixels: int = 28 * 28 * 4,
    max_pixels: int = 448 * 448,
) -> Path:
    """Write a randomly initialised `family` model of `size` with its processor to `out_dir`."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {', '.join(FAMILIES)}")
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; expected one of {', '.join(SIZES)}")
    out = Path(out_dir)
    tokenizer = tk.build_tokenizer(SIZES[size].vocab)
    processor = make_processor(family, tokenizer, min_pixels, max_pixels)
    model = make_model(make_config(family, size, tokenizer), seed)
    eos, pad = tokenizer.convert_tokens_to_ids(tk.IM_END), tokenizer.convert_tokens_to_ids(tk.ENDOFTEXT)
    # An assistant turn ends with <|im_end|>; <|endoftext|> also stops, as in Qwen's generation config.
    model.generation_config = GenerationConfig(bos_token_id=pad, eos_token_id=[eos, pad], pad_token_id=pad)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
