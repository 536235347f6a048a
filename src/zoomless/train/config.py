"""Training configs: pydantic models that map one-to-one onto the recipes' code.

Unknown keys fail at load time with the path to them (`extra="forbid"`), so a typo in a YAML file
never silently falls back to a default. Defaults are small enough for a CPU sanity run; where the
published Vision-OPD run used a different value, the field's comment gives it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from zoomless.config import ConfigError, load_config, parse_overrides

Form = Literal["mcq", "open"]
SFT_VIEWS = ("full", "crop", "zoom", "overlay")


class TrainConfig(BaseModel):
    """Fields every recipe shares (the shared core, `train/common.py` and its neighbours, reads only these)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), validate_assignment=True)

    model_dir: Path  # a local HF model directory (the student's starting point)
    data: list[Path]  # sample files (JSONL or parquet); a single path is accepted too
    out_dir: Path
    seed: int = 0

    lr: float = Field(1e-5, gt=0)
    warmup_steps: int = Field(0, ge=0)  # linear warmup to lr, then constant
    weight_decay: float = Field(0.01, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    max_steps: int = Field(100, ge=1)
    batch_size: int = Field(8, ge=1)  # prompts per optimizer step
    micro_batch_size: int = Field(8, ge=1)  # sequences per forward/backward
    save_every: int = Field(0, ge=0)  # 0: save only at the end
    log_every: int = Field(1, ge=1)

    max_pixels: int | None = Field(None, ge=28 * 28)  # resize every view to this pixel budget
    crop_margin: float = Field(0.25, ge=0)
    zoom: float = Field(2.0, gt=0)
    form: Form = "mcq"  # how questions are asked (samples without options are always open)

    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # compute dtype; auto = bf16 autocast on CUDA
    gradient_checkpointing: bool = False
    # with gradient_checkpointing, the last N decoder layers keep their activations instead of
    # recomputing them: less recompute for N layers' activation memory (docs/PERFORMANCE.md)
    uncheckpointed_layers: int = Field(0, ge=0)
    # with gradient_checkpointing, false: the vision tower's blocks keep their activations (a few GB at
    # 3B) instead of recomputing them, which on a GPU costs more kernel launches than math
    checkpoint_vision: bool = True
    # torch.compile each decoder layer and vision block whole (models/compiled.py; docs/PERFORMANCE.md)
    compile_blocks: bool = False
    # with compile_blocks, the vision tower's whole forward as one compiled region instead of block by
    # block: one guard check and wrapper per forward (3B GRPO on an H100: 0.668 -> 0.643 s a step)
    compile_vision_tower: bool = False
    # bf16 model weights for compute, fp32 master weights in the optimizer (train/master.py): the speed
    # of a bf16 model at the memory of fp32 weights, less 2 bytes a parameter when a step is one
    # micro-batch (its gradients stay bf16 until the step); bf16 compute even on CPU; one process only
    bf16_weights: bool = False
    logits_chunk_size: int = Field(512, ge=1)  # response rows per LM-head chunk
    resume: bool = False  # continue from the last checkpoint in out_dir
    tensorboard: bool = True
    progress: bool = True  # rich progress bar
    # a sample that cannot be shown (no box for a view that needs one, an unreadable image): stop the
    # run with one line naming it, or skip it (listed in out_dir/bad_samples.jsonl, metric bad_samples)
    on_bad_sample: Literal["stop", "skip"] = "stop"

    @model_validator(mode="after")
    def _bf16_weights_compute_in_bf16(self) -> "TrainConfig":
        if self.bf16_weights and self.dtype == "float32":
            raise ValueError("bf16_weights computes in bf16: leave dtype at auto or bfloat16")
        return self

    @model_validator(mode="after")
    def _uncheckpointed_layers_need_checkpointing(self) -> "TrainConfig":
        if self.uncheckpointed_layers and not self.gradient_checkpointing:
            raise ValueError("uncheckpointed_layers keeps some layers out of gradient_checkpointing: "
                             "set gradient_checkpointing: true too")
        if not self.checkpoint_vision and not self.gradient_checkpointing:
            raise ValueError("checkpoint_vision: false keeps the vision blocks out of gradient_checkpointing: "
                             "set gradient_checkpointing: true too")
        if self.compile_vision_tower and not self.compile_blocks:
            raise ValueError("compile_vision_tower changes how compile_blocks compiles the vision tower: "
                             "set compile_blocks: true too")
        return self

    @field_validator("data", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, (str, Path)) else v

    @field_validator("data")
    @classmethod
    def _not_empty(cls, v: list[Path]) -> list[Path]:
        if not v:
            raise ValueError("give at least one sample file")
        return v


class SFTConfig(TrainConfig):
    """Supervised fine-tuning on gold answers (loss on answer tokens only)."""

    # one view, or a weighted mix such as {"full": 0.5, "overlay": 0.5} drawn per sample
    view: str | dict[str, float] = "full"
    # processes that render and encode each batch's views (the per-sample CPU work that dominates a
    # small model's step on a GPU); 0 does it in the training process. Results are identical.
    data_workers: int = Field(0, ge=0)

    @field_validator("view")
    @classmethod
    def _known_views(cls, v: str | dict[str, float]) -> str | dict[str, float]:
        names = [v] if isinstance(v, str) else list(v)
        bad = [n for n in names if n not in SFT_VIEWS]
        if bad:
            raise ValueError(f"unknown view {bad[0]!r}; expected one of {', '.join(SFT_VIEWS)}")
        if isinstance(v, dict) and (not v or any(w < 0 for w in v.values()) or sum(v.values()) <= 0):
            raise ValueError("view weights must be >= 0 with a positive sum")
        return v


class OPDConfig(TrainConfig):
    """Vision-OPD on-policy self-distillation (reference values from the published run in comments)."""

    lr: float = Field(2e-6, gt=0)  # reference 2e-6
    warmup_steps: int = Field(10, ge=0)  # reference 10
    n: int = Field(4, ge=1)  # rollouts per prompt; reference 8
    temperature: float = Field(1.0, gt=0)  # reference 1.0 (also divides the logits in the loss)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(256, ge=1)  # reference 1024
    topk: int = Field(100, ge=1)  # reference 100 (+ one tail bucket)
    alpha: float = Field(0.5, ge=0, le=1)  # 0: KL(T||S), 1: KL(S||T), 0.5: JSD (reference)
    teacher: Literal["ema", "frozen", "student"] = "ema"
    ema_rate: float = Field(0.05, ge=0, le=1)  # reference 0.05
    # the EMA or frozen teacher's copy: float32 (reference), or bfloat16, half the memory (7.5 GB
    # less at 3B) with the EMA rounded stochastically (train/ema.py); one process only
    teacher_dtype: Literal["float32", "bfloat16"] = "float32"
    student_view: Literal["full", "overlay"] = "full"
    teacher_view: Literal["teacher", "zoom", "crop"] = "teacher"
    is_clip: float | None = Field(None, gt=0)  # truncated IS weights; only matter with updates_per_batch > 1
    updates_per_batch: int = Field(1, ge=1)  # optimizer steps per rollout batch; reference 1
    rollout_batch_size: int = Field(8, ge=1)  # sequences per generate batch
    # the rollout engine's KV cache: "static" preallocates it (transformers' cache_implementation):
    # the same samples, decoding 1.03-2x faster on an H100 (docs/PERFORMANCE.md, rollouts)
    rollout_cache: Literal["dynamic", "static"] = "dynamic"
    # weight of a second JSD: the student on the teacher's view against the teacher, on the same
    # responses. It keeps the zoomed-in skill, which lets the full view learn at a higher lr
    # (ZoomWorld: docs/RESULTS.md). Needs a separate teacher ("ema" or "frozen").
    crop_anchor: float = Field(0.0, ge=0)
    # render and encode the next batch's prompts in a background thread while this step runs
    # (train/prefetch.py); false: at the start of each step, on the main thread
    prefetch_prompts: bool = True

    @model_validator(mode="after")
    def _teacher_dtype_needs_a_copy(self) -> "OPDConfig":
        if self.teacher_dtype != "float32" and self.teacher == "student":
            raise ValueError("teacher_dtype is the dtype of an 'ema' or 'frozen' teacher's copy: the live "
                             "student has none")
        return self

    @model_validator(mode="after")
    def _anchor_needs_a_teacher(self) -> "OPDConfig":
        if self.crop_anchor > 0 and self.teacher == "student":
            raise ValueError("crop_anchor needs teacher 'ema' or 'frozen': against the live student it "
                             "would pull the student towards itself")
        return self


class JudgeConfig(BaseModel):
    """An LLM judge for answers the rules cannot decide: an OpenAI-compatible endpoint (`base_url`
    set, `model` is the served name) or a local HF model directory (`base_url` unset, `model` is the
    directory). The API key is read from the environment variable named by `api_key_env`."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str
    base_url: str | None = None  # e.g. http://127.0.0.1:8000/v1
    api_key_env: str | None = None  # never the key itself: configs get copied into run folders
    max_new_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.0, ge=0)  # greedy verdicts are reproducible
    max_concurrency: int = Field(8, ge=1)
    timeout_s: float = Field(60.0, gt=0)
    max_retries: int = Field(3, ge=0)
    on_malformed: Literal["wrong", "skip"] = "wrong"  # a verdict that is not a clear Yes/No, or a failed call
    device: str = "auto"  # local judges only


# Fields GRPOConfig inherits from OPDConfig that only the hybrid objective reads.
OPD_ONLY_FIELDS = ("topk", "alpha", "teacher", "ema_rate", "teacher_dtype", "teacher_view", "is_clip")


class GRPOConfig(OPDConfig):
    """GRPO (DAPO clip-higher), and the hybrid `objective: hybrid`: the Vision-OPD loss plus
    grpo_weight x the GRPO loss, sharing one rollout batch (reference values in comments, from the
    ZwZ R2I run). The distillation fields (topk, alpha, teacher, ...) are OPDConfig's and are only
    read by the hybrid."""

    lr: float = Field(1e-6, gt=0)  # reference 1e-6, constant, no warmup
    warmup_steps: int = Field(0, ge=0)
    n: int = Field(8, ge=1)  # rollouts per prompt; reference 8, T 1.0, top_p 1.0

    objective: Literal["grpo", "hybrid"] = "grpo"
    grpo_weight: float = Field(1.0, ge=0)  # lambda: hybrid loss = OPD loss + lambda * GRPO loss
    normalize_std: bool = True  # reference (r - mean) / (std + 1e-6); False: r - mean only
    clip_low: float = Field(0.2, ge=0, lt=1)  # reference 0.2
    clip_high: float = Field(0.3, ge=0)  # reference 0.3 (clip-higher)
    dual_clip: float | None = Field(None, gt=1)  # reference 3.0 (acts only off-policy)
    kl_coef: float = Field(0.0, ge=0)  # reference: KL disabled; > 0 adds k3 KL to the frozen start model
    mini_batches: int = Field(1, ge=1)  # optimizer steps per pass over the rollout batch; reference 4
    # updates_per_batch (from OPDConfig) is the number of passes (PPO epochs); reference 1

    format_weight: float = Field(0.0, ge=0, le=1)  # reward = (1 - w) accuracy + w format; reference 0
    max_answer_chars: int | None = Field(300, ge=1)  # an answer this long scores accuracy 0; reference 300
    judge: JudgeConfig | None = None  # None: rules only (an undecidable answer is wrong)

    @model_validator(mode="after")
    def _hybrid_fields_only_for_hybrid(self) -> "GRPOConfig":
        if self.objective == "grpo":
            stray = [f for f in OPD_ONLY_FIELDS if f in self.model_fields_set]
            if stray:
                raise ValueError(f"{stray[0]} is only read with objective: hybrid")
        return self


def resolve_paths(raw: dict[str, Any], base: Path) -> None:
    """Make the relative paths a training config file names (model_dir, data, out_dir) relative to
    `base`, the file's folder, in place (before validation)."""

    def fix(v: Any) -> Any:
        return str(base / v) if isinstance(v, str) and not Path(v).is_absolute() else v

    for key in ("model_dir", "out_dir"):
        if key in raw:
            raw[key] = fix(raw[key])
    if isinstance(raw.get("data"), list):
        raw["data"] = [fix(v) for v in raw["data"]]
    elif "data" in raw:
        raw["data"] = fix(raw["data"])


__all__ = ["ConfigError", "load_config", "parse_overrides", "resolve_paths"]  # re-exported from zoomless.config
