"""Supervised fine-tuning on sample records: the gold answer as the target, loss on answer tokens only.

The target is the answer in the asked form (the option letter for multiple choice, the answer text
for open questions) followed by the end-of-turn token. The view is fixed or drawn per sample from a
weighted mix; the draw depends only on (seed, step, index), so a resumed run draws the same views.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.multiprocessing as tmp

from zoomless.prompts import gold_letter, sample_form
from zoomless.sample import Sample
from zoomless.train.batching import PromptEncoding, encode_prompt, lm_head, response_hidden
from zoomless.train.checkpoints import checkpoint_dir, save_checkpoint, should_save
from zoomless.train.common import Run, device_batch, end_of_turn_id, start_run
from zoomless.train.config import SFTConfig
from zoomless.train.data import chunks
from zoomless.train.losses import chunked_logprobs
from zoomless.train.metrics import MetricsLogger, Timer
from zoomless.train.optim import clip_and_step
from zoomless.train.screening import screen_samples
from zoomless.train.views import view_conversation


def pick_view(view: str | dict[str, float], seed: int, step: int, index: int) -> str:
    if isinstance(view, str):
        return view
    names = list(view)
    return random.Random(f"{seed}:{step}:{index}").choices(names, weights=[view[n] for n in names])[0]


def target_text(sample: Sample, form: str) -> str:
    """The gold answer as the model should write it: the letter (MCQ) or the answer text (open)."""
    if sample_form(sample, form) == "mcq":
        letter = gold_letter(sample)
        if letter is None:
            raise ValueError(f"sample {sample.id}: no gold option letter to train on")
        return letter
    if not sample.answer:
        raise ValueError(f"sample {sample.id}: no gold 'answer' to train on")
    return sample.answer


def target_ids(processor, sample: Sample, form: str, eos_id: int) -> list[int]:
    return processor.tokenizer(target_text(sample, form), add_special_tokens=False)["input_ids"] + [eos_id]


def check_views(samples: list[Sample], view: str | dict[str, float]) -> None:
    """Fail before training if a sample lacks the box that a view it may be shown in needs."""
    needs_box = [v for v in ([view] if isinstance(view, str) else [v for v, w in view.items() if w > 0]) if v != "full"]
    for s in samples:
        if needs_box and s.box is None:
            raise ValueError(f"sample {s.id}: the {needs_box[0]!r} view needs a 'box' and it has none")


def encode_example(processor, cfg: SFTConfig, sample: Sample, view: str, eos: int) -> tuple[PromptEncoding, list[int]]:
    """The prompt of one view of a sample and its target ids: all the per-sample CPU work of a step."""
    conv = view_conversation(sample, view, cfg.form, max_pixels=cfg.max_pixels, crop_margin=cfg.crop_margin, zoom=cfg.zoom)
    return encode_prompt(processor, conv), target_ids(processor, sample, cfg.form, eos)


# What forked data workers read: set in the parent just before the pool forks (nothing is pickled).
_WORKER: dict[str, Any] = {}


def _worker_init() -> None:
    torch.set_num_threads(1)  # many one-thread workers, not many workers each spawning all cores


def _encode_in_worker(job: tuple[Sample, str]) -> tuple[PromptEncoding, list[int]]:
    return encode_example(_WORKER["processor"], _WORKER["cfg"], job[0], job[1], _WORKER["eos"])


def _probe_in_worker(sample: Sample) -> bool:
    try:
        _WORKER["probe"](sample)
        return True
    except (ValueError, OSError):  # probed again in the training process, which reports it
        return False


@contextmanager
def data_pool(cfg: SFTConfig, run: Run) -> Iterator[Any]:
    """A pool of `cfg.data_workers` forked processes (None for 0). Tensors come back through shared
    memory (torch.multiprocessing), so a full-view batch is not copied through a pipe. The pool
    also runs the first-draw probes of new samples (rendering their views), in parallel."""
    if cfg.data_workers == 0:
        yield None
        return
    _WORKER.update(processor=run.processor, cfg=cfg, eos=end_of_turn_id(run.model, run.processor),
                   probe=run.data.probe)
    pool = tmp.get_context("fork").Pool(cfg.data_workers, initializer=_worker_init)
    run.data.probe_many = lambda samples: pool.map(_probe_in_worker, samples, chunksize=_chunk(len(samples), cfg))
    try:
        yield pool
    finally:
        run.data.probe_many = None
        pool.terminate()
        pool.join()
        _WORKER.clear()


def _chunk(n: int, cfg: SFTConfig) -> int:
    return max(1, n // (4 * cfg.data_workers))


class BatchFeed:
    """Encoded batches for consecutive steps. With data workers the next step's batch is drawn and
    encoded while this step runs on the device; `data_state` is the data order as of the last batch
    handed out, which is what a checkpoint saves (the batch drawn ahead is drawn again on resume)."""

    def __init__(self, cfg: SFTConfig, run: Run, pool: Any) -> None:
        self.cfg, self.run, self.pool = cfg, run, pool
        self.eos = end_of_turn_id(run.model, run.processor)
        self.ahead: tuple[int, Any] | None = None  # (step, pending result)
        self.data_state = run.data.state_dict()

    def _draw(self, step: int) -> list[tuple[Sample, str]]:
        batch = [self.run.samples[i] for i in self.run.data.next_batch()]
        # i: the sample's index in the global batch (this process's slice starts at run.data.offset)
        return [(s, pick_view(self.cfg.view, self.cfg.seed, step, i)) for i, s in enumerate(batch, self.run.data.offset)]

    def get(self, step: int) -> list[tuple[PromptEncoding, list[int]]]:
        if self.pool is None:
            encoded = [encode_example(self.run.processor, self.cfg, s, v, self.eos) for s, v in self._draw(step)]
            self.data_state = self.run.data.state_dict()
            return encoded
        if self.ahead is None or self.ahead[0] != step:
            jobs = self._draw(step)
            self.ahead = (step, self.pool.map_async(_encode_in_worker, jobs, chunksize=_chunk(len(jobs), self.cfg)))
        encoded = self.ahead[1].get()
        self.data_state = self.run.data.state_dict()
        if step < self.cfg.max_steps:  # start the next batch now; it is ready when this step ends
            jobs = self._draw(step + 1)
            self.ahead = (step + 1, self.pool.map_async(_encode_in_worker, jobs, chunksize=_chunk(len(jobs), self.cfg)))
        return encoded


def sft_step(cfg: SFTConfig, run: Run, step: int, timer: Timer, feed: BatchFeed) -> dict[str, float]:
    """One optimizer step on `batch_size` samples: a global token mean of the answer cross-entropy."""
    with timer("data"):  # with data workers: only the wait for the batch encoded during the last step
        encoded = feed.get(step)
        prompts = [p for p, _ in encoded]
        responses = [r for _, r in encoded]
    total_tokens = run.dist.sum({"tokens": float(sum(len(r) for r in responses))})["tokens"]  # over all processes
    head = lm_head(run.model)
    loss_sum = 0.0
    micro = list(chunks(range(len(prompts)), cfg.micro_batch_size))
    with timer("forward_backward"):
        for j, idx in enumerate(micro):
            tf = device_batch(run, [prompts[i] for i in idx], [responses[i] for i in idx])
            with run.dist.grad_sync(run.policy, sync=j == len(micro) - 1):  # DDP reduces after the last one
                with run.autocast():
                    hidden = response_hidden(run.policy, tf)
                logp = chunked_logprobs(hidden, head, tf.targets, chunk_size=cfg.logits_chunk_size)
                # backprop per micro-batch, global token-mean denominator (train/distributed.py)
                loss = -logp.sum() / run.dist.denominator(total_tokens)
                run.backward(loss)
            loss_sum += loss.item()
    loss_sum = run.dist.sum({"loss": loss_sum})["loss"] / run.dist.world
    lr = run.optimizer.param_groups[0]["lr"]
    with timer("step"):
        grad_norm, applied = clip_and_step(run, cfg.grad_clip)
    return {"loss": loss_sum, "tokens": total_tokens, "grad_norm": grad_norm, "skipped": float(not applied), "lr": lr}


def train_sft(cfg: SFTConfig) -> Path:
    """Run supervised fine-tuning; return the final checkpoint directory (a standard HF model dir)."""
    run = start_run(cfg)
    views = [cfg.view] if isinstance(cfg.view, str) else [v for v, w in cfg.view.items() if w > 0]
    view = dict(max_pixels=cfg.max_pixels, crop_margin=cfg.crop_margin, zoom=cfg.zoom)
    screen_samples(  # bad samples stop the run or are skipped (cfg.on_bad_sample), before any work
        run, check=lambda s: (check_views([s], cfg.view), target_text(s, cfg.form)),
        probe=lambda s: [view_conversation(s, v, cfg.form, **view) for v in views],
    )
    logger = MetricsLogger(
        cfg.out_dir, cfg.max_steps, run.start_step, cfg.tensorboard, cfg.progress, show=("loss",),
        enabled=run.dist.is_main,
    )
    final = None
    try:
        with data_pool(cfg, run) as pool:  # None without data_workers: encode in this process
            feed = BatchFeed(cfg, run, pool)
            for step in range(run.start_step + 1, cfg.max_steps + 1):
                timer = Timer()
                metrics = sft_step(cfg, run, step, timer, feed)
                metrics.update({f"seconds/{k}": v for k, v in timer.seconds.items()})
                metrics["bad_samples"] = float(len(run.data.screen.bad))  # skipped so far (on_bad_sample: skip)
                if step % cfg.log_every == 0 or step == cfg.max_steps:
                    logger.log(step, metrics)
                else:
                    logger.advance(step)
                if should_save(step, cfg.max_steps, cfg.save_every):
                    final = save_checkpoint(run, cfg.out_dir, step, data_state=feed.data_state)
    finally:
        logger.close()
    return final if final is not None else checkpoint_dir(cfg.out_dir, cfg.max_steps)  # resumed a finished run
