"""Train and evaluate tiny VLMs on ZoomWorld tensors (`tensors.py`), every batch built on the device.

- `fit_sft`: cross-entropy on the gold answer, the view of each step drawn from a schedule of
  stages (e.g. crops only for the BASE; crops, then wider crops, then the full scene for the
  CEILING: a zoom-out curriculum).
- `fit_opd`: Vision-OPD without labels: the student samples answers on its view (the full scene),
  the teacher (frozen copy or EMA) scores them on the crop, loss = top-k + tail JSD
  (`train/losses.py`, the same functions `zoomless train opd` uses). Optional crop anchor: the same
  JSD with the student also on the crop, so that distilling the full view does not erode the crop.
- `synthesize_labels` + `fit_grpo`: R2I on ZoomWorld. The teacher (the BASE) answers each scene
  several times on the crop; answers it agrees on (majority share >= `min_agree`) become labels;
  the student then learns the full view by GRPO with reward 1 for an answer equal to the label.
  Gold answers are read only to report the labels' accuracy (the synthesis funnel).
- `evaluate`: greedy answers graded by `eval/grading.py`, per dimension.

Steps are time-budgeted: `max_steps=None` measures the first steps and fits the run (and its
learning-rate decay) into `seconds`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import re
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from zoomless.eval.grading import grade
from zoomless.train.ema import ema_update_
from zoomless.train.losses import gather_logprobs, grpo_advantages, topk_generalized_jsd, topk_ids
from zoomless.train.optim import build_optimizer
from zoomless.train.shared_images import encode_once, sharing_of, vision_module, vision_once
from zoomless.world.tensors import Batch, Bucket, WorldTensors, make_batch, parse_view


@dataclass
class Stage:
    """`steps` optimizer steps (a fraction of the run when below 1; 0: a share of what is left)
    whose views are drawn from `views` (name -> weight)."""

    steps: float
    views: dict[str, float]


def parse_schedule(text: str) -> list[Stage]:
    """'crop=1' (one stage, all steps) or '600:crop=1;600:crop@1.5=.7,crop=.3;0:full=.75,crop=.25'
    (steps per stage, or a fraction of the run such as 0.2; 0 = the rest of the run)."""
    stages = []
    for part in text.split(";"):
        # "<steps>:" is a leading number; view names may hold a colon themselves ("full:2")
        head = re.match(r"\s*([0-9.]+)\s*:(.*)$", part)
        steps, views = head.groups() if head else ("", part)
        weights = {}
        for item in views.split(","):
            name, _, w = item.partition("=")
            try:
                weights[name.strip()] = float(w) if w else 1.0
            except ValueError:
                raise ValueError(f"schedule {text!r}: bad weight in {item!r}") from None
            parse_view(name.strip())  # a bad view name fails here, before any rendering
        stages.append(Stage(float(steps) if steps else 0.0, weights))
    return stages


@dataclass
class FitConfig:
    lr: float = 5e-4
    batch: int = 128
    warmup: int = 100
    weight_decay: float = 0.01
    clip: float = 1.0
    seconds: float = 300.0  # wall-clock budget of the training loop
    max_steps: int | None = None  # None: fit the steps to `seconds` after 30 timed steps
    decay_fraction: float = 0.3  # the last 30% of steps decay the lr linearly to 10%
    eval_every: int = 500
    seed: int = 0


@dataclass
class RolloutConfig(FitConfig):
    """What the on-policy methods share: the student answers `rollouts` times per prompt on its view."""

    lr: float = 1e-4
    batch: int = 64  # prompts per step
    rollouts: int = 2  # sampled answers per prompt
    max_new: int = 8
    temperature: float = 1.0
    student_view: str = "full"
    warmup: int = 20
    decay_fraction: float = 0.0


@dataclass
class OPDConfig(RolloutConfig):
    top_k: int = 32
    alpha: float = 0.5
    teacher: str = "frozen"  # or "ema"
    ema_rate: float = 0.05
    teacher_view: str = "crop"
    crop_anchor: float = 0.0  # weight of the student-on-crop JSD term


@dataclass
class GRPOConfig(RolloutConfig):
    lr: float = 5e-5
    batch: int = 32
    rollouts: int = 8  # the group size


@dataclass
class History:
    """What a run logs: one dict per logged step, also written as JSON lines to `path`."""

    path: Path | None = None
    rows: list[dict] = field(default_factory=list)

    def log(self, row: dict) -> None:
        self.rows.append(row)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


# ----------------------------------------------------------------------------- forward pieces


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def token_logits(model: nn.Module, batch: Batch, responses: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
    """Logits [B, R, V] predicting each response token, and the valid mask [B, R]. Rows of one
    scene (the rollouts of a prompt) have one image: it is encoded once (`train/shared_images.py`)."""
    with encode_once(vision_module(model), sharing_of(batch.rows.tolist())):
        hidden = model.model(**batch.inputs, use_cache=False).last_hidden_state
    r = responses.shape[1]
    j = torch.arange(r, device=hidden.device)
    pos = (batch.answer_start.view(-1, 1) - 1 + j).clamp(max=hidden.shape[1] - 1)
    h = hidden.gather(1, pos.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    return model.get_output_embeddings()(h), j.view(1, -1) < lengths.view(-1, 1)


def pick(bucket_sizes: list[int], batch: int, gen: torch.Generator) -> tuple[int, Tensor]:
    """A bucket (chance proportional to its size) and `batch` random items of it."""
    sizes = torch.tensor(bucket_sizes, dtype=torch.float)
    k = int(torch.multinomial(sizes, 1, generator=gen))
    return k, torch.randint(bucket_sizes[k], (batch,), generator=gen)


@torch.no_grad()
def decode(model: nn.Module, data: WorldTensors, bucket: Bucket, picks: Tensor, stats: tuple, max_new: int = 8,
           temperature: float = 0.0, gen: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Answers of `model` for bucket items `picks`: ids [B, max_new] (pad after the end) and lengths
    (the end-of-turn token included when emitted). Greedy at temperature 0, else sampled.
    Recomputes the whole sequence per token: answers are a few tokens long."""
    dev = data.device
    b = len(picks)
    out = torch.full((b, max_new), data.pad_id, dtype=torch.long, device=dev)
    length = torch.zeros(b, dtype=torch.long, device=dev)
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    visual = vision_module(model)
    # the images are the same at every step: encode each distinct one once, for the whole loop
    with vision_once(visual), encode_once(visual, sharing_of(picks.tolist())):
        for t in range(max_new):
            if _decode_step(model, data, bucket, picks, stats, out, length, done, t, temperature, gen):
                break
    return out, length


def _decode_step(model: nn.Module, data: WorldTensors, bucket: Bucket, picks: Tensor, stats: tuple, out: Tensor,
                 length: Tensor, done: Tensor, t: int, temperature: float, gen: torch.Generator | None) -> bool:
    """One token for every unfinished row (written into `out`, `length`, `done` in place); True
    when every row has ended."""
    dev, b = data.device, len(picks)
    resp = (out[:, :t], length) if t else (None, None)
    batch = make_batch(data, bucket, picks, stats, with_answer=False, responses=resp[0], response_len=resp[1])
    with _autocast(dev):
        hidden = model.model(**batch.inputs, use_cache=False).last_hidden_state
        logits = model.get_output_embeddings()(hidden[torch.arange(b, device=dev), batch.lengths - 1]).float()
    logits[:, data.banned] = float("-inf")
    if temperature > 0:
        probs = torch.softmax(logits / temperature, dim=-1)
        nxt = torch.multinomial(probs.cpu(), 1, generator=gen).squeeze(1).to(dev)
    else:
        nxt = logits.argmax(-1)
    live = ~done
    out[live, length[live]] = nxt[live]
    length += live.long()
    done |= nxt == data.eos_id
    return bool(done.all())


def evaluate(model: nn.Module, data: WorldTensors, view: str, stats: tuple, tokenizer: Any, batch: int = 256,
             max_new: int = 8) -> dict[str, Any]:
    """Greedy accuracy on `view`: overall and per dimension (in %), and every prediction."""
    was_training = model.training
    model.eval()
    preds: dict[int, str] = {}
    for bucket in data.buckets[view]:
        for start in range(0, len(bucket.rows), batch):
            picks = torch.arange(start, min(start + batch, len(bucket.rows)), device=data.device)
            ids, lengths = decode(model, data, bucket, picks, stats, max_new)
            for row, seq, n in zip(bucket.rows[picks].tolist(), ids.tolist(), lengths.tolist()):
                preds[row] = tokenizer.decode(seq[:n], skip_special_tokens=True).strip()
    model.train(was_training)
    hits: dict[str, list[bool]] = defaultdict(list)
    for i, text in preds.items():
        sample = data.samples[i]
        ok = grade(sample, text, "open").correct
        hits[sample.dimension or "?"].append(ok)
        hits["all"].append(ok)
    acc = {k: round(100.0 * sum(v) / len(v), 2) for k, v in sorted(hits.items())}
    return {"view": view, "accuracy": acc, "n": len(preds), "predictions": [preds[i] for i in sorted(preds)]}


# ----------------------------------------------------------------------------- schedule and loop


def lr_factor(step: int, total: int, cfg: FitConfig) -> float:
    warm = min(1.0, (step + 1) / max(1, cfg.warmup))
    decay_start = total * (1 - cfg.decay_fraction)
    if cfg.decay_fraction <= 0 or step < decay_start:
        return warm
    return warm * (1.0 - 0.9 * min(1.0, (step - decay_start) / max(1.0, total - decay_start)))


def stage_at(stages: list[Stage], step: int, total: int) -> Stage:
    """The stage of `step`; stages given 0 steps share what the others leave of `total`."""
    sizes = [s.steps * total if 0 < s.steps < 1 else s.steps for s in stages]
    n_open = sum(1 for n in sizes if n == 0)
    spare = max(0.0, total - sum(sizes)) / max(1, n_open)
    end = 0.0
    for s, n in zip(stages, sizes):
        end += n or spare
        if step < end:
            return s
    return stages[-1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_loop(model: nn.Module, cfg: FitConfig, step_fn: Callable[[int, int], dict[str, float]],
             history: History, on_eval: Callable[[int], dict] | None = None,
             profile: Callable[[], contextlib.AbstractContextManager] | None = None) -> int:
    """Optimizer steps of `step_fn(step, total)` until `max_steps` or the time budget; returns the
    number of steps done. `on_eval(step)` runs every `eval_every` steps and at the end."""
    device = next(model.parameters()).device
    total = cfg.max_steps or 10**9
    t0 = time.perf_counter()
    step = 0
    while step < total:
        if cfg.max_steps is None and step == 10:  # the first steps pay for warm-up (cuDNN, allocator)
            _sync(device)
            t10 = time.perf_counter()
        if cfg.max_steps is None and step == 30:  # fit the run into the budget from 20 steady steps
            _sync(device)
            now = time.perf_counter()
            per_step = (now - t10) / 20
            total = max(31, 30 + int((cfg.seconds - (now - t0)) / per_step))
            history.log({"event": "budget", "seconds_per_step": round(per_step, 4), "steps": total})
        if profile is not None and step == 40:  # 5 steady-state steps under the profiler
            with profile():
                for _ in range(5):
                    metrics = step_fn(step, total)
                    step += 1
            continue
        metrics = step_fn(step, total)
        step += 1
        if step % 25 == 0 or step == 1:
            history.log({"step": step, "time": round(time.perf_counter() - t0, 2), **metrics})
        if on_eval is not None and cfg.eval_every and step % cfg.eval_every == 0:
            history.log({"step": step, "time": round(time.perf_counter() - t0, 2), **on_eval(step)})
        if time.perf_counter() - t0 > cfg.seconds * 1.05:  # the budget is a promise: stop
            history.log({"event": "time budget reached", "step": step})
            break
    if on_eval is not None and (not cfg.eval_every or step % cfg.eval_every):
        history.log({"step": step, "time": round(time.perf_counter() - t0, 2), **on_eval(step)})
    return step


def _optimizer(model: nn.Module, cfg: FitConfig):
    opt = build_optimizer(model.parameters(), cfg.lr, cfg.weight_decay)
    return opt


def _apply(model: nn.Module, opt: torch.optim.Optimizer, loss: Tensor, cfg: FitConfig, step: int, total: int) -> float:
    for g in opt.param_groups:
        g["lr"] = cfg.lr * lr_factor(step, total, cfg)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
    opt.step()
    return float(norm)


def _bucket_sizes(data: WorldTensors) -> dict[str, list[int]]:
    return {v: [len(b.rows) for b in bs] for v, bs in data.buckets.items()}


def fit_sft(model: nn.Module, data: WorldTensors, stages: list[Stage], stats: tuple, cfg: FitConfig,
            history: History, on_eval: Callable[[int], dict] | None = None, profile=None,
            fresh: Callable[[], WorldTensors | None] | None = None) -> int:
    """Supervised training on gold answers; the view of each step is drawn from its stage.
    `fresh()` (e.g. `FreshScenes.poll`) is asked before every step for new scenes to train on."""
    device = data.device
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = _optimizer(model, cfg)
    for s in stages:
        for v in s.views:
            if not data.buckets.get(v):
                raise ValueError(f"the schedule asks for view {v!r}, the data has {sorted(data.buckets)}")
    model.train()
    world = {"data": data, "sizes": _bucket_sizes(data)}

    def step_fn(step: int, total: int) -> dict[str, float]:
        new = fresh() if fresh is not None else None
        if new is not None:
            world.update(data=new, sizes=_bucket_sizes(new))
            history.log({"event": "fresh scenes", "step": step, "first_scene": new.samples[0].meta.get("index")})
        data, sizes = world["data"], world["sizes"]
        stage = stage_at(stages, step, total)
        names = list(stage.views)
        view = names[int(torch.multinomial(torch.tensor(list(stage.views.values())), 1, generator=gen))]
        k, picks = pick(sizes[view], cfg.batch, gen)
        bucket = data.buckets[view][k]
        picks = picks.to(device)
        batch = make_batch(data, bucket, picks, stats)
        answers, lengths = data.answer[batch.rows], data.answer_len[batch.rows]
        with _autocast(device):
            logits, valid = token_logits(model, batch, answers, lengths)
        loss = torch.nn.functional.cross_entropy(logits[valid].float(), answers[valid])
        norm = _apply(model, opt, loss, cfg, step, total)
        return {"loss": round(float(loss.detach()), 4), "grad_norm": round(norm, 3), "view": view}

    return run_loop(model, cfg, step_fn, history, on_eval, profile)


def view_logits(model: nn.Module, data: WorldTensors, view: str, rows: Tensor, responses: Tensor, lengths: Tensor,
                stats: tuple) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Logits for `responses` to samples `rows` seen in `view`, one forward per image size of that
    view: yields (positions in `rows`, logits [b, R, V], valid [b, R]) per size."""
    where = data.locate(view)[rows]
    for k in where[:, 0].unique().tolist():
        sel = (where[:, 0] == k).nonzero().squeeze(1)
        batch = make_batch(data, data.buckets[view][k], where[sel, 1], stats, with_answer=False,
                           responses=responses[sel], response_len=lengths[sel])
        with _autocast(data.device):
            logits, valid = token_logits(model, batch, responses[sel], lengths[sel])
        yield sel, logits, valid


@torch.no_grad()
def teacher_logits(teacher: nn.Module, data: WorldTensors, view: str, rows: Tensor, responses: Tensor,
                   lengths: Tensor, stats: tuple) -> Tensor:
    """Teacher logits [B, R, V] for `responses` to samples `rows` in `view`."""
    out = None
    for sel, logits, _ in view_logits(teacher, data, view, rows, responses, lengths, stats):
        if out is None:
            out = logits.new_zeros(len(rows), *logits.shape[1:])
        out[sel] = logits
    return out


def rollout(student: nn.Module, data: WorldTensors, stats: tuple, cfg: RolloutConfig,
            gen: torch.Generator) -> tuple[Batch, Tensor, Tensor, Tensor]:
    """`cfg.batch` random prompts of the student's view, each answered `cfg.rollouts` times by the
    student (sampled): the teacher-forcing batch of prompt + answer, sample rows, answers, lengths."""
    sizes = [len(b.rows) for b in data.buckets[cfg.student_view]]
    k, picks = pick(sizes, cfg.batch, gen)
    bucket = data.buckets[cfg.student_view][k]
    picks = picks.to(data.device).repeat_interleave(cfg.rollouts)
    student.eval()
    responses, lengths = decode(student, data, bucket, picks, stats, cfg.max_new, cfg.temperature, gen)
    student.train()
    batch = make_batch(data, bucket, picks, stats, with_answer=False, responses=responses, response_len=lengths)
    return batch, bucket.rows[picks], responses, lengths


def fit_opd(student: nn.Module, teacher: nn.Module, data: WorldTensors, stats: tuple, cfg: OPDConfig,
            history: History, on_eval: Callable[[int], dict] | None = None) -> int:
    """Vision-OPD from the crop to the full view, no labels read (see module doc)."""
    device = data.device
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = _optimizer(student, cfg)
    student.train()
    teacher.eval()

    def jsd(logits: Tensor, t_logits: Tensor, valid: Tensor) -> Tensor:
        s = logits[valid].float()
        ids = topk_ids(s.detach(), cfg.top_k)
        t = gather_logprobs(t_logits[valid].float(), ids)
        return topk_generalized_jsd(s, ids, t, cfg.alpha).mean()

    def step_fn(step: int, total: int) -> dict[str, float]:
        batch, rows, responses, lengths = rollout(student, data, stats, cfg, gen)
        t_logits = teacher_logits(teacher, data, cfg.teacher_view, rows, responses, lengths, stats)
        with _autocast(device):
            logits, valid = token_logits(student, batch, responses, lengths)
        loss = jsd(logits, t_logits, valid)
        metrics = {"jsd": round(float(loss.detach()), 4)}
        if cfg.crop_anchor > 0:  # the student on the teacher's view, pulled to the teacher there too
            parts = view_logits(student, data, cfg.teacher_view, rows, responses, lengths, stats)
            anchor_loss = sum(jsd(lg, t_logits[sel], vd) * len(sel) for sel, lg, vd in parts) / len(rows)
            metrics["anchor_jsd"] = round(float(anchor_loss.detach()), 4)
            loss = loss + cfg.crop_anchor * anchor_loss
        norm = _apply(student, opt, loss, cfg, step, total)
        if cfg.teacher == "ema":
            ema_update_(teacher, student, cfg.ema_rate)
        metrics.update(grad_norm=round(norm, 3), response_len=round(float(lengths.float().mean()), 2))
        return metrics

    return run_loop(student, cfg, step_fn, history, on_eval)


@torch.no_grad()
def synthesize_labels(teacher: nn.Module, data: WorldTensors, stats: tuple, view: str = "crop", votes: int = 5,
                      min_agree: float = 0.6, max_new: int = 8, temperature: float = 1.0, seed: int = 0,
                      batch: int = 256) -> tuple[WorldTensors, dict[str, float]]:
    """R2I's consensus step on ZoomWorld: `teacher` answers every scene `votes` times on `view`;
    scenes whose most common answer has at least `min_agree` of the votes keep it as their label.
    Returns the kept scenes with those labels, and the funnel (counts, label accuracy vs gold)."""
    gen = torch.Generator().manual_seed(seed)
    teacher.eval()
    answers: dict[int, tuple[int, ...]] = {}
    share: dict[int, float] = {}
    for bucket in data.buckets[view]:
        for start in range(0, len(bucket.rows), batch):
            picks = torch.arange(start, min(start + batch, len(bucket.rows)), device=data.device)
            ids, lengths = decode(teacher, data, bucket, picks.repeat_interleave(votes), stats, max_new, temperature, gen)
            seqs = [tuple(x[:n]) for x, n in zip(ids.tolist(), lengths.tolist())]
            for j, row in enumerate(bucket.rows[picks].tolist()):
                group = seqs[j * votes:(j + 1) * votes]
                best = max(set(group), key=group.count)
                answers[row], share[row] = best, group.count(best) / votes
    keep = sorted(r for r in answers if share[r] >= min_agree and answers[r] and answers[r][-1] == data.eos_id)
    correct = sum(bool(torch.equal(torch.tensor(answers[r], device=data.device),
                                   data.answer[r, : data.answer_len[r]])) for r in keep)
    funnel = {"scenes": len(answers), "kept": len(keep), "kept_share": round(100.0 * len(keep) / max(1, len(answers)), 1),
              "label_accuracy": round(100.0 * correct / max(1, len(keep)), 1)}
    return relabel(data, {r: answers[r] for r in keep}), funnel


def relabel(data: WorldTensors, labels: dict[int, tuple[int, ...]]) -> WorldTensors:
    """The scenes in `labels` only (same sample indices), with those answers as their targets."""
    if not labels:
        raise ValueError("no scene has a label: the teacher's votes agreed on none (lower min_agree, add votes)")
    rows = torch.tensor(sorted(labels), dtype=torch.long, device=data.device)
    keep = torch.zeros(len(data), dtype=torch.bool, device=data.device)
    keep[rows] = True
    width = max(len(a) for a in labels.values())
    answer = torch.full((len(data), width), data.pad_id, dtype=torch.long, device=data.device)
    answer_len = torch.zeros(len(data), dtype=torch.long, device=data.device)
    for r, a in labels.items():
        answer[r, : len(a)] = torch.tensor(a, device=data.device)
        answer_len[r] = len(a)
    buckets = {}
    for view, bs in data.buckets.items():
        buckets[view] = [type(b)(b.view, b.rows[keep[b.rows]], b.pixels[keep[b.rows]]) for b in bs if keep[b.rows].any()]
    out = copy.copy(data)
    out.buckets, out.answer, out.answer_len = buckets, answer, answer_len
    return out


def fit_grpo(student: nn.Module, data: WorldTensors, stats: tuple, cfg: GRPOConfig, history: History,
             on_eval: Callable[[int], dict] | None = None) -> int:
    """GRPO on the full view against `data`'s answers (the synthesized labels): reward 1 for an
    answer whose tokens equal the label's, group-normalised advantages, one on-policy update per
    batch of rollouts (so the PPO ratio is 1 and needs no clipping)."""
    device = data.device
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = _optimizer(student, cfg)

    def step_fn(step: int, total: int) -> dict[str, float]:
        batch, rows, responses, lengths = rollout(student, data, stats, cfg, gen)
        label, label_len = data.answer[rows], data.answer_len[rows]
        w = max(responses.shape[1], label.shape[1])
        pad = lambda x: torch.nn.functional.pad(x, (0, w - x.shape[1]), value=data.pad_id)  # noqa: E731
        same = (pad(responses) == pad(label)) | (torch.arange(w, device=device) >= lengths.view(-1, 1))
        reward = (same.all(1) & (lengths == label_len)).float()
        adv = grpo_advantages(reward.view(-1, cfg.rollouts)).view(-1)
        with _autocast(device):
            logits, valid = token_logits(student, batch, responses, lengths)
        logp = torch.log_softmax(logits.float(), -1).gather(-1, responses.unsqueeze(-1)).squeeze(-1)
        loss = -(adv.view(-1, 1) * logp * valid).sum() / valid.sum().clamp(min=1)
        norm = _apply(student, opt, loss, cfg, step, total)
        return {"reward": round(float(reward.mean()), 4), "loss": round(float(loss.detach()), 4),
                "grad_norm": round(norm, 3), "response_len": round(float(lengths.float().mean()), 2)}

    return run_loop(student, cfg, step_fn, history, on_eval)


def gap_closed(full_base: float, full_after: float, full_ceiling: float) -> float | None:
    """Share of the base-to-ceiling full-view gap that a method closed, in %."""
    span = full_ceiling - full_base
    if span <= 0 or math.isnan(span):
        return None
    return round(100.0 * (full_after - full_base) / span, 1)
