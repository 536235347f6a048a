"""Tiny model building, the offline tokenizer, loading and prompt encoding."""

import random

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

from zoomless.engines.base import conversation
from zoomless.models import tokenizer as tk
from zoomless.models.loading import (
    conversation_images,
    encode_conversations,
    load_vlm,
    render_prompts,
    vision_token_ids,
)
from zoomless.models.tiny import build_tiny_vlm, count_parameters, make_config, make_model

FAMILIES = ["qwen2_5_vl", "qwen3_vl", "qwen3_5"]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {f: build_tiny_vlm(root / f, family=f, size="test", seed=0) for f in FAMILIES}


@pytest.fixture(scope="module")
def tokenizer():
    return tk.build_tokenizer(2048)


def image(w, h, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())


# --- tokenizer ---------------------------------------------------------------------------------


def test_tokenizer_is_deterministic_and_has_qwen_special_tokens(tokenizer):
    again = tk.build_tokenizer(2048)
    assert again.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()
    assert len(tokenizer) == 2048
    vocab = tokenizer.get_vocab()
    ids = [vocab[t] for t in tk.SPECIAL_TOKENS]
    assert ids == list(range(2048 - len(tk.SPECIAL_TOKENS), 2048))  # at the end, in Qwen's order
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.padding_side == "left"
    # Special tokens are single tokens, also inside text.
    enc = tokenizer("<|vision_start|><|image_pad|><|vision_end|>hi")["input_ids"]
    assert enc[:3] == [vocab["<|vision_start|>"], vocab["<|image_pad|>"], vocab["<|vision_end|>"]]


def test_tokenizer_learns_project_phrases(tokenizer):
    ids = tokenizer("Answer with the option's letter from the given choices directly.")["input_ids"]
    assert len(ids) <= 12  # words are merged, not bytes
    assert len(tokenizer("red")["input_ids"]) == 1


def test_tokenizer_round_trips_arbitrary_utf8(tokenizer):
    rng = random.Random(0)
    alphabet = [chr(c) for c in range(0x20, 0x3000) if not 0xD800 <= c < 0xE000] + list("\n\t\r 😀🙂日本語e\u0301")
    texts = ["", " leading and trailing  ", "e\u0301 vs \u00e9", "a\x00b\x7f", "🧪 ∑ ½ ñ 中文 한국어 العربية"]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 80))) for _ in range(50)]
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text


def test_tokenizer_vocab_size_is_bounded_below():
    with pytest.raises(ValueError, match="vocab_size"):
        tk.build_tokenizer(100)


def test_chat_template_renders_qwen_format(tokenizer):
    msgs = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "image", "image": image(8, 8)}, {"type": "text", "text": "What colour?"}]},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "And now?"},
    ]
    expected = (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What colour?<|im_end|>\n"
        "<|im_start|>assistant\nred<|im_end|>\n"
        "<|im_start|>user\nAnd now?<|im_end|>\n"
    )
    assert tokenizer.apply_chat_template(msgs, tokenize=False) == expected
    assert tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == expected + "<|im_start|>assistant\n"


# --- tiny models -------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_model_reloads_with_auto_classes(model_dirs, family):
    d = model_dirs[family]
    model = AutoModelForImageTextToText.from_pretrained(d, local_files_only=True)
    processor = AutoProcessor.from_pretrained(d, local_files_only=True)
    assert model.config.model_type == family
    assert 300_000 <= count_parameters(model) <= 3_000_000
    tok = processor.tokenizer
    assert model.config.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert model.config.video_token_id == tok.convert_tokens_to_ids("<|video_pad|>")
    assert model.config.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert model.generation_config.eos_token_id == [tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id]
    assert model.get_input_embeddings().num_embeddings >= len(tok)
    # The chat template travels with the processor and the tokenizer.
    conv = conversation([image(32, 32)], "Hi")
    text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hi<|im_end|>\n<|im_start|>assistant\n"
    assert processor.apply_chat_template(conv, tokenize=False, add_generation_prompt=True) == text
    assert AutoTokenizer.from_pretrained(d).apply_chat_template(conv, tokenize=False, add_generation_prompt=True) == text


@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_reload_give_identical_logits(model_dirs, family):
    model, processor = load_vlm(model_dirs[family], dtype="float32", device="cpu")
    fresh = make_model(make_config(family, "test", processor.tokenizer), seed=0)  # same seed as the saved one
    inputs = encode_conversations(processor, [conversation([image(64, 48)], "What colour is the car?")])
    with torch.no_grad():
        a, b = model(**inputs).logits, fresh(**inputs).logits
    assert torch.equal(a, b)
    other = make_model(make_config(family, "test", processor.tokenizer), seed=1)
    assert not torch.equal(other.lm_head.weight, fresh.lm_head.weight)


def test_image_token_count_follows_patch_size(model_dirs):
    conv = conversation([image(448, 448)], "x")
    counts = {}
    for family, d in model_dirs.items():
        _, processor = load_vlm(d, device="cpu")
        ids = encode_conversations(processor, [conv])["input_ids"][0]
        counts[family] = int((ids == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum())
    assert counts == {"qwen2_5_vl": 16 * 16, "qwen3_vl": 14 * 14, "qwen3_5": 14 * 14}  # 28 and 32 pixels per merged token


def test_unknown_family_or_size_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="family"):
        build_tiny_vlm(tmp_path, family="llava")
    with pytest.raises(ValueError, match="size"):
        build_tiny_vlm(tmp_path, size="huge")


# --- loading -----------------------------------------------------------------------------------


def test_load_vlm_errors_name_the_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_vlm(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_vlm(tmp_path)


def test_load_vlm_options(model_dirs):
    d = model_dirs["qwen2_5_vl"]
    model, processor = load_vlm(d, dtype="bfloat16", device="cpu", attn_implementation="eager", max_pixels=112 * 112)
    assert model.dtype == torch.bfloat16 and not model.training
    assert model.config._attn_implementation == "eager"
    assert processor.tokenizer.padding_side == "left"
    grid = encode_conversations(processor, [conversation([image(448, 448)], "x")])["image_grid_thw"]
    assert grid.tolist() == [[1, 8, 8]]  # capped at 112x112 pixels
    _, processor = load_vlm(d, device="cpu", min_pixels=224 * 224)
    grid = encode_conversations(processor, [conversation([image(28, 28)], "x")])["image_grid_thw"]
    assert grid.tolist() == [[1, 16, 16]]  # raised to 224x224 pixels
    with pytest.raises(ValueError, match="dtype"):
        load_vlm(d, dtype="float8")


def test_vision_token_ids(model_dirs):
    _, processor = load_vlm(model_dirs["qwen3_vl"], device="cpu")
    names = ["<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
    assert vision_token_ids(processor) == sorted(processor.tokenizer.convert_tokens_to_ids(names))
    assert vision_token_ids(processor.tokenizer) == vision_token_ids(processor)  # either one works
    assert processor.tokenizer.eos_token_id not in vision_token_ids(processor)


def test_encode_conversations_left_pads_mixed_images(model_dirs):
    _, processor = load_vlm(model_dirs["qwen2_5_vl"], device="cpu")
    a, b = image(64, 64, 1), image(112, 84, 2)
    convs = [conversation([a], "short"), conversation([b, a], "a much longer question about two images")]
    assert conversation_images(convs[1]) == [b, a]
    batch = encode_conversations(processor, convs)
    mask = batch["attention_mask"]
    assert mask[0, 0] == 0 and mask[0, -1] == 1 and mask[1].all()  # left padding
    assert batch["image_grid_thw"].shape[0] == 3
    assert batch["mm_token_type_ids"].shape == batch["input_ids"].shape
    assert render_prompts(processor, convs[:1])[0].endswith("short<|im_end|>\n<|im_start|>assistant\n")
    # The same prompt alone is the unpadded tail of its batch row.
    alone = encode_conversations(processor, convs[:1])["input_ids"][0]
    assert torch.equal(batch["input_ids"][0, -len(alone):], alone)


def test_bad_image_item_is_named(model_dirs):
    _, processor = load_vlm(model_dirs["qwen2_5_vl"], device="cpu")
    bad = [{"role": "user", "content": [{"type": "image", "image": 3}, {"type": "text", "text": "x"}]}]
    with pytest.raises(ValueError, match="message 0: an image item"):
        encode_conversations(processor, [bad])


def test_image_items_may_be_paths(tmp_path):
    path = tmp_path / "a.png"
    image(20, 10).convert("L").save(path)
    (im,) = conversation_images([{"role": "user", "content": [{"type": "image", "image": str(path)}]}])
    assert im.mode == "RGB" and im.size == (20, 10)
