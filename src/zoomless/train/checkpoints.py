"""Checkpoints are standard HF directories, `out_dir/checkpoint-000042/`: the student
(save_pretrained) and its processor, any extra models (an EMA teacher) in subdirectories, and
`trainer_state.pt` with the optimizer, scheduler, RNG and data-order state, so `resume` continues
exactly where it stopped."""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from zoomless.train.distributed import export_pretrained, load_sharded_optimizer, save_sharded_optimizer

if TYPE_CHECKING:
    from zoomless.train.common import Run

STATE_FILE = "trainer_state.pt"
CHECKPOINT_PREFIX = "checkpoint-"
SHARDED_OPTIMIZER = "optimizer"  # FSDP: the optimizer state, one torch.distributed.checkpoint shard per process
RANK_RNG_FILE = "rng_state_{rank}.pt"  # the RNG state of each process after the first


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


def should_save(step: int, max_steps: int, save_every: int) -> bool:
    return step == max_steps or (save_every > 0 and step % save_every == 0)
