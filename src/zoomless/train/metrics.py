"""What a run reports: per-step metrics (jsonl, TensorBoard, a progress bar) and seconds per phase."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Iterator, Sequence

import torch


def read_values(values: dict[str, float | torch.Tensor]) -> dict[str, float]:
    """`values` as floats, the tensors among them read from the GPU at once: the recipes keep their
    per-micro-batch sums on the GPU, so that the CPU prepares the next micro-batch while the GPU
    still runs this one's backward, and read them once per step (each read waits for the GPU)."""
    tensors = {k: v for k, v in values.items() if isinstance(v, torch.Tensor)}
    read = torch.stack([t.detach().double().reshape(()) for t in tensors.values()]).tolist() if tensors else []
    read_back = dict(zip(tensors, read))
    return {k: read_back[k] if k in read_back else float(v) for k, v in values.items()}


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
