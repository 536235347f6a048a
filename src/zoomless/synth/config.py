"""The `zoomless synth` config: one typed tree that maps one-to-one onto the pipeline's stages.

Defaults are the reference's (ZwZ data synthesis, see reference/zwz-r2i-spec.md §2.12) unless a
comment says otherwise. Every model role names its own endpoint; unset endpoint fields fall back
to the shared `endpoint` section, so a single served model needs only `endpoint.base_url` and
`endpoint.model`. A role may instead give `model_dir` to run a local HF model in-process.

Unknown keys fail at load time with the path to them (`extra="forbid"`).

A config for two teachers behind vLLM and a local student proxy:

    images: [photos/]
    out_dir: synth_out
    endpoint: {base_url: http://gpu1:8000/v1, model: Qwen3-VL-235B-A22B-Instruct, api_key_env: VLLM_KEY}
    regions: {backend: teacher, coords: rel1000}     # or opencv (no model), or boxes + boxes_file
    roles:
      teachers:
        - {name: qwen}
        - {name: glm, base_url: http://gpu2:8000/v1, model: GLM-4.5V}
      student: {model_dir: /models/Qwen3-VL-8B-Instruct}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from zoomless.config import ConfigError, load_config
from zoomless.config import parse_overrides as _parse_overrides



class SynthConfigError(ConfigError):
    """A config that cannot be used; the one-line message names the file and the key."""


class SynthError(RuntimeError):
    """A run that cannot go on; the one-line message says what to fix. Nothing done is lost."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


# ----------------------------------------------------------------------------- model roles

ENDPOINT_FIELDS = (
    "base_url", "model", "model_dir", "api_key_env", "max_concurrency", "timeout_s", "max_retries",
    "backoff_base_s", "backoff_max_s", "max_image_pixels", "image_format", "batch_size", "device",
)


class Endpoint(_Section):
    """How to reach a model: an OpenAI-compatible endpoint (base_url + model) or a local `model_dir`."""

    base_url: str | None = None  # e.g. http://127.0.0.1:8000/v1 (vLLM, SGLang, `zoomless serve`, a provider)
    model: str | None = None  # the served model name
    model_dir: Path | None = None  # a local HF model directory, run in-process instead of over HTTP
    api_key_env: str | None = None  # the NAME of the environment variable that holds the key
    max_concurrency: int = Field(8, ge=1)
    timeout_s: float = Field(120.0, gt=0)  # reference: 120 s per request
    max_retries: int = Field(5, ge=0)  # bounded, with exponential backoff (the reference retried up to 3000x)
    backoff_base_s: float = Field(1.0, ge=0)
    backoff_max_s: float = Field(60.0, ge=0)
    max_image_pixels: int = Field(2048 * 2048, ge=28 * 28)  # images are downscaled to this before sending
    image_format: Literal["png", "jpeg"] = "png"
    batch_size: int = Field(8, ge=1)  # in-process models only
    device: str = "auto"  # in-process models only

    @model_validator(mode="after")
    def _one_kind(self) -> "Endpoint":
        if self.base_url and self.model_dir:
            raise ValueError("set base_url (an endpoint) or model_dir (a local model), not both")
        return self


class Role(_Section):
    """One model role: endpoint fields (None = take them from the shared `endpoint`) + sampling."""

    base_url: str | None = None
    model: str | None = None
    model_dir: Path | None = None
    api_key_env: str | None = None
    max_concurrency: int | None = Field(None, ge=1)
    timeout_s: float | None = Field(None, gt=0)
    max_retries: int | None = Field(None, ge=0)
    backoff_base_s: float | None = Field(None, ge=0)
    backoff_max_s: float | None = Field(None, ge=0)
    max_image_pixels: int | None = Field(None, ge=28 * 28)
    image_format: Literal["png", "jpeg"] | None = None
    batch_size: int | None = Field(None, ge=1)
    device: str | None = None

    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(1024, ge=1)

    @model_validator(mode="after")
    def _one_kind(self) -> "Role":
        if self.base_url and self.model_dir:
            raise ValueError("set base_url (an endpoint) or model_dir (a local model), not both")
        return self

    def endpoint(self, shared: Endpoint) -> Endpoint:
        """This role's endpoint: its own fields, the shared section's for the ones it leaves unset."""
        own = {k: getattr(self, k) for k in ENDPOINT_FIELDS if getattr(self, k) is not None}
        if "model_dir" in own and "base_url" not in own:
            own["base_url"] = None  # a role that names a local model does not inherit the shared URL
        if "base_url" in own and "model_dir" not in own:
            own["model_dir"] = None
        return shared.model_copy(update=own)


class ListerRole(Role):  # lists objects present once and grounds them (regions.backend = teacher)
    temperature: float = 0.7
    max_new_tokens: int = 2048


class QuestionerRole(Role):  # writes questions on the crop
    temperature: float = 0.9
    top_p: float = 0.8


class ValidatorRole(Role):  # checks each question against the full image and the crop
    temperature: float = 0.3
    top_p: float = 0.9


class TeacherRole(Role):  # answers on the crop, `samples` times
    name: str | None = None  # names the teacher in the store; default "teacher<i>"
    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 2048
    samples: int = Field(4, ge=1)


class JudgeRole(Role):  # groups equivalent teacher answers (consensus.method = judge)
    temperature: float = 0.3


class DistractorRole(Role):  # writes wrong options for the multiple-choice form
    temperature: float = 0.8


class StudentRole(Role):  # the difficulty proxy: answers the MCQ on the overlay `samples` times
    temperature: float = 1.0
    max_new_tokens: int = 2048
    samples: int = Field(4, ge=1)


def _default_teachers() -> list[TeacherRole]:
    return [TeacherRole(), TeacherRole()]  # reference: 4 x Qwen3-VL-235B + 4 x GLM-4.5V


class Roles(_Section):
    lister: ListerRole = ListerRole()
    questioner: QuestionerRole = QuestionerRole()
    validator: ValidatorRole = ValidatorRole()
    teachers: list[TeacherRole] = Field(default_factory=_default_teachers)
    judge: JudgeRole = JudgeRole()
    distractor: DistractorRole = DistractorRole()
    student: StudentRole = StudentRole()

    @field_validator("teachers")
    @classmethod
    def _teachers(cls, v: list[TeacherRole]) -> list[TeacherRole]:
        if not v:
            raise ValueError("give at least one teacher")
        names = [t.name or f"teacher{i + 1}" for i, t in enumerate(v)]
        if len(set(names)) != len(names):
            raise ValueError(f"teacher names must be distinct, got {names}")
        return v

    def teacher_names(self) -> list[str]:
        return [t.name or f"teacher{i + 1}" for i, t in enumerate(self.teachers)]


# ----------------------------------------------------------------------------- stages


class IntakeConfig(_Section):
    extensions: list[str] = [".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tiff", ".webp"]
    min_width: int = Field(1200, ge=1)  # reference: keep W > 1200 and H > 1200 (we keep >= min)
    min_height: int = Field(1200, ge=1)
    max_pixels: int = Field(100_000_000, ge=1)  # refuse larger files (decompression bombs)
    max_images: int | None = Field(None, ge=1)  # a seeded random subset (reference --max_images)


class OpenCVConfig(_Section):
    work_side: int = Field(1024, ge=64)  # edges are found on a copy whose long side is at most this
    top_k: int = Field(8, ge=1)  # proposals kept per image, best first
    nms_iou: float = Field(0.3, gt=0, le=1)
    min_area_fraction: float = Field(0.0005, ge=0)


class RegionsConfig(_Section):
    backend: Literal["teacher", "opencv", "boxes"] = "opencv"  # opencv needs no model
    # teacher backend: how the lister writes boxes. rel1000 = Qwen3-VL (0..1000 relative),
    # pixels = Qwen2.5-VL (absolute pixels of the image it was sent), rel1 = fractions 0..1.
    coords: Literal["rel1000", "pixels", "rel1"] = "rel1000"
    pixel_factor: int = Field(28, ge=1)  # pixels: the image is sent aligned to this (Qwen2.5-VL: 28)
    min_objects: int = Field(3, ge=0)  # reference: an object list of 2 or fewer fails the image
    boxes_file: Path | None = None  # boxes backend: JSONL of {"image", "box", "label"?, "score"?}
    opencv: OpenCVConfig = OpenCVConfig()
    # filters
    max_area_fraction: float = Field(0.10, gt=0, le=1)  # reference: keep area < 10 % of the image
    min_side: int = Field(16, ge=1)  # px; the reference has none (a 16 px region is 32 px zoomed)
    min_score: float = Field(0.75, ge=0, le=1)  # reference SAM3 threshold; only for boxes that carry a score
    unique: bool = True  # drop labels listed more than once in an image
    max_per_image: int | None = Field(None, ge=1)


class CropConfig(_Section):
    margin: float = Field(0.0, ge=0)  # reference: the raw box, no padding
    zoom: float = Field(2.0, gt=0)  # reference: 2x LANCZOS
    min_side: int = Field(28, ge=1)  # a smaller crop is grown around its centre first


class QuestionsConfig(_Section):
    per_crop: int = Field(3, ge=1)
    n_seeds: int = Field(15, ge=0)  # few-shot examples shown per crop, spread over the dimensions
    seeds_file: Path | None = None  # JSON list of {"question", "dimension"}; default: the built-in list
    max_chars: int = Field(300, ge=10)


class ValidationConfig(_Section):
    enabled: bool = True


class AnswersConfig(_Section):
    max_chars: int = Field(80, ge=1)  # a longer extracted answer is not a short factual answer
    uncued_max_words: int = Field(6, ge=1)  # an answer without \\boxed{} / tags must be this short


class ConsensusConfig(_Section):
    method: Literal["rules", "judge"] = "rules"
    min_agreement: float = Field(0.75, gt=0, le=1)  # of the planned votes: 6 of 8 by default
    fuzzy: float = Field(0.85, gt=0, le=1)  # string similarity at which two answers agree


class DistillConfig(_Section):
    form: Literal["mcq", "open"] = "mcq"
    n_distractors: int = Field(3, ge=1, le=9)
    overlay_margin: float = Field(0.05, ge=0)  # reference: the box grown by 5 % per side
    overlay_width: int = Field(5, ge=1)  # reference: 5 px red outline


class DifficultyConfig(_Section):
    enabled: bool = True
    max_correct: int = Field(1, ge=0)  # keep when at most this many student samples are right


class ExportConfig(_Section):
    data_source: str = "general"  # EasyR1 routes its judge on this
    embed_images: bool = False  # samples.parquet: embed image bytes instead of paths
    opd_student: Literal["overlay", "full"] = "overlay"  # the student image of the Vision-OPD form
    opd_teacher: Literal["crop", "overlay_crop"] = "crop"  # the teacher image: zoomed crop, or of the overlay


# ----------------------------------------------------------------------------- the whole config


class SynthConfig(_Section):
    images: list[Path]  # folders (walked recursively) or image files
    out_dir: Path
    seed: int = 42
    shard: str = "0/1"  # "i/n": this machine does the i-th of n parts
    wave_size: int = Field(64, ge=1)  # images taken through all stages together
    chunk_size: int = Field(32, ge=1)  # conversations per engine call
    max_reply_chars: int = Field(8000, ge=100)  # replies are stored clipped to this (head + tail)
    progress: bool = True
    endpoint: Endpoint = Endpoint()
    roles: Roles = Roles()
    intake: IntakeConfig = IntakeConfig()
    regions: RegionsConfig = RegionsConfig()
    crop: CropConfig = CropConfig()
    questions: QuestionsConfig = QuestionsConfig()
    validation: ValidationConfig = ValidationConfig()
    answers: AnswersConfig = AnswersConfig()
    consensus: ConsensusConfig = ConsensusConfig()
    distill: DistillConfig = DistillConfig()
    difficulty: DifficultyConfig = DifficultyConfig()
    export: ExportConfig = ExportConfig()

    @field_validator("images", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, (str, Path)) else v

    @field_validator("images")
    @classmethod
    def _not_empty(cls, v: list[Path]) -> list[Path]:
        if not v:
            raise ValueError("give at least one image folder or file")
        return v

    @field_validator("shard")
    @classmethod
    def _shard(cls, v: str) -> str:
        parse_shard(v)
        return v

    @property
    def shard_index(self) -> tuple[int, int]:
        return parse_shard(self.shard)


def parse_shard(text: str) -> tuple[int, int]:
    """"1/4" -> (1, 4): this run does part 1 (0-based) of 4."""
    i, sep, n = str(text).partition("/")
    try:
        index, count = int(i), int(n)
    except ValueError:
        index, count = -1, 0
    if not sep or count < 1 or not 0 <= index < count:
        raise ValueError(f"shard must be 'i/n' with 0 <= i < n, got {text!r}")
    return index, count


# ----------------------------------------------------------------------------- loading


def load_synth_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> SynthConfig:
    """Read a YAML config, apply `overrides` ({"roles.student.samples": 8, ...}), validate.

    Relative paths written in the file (images, out_dir, boxes_file, seeds_file, model_dir) are
    taken relative to the file's folder; paths given as overrides, relative to the working folder.
    Raises SynthConfigError naming the file and the key.
    """
    return load_config(path, SynthConfig, overrides, error=SynthConfigError, prepare=_resolve_paths)


def _resolve_paths(raw: dict[str, Any], base: Path) -> None:
    """Make the file's relative paths relative to `base`, in place (before validation)."""

    def fix(section: Any, key: str) -> None:
        if isinstance(section, dict) and isinstance(section.get(key), str) and not Path(section[key]).is_absolute():
            section[key] = str(base / section[key])

    images = raw.get("images")
    if isinstance(images, str):
        raw["images"] = images = [images]
    if isinstance(images, list):
        raw["images"] = [str(base / v) if isinstance(v, str) and not Path(v).is_absolute() else v for v in images]
    fix(raw, "out_dir")
    fix(raw.get("regions"), "boxes_file")
    fix(raw.get("questions"), "seeds_file")
    fix(raw.get("endpoint"), "model_dir")
    roles = raw.get("roles")
    if isinstance(roles, dict):
        for name, role in roles.items():
            for r in role if name == "teachers" and isinstance(role, list) else [role]:
                fix(r, "model_dir")


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """["roles.student.samples=8", "shard=1/4"] -> {...}, values parsed as YAML."""
    return _parse_overrides(items, SynthConfigError)
