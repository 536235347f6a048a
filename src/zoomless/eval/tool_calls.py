"""The zoom tool of the Thinking-with-Images baseline (`eval/tool_loop.py`) as the model meets it:
its description in Qwen's function-calling format (`system_prompt`), the calls the model writes,
parsed leniently (`parse_tool_call`), and the zoom itself on the original image (`zoom_in`).

JSON repairs: code fences, single quotes, trailing commas, Python literals, missing closing
brackets, `arguments` sent as a JSON string. A call with no closing `</tool_call>` (cut off by
max_new_tokens) is parsed up to the end of the text. Several calls in one reply: the first is used.
"""

from __future__ import annotations

import ast
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Sequence

from PIL import Image

from zoomless.imaging import Box, crop_view, from_rel1000, resize_to_budget, zoom_view

TOOL_NAMES = ("zoom_in", "image_zoom_in_tool")  # ours, and the Qwen-Agent tool Qwen3-VL was trained with
MIN_SIDE = 32  # px per side of a zoom crop, after clamping (as Qwen-Agent's image_zoom_in_tool)

# ----------------------------------------------------------------------------- the prompt

_TOOL_SCHEMA = {
    "type": "function",
    "function": {
        "name": "zoom_in",
        "description": "Zoom in on a region of the original full image and see it enlarged, at full resolution.",
        "parameters": {
            "type": "object",
            "properties": {
                "bbox_2d": {
                    "type": "array",
                    "items": {"type": "number"},
                    "minItems": 4,
                    "maxItems": 4,
                    "description": "The region [x1, y1, x2, y2] in relative coordinates from 0 to 1000 of the "
                    "full image: (0, 0) is the top-left corner, (1000, 1000) the bottom-right.",
                }
            },
            "required": ["bbox_2d"],
        },
    },
}


def system_prompt(max_turns: int) -> str:
    """The tool description in Qwen's function-calling format, plus the rules of the loop."""
    return (
        "You are a careful visual assistant. Small details in the image may decide the answer; "
        "when you are not sure, look closer with the zoom tool.\n\n"
        "# Tools\n\n"
        "You may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n"
        f"<tools>\n{json.dumps(_TOOL_SCHEMA)}\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n"
        '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>\n\n'
        f"Call at most one tool per reply. You have at most {max_turns} replies in total, the one with "
        "your answer included. When you can answer, reply with the final answer only, without a tool "
        "call, in the format the question asks for."
    )


# ----------------------------------------------------------------------------- parsing tool calls

_TOOL_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.DOTALL)
_FENCE = re.compile(r"^```[a-zA-Z]*\s*|\s*```$")
_TRAILING_COMMA = re.compile(r",\s*([}\]])")
_JSON_LITERALS = {"true": "True", "false": "False", "null": "None"}


@dataclass(frozen=True)
class ToolCall:
    """One parsed tool call: the box (relative 0..1000) or why the call is malformed."""

    bbox: tuple[float, float, float, float] | None
    error: str | None  # None for a valid call
    raw: str


def _close_brackets(text: str) -> str:
    """Append the closers of brackets left open (a call cut off mid-way), skipping quoted text."""
    stack: list[str] = []
    quote: str | None = None
    escaped = False
    for ch in text:
        if quote:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch in "{[":
            stack.append("}" if ch == "{" else "]")
        elif ch in "}]" and stack and stack[-1] == ch:
            stack.pop()
    return text + (quote or "") + "".join(reversed(stack))


def loads_lenient(text: str) -> Any:
    """Parse a JSON object written the way models write it; None when nothing can be read.

    Tried in order: the first JSON object (anything after it ignored); plain JSON; without
    trailing commas; as a Python literal (single quotes, True/None, trailing commas), with JSON's
    true/false/null mapped; each also with the brackets a cut-off text left open closed."""
    text = _FENCE.sub("", text.strip())
    start = text.find("{")
    if start < 0:
        return None
    text = text[start:]
    end = text.rfind("}")
    candidates = [text[: end + 1]] if end >= 0 else []
    candidates.append(_close_brackets(text))
    try:  # a valid object followed by anything else (a second object, prose)
        return json.JSONDecoder().raw_decode(text)[0]
    except ValueError:
        pass
    for cand in candidates:
        for attempt in (
            lambda c: json.loads(c),
            lambda c: json.loads(_TRAILING_COMMA.sub(r"\1", c)),
            lambda c: ast.literal_eval(re.sub(r"\b(true|false|null)\b", lambda m: _JSON_LITERALS[m.group(1)], c)),
        ):
            try:
                return attempt(cand)
            except Exception:  # noqa: BLE001 - json, ast and recursion errors all mean "try the next repair"
                continue
    return None


def _number(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def parse_tool_call(text: str, need_box: bool = True) -> ToolCall | None:
    """The first `<tool_call>` in a reply; None when the reply has none (it is an answer).

    `need_box=False` (oracle mode) accepts a zoom call whatever its box says."""
    m = _TOOL_CALL.search(text)
    if m is None:
        return None
    raw = m.group(1).strip()
    obj = loads_lenient(raw)
    if not isinstance(obj, dict):
        return ToolCall(None, "the call is not a JSON object", raw)
    name = obj.get("name")
    if name not in TOOL_NAMES:
        return ToolCall(None, f"unknown tool {name!r}; the tool is 'zoom_in'", raw)
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # OpenAI style: the arguments as a JSON string
        args = loads_lenient(args)
    if not isinstance(args, dict):
        return ToolCall(None, "'arguments' must be an object", raw)
    box = args.get("bbox_2d", args.get("bbox"))
    if isinstance(box, list) and len(box) == 1 and isinstance(box[0], list):  # [[x1, y1, x2, y2]]
        box = box[0]
    nums = [_number(v) for v in box] if isinstance(box, (list, tuple)) else []
    if len(nums) != 4 or any(v is None for v in nums):
        if not need_box:
            return ToolCall(None, None, raw)
        return ToolCall(None, "'bbox_2d' must be four numbers [x1, y1, x2, y2]", raw)
    x1, y1, x2, y2 = nums
    if need_box and not (x2 > x1 and y2 > y1):
        return ToolCall(None, f"'bbox_2d' {box} is empty: x2 must exceed x1 and y2 exceed y1", raw)
    return ToolCall((x1, y1, x2, y2), None, raw)


def strip_tool_calls(text: str) -> str:
    """The reply without its tool-call blocks (what is left to grade when the turns ran out)."""
    return _TOOL_CALL.sub("", text).strip()


# ----------------------------------------------------------------------------- the zoom tool


def zoom_in(
    full: Image.Image, box: Sequence[float], *, relative: bool = True, zoom_min_pixels: int = 512 * 512,
    max_pixels: int | None = None,
) -> tuple[Image.Image, Box]:
    """Execute a zoom on the ORIGINAL full image: the box (0..1000 relative, or pixels with
    relative=False) is clamped, widened to MIN_SIDE px per side, cropped, enlarged (never shrunk)
    to about `zoom_min_pixels`, then fitted to `max_pixels`. Returns the image and the crop
    rectangle in original pixels."""
    w, h = full.size
    px = from_rel1000(box, w, h) if relative else box
    crop, rect = crop_view(full, px, margin=0.0, min_side=MIN_SIDE)
    factor = math.sqrt(zoom_min_pixels / (crop.width * crop.height))
    if factor > 1:
        crop = zoom_view(crop, factor)
    if max_pixels is not None:
        crop = resize_to_budget(crop, None, max_pixels)[0]
    return crop, rect
