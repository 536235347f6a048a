"""The shared core of every training recipe: device, seeding, optimizer, data order, checkpoints,
logging and rollouts. Nothing method-specific lives here; a recipe is a short loop over these parts.

Checkpoints are standard HF directories, `out_dir/checkpoint-000042/`: the student (save_pretrained)
and its processor, any extra models (an EMA teacher) in subdirectories, and `trainer_state.pt` with
the optimizer, scheduler, RNG and data-order state, so `resume` continues exactly where it stopped.

Everything runs on one process or data-parallel on several (`accelerate launch`, DDP or FSDP2):
`train/distributed.py` says what changes with several processes and why the result does not.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import gc
import json
import math
import random
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from zoomless.engines.base import Conversation, Engine, Generation, SamplingParams
from zoomless.sample import Sample, read_samples
from zoomless.train.batching import (
    PromptEncoding, TeacherForcingBatch, build_batch, encode_prompt, lm_head, response_hidden, with_positions,
)
from zoomless.train.distributed import (
    Dist,
    export_pretrained,
    gathered_for_generation,
    load_sharded_optimizer,
    make_accelerator,
    prepare_policy,
    reshard,
    save_sharded_optimizer,
)
from zoomless.train.losses import chunked_logprobs
from zoomless.train.master import MasterWeights
from zoomless.train.prefetch import Prefetcher
from zoomless.train.shared_images import vision_module

STATE_FILE = "trainer_state.pt"
CHECKPOINT_PREFIX = "checkpoint-"
SHARDED_OPTIMIZER = "optimizer"  # FSDP: the optimizer state, one torch.distributed.checkpoint shard per process
RANK_RNG_FILE = "rng_state_{rank}.pt"  # the RNG state of each process after the first


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
    launch-bound (many small kernels for little math: docs/PERFORMANCE.md)."""
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


# ----------------------------------------------------------------------------- optimizer


def build_optimizer(
    params: Iterable[torch.Tensor], lr: float, weight_decay: float, fused: bool = False
) -> torch.optim.AdamW:
    """AdamW (betas 0.9/0.999) over `params` (e.g. `model.parameters()`); weight decay on matrices
    only, not on norms and biases. `fused`: torch's one-kernel AdamW (CUDA or CPU tensors)."""
    decay, no_decay = [], []
    for p in params:
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.999), fused=fused or None)


def warmup_constant_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over `warmup_steps` updates (the first already has lr/warmup, not 0), then constant."""
    if warmup_steps == 0:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 1.0)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: min(1.0, (k + 1) / warmup_steps))


def clip_and_step(run: "Run", grad_clip: float) -> tuple[float, bool]:
    """Clip gradients, step the optimizer and scheduler; skip the update if the norm is not finite.
    With several processes the norm is that of the reduced gradients, the same on every process.

    Returns (grad norm before clipping, whether the update was applied).
    """
    from torch.distributed.tensor import DTensor

    if run.dist.fsdp:
        reshard(run.policy)  # the optimizer updates the fp32 shards: no gathered copy may outlive them
    if run.master:  # whose AdamW is torch's fused one (start_run)
        # the update and the copy to the bf16 weights are queued before the norm is read (a skipped
        # update leaves the masters as they were: copying them changes nothing); the masters are
        # stepped a chunk at a time, so that only a chunk's gradients exist in fp32 at once
        norm_t = total_norm(run.master.grads())  # the list dies here: each held gradient is freed in its chunk
        clip_inside_fused_step(run.optimizer, norm_t, grad_clip, run.master.in_chunks())
        run.master.copy_to_model()
        norm = float(norm_t)
    else:
        params = [p for p in run.policy.parameters() if p.requires_grad]
        norm_t = run.dist.accelerator.clip_grad_norm_(params, grad_clip)
        norm = float(norm_t.full_tensor() if isinstance(norm_t, DTensor) else norm_t)
        if math.isfinite(norm):
            run.optimizer.step()
    applied = math.isfinite(norm)
    if applied:
        run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return norm, applied


def read_values(values: dict[str, float | torch.Tensor]) -> dict[str, float]:
    """`values` as floats, the tensors among them read from the GPU at once: the recipes keep their
    per-micro-batch sums on the GPU, so that the CPU prepares the next micro-batch while the GPU
    still runs this one's backward, and read them once per step (each read waits for the GPU)."""
    tensors = {k: v for k, v in values.items() if isinstance(v, torch.Tensor)}
    read = torch.stack([t.detach().double().reshape(()) for t in tensors.values()]).tolist() if tensors else []
    read_back = dict(zip(tensors, read))
    return {k: read_back[k] if k in read_back else float(v) for k, v in values.items()}


def total_norm(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all `grads` together, in fp32 whatever their dtype (bf16 ones held by
    MasterWeights)."""
    norms = torch._foreach_norm(list(grads), 2, dtype=torch.float32) if grads else [torch.zeros(())]
    return torch.linalg.vector_norm(torch.stack(norms))


def clip_inside_fused_step(
    optimizer: Any, norm: torch.Tensor, max_norm: float, chunks: Iterable[Any] = (None,)
) -> None:
    """Step a fused AdamW (`fused=True`, one process) on its parameters' gradients, whose norm is
    `norm` (`total_norm`), clipped to `max_norm` (`norm` stays a tensor: no wait for the GPU before
    the step is queued). `chunks`: the step runs once per item, each time on the parameters whose
    gradients are set then (`MasterWeights.in_chunks`); by default once.

    The kernel divides each gradient by `grad_scale` and skips the update (step count included)
    where `found_inf` is set: the hooks GradScaler uses. Passing the clip coefficient's inverse
    there saves `clip_grad_norm_`'s pass over every gradient (11 ms of a 3B step) and its host sync
    on the norm: the same update as clipping first (tests/test_train_common.py)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    inner.grad_scale = torch.clamp((norm + 1e-6) / max_norm, min=1.0)  # clip_grad_norm_'s coefficient, inverted
    inner.found_inf = (~torch.isfinite(norm)).float()
    try:
        for _ in chunks:
            optimizer.step()
    finally:
        del inner.grad_scale, inner.found_inf


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
    With several processes each one draws the same global batch and keeps its own contiguous slice
    (`shard`): the union over processes is the single-process batch, and the state stays global.
    """

    def __init__(self, n_items: int, batch_size: int, seed: int = 0, shuffle: bool = True) -> None:
        if n_items < 1:
            raise ValueError("DataIterator needs at least one item")
        self.n_items, self.batch_size, self.seed, self.shuffle = n_items, batch_size, seed, shuffle
        self.epoch, self.position = 0, 0
        self.rank, self.world = 0, 1

    def shard(self, rank: int, world: int) -> None:
        """From now on `next_batch` gives process `rank`'s slice of each global batch of `world`."""
        if self.batch_size % world:
            raise ValueError(
                f"batch_size {self.batch_size} is not a multiple of the {world} processes: "
                "each one takes an equal slice"
            )
        self.rank, self.world = rank, world

    @property
    def offset(self) -> int:
        """Where this process's slice starts in the global batch."""
        return self.rank * (self.batch_size // self.world)

    def _order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.n_items))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n_items, generator=g).tolist()

    def next_batch(self) -> list[int]:
        """This process's slice of the next global batch (all of it on one process)."""
        batch = self.global_batch()
        return batch[self.offset : self.offset + self.batch_size // self.world]

    def global_batch(self) -> list[int]:
        return self.take(self.batch_size)

    def peek_batch(self) -> list[int]:
        """The indices `next_batch` gives next, the state left exactly as it is (a checkpoint saves
        it): what the next step's prompts are prepared for ahead of time (`step_prompts`)."""
        batch = self.peek_global_batch()
        return batch[self.offset : self.offset + self.batch_size // self.world]

    def peek_global_batch(self) -> list[int]:
        with self.state_kept():
            return self.take(self.batch_size)

    @contextlib.contextmanager
    def state_kept(self) -> Iterator[None]:
        """Draw inside the block as far as you like: the order's state is restored after it."""
        epoch, position = self.epoch, self.position
        try:
            yield
        finally:
            self.epoch, self.position = epoch, position

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
    run: "Run",
    out_dir: Path,
    step: int,
    extra_models: dict[str, nn.Module] | None = None,
    extra_state: dict[str, Any] | None = None,
    data_state: dict[str, Any] | None = None,
) -> Path:
    """Write `out_dir/checkpoint-{step}` atomically (to a temporary folder, then renamed).

    `data_state` replaces the data order's current state (a loader that draws ahead passes the
    state as of the last batch it trained on).

    Every process calls this. The main process writes the HF directories and `trainer_state.pt`;
    the others only their RNG state, and under FSDP their shard of the optimizer state.
    """
    dist = run.dist
    final = checkpoint_dir(out_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    export_pretrained(dist, run.policy if dist.fsdp else run.model, tmp, run.fp32_state_dict())
    for name, extra in (extra_models or {}).items():  # each a standard model dir of its own
        export_pretrained(dist, extra, tmp / name)
        if dist.is_main:
            run.processor.save_pretrained(tmp / name)
    if dist.fsdp:
        save_sharded_optimizer(run.policy, run.optimizer, tmp / SHARDED_OPTIMIZER)
    if dist.rank > 0:
        torch.save(_rng_state(), tmp / RANK_RNG_FILE.format(rank=dist.rank))
    if dist.is_main:
        run.processor.save_pretrained(tmp)
        state = {
            "step": step,
            "optimizer": None if dist.fsdp else run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "data": run.data.state_dict() if data_state is None else data_state,
            "rng": _rng_state(),
            "extra": extra_state or {},
            "processes": dist.world,
        }
        torch.save(state, tmp / STATE_FILE)
    dist.barrier()
    if dist.is_main:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    dist.barrier()
    return final


def last_checkpoint(out_dir: Path) -> Path | None:
    """The highest-step complete checkpoint in `out_dir`, or None."""
    found = [
        p for p in Path(out_dir).glob(f"{CHECKPOINT_PREFIX}*")
        if p.is_dir() and not p.name.endswith(".tmp") and (p / STATE_FILE).exists()
    ]
    return max(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]), default=None)


def load_trainer_state(run: "Run", ckpt: Path) -> dict[str, Any]:
    """Restore optimizer, scheduler, data order and RNG from a checkpoint; return the full state."""
    state = torch.load(Path(ckpt) / STATE_FILE, map_location="cpu", weights_only=False)
    if state["optimizer"] is None:  # written under FSDP: one shard per process
        if not run.dist.fsdp:
            raise ValueError(f"{ckpt}: its optimizer state is sharded (FSDP); resume it under FSDP too")
        load_sharded_optimizer(run.policy, run.optimizer, Path(ckpt) / SHARDED_OPTIMIZER)
    else:
        run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.data.load_state_dict(state["data"])
    own = Path(ckpt) / RANK_RNG_FILE.format(rank=run.dist.rank)
    rng = state["rng"] if run.dist.rank == 0 or not own.exists() else torch.load(own, weights_only=False)
    _set_rng_state(rng)
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
        show: Sequence[str] = ("loss",), enabled: bool = True,
    ) -> None:
        self.enabled = enabled  # False on all processes but the main one: they log nothing
        self.writer = self.progress = None
        if not enabled:
            return
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
        if not self.enabled:
            return
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
    """Accumulates seconds per named phase: `with timer("rollout"): ...`. Host time: the GPU may
    still run a phase's work after it ends. Each phase is also a range in torch.profiler traces."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            with torch.profiler.record_function(f"phase:{name}"):
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


PADDING = "padding"  # finish_reason of a placeholder rollout: a zero-weight micro-batch (train/distributed.py)


def padding_rollout(run: "Run") -> Rollout:
    """A one-token placeholder under the first prompt, for a process with fewer micro-batches than
    the others: it runs the same passes and contributes nothing (its loss is multiplied by 0)."""
    return Rollout(0, [end_of_turn_id(run.model, run.processor)], None, "", PADDING)


def is_padding(rollouts: Sequence[Rollout]) -> bool:
    return len(rollouts) == 1 and rollouts[0].finish_reason == PADDING


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
    policy: nn.Module | None = None,
) -> RolloutBatch:
    """Sample `params.n` responses per conversation with the policy; drop unusable ones.

    `model` (the policy inside the engine) is put in eval mode for sampling and back in train mode
    after; `policy` (its training wrapper) has its parameters gathered meanwhile when FSDP shards them.
    """
    was_training = model.training if model is not None else False
    if model is not None:
        model.eval()
    try:
        gathered = gathered_for_generation(policy) if policy is not None else contextlib.nullcontext()
        with torch.no_grad(), gathered, (autocast_ctx or contextlib.nullcontext()):
            generations = engine.generate(list(conversations), params)
    finally:
        if model is not None and was_training:
            model.train()
    return filter_generations(generations, banned_ids)


def sampling_params(cfg: Any, step: int, rank: int = 0) -> SamplingParams:
    """The rollout sampling of one step (`cfg` has n, temperature, top_p, max_new_tokens, seed).
    The seed is a pure function of the step (and of the process, which samples its own prompts),
    so a resumed run samples what the straight run did."""
    return SamplingParams(
        n=cfg.n, temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
        seed=cfg.seed * 1_000_003 + step + rank * 2**32,
    )


def rollout_counts(rb: RolloutBatch, dist: Dist | None = None) -> dict[str, float]:
    """Dropped and sampled rollouts (summed over processes when `dist` is given)."""
    counts = {"dropped": float(rb.dropped), "dropped_vision": float(rb.dropped_vision), "rollouts": float(rb.total)}
    return dist.sum(counts) if dist is not None else counts


def response_stats(rollouts: Sequence[Rollout], dist: Dist | None = None) -> dict[str, float]:
    """Token count, mean and max response length, and the share cut at max_new_tokens (over all
    processes when `dist` is given)."""
    lengths = [len(r.token_ids) for r in rollouts]
    sums = {"tokens": float(sum(lengths)), "n": float(len(lengths)),
            "truncated": float(sum(r.finish_reason == "length" for r in rollouts))}
    longest = {"max": float(max(lengths, default=0))}
    if dist is not None:
        sums, longest = dist.sum(sums), dist.max(longest)
    n = max(sums["n"], 1.0)
    return {
        "tokens": sums["tokens"],
        "response_len": sums["tokens"] / n,
        "response_len_max": longest["max"],
        "truncated": sums["truncated"] / n,
    }


def rollout_batch(run: "Run", prompts: Sequence[PromptEncoding], rollouts: Sequence[Rollout]) -> TeacherForcingBatch:
    """Teacher forcing of rollouts under per-conversation prompts (`prompts[r.prompt_index]`), on the run's device."""
    return device_batch(run, [prompts[r.prompt_index] for r in rollouts], [r.token_ids for r in rollouts])


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


@dataclass
class StepPrompts:
    """A batch's prompts: each sample in the student's view (the conversation the rollout engine
    samples under, and its encoding) and, where the recipe has a teacher, encoded in the teacher's view."""

    conversations: list[Conversation]
    student: list[PromptEncoding]
    teacher: list[PromptEncoding] | None


def encode_views(
    processor: Any, samples: Sequence[Sample], student_view: str, teacher_view: str | None, view: dict[str, Any]
) -> StepPrompts:
    """Render and encode a batch's views (`view`: `view_conversation`'s keyword arguments). Pure:
    no random draws, the same prompts on any thread."""
    conversations = [view_conversation(s, student_view, **view) for s in samples]
    student = [encode_prompt(processor, c) for c in conversations]
    teacher = None
    if teacher_view is not None:
        teacher = [encode_prompt(processor, view_conversation(s, teacher_view, **view)) for s in samples]
    return StepPrompts(conversations, student, teacher)


def step_prompts(
    run: "Run", indices: Sequence[int], student_view: str, teacher_view: str | None, view: dict[str, Any],
    ahead: bool = True, probes_these_views: bool = False,
) -> StepPrompts:
    """The prompts of this step's batch (`indices`, from `run.data.next_batch()`), and, with `ahead`,
    the next batch's started in the background (`run.prefetch`): they need no weights, so rendering
    and encoding them overlaps this step's rollout, forwards and backwards. The prefetch is a cache
    keyed by the indices and the views: what comes back is what `encode_views` gives here.
    `probes_these_views`: the data's first-draw probe renders exactly these views, so a batch
    prepared ahead without error is vouched for (`ScreenedData.vouch`) and not rendered again."""
    views = (student_view, teacher_view, tuple(sorted(view.items())))
    vouch = getattr(run.data, "vouch", None) if probes_these_views else None

    def prepare(batch: Sequence[int], processor: Any) -> Callable[[], StepPrompts]:
        def job() -> StepPrompts:
            prompts = encode_views(processor, [run.samples[i] for i in batch], student_view, teacher_view, view)
            if vouch is not None:
                vouch(batch)
            return prompts

        return job

    prompts = run.prefetch.get((views, tuple(indices)), prepare(indices, run.processor))
    if ahead:
        upcoming = run.data.peek_batch()
        run.prefetch.ahead((views, tuple(upcoming)), prepare(upcoming, run.worker_processor))
    return prompts


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
    # per 3B step, docs/PERFORMANCE.md; torch has it for CPUs too); sharded and DDP weights keep the
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


def should_save(step: int, max_steps: int, save_every: int) -> bool:
    return step == max_steps or (save_every > 0 and step % save_every == 0)


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


def hf_engine(model: nn.Module, processor: Any, batch_size: int) -> Engine:
    """The default rollout engine: the in-process HF engine around the live policy."""
    from zoomless.engines.hf import HFEngine

    return HFEngine(model, processor, batch_size=batch_size)
