"""The in-process HF engine: batched `model.generate` on a local vision-language model.

Prompts: `encode_conversations` (models/loading.py) renders each conversation with the processor's
chat template plus the generation prompt (`<|im_start|>assistant\\n` for Qwen) and left-pads the
batch, so every prompt ends at the same column and the generated ids start right after it.

What a `Generation` holds:
- `token_ids`: exactly the ids the model generated, up to and including the first eos if one was
  generated (no padding). Teacher forcing `prompt ids + token_ids` reproduces the rollout.
- `text`: `token_ids` decoded without special tokens, stripped.
- `logprobs` (when asked): for each token, log_softmax(raw logits / T)[token], with T the sampling
  temperature (1 for greedy). That is the model's own distribution at T, as a teacher-forced
  forward pass computes it: before top-p truncation and before vision-token suppression.
  The engine keeps every step's logits until the batch ends (steps x batch x vocab floats).
- `finish_reason`: "stop" when eos was generated, else "length" (max_new_tokens reached).

Vision special tokens (`<|image_pad|>` ...) are suppressed: a random or weak model would sample
them, and a response holding one cannot be fed back to the model. So are the ids past the
tokenizer's length (logits padded to a round vocabulary size), which decode to nothing.

Sampling is deterministic under `params.seed` for the same conversations, parameters and
batch_size (the RNG runs across the batch); the caller's global RNG state is left untouched.
Each conversation is repeated `n` times in the batch (greedy runs once and copies).

Decoding speed: `cache_implementation="static"` preallocates the KV cache (transformers' option of
the same name); on a GPU transformers then compiles the decode step (torch.compile, CUDA graphs)
unless `compile=False`. The first batch of each new shape pays for the compilation. The default is
transformers' dynamic cache, uncompiled; `benchmarks/perf_3b.py` measures the options.

Timing: `engine.stats` accumulates prompts, generated tokens, batches and seconds over all calls;
`engine.last_call_seconds` is the wall time of the last `generate` call.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from transformers import PreTrainedModel, ProcessorMixin

from zoomless.engines.base import Conversation, Generation, SamplingParams
from zoomless.models.loading import encode_conversations, load_vlm, vision_token_ids


@contextlib.contextmanager
def seeded_rng(seed: int | None, device: torch.device) -> Iterator[None]:
    """Seed the CPU and `device` generators inside, and restore the caller's RNG state after."""
    if seed is None:
        yield
        return
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(cuda[0]):
                torch.cuda.manual_seed(seed)
        yield


def generation_kwargs(params: SamplingParams) -> dict[str, Any]:
    """Arguments to `generate` that fully set the decoding rule.

    `generate` fills every unset option from the model's generation_config.json (real checkpoints
    ship top_k, repetition_penalty, low temperatures...), so each knob that changes the
    distribution is set here explicitly: plain temperature + top-p sampling, or plain greedy.
    """
    kwargs: dict[str, Any] = dict(
        max_new_tokens=params.max_new_tokens,
        num_beams=1,
        num_return_sequences=1,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        return_dict_in_generate=True,
        output_logits=params.logprobs,
    )
    if params.temperature > 0:
        kwargs.update(
            do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0,
            min_p=0.0, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0,
        )
    else:
        kwargs.update(do_sample=False)
    return kwargs


def check_params(params: SamplingParams) -> None:
    """Reject bad parameters up front (inside a batch they would turn into per-row errors)."""
    if params.n < 1:
        raise ValueError(f"SamplingParams.n must be at least 1, got {params.n}")
    if params.max_new_tokens < 1:
        raise ValueError(f"SamplingParams.max_new_tokens must be at least 1, got {params.max_new_tokens}")
    if params.temperature < 0:
        raise ValueError(f"SamplingParams.temperature must be >= 0 (0 is greedy), got {params.temperature}")
    if not 0 < params.top_p <= 1:
        raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {params.top_p}")


class HFEngine:
    """Generate with an in-process HF model; see the module docstring for what comes back."""

    def __init__(
        self,
        model: PreTrainedModel,
        processor: ProcessorMixin,
        *,
        batch_size: int = 8,
        device: str | torch.device | None = None,
        name: str = "hf",
        cache_implementation: str | None = None,
        compile: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.tokenizer.padding_side = "left"  # prompts must end where generation starts
        self.batch_size = batch_size
        self.device = torch.device(device) if device is not None else model.device
        self.name = name
        self.decoding: dict[str, Any] = {}  # cache and compile options for `generate` (module docstring)
        if cache_implementation is not None:
            self.decoding["cache_implementation"] = cache_implementation
        if not compile:
            self.decoding["disable_compile"] = True
        # Vision tokens, and the padding columns of the logits that no token maps to.
        head = model.get_output_embeddings()
        vocab_rows = head.weight.shape[0] if head is not None else len(self.tokenizer)
        self.suppressed_ids = vision_token_ids(processor) + list(range(len(self.tokenizer), vocab_rows))
        self.eos_ids = self._eos_ids()
        self.pad_id = self._pad_id()
        self.stats: dict[str, float] = {"prompts": 0, "generated_tokens": 0, "batches": 0, "seconds": 0.0}
        self.last_call_seconds = 0.0

    @classmethod
    def from_dir(
        cls, model_dir: str | Path, *, batch_size: int = 8, name: str = "hf", cache_implementation: str | None = None,
        compile: bool = True, **load_kwargs: Any,
    ) -> "HFEngine":
        """Load a local model directory (`load_kwargs` go to `load_vlm`: dtype, device, ...)."""
        model, processor = load_vlm(model_dir, **load_kwargs)
        return cls(model, processor, batch_size=batch_size, name=name, cache_implementation=cache_implementation,
                   compile=compile)

    def _eos_ids(self) -> list[int]:
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        if eos is None:
            raise ValueError("the model has no eos token id (neither in generation_config nor in the tokenizer)")
        return [eos] if isinstance(eos, int) else list(eos)

    def _pad_id(self) -> int:
        for pad in (self.tokenizer.pad_token_id, self.model.generation_config.pad_token_id):
            if pad is not None:
                return pad
        return self.eos_ids[0]

    def generate(self, conversations: Sequence[Conversation], params: SamplingParams) -> list[list[Generation]]:
        """For each conversation, `params.n` generations, in order."""
        check_params(params)
        start = time.perf_counter()
        greedy = params.temperature <= 0
        copies = 1 if greedy else params.n  # greedy samples are all the same: decode once
        rows = [i for i in range(len(conversations)) for _ in range(copies)]
        results: list[list[Generation]] = [[] for _ in conversations]
        with seeded_rng(params.seed, self.device):
            for b in range(0, len(rows), self.batch_size):
                batch = rows[b : b + self.batch_size]
                for i, gen in zip(batch, self._generate_safely([conversations[i] for i in batch], params)):
                    results[i].append(gen)
        if greedy and params.n > 1:
            results = [[g] + [_copy(g) for _ in range(params.n - 1)] for g, *_ in results]
        self.last_call_seconds = time.perf_counter() - start
        self.stats["seconds"] += self.last_call_seconds
        self.stats["prompts"] += len(conversations)
        self.stats["generated_tokens"] += sum(len(g.token_ids) for gens in results for g in gens)
        return results

    def _generate_safely(self, conversations: list[Conversation], params: SamplingParams) -> list[Generation]:
        """One batch. Bad inputs (an unreadable image, an extreme aspect ratio...) raise ValueError or
        OSError: then each conversation runs alone and only the bad ones come back as errors."""
        try:
            return self._generate_batch(conversations, params)
        except (ValueError, OSError) as e:
            if len(conversations) == 1:
                return [Generation(text="", finish_reason="error", error=f"{type(e).__name__}: {e}")]
        return [g for conv in conversations for g in self._generate_safely([conv], params)]

    @torch.inference_mode()
    def _generate_batch(self, conversations: list[Conversation], params: SamplingParams) -> list[Generation]:
        inputs = encode_conversations(self.processor, conversations).to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        out = self.model.generate(
            **inputs,
            **generation_kwargs(params),
            **self.decoding,
            eos_token_id=self.eos_ids,
            pad_token_id=self.pad_id,
            suppress_tokens=self.suppressed_ids or None,
        )
        self.stats["batches"] += 1
        generated = out.sequences[:, inputs["input_ids"].shape[1] :].tolist()
        prompt_lengths = inputs["attention_mask"].sum(1).tolist()  # left padding is masked out
        temperature = params.temperature if params.temperature > 0 else 1.0
        gens = []
        for row, ids in enumerate(generated):
            ids, finish = _cut_at_eos(ids, self.eos_ids)
            logprobs = None
            if params.logprobs:
                steps = torch.stack([step[row] for step in out.logits[: len(ids)]]).float()
                logp = torch.log_softmax(steps / temperature, dim=-1)
                logprobs = logp.gather(1, torch.tensor(ids, device=logp.device)[:, None]).squeeze(1).tolist()
            text = self.tokenizer.decode(ids, skip_special_tokens=True).strip()
            gens.append(Generation(text=text, token_ids=ids, logprobs=logprobs, finish_reason=finish,
                                   prompt_tokens=int(prompt_lengths[row])))
        return gens


def _cut_at_eos(ids: list[int], eos_ids: list[int]) -> tuple[list[int], str]:
    """The ids up to and including the first eos, and why generation ended."""
    for k, t in enumerate(ids):
        if t in eos_ids:
            return ids[: k + 1], "stop"
    return ids, "length"


def _copy(g: Generation) -> Generation:
    return Generation(
        text=g.text, token_ids=list(g.token_ids), logprobs=None if g.logprobs is None else list(g.logprobs),
        finish_reason=g.finish_reason, error=g.error, prompt_tokens=g.prompt_tokens,
    )
