"""The engine interface: one way to ask any model (in-process HF or an HTTP endpoint) for text.

A conversation is a list of chat messages in the HF chat-template form, with images inline:
    [{"role": "user", "content": [{"type": "image", "image": <PIL.Image>}, {"type": "text", "text": "..."}]}]
The HTTP engine turns the images into data URIs; the HF engine hands them to the processor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

from PIL import Image

Message = dict[str, Any]
Conversation = list[Message]


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    n: int = 1  # samples per conversation
    seed: int | None = None
    logprobs: bool = False  # return the log-prob of each generated token


@dataclass
class Generation:
    text: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None
    finish_reason: str = "stop"  # "stop", "length" or "error"
    error: str | None = None  # set when the engine could not answer; text is then ""
    prompt_tokens: int = 0  # the prompt's length in tokens, image tokens included (0: not known)


class Engine(Protocol):
    name: str

    def generate(
        self, conversations: Sequence[Conversation], params: SamplingParams
    ) -> list[list[Generation]]:
        """Return, for each conversation, `params.n` generations (in order)."""
        ...


def conversation(images: Sequence[Image.Image], text: str, system: str | None = None) -> Conversation:
    """A single user turn: the images first, then the text (the order Qwen-VL models are trained on)."""
    content: list[dict[str, Any]] = [{"type": "image", "image": im} for im in images]
    content.append({"type": "text", "text": text})
    msgs: Conversation = []
    if system:
        msgs.append({"role": "system", "content": [{"type": "text", "text": system}]})
    msgs.append({"role": "user", "content": content})
    return msgs
