"""The run every training recipe starts from and the loop they share: device and precision, the
policy with its optimizer and data order (`start_run`), device batches, and `train_loop` (metrics,
checkpoints, the garbage collector between steps). Nothing method-specific lives here; a recipe is a
step function over these parts and those of its neighbours: `optim` (the clipped step), `data` (the
order), `checkpoints`, `metrics`, `rollouts` and `views` (a step's prompts).

Everything runs on one process or data-parallel on several (`accelerate launch`, DDP or FSDP2):
`train/distributed.py` says what changes with several processes and why the result does not.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import gc
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from zoomless.sample import Sample
from zoomless.train.batching import (
    PromptEncoding,
    TeacherForcingBatch,
    build_batch,
    lm_head,
    response_hidden,
    with_positions,
)
from zoomless.train.checkpoints import checkpoint_dir, load_trainer_state, resolve_start, save_checkpoint, should_save
from zoomless.train.data import DataIterator
from zoomless.train.distributed import Dist, make_accelerator, prepare_policy
from zoomless.train.losses import chunked_logprobs
from zoomless.train.master import MasterWeights
from zoomless.train.metrics import MetricsLogger, Timer
from zoomless.train.optim import build_optimizer, warmup_constant_schedule
from zoomless.train.prefetch import Prefetcher
from zoomless.train.shared_images import vision_module

# ----------------------------------------------------------------------------- device and precision


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


def enable_activation_checkpointing(model: nn.Module, uncheckpointed_layers: int = 0,
                                    checkpoint_vision: bool = True) -> None:
    """Recompute each layer's activations in the backward pass (newer transformers renamed the API),
    except in the last `uncheckpointed_layers` decoder layers: they keep theirs, trading their
    activation memory for less recompute. The last ones, because the backward frees them first,
    before the gradients of the earlier layers take up their memory. Without `checkpoint_vision`
    the vision tower's blocks keep theirs too: a few GB at 3B, and the recompute they save is
    launch-bound (many small kernels for little math: docs/PERFORMANCE_LOG.md)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    keep = list(model.get_decoder().layers[-uncheckpointed_layers:]) if uncheckpointed_layers else []
    visual = vision_module(model)
    if not checkpoint_vision and visual is not None:
        keep += [m for m in visual.modules() if hasattr(m, "gradient_checkpointing")]
    for layer in keep:
        layer.gradient_checkpointing = False  # HF's GradientCheckpointingLayer checks it on each call


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- batches


def device_batch(
    run: "Run", prompts: Sequence[PromptEncoding], responses: Sequence[Sequence[int]], distinct_pixels: bool = True
) -> TeacherForcingBatch:
    """`build_batch` on the CPU, with the position ids made there (`with_positions`), sent to the run's device.
    A batch without padding goes without its all-ones attention mask: transformers would read it
    back from the GPU to find that out (a host sync per forward), then attend causally, as without."""
    batch = with_positions(run.model, build_batch(prompts, responses, pad_id(run.processor), distinct_pixels))
    if "position_ids" in batch.inputs and bool(batch.inputs["attention_mask"].all()):
        batch = replace(batch, inputs={k: v for k, v in batch.inputs.items() if k != "attention_mask"})
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
    several-update step, or a reference model. `model` may be a training wrapper (`run.policy`)."""
    with autocast_ctx():
        h = response_hidden(model, batch)
        return chunked_logprobs(h, lm_head(model), batch.targets, temperature, chunk_size)


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
    model: nn.Module  # the HF model: fp32 weights, train mode (under FSDP its parameters are shards)
    processor: Any
    optimizer: torch.optim.Optimizer  # accelerate's wrapper around AdamW
    scheduler: torch.optim.lr_scheduler.LRScheduler
    data: DataIterator  # gives this process's slice of each batch
    samples: list[Sample]
    start_step: int
    resumed_from: Path | None
    extra_state: dict[str, Any]
    policy: nn.Module  # what training forwards go through: a ResponseModel around `model` (in DDP, or sharded)
    dist: Dist  # this process among the training processes (one, without a launcher)
    master: MasterWeights | None = None  # bf16_weights: the fp32 weights the optimizer updates
    prefetch: Prefetcher = field(default_factory=Prefetcher)  # the next batch's prompts, made during this step

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.dtype)

    @functools.cached_property
    def worker_processor(self) -> Any:
        """The processor the prefetch thread encodes with: a copy of its own, since a fast tokenizer
        called from two threads at once may fail ("Already borrowed": one call changing its padding
        settings while the other encodes) and the main thread's engine uses `processor`."""
        return copy.deepcopy(self.processor)

    def fp32_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The model's weights at full precision when `model` holds bf16 copies; None otherwise (then
        the model's own state dict is that)."""
        return self.master.fp32_state_dict(self.model) if self.master else None

    def fp32_parameters(self) -> dict[str, torch.Tensor]:
        """The trainable weights by name, at full precision (what an EMA teacher averages)."""
        return self.master.fp32_parameters(self.model) if self.master else dict(self.model.named_parameters())

    def backward(self, loss: torch.Tensor) -> None:
        self.dist.accelerator.backward(loss)


def start_run(cfg: Any) -> Run:
    """Seed, read the data, load the policy (from the last checkpoint when `cfg.resume`), build the
    optimizer and scheduler, hand the policy and optimizer to accelerate (DDP or FSDP when launched
    on several processes), and restore their state when resuming. `cfg` is a `TrainConfig`."""
    from zoomless.models.loading import load_vlm
    from zoomless.train.screening import make_data, read_training_samples

    dist = Dist(make_accelerator(cfg.device, cfg.dtype))
    device = dist.accelerator.device
    dtype = torch.bfloat16 if cfg.bf16_weights else compute_dtype(cfg.dtype, device)
    if cfg.bf16_weights and dist.world > 1:
        raise ValueError("bf16_weights is for one process: under FSDP the sharded weights already stay fp32 and are "
                         "gathered in bf16 for compute; with DDP leave it off")
    seed_everything(cfg.seed)
    samples, sources = read_training_samples(cfg.data)
    load_dir, ckpt = resolve_start(cfg.model_dir, cfg.out_dir, cfg.resume)
    model, processor = load_vlm(load_dir, dtype=torch.float32, device=device)
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(model, cfg.uncheckpointed_layers, cfg.checkpoint_vision)
    if cfg.compile_blocks:
        from zoomless.models.compiled import compile_blocks

        compile_blocks(model, vision_tower=cfg.compile_vision_tower)
    model.requires_grad_(True)
    model.train()
    master = MasterWeights(model) if cfg.bf16_weights else None  # the model becomes bf16, the masters fp32
    # the masters are plain fp32 tensors of one process: the fused kernel is safe there (0.09 -> 0.05 s
    # per 3B step, docs/PERFORMANCE_LOG.md; torch has it for CPUs too); sharded and DDP weights keep the
    # default foreach kernels
    fused = master is not None
    optimizer = build_optimizer(master.masters if master else model.parameters(), cfg.lr, cfg.weight_decay, fused)
    # not handed to accelerate, which would step it once per process: the global batch, and so
    # the number of optimizer steps, are the single-process run's
    scheduler = warmup_constant_schedule(optimizer, cfg.warmup_steps)
    policy, optimizer = prepare_policy(dist, model, optimizer)
    data = make_data(cfg, samples, sources, resume=ckpt is not None, main=dist.is_main)  # the order, minus bad samples
    data.shard(dist.rank, dist.world)
    run = Run(device, dtype, model, processor, optimizer, scheduler, data, samples, 0, ckpt, {}, policy, dist, master)
    if ckpt is not None:
        state = load_trainer_state(run, ckpt)
        run.start_step, run.extra_state = int(state["step"]), state.get("extra", {})
    if dist.is_main:
        out = Path(cfg.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(cfg.model_dump_json(indent=2))  # what this run was asked to do
    return run


StepFn = Callable[[int, Timer], dict[str, float]]


class CollectBetweenSteps:
    """Python's cyclic garbage collector, run between training steps instead of inside them.

    A run holds about half a million Python objects (transformers, torch, compiled graphs): a full
    collection of them took 0.3 s on this project's CPU machine and 0.47 s on the H100's host.
    Left on, Python starts one at whatever point the allocation counts cross its thresholds; inside
    a step the GPU, whose launch queue the host keeps only a few milliseconds ahead, idles that
    long. So the collector is off for the whole `with` block (the loop). Switched back on between
    steps, as it was until 2026-12-07, it still started one after a step: once ten young
    collections had passed and a compile had added many objects, the next allocation began a full
    collection (the one slow step in eight measured on the H100). `after_step` collects the young
    generations (under a millisecond) and, every `full_every` steps, everything (as torchtitan
    does). Nothing is frozen (`gc.freeze`, which would make those full collections cheap): an
    object alive at the freeze that later dies in a reference cycle, such as a replaced KV cache,
    would hold its GPU memory until the run ends."""

    def __init__(self, full_every: int = 100) -> None:
        self.full_every = full_every
        self.was_enabled = gc.isenabled()

    def __enter__(self) -> "CollectBetweenSteps":
        self.was_enabled = gc.isenabled()
        gc.disable()
        return self

    def after_step(self, step: int) -> None:
        gc.collect(2 if step % self.full_every == 0 else 1)

    def __exit__(self, *exc: Any) -> None:
        if self.was_enabled:
            gc.enable()


def train_loop(cfg: Any, run: Run, step_fn: StepFn, show: Sequence[str], extra_models: dict[str, nn.Module] | None = None) -> Path:
    """The loop every recipe shares: `step_fn(step, timer)` from the start step to max_steps, with
    metrics (plus seconds per phase) logged every `log_every` steps and checkpoints every
    `save_every` and at the end (only the main process writes). Returns the final checkpoint directory."""
    logger = MetricsLogger(
        cfg.out_dir, cfg.max_steps, run.start_step, cfg.tensorboard, cfg.progress, show=show, enabled=run.dist.is_main
    )
    final = None
    try:
        with CollectBetweenSteps() as collector:
            for step in range(run.start_step + 1, cfg.max_steps + 1):
                timer = Timer()
                metrics = step_fn(step, timer)
                collector.after_step(step)
                metrics.update({f"seconds/{k}": v for k, v in timer.seconds.items()})
                screen = getattr(run.data, "screen", None)
                if screen is not None:  # samples skipped so far (on_bad_sample: skip)
                    metrics["bad_samples"] = float(len(screen.bad))
                if step % cfg.log_every == 0 or step == cfg.max_steps:
                    logger.log(step, metrics)
                else:
                    logger.advance(step)
                if should_save(step, cfg.max_steps, cfg.save_every):
                    final = save_checkpoint(run, cfg.out_dir, step, extra_models)
    finally:
        run.prefetch.close()  # the worker thread; a batch prepared beyond the last step is dropped
        logger.close()
    return final if final is not None else checkpoint_dir(cfg.out_dir, cfg.max_steps)  # resumed a finished run
