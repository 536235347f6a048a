"""An offline byte-level BPE tokenizer with the Qwen-VL special tokens and chat template.

Tiny models need a tokenizer without downloading one. We train a byte-level BPE (the scheme Qwen
uses: any UTF-8 text round-trips, unknown words fall back to bytes) on a corpus generated in code
from the phrases the project asks models, then add the Qwen special tokens at the end of the
vocabulary, as in the real Qwen vocabulary. Same arguments, same vocabulary.

Prompt format (Qwen style, no default system prompt):

    <|im_start|>system\n{system}<|im_end|>\n            (only when a system message is given)
    <|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{text}<|im_end|>\n
    <|im_start|>assistant\n                               (add_generation_prompt=True)

The processor expands each `<|image_pad|>` into one token per merged 2x2 patch group.
"""

from __future__ import annotations

import itertools
import random

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
VISION_PAD = "<|vision_pad|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"

# In the order of the real Qwen vocabulary (which puts them after the BPE tokens).
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END, VISION_START, VISION_END, VISION_PAD, IMAGE_PAD, VIDEO_PAD]

# Qwen2's pre-tokenizer split: contractions, letter runs with one leading non-letter, single digits,
# punctuation runs, newlines, spaces.
_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Jinja; the '\n' inside string literals are newlines once rendered. Images and videos become
# a vision block where they appear in the content; `content` may also be a plain string.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' or 'image' in item or 'image_url' in item %}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif item['type'] == 'video' or 'video' in item %}"
    "{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{% elif 'text' in item %}{{ item['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

COLOURS = ["red", "green", "blue", "yellow", "orange", "purple", "pink", "brown", "black", "white",
           "gray", "grey", "cyan", "magenta", "teal", "navy", "olive", "maroon", "gold", "silver"]
SHAPES = ["circle", "square", "triangle", "rectangle", "star", "hexagon", "pentagon", "diamond",
          "cross", "heart", "ellipse", "ring", "arrow", "octagon"]
TEXTURES = ["striped", "dotted", "checkered", "solid", "plain", "wavy", "grid", "hatched", "spotted",
            "smooth", "rough", "gradient"]
OBJECTS = ["car", "tree", "house", "sign", "person", "dog", "cat", "bird", "flower", "boat", "ball",
           "cup", "book", "lamp", "door", "window", "clock", "bottle", "chair", "table", "flag",
           "kite", "box", "key", "shoe", "hat", "bag", "phone", "bike", "bus", "truck", "light",
           "plate", "fish", "leaf", "stone", "label", "letter", "digit", "number", "word", "shape",
           "object", "mark", "icon", "badge", "button", "tag", "poster", "screen"]
POSITIONS = ["left", "right", "top", "bottom", "center", "middle", "above", "below", "behind",
             "in front of", "next to", "inside", "outside", "near", "far", "corner", "edge"]
SIZES = ["small", "tiny", "large", "big", "little", "huge", "medium", "thin", "wide", "tall", "short"]
COMMON_WORDS = """
the a an of to and in is it that this on for with as at by from be are was were has have had not or
but if then than so what which who whom whose where when why how many much more most less few some
any all each every no yes one two three four five six seven eight nine ten eleven twelve twenty
hundred thousand first second third fourth fifth last next other another same different image
picture photo photograph scene region area part box bounding crop zoom zoomed detail details visible
see seen look looking find count answer question option choice choices correct wrong true false
best given following directly only focus objects single phrase select respond letter color colour
kind type text written say shows show there here can could would should will do does did you your
we our they their its his her my me us them please describe identify determine fine decisive
evidence full view close background foreground highest lowest nearest farthest between among
around along across over under into onto out off up down about after before during while because
assistant user system helpful think reasoning step final result value name people man woman child
children boy girl family friend group team member hand head face eye eyes hair arm leg foot body
heart mind life world country city town village street road way path bridge river lake sea ocean
water fire air earth ground land field farm garden park forest mountain hill valley island beach
sky sun moon cloud rain snow wind storm weather day night morning evening afternoon week month
year time hour minute moment today tomorrow yesterday spring summer autumn winter season home room
kitchen bedroom bathroom office school class teacher student lesson book page paper pen pencil desk
wall floor roof stairs building tower church shop store market bank hospital station airport train
plane ship road traffic food bread milk cheese meat apple orange banana grape lemon egg rice soup
tea coffee juice sugar salt water glass bowl spoon fork knife bottle jar basket bag pocket money
price cost number amount size length width height weight speed distance direction north south east
west front back side end start middle centre center line circle point corner edge surface shape
form pattern mark sign symbol word sentence story news report message note list table chart graph
map plan idea reason fact truth problem solution example case rule law order power force energy
light dark shadow colour bright dull clear sharp blurry soft hard heavy light strong weak fast slow
quick early late young old new ancient modern good bad better worse great poor rich cheap expensive
easy difficult simple complex possible impossible important main major minor real false right left
high low long short tall deep shallow wide narrow thick thin big small large little huge tiny open
closed empty full hot cold warm cool dry wet clean dirty quiet loud happy sad angry calm safe
dangerous free busy ready sure certain likely similar common rare special general public private
local national human natural social political economic personal medical physical central whole
entire own able available recent current present past future near far away together alone again
always never often sometimes usually already still just also even ever very too quite rather almost
enough perhaps maybe probably really actually especially exactly nearly only once twice make made
making take took taken give gave go went gone come came get got put set keep kept let begin began
seem help turn start run ran move live believe hold bring happen write provide sit stand lose pay
meet include continue learn change lead understand watch follow stop create speak read allow add
spend grow offer remember love consider appear buy wait serve die send expect build stay fall cut
reach kill remain suggest raise pass sell require decide pull carry break receive agree support hit
produce eat cover catch draw choose wear drive fly throw pick hang touch paint measure compare
notice point check test train learn teach explain guess solve fill mix sort match join place
belong contain depend differ exist fit locate mention prefer recognize rotate scale shift split
""".split()

QUESTION_TEMPLATES = [
    "What is the colour of the {size} {obj}?",
    "What color is the {obj} in the {pos} of the image?",
    "What shape is the {colour} {obj}?",
    "What texture does the {obj} near the {pos} have?",
    "How many {colour} {shape}s are there in the image?",
    "How many {obj}s can you see?",
    "Which object is to the {pos} of the {colour} {shape}?",
    "Is the {colour} {obj} {pos} the {obj2}?",
    "What is written on the {obj}?",
    "What digit is shown on the {colour} {obj}?",
    "What is the {size} {texture} {shape} made of?",
    "Which {shape} is {colour}?",
    "Where is the {size} {colour} {obj} located?",
    "Is there a {colour} {shape} in the {pos} corner?",
    "Describe the {obj} inside the red box.",
]

ANSWER_SUFFIXES = [
    "Answer with the option's letter from the given choices directly.",
    "Answer the question using a single word or phrase.",
    "Only focus on the objects inside the red bounding box in the image to answer this question.",
    "Select from the following choices.",
    "Select the best answer to the above multiple-choice question based on the image. "
    "Respond with only the letter (A, B, C, D, or E) of the correct option.\nThe best answer is: ",
]


def default_corpus(num_questions: int = 3000, seed: int = 0) -> list[str]:
    """English text in the shape of the project's prompts and answers (deterministic)."""
    rng = random.Random(seed)
    pools = {"colour": COLOURS, "shape": SHAPES, "texture": TEXTURES, "obj": OBJECTS,
             "obj2": OBJECTS, "pos": POSITIONS, "size": SIZES}
    lines: list[str] = ["You are a helpful assistant.", "system", "user", "assistant"]
    lines += ANSWER_SUFFIXES
    lines += [" ".join(COMMON_WORDS[i:i + 12]) for i in range(0, len(COMMON_WORDS), 12)]
    for _ in range(num_questions):  # word salad: every word at sentence start, after a space, plural
        words = rng.sample(COMMON_WORDS, 8)
        lines.append(" ".join([words[0].capitalize(), *words[1:4], words[4] + "s", *words[5:]]) + rng.choice(".?!,;:"))
    lines += [" ".join(p) for p in itertools.product(SIZES, COLOURS, TEXTURES)]
    lines += [f"{c} {s}" for c, s in itertools.product(COLOURS, SHAPES + OBJECTS)]
    lines += [" ".join(str(n) for n in range(i, i + 10)) for i in range(0, 1000, 10)]
    for _ in range(num_questions):
        question = rng.choice(QUESTION_TEMPLATES).format(**{k: rng.choice(v) for k, v in pools.items()})
        options = rng.sample(COLOURS + SHAPES + OBJECTS, 4)
        if rng.random() < 0.5:
            opts = "\n".join(f"{letter}. {o}" for letter, o in zip("ABCD", options))
        else:
            opts = "\n".join(f"({letter}) {o}" for letter, o in zip("ABCD", options))
        letter = rng.choice("ABCD")
        lines.append(f"{question}\n{opts}\n{rng.choice(ANSWER_SUFFIXES)}")
        lines.append(rng.choice([letter, f"{letter}.", f"({letter})", f"The answer is {letter}.",
                                 options["ABCD".index(letter)], str(rng.randint(0, 99))]))
    return lines


def train_bpe(vocab_size: int = 2048, corpus: list[str] | None = None) -> Tokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` with `vocab_size` entries, special tokens included."""
    num_bpe = vocab_size - len(SPECIAL_TOKENS)
    if num_bpe < 256:
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (256 bytes + special tokens), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=num_bpe,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is unknown
        show_progress=False,
    )
    tok.train_from_iterator(corpus if corpus is not None else default_corpus(), trainer=trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    return tok


def build_tokenizer(vocab_size: int = 2048, corpus: list[str] | None = None) -> PreTrainedTokenizerFast:
    """The HF tokenizer for tiny models: Qwen special tokens, chat template, left padding.

    eos is `<|im_end|>` (what an assistant turn ends with) and pad is `<|endoftext|>`, as in Qwen
    instruct models; there is no bos token. The vocabulary may come out smaller than `vocab_size`
    when the corpus has no more pairs to merge.
    """
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=train_bpe(vocab_size, corpus),
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=32768,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
