"""The shared core of every training recipe: device, seeding, optimizer, data order, checkpoints,
logging and rollouts. Nothing method-specific lives here; a recipe is a short loop over these parts.

Checkpoints are standard HF directories, `out_dir/checkpoint-000042/`: the student (save_pretrained)
and its processor, any extra models (an EMA teacher) in subdirectories, and `trainer_state.pt` with
the optimizer, scheduler, RNG and data-order state, so `resume` continues exactly where it stopped.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from zoomless.engines.base import Conversation, Engine, Generation, SamplingParams
from zoomless.sample import Sample, read_samples
from zoomless.train.batching import PromptEncoding, TeacherForcingBatch, build_batch, lm_head, response_hidden
from zoomless.train.losses import chunked_logprobs

STATE_FILE = "trainer_state.pt"
CHECKPOINT_PREFIX = "checkpoint-"


# ----------------------------------------------------------------------------- device and precision


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available")
    return device


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype: "auto" is bf16 on CUDA and fp32 elsewhere. Weights stay fp32."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """bf16 autocast around forwards; a no-op for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each layer's activations in the backward pass (newer transformers renamed the API)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- optimizer


def build_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW (betas 0.9/0.999); weight decay on matrices only, not on norms and biases."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.999))


def warmup_constant_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over `warmup_steps` updates (the first already has lr/warmup, not 0), then constant."""
    if warmup_steps == 0:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 1.0)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: min(1.0, (k + 1) / warmup_steps))


def clip_and_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    grad_clip: float,
) -> tuple[float, bool]:
    """Clip gradients, step the optimizer and scheduler; skip the update if the norm is not finite.

    Returns (grad norm before clipping, whether the update was applied).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    norm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip))
    applied = math.isfinite(norm)
    if applied:
        optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm, applied


# ----------------------------------------------------------------------------- data


def load_training_samples(paths: Sequence[str | Path]) -> list[Sample]:
    samples: list[Sample] = []
    for p in paths:
        samples.extend(read_samples(p))
    if not samples:
        raise ValueError(f"{', '.join(str(p) for p in paths)}: no samples to train on")
    return samples


class DataIterator:
    """Endless batches of sample indices, reshuffled every epoch from (seed, epoch).

    The whole state is (epoch, position), so saving and restoring it resumes the exact order.
    """

    def __init__(self, n_items: int, batch_size: int, seed: int = 0, shuffle: bool = True) -> None:
        if n_items < 1:
            raise ValueError("DataIterator needs at least one item")
        self.n_items, self.batch_size, self.seed, self.shuffle = n_items, batch_size, seed, shuffle
        self.epoch, self.position = 0, 0

    def _order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.n_items))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n_items, generator=g).tolist()

    def next_batch(self) -> list[int]:
        return self.take(self.batch_size)

    def take(self, n: int) -> list[int]:
        """The next `n` indices of the order (more than a batch replace bad samples, `train/screening.py`)."""
        batch: list[int] = []
        order = self._order(self.epoch)
        while len(batch) < n:
            if self.position == self.n_items:
                self.epoch, self.position = self.epoch + 1, 0
                order = self._order(self.epoch)
            take = min(n - len(batch), self.n_items - self.position)
            batch.extend(order[self.position : self.position + take])
            self.position += take
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


# ----------------------------------------------------------------------------- checkpoints


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dir(out_dir: Path, step: int) -> Path:
    return Path(out_dir) / f"{CHECKPOINT_PREFIX}{step:06d}"


def save_checkpoint(
    out_dir: Path,
    step: int,
    model: nn.Module,
    processor: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    data: DataIterator,
    extra_models: dict[str, nn.Module] | None = None,
    extra_state: dict[str, Any] | None = None,
) -> Path:
    """Write `out_dir/checkpoint-{step}` atomically (to a temporary folder, then renamed)."""
    final = checkpoint_dir(out_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    for name, extra in (extra_models or {}).items():  # each a standard model dir of its own
        extra.save_pretrained(tmp / name)
        processor.save_pretrained(tmp / name)
    state = {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "data": data.state_dict(),
        "rng": _rng_state(),
        "extra": extra_state or {},
    }
    torch.save(state, tmp / STATE_FILE)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def last_checkpoint(out_dir: Path) -> Path | None:
    """The highest-step complete checkpoint in `out_dir`, or None."""
    found = [
        p for p in Path(out_dir).glob(f"{CHECKPOINT_PREFIX}*")
        if p.is_dir() and not p.name.endswith(".tmp") and (p / STATE_FILE).exists()
    ]
    return max(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]), default=None)


def load_trainer_state(
    ckpt: Path,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    data: DataIterator,
) -> dict[str, Any]:
    """Restore optimizer, scheduler, data order and RNG from a checkpoint; return the full state."""
    state = torch.load(Path(ckpt) / STATE_FILE, map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    data.load_state_dict(state["data"])
    _set_rng_state(state["rng"])
    return state


def resolve_start(model_dir: Path, out_dir: Path, resume: bool) -> tuple[Path, Path | None]:
    """Where to load the student from: the last checkpoint when resuming, else `model_dir`."""
    if not resume:
        return Path(model_dir), None
    ckpt = last_checkpoint(out_dir)
    if ckpt is None:
        raise FileNotFoundError(f"{out_dir}: resume asked for, but there is no checkpoint to resume from")
    return ckpt, ckpt


# ----------------------------------------------------------------------------- logging


class MetricsLogger:
    """Per-step metrics to `out_dir/metrics.jsonl`, TensorBoard (`out_dir/tb`) and a rich progress bar."""

    def __init__(
        self, out_dir: Path, total_steps: int, start_step: int = 0, tensorboard: bool = True, progress: bool = True,
        show: Sequence[str] = ("loss",),
    ) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / "metrics.jsonl"
        if start_step == 0:
            self.path.unlink(missing_ok=True)
        else:  # resuming: drop lines from steps after the checkpoint (they will be redone)
            self._truncate_after(start_step)
        self.show = tuple(show)
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.out_dir / "tb"), purge_step=start_step + 1 if start_step else None)
        self.progress = None
        if progress:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
            )
            self.task = self.progress.add_task("train", total=total_steps, completed=start_step, info="")
            self.progress.start()

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in keep))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.writer is not None:
            for k, v in metrics.items():
                self.writer.add_scalar(k, v, step)
        if self.progress is not None:
            info = "  ".join(f"{k} {metrics[k]:.4g}" for k in self.show if k in metrics)
            self.progress.update(self.task, completed=step, info=info)

    def advance(self, step: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.progress is not None:
            self.progress.stop()


class Timer:
    """Accumulates seconds per named phase: `with timer("rollout"): ...`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


# ----------------------------------------------------------------------------- rollouts


@dataclass
class Rollout:
    prompt_index: int  # which conversation it answers
    token_ids: list[int]
    logprobs: list[float] | None
    text: str
    finish_reason: str


@dataclass
class RolloutBatch:
    rollouts: list[Rollout] = field(default_factory=list)
    dropped_vision: int = 0  # responses holding vision special tokens (cannot be teacher-forced)
    dropped_other: int = 0  # engine errors and empty responses
    total: int = 0

    @property
    def dropped(self) -> int:
        return self.dropped_vision + self.dropped_other


def filter_generations(generations: Sequence[Sequence[Generation]], banned_ids: Sequence[int]) -> RolloutBatch:
    """Keep the usable generations; drop (and count) ones with vision special tokens, errors or no tokens."""
    banned = set(banned_ids)
    out = RolloutBatch()
    for i, gens in enumerate(generations):
        for g in gens:
            out.total += 1
            if g.error is not None or not g.token_ids:
                out.dropped_other += 1
            elif banned.intersection(g.token_ids):
                out.dropped_vision += 1
            else:
                out.rollouts.append(Rollout(i, list(g.token_ids), g.logprobs, g.text, g.finish_reason))
    return out


def rollout(
    engine: Engine,
    conversations: Sequence[Conversation],
    params: SamplingParams,
    banned_ids: Sequence[int],
    model: nn.Module | None = None,
    autocast_ctx: contextlib.AbstractContextManager | None = None,
) -> RolloutBatch:
    """Sample `params.n` responses per conversation with the policy; drop unusable ones.

    `model` (the policy inside the engine) is put in eval mode for sampling and back in train mode after.
    """
    was_training = model.training if model is not None else False
    if model is not None:
        model.eval()
    try:
        with torch.no_grad(), (autocast_ctx or contextlib.nullcontext()):
            generations = engine.generate(list(conversations), params)
    finally:
        if model is not None and was_training:
            model.train()
    return filter_generations(generations, banned_ids)


def sampling_params(cfg: Any, step: int) -> SamplingParams:
    """The rollout sampling of one step (`cfg` has n, temperature, top_p, max_new_tokens, seed).
    The seed is a pure function of the step, so a resumed run samples what the straight run did."""
    return SamplingParams(
        n=cfg.n, temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
        seed=cfg.seed * 1_000_003 + step,
    )


def rollout_counts(rb: RolloutBatch) -> dict[str, float]:
    return {"dropped": float(rb.dropped), "dropped_vision": float(rb.dropped_vision), "rollouts": float(rb.total)}


def response_stats(rollouts: Sequence[Rollout]) -> dict[str, float]:
    """Token count, mean and max response length, and the share cut at max_new_tokens."""
    lengths = [len(r.token_ids) for r in rollouts]
    return {
        "tokens": float(sum(lengths)),
        "response_len": sum(lengths) / len(lengths),
        "response_len_max": float(max(lengths)),
        "truncated": sum(r.finish_reason == "length" for r in rollouts) / len(lengths),
    }


def rollout_batch(run: "Run", prompts: Sequence[PromptEncoding], rollouts: Sequence[Rollout]) -> TeacherForcingBatch:
    """Teacher forcing of rollouts under per-conversation prompts (`prompts[r.prompt_index]`), on the run's device."""
    batch = build_batch([prompts[r.prompt_index] for r in rollouts], [r.token_ids for r in rollouts], pad_id(run.processor))
    return batch.to(run.device)


@torch.no_grad()
def sampled_logprobs(
    model: nn.Module,
    batch: TeacherForcingBatch,
    temperature: float = 1.0,
    chunk_size: int = 512,
    autocast_ctx: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> torch.Tensor:
    """Log-probs of the response tokens under `model` ([N], no grad): the "old" policy of a
    several-update step, or a reference model."""
    with autocast_ctx():
        h = response_hidden(model, batch)
        return chunked_logprobs(h, lm_head(model), batch.targets, temperature, chunk_size)


# ----------------------------------------------------------------------------- prompts


def view_conversation(
    sample: Sample, view: str, form: str, *, max_pixels: int | None, crop_margin: float, zoom: float
) -> Conversation:
    """The single-turn conversation a model sees for one view of a sample."""
    from zoomless.engines.base import conversation
    from zoomless.imaging import render_view
    from zoomless.prompts import format_question

    image, question = render_view(sample, view, crop_margin=crop_margin, zoom=zoom, max_pixels=max_pixels)
    return conversation([image], format_question(sample, question, form))


def end_of_turn_id(model: nn.Module, processor: Any) -> int:
    """The token that ends an assistant turn: the first generation eos id, else the tokenizer's eos."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    if eos is None:
        eos = processor.tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the model has no eos token id (generation_config.eos_token_id or tokenizer.eos_token_id)")
    return int(eos)


def pad_id(processor: Any) -> int:
    tok = processor.tokenizer
    return int(tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0))


# ----------------------------------------------------------------------------- run setup


@dataclass
class Run:
    """What every recipe starts from: the policy, its optimizer, data order and where it resumes."""

    device: torch.device
    dtype: torch.dtype  # autocast compute dtype
    model: nn.Module  # fp32 weights, train mode
    processor: Any
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    data: DataIterator
    samples: list[Sample]
    start_step: int
    resumed_from: Path | None
    extra_state: dict[str, Any]

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.dtype)


def start_run(cfg: Any) -> Run:
    """Seed, read the data, load the policy (from the last checkpoint when `cfg.resume`), build the
    optimizer and scheduler, and restore their state when resuming. `cfg` is a `TrainConfig`."""
    from zoomless.models.loading import load_vlm
    from zoomless.train.screening import make_data, read_training_samples

    device = pick_device(cfg.device)
    dtype = compute_dtype(cfg.dtype, device)
    seed_everything(cfg.seed)
    samples, sources = read_training_samples(cfg.data)
    load_dir, ckpt = resolve_start(cfg.model_dir, cfg.out_dir, cfg.resume)
    model, processor = load_vlm(load_dir, dtype=torch.float32, device=device)
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(model)
    model.requires_grad_(True)
    model.train()
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay)
    scheduler = warmup_constant_schedule(optimizer, cfg.warmup_steps)
    data = make_data(cfg, samples, sources, resume=ckpt is not None)  # the order, minus bad samples
    start_step, extra = 0, {}
    if ckpt is not None:
        state = load_trainer_state(ckpt, optimizer, scheduler, data)
        start_step, extra = int(state["step"]), state.get("extra", {})
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.json").write_text(cfg.model_dump_json(indent=2))  # what this run was asked to do
    return Run(device, dtype, model, processor, optimizer, scheduler, data, samples, start_step, ckpt, extra)


def should_save(step: int, max_steps: int, save_every: int) -> bool:
    return step == max_steps or (save_every > 0 and step % save_every == 0)


StepFn = Callable[[int, Timer], dict[str, float]]


def train_loop(cfg: Any, run: Run, step_fn: StepFn, show: Sequence[str], extra_models: dict[str, nn.Module] | None = None) -> Path:
    """The loop every recipe shares: `step_fn(step, timer)` from the start step to max_steps, with
    metrics (plus seconds per phase) logged every `log_every` steps and checkpoints every
    `save_every` and at the end. Returns the final checkpoint directory."""
    logger = MetricsLogger(cfg.out_dir, cfg.max_steps, run.start_step, cfg.tensorboard, cfg.progress, show=show)
    final = None
    try:
        for step in range(run.start_step + 1, cfg.max_steps + 1):
            timer = Timer()
            metrics = step_fn(step, timer)
            metrics.update({f"seconds/{k}": v for k, v in timer.seconds.items()})
            screen = getattr(run.data, "screen", None)
            if screen is not None:  # samples skipped so far (on_bad_sample: skip)
                metrics["bad_samples"] = float(len(screen.bad))
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                logger.log(step, metrics)
            else:
                logger.advance(step)
            if should_save(step, cfg.max_steps, cfg.save_every):
                final = save_checkpoint(
                    cfg.out_dir, step, run.model, run.processor, run.optimizer, run.scheduler, run.data, extra_models
                )
    finally:
        logger.close()
    return final if final is not None else checkpoint_dir(cfg.out_dir, cfg.max_steps)  # resumed a finished run


def hf_engine(model: nn.Module, processor: Any, batch_size: int) -> Engine:
    """The default rollout engine: the in-process HF engine around the live policy."""
    from zoomless.engines.hf import HFEngine

    return HFEngine(model, processor, batch_size=batch_size)
