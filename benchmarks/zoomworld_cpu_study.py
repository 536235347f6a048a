"""CPU study: why the ZoomWorld BASE (crop-only SFT, MCQ) stays at chance. Small, single-thread runs.

    PYTHONPATH=src python benchmarks/zoomworld_cpu_study.py probe
    PYTHONPATH=src python benchmarks/zoomworld_cpu_study.py colors --form mcq --order shuffled --lr 1e-4 3e-4 1e-3
    PYTHONPATH=src python benchmarks/zoomworld_cpu_study.py zoomworld --dims color --form mcq --lr 1e-3

Every run trains a fresh `build_tiny_vlm` model with the SFT recipe's pieces (load_vlm with the
batched vision attention, `build_batch`, `response_hidden`, `chunked_logprobs`, AdamW with weight
decay on matrices, linear warm-up then constant, clip 1.0), on prompts encoded once up front, and
logs the loss per response position (the letter, then <|im_end|>) and the accuracy on held-out
items (teacher-forced: the argmax of the first response token over the whole vocabulary, and for
open answers every token of the answer and the end token).

- `probe`: per-position loss at init, image vs text embedding scale, per-module grad norms, and
  whether the answer logits move at all when the image changes.
- `colors`: a solid-colour 112-px image, "What color is the image?"; `--order fixed` keeps the
  options in one order (the letter is a function of the colour), `shuffled` shuffles them per item
  as ZoomWorld does (the model must match the colour to an option in the text), `--form open`
  answers with the colour word, `--form mix` trains half the items open and half MCQ (held-out
  items are asked as `--eval-form`, MCQ by default).
- `zoomworld`: ZoomWorld crop views (scene 448, the generator's panels), some or all dimensions.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image

torch.set_num_threads(1)  # a shared 2-core machine

from zoomless.engines.base import conversation
from zoomless.imaging import render_view
from zoomless.models.loading import load_vlm
from zoomless.models.tiny import build_tiny_vlm
from zoomless.prompts import format_question
from zoomless.sample import Sample
from zoomless.train.batching import build_batch, encode_prompt, lm_head, response_hidden
from zoomless.train.common import end_of_turn_id, pad_id
from zoomless.train.losses import chunked_logprobs
from zoomless.train.optim import build_optimizer, warmup_constant_schedule
from zoomless.train.sft import target_ids
from zoomless.world import generate_sample

WORK = Path("/tmp/zoomworld_cpu_study")
SOLID = {"red": (220, 30, 40), "green": (30, 150, 60), "blue": (35, 85, 220), "yellow": (235, 200, 0)}


# ----------------------------------------------------------------------------- data: (prompt, target ids, sample)


def encode(processor, sample: Sample, image: Image.Image, question: str, form: str, eos: int):
    if form == "mix":  # half the items open (answer word), half MCQ (letter), drawn per item
        form = "open" if random.Random(sample.id).random() < 0.5 else "mcq"
    conv = conversation([image], format_question(sample, question, form))
    return encode_prompt(processor, conv), target_ids(processor, sample, form, eos), sample


def color_items(processor, eos: int, n: int, seed: int, form: str, order: str, size: int = 112) -> list:
    rng = random.Random(seed)
    names = list(SOLID)
    out = []
    for i in range(n):
        colour = names[rng.randrange(4)]
        px = np.clip(np.array(SOLID[colour], np.int16) + np.random.default_rng(seed * 10**6 + i).integers(
            -20, 21, (size, size, 3)), 0, 255).astype(np.uint8)  # a little noise, so no two images are equal
        options = list(names) if order == "fixed" else rng.sample(names, 4)
        s = Sample(id=f"c{i}", image=f"c{i}.png", question="What color is the image?", answer=colour, options=tuple(options),
                   dimension="color")
        out.append(encode(processor, s, Image.fromarray(px), s.question, form, eos))
    return out


def zoomworld_items(processor, eos: int, n: int, split: str, dims: list[str], form: str, min_area: float,
                    max_area: float, view: str = "crop", size: int = 448) -> list:
    out = []
    for i in range(n):
        image, s = generate_sample(i, split=split, size=size, dimensions=dims, min_area_fraction=min_area,
                                   max_area_fraction=max_area)
        view_image, question = render_view(s, view, image, crop_margin=0.25, max_pixels=size * size)
        out.append(encode(processor, s, view_image, question, form, eos))
    return out


# ----------------------------------------------------------------------------- model, step, eval


def fresh_model(size: str, seed: int = 0):
    d = build_tiny_vlm(WORK / f"init-{size}-{seed}", size=size, seed=seed, max_pixels=448 * 448)
    model, processor = load_vlm(d, dtype=torch.float32, device="cpu")
    model.requires_grad_(True)
    return model, processor


def forward_logp(model, processor, items) -> torch.Tensor:
    batch = build_batch([p for p, _, _ in items], [r for _, r, _ in items], pad_id(processor))
    hidden = response_hidden(model, batch)
    return chunked_logprobs(hidden, lm_head(model), batch.targets), batch


def position_losses(logp: torch.Tensor, lengths: list[int]) -> tuple[float, float]:
    """Mean -log p of the first response token (the letter) and of the last (<|im_end|>)."""
    starts = np.cumsum([0] + lengths[:-1])
    first = -logp[torch.as_tensor(starts)].mean().item()
    last = -logp[torch.as_tensor(starts + np.array(lengths) - 1)].mean().item()
    return first, last


@torch.no_grad()
def evaluate(model, processor, items, form: str, chunk: int = 64) -> dict:
    """Teacher-forced accuracy: every response token is the argmax over the vocabulary; the first
    token's distribution of predictions; the per-position loss."""
    model.eval()
    head = lm_head(model)
    correct, firsts, l1, l2 = 0, Counter(), [], []
    for k in range(0, len(items), chunk):
        part = items[k:k + chunk]
        batch = build_batch([p for p, _, _ in part], [r for _, r, _ in part], pad_id(processor))
        logits = head(response_hidden(model, batch)).float()
        pred = logits.argmax(-1)
        logp = torch.log_softmax(logits, -1).gather(1, batch.targets[:, None])[:, 0]
        a, b = position_losses(logp, batch.lengths)
        l1.append(a * len(part)); l2.append(b * len(part))
        start = 0
        for n in batch.lengths:
            ok = bool((pred[start:start + n] == batch.targets[start:start + n]).all())
            correct += ok
            firsts[processor.tokenizer.decode([int(pred[start])])] += 1
            start += n
    model.train()
    n = len(items)
    return {"acc": round(correct / n, 4), "loss_first": round(sum(l1) / n, 4), "loss_last": round(sum(l2) / n, 4),
            "top_first_tokens": dict(firsts.most_common(5))}


def module_grad_norms(model) -> dict[str, float]:
    groups: dict[str, float] = {}
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        key = ("visual." + name.split("visual.")[1].split(".")[0]) if "visual." in name else (
            "embed_tokens" if "embed_tokens" in name else "language_model")
        groups[key] = groups.get(key, 0.0) + p.grad.float().pow(2).sum().item()
    return {k: round(math.sqrt(v), 5) for k, v in groups.items()}


def train(model, processor, train_items, test_items, *, lr: float, steps: int, batch: int, warmup: int,
          form: str, eval_every: int, seed: int = 0, log=print) -> dict:
    rng = random.Random(seed)
    opt = build_optimizer(model.parameters(), lr, 0.01)
    sched = warmup_constant_schedule(opt, warmup)
    model.train()
    curve, evals, t0 = [], [], time.perf_counter()
    order: list[int] = []
    for step in range(1, steps + 1):
        if len(order) < batch:  # epochs over the training items, reshuffled
            more = list(range(len(train_items)))
            rng.shuffle(more)
            order += more
        idx, order = order[:batch], order[batch:]
        logp, tf = forward_logp(model, processor, [train_items[i] for i in idx])
        loss = -logp.mean()
        loss.backward()
        grads = module_grad_norms(model) if step in (1, steps) or step % eval_every == 0 else None
        norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        opt.step(); sched.step(); opt.zero_grad(set_to_none=True)
        first, last = position_losses(logp.detach(), tf.lengths)
        curve.append({"step": step, "loss": round(loss.item(), 4), "letter": round(first, 4), "eos": round(last, 4),
                      "grad_norm": round(norm, 3)})
        if step % eval_every == 0 or step == steps:
            ev = evaluate(model, processor, test_items, form)
            ev.update(step=step, seconds=round(time.perf_counter() - t0, 1), grads=grads,
                      train_loss=round(statistics.mean(c["loss"] for c in curve[-eval_every:]), 4),
                      train_letter=round(statistics.mean(c["letter"] for c in curve[-eval_every:]), 4))
            evals.append(ev)
            log(json.dumps(ev))
    return {"lr": lr, "steps": steps, "batch": batch, "warmup": warmup, "evals": evals,
            "max_grad_norm": max(c["grad_norm"] for c in curve),
            "curve_every_10": [c for c in curve if c["step"] % 10 == 0]}


# ----------------------------------------------------------------------------- subcommands


def cmd_probe(a: argparse.Namespace) -> dict:
    """Per-position loss at init and after a few steps, embedding scales, image sensitivity."""
    model, processor = fresh_model(a.model_size)
    eos = end_of_turn_id(model, processor)
    items = zoomworld_items(processor, eos, 32, "train", ["color"], "mcq", 0.005, 0.03)
    res: dict = {}
    with torch.no_grad():
        logp, tf = forward_logp(model, processor, items)
        res["init_loss_letter_eos"] = position_losses(logp, tf.lengths)
        inner = model.model
        p, _, _ = items[0]
        img = inner.get_image_features(p.vision["pixel_values"], p.vision["image_grid_thw"])
        img = torch.cat(list(img.pooler_output if hasattr(img, "pooler_output") else img))
        txt = inner.get_input_embeddings()(p.input_ids)
        res["rms_image_tokens"] = img.pow(2).mean().sqrt().item()
        res["rms_text_tokens"] = txt.pow(2).mean().sqrt().item()
        res["pixel_values_mean_std"] = [p.vision["pixel_values"].mean().item(), p.vision["pixel_values"].std().item()]
    logp, tf = forward_logp(model, processor, items)
    (-logp.mean()).backward()
    res["grad_norms_init"] = module_grad_norms(model)
    model.zero_grad(set_to_none=True)
    # Does the letter distribution depend on the image at init? One prompt text with 8 solid-colour
    # images of one size (ZoomWorld crops differ in size, so their image token counts differ).
    with torch.no_grad():
        colours = color_items(processor, eos, 8, 0, "mcq", "fixed")
        a0, b0, _ = colours[0]
        swapped = [(type(a0)(a0.input_ids, a0.mm_token_type_ids, c[0].vision), b0, None) for c in colours]
        batch = build_batch([p for p, _, _ in swapped], [r for _, r, _ in swapped], pad_id(processor))
        logits = lm_head(model)(response_hidden(model, batch)).float()[:: len(b0)]
        res["letter_logit_spread_over_images"] = (logits.max(0).values - logits.min(0).values).abs().max().item()
        res["images_compared"] = len(swapped)
    return res


def cmd_colors(a: argparse.Namespace) -> dict:
    out = {}
    for lr in a.lr:
        model, processor = fresh_model(a.model_size, a.seed)
        eos = end_of_turn_id(model, processor)
        tr = color_items(processor, eos, a.train_n, 1, a.form, a.order)
        te = color_items(processor, eos, a.test_n, 2, a.eval_form, a.order)
        print(f"colors form={a.form} order={a.order} lr={lr}", flush=True)
        out[str(lr)] = train(model, processor, tr, te, lr=lr, steps=a.steps, batch=a.batch, warmup=a.warmup,
                             form=a.eval_form, eval_every=a.eval_every, seed=a.seed)
    return out


def cmd_zoomworld(a: argparse.Namespace) -> dict:
    out = {}
    dims = a.dims.split(",") if a.dims != "all" else ["counting", "ocr", "color", "structure", "material", "object"]
    for lr in a.lr:
        model, processor = fresh_model(a.model_size, a.seed)
        eos = end_of_turn_id(model, processor)
        t0 = time.perf_counter()
        tr = zoomworld_items(processor, eos, a.train_n, "train", dims, a.form, a.min_area, a.max_area, a.view, a.size)
        te = zoomworld_items(processor, eos, a.test_n, "test", dims, a.eval_form, a.min_area, a.max_area, a.view, a.size)
        print(f"zoomworld dims={a.dims} form={a.form} lr={lr}: data in {time.perf_counter() - t0:.1f}s", flush=True)
        res = train(model, processor, tr, te, lr=lr, steps=a.steps, batch=a.batch, warmup=a.warmup, form=a.eval_form,
                    eval_every=a.eval_every, seed=a.seed)
        if len(dims) > 1:  # final accuracy per dimension
            res["final_by_dimension"] = {d: evaluate(model, processor, [t for t in te if t[2].dimension == d], a.eval_form)["acc"]
                                         for d in dims}
        for view in a.also_eval:  # the same test scenes in another view (e.g. full after crop training)
            other = zoomworld_items(processor, eos, a.test_n, "test", dims, a.eval_form, a.min_area, a.max_area, view,
                                    a.size)
            res[f"final_{view}"] = {d: evaluate(model, processor, [t for t in other if t[2].dimension == d],
                                                a.eval_form)["acc"] for d in dims}
            res[f"final_{view}"]["all"] = evaluate(model, processor, other, a.eval_form)["acc"]
            print(view, json.dumps(res[f"final_{view}"]), flush=True)
        out[str(lr)] = res
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("probe", "colors", "zoomworld"):
        s = sub.add_parser(name)
        s.add_argument("--model-size", default="small")
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--json", type=Path, help="write the results here")
        if name == "probe":
            continue
        s.add_argument("--form", choices=["mcq", "open", "mix"], default="mcq", help="training form; mix: half open")
        s.add_argument("--eval-form", choices=["mcq", "open"], help="held-out form (default: --form, mcq for mix)")
        s.add_argument("--lr", type=float, nargs="+", default=[1e-3])
        s.add_argument("--steps", type=int, default=200)
        s.add_argument("--batch", type=int, default=16)
        s.add_argument("--warmup", type=int, default=20)
        s.add_argument("--eval-every", type=int, default=50)
        s.add_argument("--train-n", type=int, default=2000)
        s.add_argument("--test-n", type=int, default=200)
        if name == "colors":
            s.add_argument("--order", choices=["fixed", "shuffled"], default="shuffled")
        else:
            s.add_argument("--dims", default="color", help="comma-separated dimensions, or all")
            s.add_argument("--view", default="crop")
            s.add_argument("--min-area", type=float, default=0.005)
            s.add_argument("--max-area", type=float, default=0.03)
            s.add_argument("--size", type=int, default=448, help="scene side in pixels (also the pixel budget)")
            s.add_argument("--also-eval", nargs="*", default=[], help="views to evaluate at the end too")
    a = p.parse_args()
    if a.cmd != "probe" and a.eval_form is None:
        a.eval_form = "mcq" if a.form == "mix" else a.form
    WORK.mkdir(parents=True, exist_ok=True)
    res = {"probe": cmd_probe, "colors": cmd_colors, "zoomworld": cmd_zoomworld}[a.cmd](a)
    res = {"args": {k: str(v) for k, v in vars(a).items()}, "results": res}
    print(json.dumps(res if a.cmd == "probe" else {k: v["evals"][-1] for k, v in res["results"].items()}, indent=1))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    sys.exit(main())
