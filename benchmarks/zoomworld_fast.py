"""ZoomWorld BASE and CEILING (issue 7) and Vision-OPD from the BASE (issue 8), with batches built
on the GPU (`zoomless.world.tensors`, `zoomless.world.trainer`).

    # BASE (crops only) and CEILING (zoom-out curriculum to the full scene), fresh init, seed 0
    python benchmarks/zoomworld_fast.py models --out $OUT --base-seconds 200 --ceiling-seconds 220
    # Vision-OPD variants (no labels) and R2I GRPO variants (labels voted by the BASE on crops)
    # from the BASE, each against the BASE and CEILING, --seeds seeds each
    python benchmarks/zoomworld_fast.py opd --base DIR --ceiling DIR --out $OUT \\
        --variant plain:lr=1e-4 --variant anchor:lr=1e-4,crop_anchor=1 --grpo-variant r2i:lr=5e-5

The model is the shipped BASE's architecture and tokenizer (`--arch`), initialised from scratch
with `--seed`. Train, val and test scenes come from disjoint seeds streams (split names hashed);
val steers nothing automatically and test is only read at the end. Writes to `--out`:
results.json, logs/history_<run>.jsonl, profile.txt, and the models as <name>.tar.gz (bf16).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

from zoomless.train.common import end_of_turn_id
from zoomless.world.scene import parse_panels
from zoomless.world.stream import FreshScenes
from zoomless.world.tensors import WorldSpec, build_world, image_stats
from zoomless.world.trainer import (
    FitConfig,
    GRPOConfig,
    History,
    OPDConfig,
    evaluate,
    fit_grpo,
    fit_opd,
    fit_sft,
    gap_closed,
    parse_schedule,
    synthesize_labels,
)

ROOT = Path(__file__).resolve().parent.parent
ARCH = ROOT / "src/zoomless/assets/zoomworld-base"
BASE_SCHEDULE = "crop=1"
# Zoom-out: the crop, then the panel with one and then 2.5 panel sizes of context, then the scene.
CEILING_SCHEDULE = "0.15:crop@1=.6,crop=.4;0.15:crop@2.5=.6,crop@1=.2,crop=.2;0:full=.7,crop@2.5=.1,crop@1=.1,crop=.1"


def log(*args) -> None:
    print(time.strftime("%H:%M:%S"), *args, flush=True)


def fresh_model(arch: Path, seed: int, device: torch.device):
    """The architecture and processor of `arch`, weights initialised from scratch with `seed`."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from zoomless.models.fast_vision import patch_vision_attention
    from zoomless.models.loading import load_processor

    config = AutoConfig.from_pretrained(arch, local_files_only=True)
    config.dtype = "float32"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config).float()
    model.generation_config = copy.deepcopy(
        AutoModelForImageTextToText.from_pretrained(arch, local_files_only=True).generation_config)
    patch_vision_attention(model)
    return model.to(device), load_processor(arch, max_pixels=224 * 224)


def load(path: Path, device: torch.device):
    from zoomless.models.loading import load_vlm

    return load_vlm(path, dtype=torch.float32, device=device, max_pixels=224 * 224)


def save_bf16(model, processor, out: Path, name: str) -> Path:
    """The model as <out>/<name>.tar.gz holding a standard HF directory with bf16 weights."""
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / name
        shipped = copy.deepcopy(model).to("cpu", torch.bfloat16)
        shipped.save_pretrained(d)
        processor.save_pretrained(d)
        with tarfile.open(out / f"{name}.tar.gz", "w:gz") as tar:
            tar.add(d, arcname=name)
    return out / f"{name}.tar.gz"


def world_spec(args, split: str) -> WorldSpec:
    """The scenes of one split; the train split alone may have its own world seed (fresh scenes)."""
    train = split == "train"
    return WorldSpec(split=split, seed=args.train_seed if train else args.world_seed, size=args.size,
                     min_area_fraction=args.min_area, max_area_fraction=args.max_area, frame_fraction=args.frame,
                     panels=args.panels, ocr=args.ocr,
                     locate_share=getattr(args, "locate_share", 0.0) if train else 0.0)


def worlds(args, processor, eos: int, device, train_views) -> dict:
    out = {}
    val_views = ("full", "crop", *getattr(args, "val_views", ()))
    for split, n, views in (("train", args.train_n, train_views), ("val", args.val_n, val_views),
                            ("test", args.test_n, ("full", "crop"))):
        t = time.perf_counter()
        out[split] = build_world(world_spec(args, split), n, views, processor, eos, device=device,
                                 workers=args.workers, progress=False)
        log(f"{split}: {n} scenes, views {list(views)}, {time.perf_counter() - t:.1f} s")
    return out


def dual_view(model, data, stats, tokenizer) -> dict:
    res = {v: evaluate(model, data, v, stats, tokenizer)["accuracy"] for v in ("full", "crop")}
    res["gap"] = {k: round(res["crop"][k] - res["full"].get(k, 0.0), 2) for k in res["crop"]}
    return res


def profiler(out: Path):
    def ctx():
        prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]
                                      + ([torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else []))

        class Ctx:
            def __enter__(self):
                prof.__enter__()

            def __exit__(self, *exc):
                prof.__exit__(*exc)
                key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
                with open(out / "profile.txt", "a") as f:
                    f.write("## by self CPU time\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
                    f.write("\n## by self device time\n" + prof.key_averages().table(sort_by=key, row_limit=25) + "\n")
        return Ctx()
    return ctx


def train_sft_run(name, model, data, stats, processor, args, schedule, seconds, lr, out, results, profile=False,
                  fresh=None):
    cfg = FitConfig(lr=lr, batch=args.batch, warmup=args.warmup, seconds=seconds, eval_every=args.eval_every,
                    seed=args.seed)
    hist = History(out / "logs" / f"history_{name}.jsonl")
    last = {}  # run_loop always evaluates at its final step: that result is the run's val row

    def on_eval(step):
        last["val"] = r = dual_view(model, data["val"], stats, processor.tokenizer)
        row = {"val_full": r["full"]["all"], "val_crop": r["crop"]["all"]}
        for view in args.val_views:  # easier full views, to see which part of the task is learned
            row[f"val_{view}"] = evaluate(model, data["val"], view, stats, processor.tokenizer)["accuracy"]["all"]
        log(f"{name} step {step}: " + " ".join(f"{k} {v}" for k, v in row.items()))
        return row

    t = time.perf_counter()
    sets_before = fresh.chunks if fresh else 1
    steps = fit_sft(model, data["train"], parse_schedule(schedule), stats, cfg, hist, on_eval,
                    profile=profiler(out) if profile else None, fresh=fresh.poll if fresh else None)
    wall = time.perf_counter() - t
    budget = next((r for r in hist.rows if r.get("event") == "budget"), {})
    results[name] = {
        "schedule": schedule, "steps": steps, "seconds": round(wall, 1), "batch": args.batch, "lr": lr,
        "seconds_per_step": budget.get("seconds_per_step"), "samples_seen": steps * args.batch,
        "val": last["val"], "test": dual_view(model, data["test"], stats, processor.tokenizer),
        "train_scene_sets": (fresh.chunks if fresh else 1) - sets_before + 1,  # the set in use at the start counts
        "samples_per_train_scene": round(steps * args.batch / (args.train_n * ((fresh.chunks if fresh else 1)
                                                                               - sets_before + 1)), 1),
    }
    log(name, json.dumps({k: results[name][k] for k in ("steps", "seconds_per_step", "test")}))


def cmd_models(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.init:
        model, processor = load(Path(args.init), device)
    else:
        model, processor = fresh_model(Path(args.arch), args.seed, device)
    stats = image_stats(processor)
    stages = (parse_schedule(BASE_SCHEDULE) if args.base_seconds > 0 else []) + (
        parse_schedule(args.ceiling_schedule) if args.ceiling_seconds > 0 else [])
    views = sorted({v for s in stages for v in s.views})
    eos = end_of_turn_id(model, processor)
    data = worlds(args, processor, eos, device, views)
    # --fresh: the next --train-n scenes render while training runs and replace the current ones
    fresh = FreshScenes(world_spec(args, "train"), args.train_n, views, processor, eos, device=device,
                        workers=args.workers, first=data["train"]) if args.fresh else None
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "date": time.strftime("%Y-%m-%d"), "args": vars(args),
               "parameters": sum(p.numel() for p in model.parameters())}
    if args.base_seconds > 0:
        train_sft_run("base", model, data, stats, processor, args, BASE_SCHEDULE, args.base_seconds, args.lr, out,
                      results, profile=args.profile, fresh=fresh)
        save_bf16(model, processor, out, "zoomworld-base")
        (out / "results.json").write_text(json.dumps(results, indent=2))
    if args.ceiling_seconds > 0:
        train_sft_run("ceiling", model, data, stats, processor, args, args.ceiling_schedule, args.ceiling_seconds,
                      args.ceiling_lr or args.lr, out, results, fresh=fresh)
        save_bf16(model, processor, out, "zoomworld-ceiling")
    if fresh:
        fresh.close()
    (out / "results.json").write_text(json.dumps(results, indent=2))


def parse_variant(text: str, cls=OPDConfig) -> tuple[str, dict]:
    name, _, kv = text.partition(":")
    fields = cls.__dataclass_fields__
    overrides = {}
    for item in filter(None, kv.split(",")):
        key, _, value = item.partition("=")
        if key not in fields:
            raise SystemExit(f"variant {name}: unknown setting {key!r}; choose from {sorted(fields)}")
        default = getattr(cls(), key)
        overrides[key] = value if isinstance(default, str) else type(default if default is not None else 0)(float(value))
    return name, overrides


def cmd_opd(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base, processor = load(Path(args.base), device)
    ceiling = load(Path(args.ceiling), device)[0] if args.ceiling else None
    stats = image_stats(processor)
    args.train_n = args.opd_train_n
    teacher_views = {parse_variant(v)[1].get("teacher_view", "crop") for v in args.variant}
    views = ("full", "crop", *sorted(teacher_views - {"full", "crop"}))
    data = worlds(args, processor, end_of_turn_id(base, processor), device, views)
    tok = processor.tokenizer
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "date": time.strftime("%Y-%m-%d"), "args": vars(args),
               "base": {s: dual_view(base, data[s], stats, tok) for s in ("val", "test")},
               "ceiling": {s: dual_view(ceiling, data[s], stats, tok) for s in ("val", "test")} if ceiling else None,
               "variants": {}}
    del ceiling
    for spec in args.variant:
        run_variants("opd", spec, OPDConfig, args, data["train"], data, stats, processor, results, out)
    if args.grpo_variant:
        labeller = load(Path(args.label_model), device)[0] if args.label_model else base
        t = time.perf_counter()
        try:
            labelled, funnel = synthesize_labels(labeller, data["train"], stats, votes=args.votes,
                                                 min_agree=args.min_agree)
        except ValueError as e:  # no label passed the vote: nothing to train GRPO on, the rest stands
            results["r2i_funnel"] = {"error": str(e)}
            (out / "results.json").write_text(json.dumps(results, indent=2))
            return log("R2I:", e)
        del labeller
        results["r2i_funnel"] = {**funnel, "votes": args.votes, "min_agree": args.min_agree,
                                 "seconds": round(time.perf_counter() - t, 1)}
        log("R2I labels:", results["r2i_funnel"])
        for spec in args.grpo_variant:
            run_variants("grpo", spec, GRPOConfig, args, labelled, data, stats, processor, results, out)


def run_variants(method, spec, cls, args, train, data, stats, processor, results, out) -> None:
    """`args.seeds` runs of one variant from the BASE, each evaluated on val and test."""
    name, overrides = parse_variant(spec, cls)
    device = train.device
    tok = processor.tokenizer
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        cfg = cls(seconds=args.opd_seconds, eval_every=args.eval_every, seed=seed, **overrides)
        student, _ = load(Path(args.base), device)
        hist = History(out / "logs" / f"history_{method}_{name}_s{seed}.jsonl")

        last = {}  # run_loop always evaluates at its final step: that result is the run's val row

        def on_eval(step, student=student, last=last):
            last["val"] = r = dual_view(student, data["val"], stats, tok)
            return {"val_full": r["full"]["all"], "val_crop": r["crop"]["all"]}

        if method == "opd":
            teacher = copy.deepcopy(student).eval().requires_grad_(False)
            steps = fit_opd(student, teacher, train, stats, cfg, hist, on_eval)
            del teacher
        else:
            steps = fit_grpo(student, train, stats, cfg, hist, on_eval)
        test = dual_view(student, data["test"], stats, tok)
        b, c = results["base"]["test"], (results["ceiling"] or {}).get("test")
        row = {"config": {k: getattr(cfg, k) for k in cls.__dataclass_fields__}, "steps": steps,
               "val": last["val"], "test": test,
               "gap_closed_test": gap_closed(b["full"]["all"], test["full"]["all"], c["full"]["all"]) if c else None,
               "crop_change_test": round(test["crop"]["all"] - b["crop"]["all"], 2)}
        results["variants"].setdefault(f"{method}:{name}", []).append(row)
        log(f"{method} {name} seed {seed}: {steps} steps, test full {test['full']['all']} crop {test['crop']['all']}, "
            f"gap closed {row['gap_closed_test']}%")
        if seed == args.first_seed and f"{method}:{name}" == args.variant_to_save:
            save_bf16(student, processor, out, f"zoomworld-{method}-{name}")
        (out / "results.json").write_text(json.dumps(results, indent=2))
        del student


def cmd_plot(args) -> None:
    """Training loss and validation accuracy (full, crop) of history files, run after run on one
    step axis (a run that starts from the previous one continues its curve)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    offset = 0
    for path in args.history:
        rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        steps = [r for r in rows if "loss" in r]
        evals = [r for r in rows if "val_crop" in r]
        label = f"{Path(path).stem.removeprefix('history_')} ({Path(path).parent.name})"
        ax_loss.plot([offset + r["step"] for r in steps], [r["loss"] for r in steps], lw=0.8, label=label)
        keys = sorted({k for r in evals for k in r if k.startswith("val_")}, key=lambda k: (k != "val_crop", k))
        for key in keys:  # crop solid, full dashed, the easier full views (full:k) dotted
            style = "-o" if key == "val_crop" else "--s" if key == "val_full" else ":^"
            ax_acc.plot([offset + r["step"] for r in evals if key in r], [r[key] for r in evals if key in r], style,
                        ms=3, label=f"{label} {key.removeprefix('val_')}")
        offset += max((r.get("step", 0) for r in rows), default=0)
    ax_loss.set(xlabel="optimizer step", ylabel="answer cross-entropy", yscale="log", title="training loss")
    ax_acc.set(xlabel="optimizer step", ylabel="accuracy (%)", ylim=(0, 100), title="validation accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.png, dpi=110)
    print(args.png)


def cmd_views(args) -> None:
    """Validation accuracy per view (one panel per `val_*` key: full:1, full:2, ..., full, crop),
    one line per history file, named by its run folder: which part of the task a run learned."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {}
    for path in args.history:
        rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        runs[Path(path).parent.parent.name] = [r for r in rows if "val_full" in r]
    keys = sorted({k for evals in runs.values() for r in evals for k in r if k.startswith("val_")},
                  key=lambda k: (k == "val_crop", k == "val_full", k))
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.4), sharey=True)
    for ax, key in zip(axes, keys):
        for name, evals in runs.items():
            pts = [(r["step"], r[key]) for r in evals if key in r]
            ax.plot(*zip(*pts), "-o", ms=3, lw=1, label=name)
        ax.set(title=key.removeprefix("val_"), xlabel="optimizer step", ylim=(0, 100))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation accuracy (%)")
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.png, dpi=110)
    print(args.png)


def cmd_gaps(args) -> None:
    """The test gap (crop - full) per dimension of the BASE, the CEILING and each variant's seeds
    (mean), from `opd` runs' results.json, as grouped bars. With several files the BASE and the
    CEILING come from the first and the variants' runs are pooled by name (one seed per job)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [json.loads(Path(path).read_text()) for path in args.results]
    res = results[0]
    rows = {"BASE": [res["base"]["test"]["gap"]]}
    if res.get("ceiling"):
        rows["CEILING"] = [res["ceiling"]["test"]["gap"]]
    for other in results:
        for name, runs in other["variants"].items():
            rows.setdefault(name, []).extend(r["test"]["gap"] for r in runs)
    dims = list(rows["BASE"][0])
    fig, ax = plt.subplots(figsize=(11, 4))
    width = 0.8 / len(rows)
    for i, (name, gaps) in enumerate(rows.items()):
        means = [sum(g[d] for g in gaps) / len(gaps) for d in dims]
        ax.bar([j + i * width for j in range(len(dims))], means, width, label=f"{name} (n={len(gaps)})")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(dims))], dims)
    ax.set(ylabel="gap: crop - full accuracy (points)", title=f"ZoomWorld test gap per dimension ({res['device']}, "
           f"{res['date']})")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # outside: bars reach the top
    fig.tight_layout()
    fig.savefig(args.png, dpi=110)
    print(args.png)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("models", "opd"):  # `plot` takes none of these
        s = sub.add_parser(name)
        s.add_argument("--out", required=True)
        s.add_argument("--size", type=int, default=224)
        s.add_argument("--min-area", type=float, default=0.03)
        s.add_argument("--max-area", type=float, default=0.06)
        s.add_argument("--frame", type=float, default=0.05, help="panel frame width / shorter panel side")
        s.add_argument("--panels", type=parse_panels, default=(4, 6),
                       help="framed panels per scene, N or LO-HI (default 4-6); 1: the evidence panel alone in the clutter")
        s.add_argument("--ocr", choices=("strings", "words"), default="strings",
                       help="OCR panels show random strings or one of a few words")
        s.add_argument("--world-seed", type=int, default=0)
        s.add_argument("--train-seed", type=int, default=0, help="world seed of the train split only (fresh scenes)")
        s.add_argument("--val-n", type=int, default=300)
        s.add_argument("--test-n", type=int, default=600)
        s.add_argument("--workers", type=int, default=15)
        s.add_argument("--eval-every", type=int, default=1000)
    m = sub.choices["models"]
    m.add_argument("--arch", default=str(ARCH), help="model directory whose config and tokenizer to use")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--init", default="", help="start from this model directory instead of a fresh init")
    m.add_argument("--ceiling-schedule", default=CEILING_SCHEDULE, help="views per stage (0 seconds: skip a stage)")
    m.add_argument("--train-n", type=int, default=60000)
    m.add_argument("--batch", type=int, default=256)
    m.add_argument("--lr", type=float, default=1e-3)
    m.add_argument("--ceiling-lr", type=float, default=0.0, help="the CEILING stage's lr (0: --lr)")
    m.add_argument("--warmup", type=int, default=200)
    m.add_argument("--base-seconds", type=float, default=200)
    m.add_argument("--ceiling-seconds", type=float, default=220)
    m.add_argument("--profile", action="store_true")
    m.add_argument("--locate-share", type=float, default=0.0,
                   help="share of train scenes that ask where the named panel is (zoomless.world.locate)")
    m.add_argument("--fresh", action="store_true",
                   help="render the next --train-n train scenes while training and switch to them when ready")
    m.add_argument("--val-views", type=lambda t: tuple(filter(None, t.split(","))), default=(),
                   help="more views to score on val at each evaluation, e.g. full:1,full:2")
    o = sub.choices["opd"]
    o.add_argument("--base", required=True)
    o.add_argument("--ceiling", default="", help="the CEILING, for the share of the gap closed (optional)")
    o.add_argument("--opd-train-n", type=int, default=20000)
    o.add_argument("--opd-seconds", type=float, default=60)
    o.add_argument("--seeds", type=int, default=1)
    o.add_argument("--first-seed", type=int, default=0, help="seeds first-seed, first-seed + 1, ...")
    o.add_argument("--variant", action="append", default=[], help="Vision-OPD run, name:key=value,... (OPDConfig fields)")
    o.add_argument("--grpo-variant", action="append", default=[], help="R2I GRPO run, name:key=value,... (GRPOConfig fields)")
    o.add_argument("--votes", type=int, default=5, help="R2I: answers of the BASE per crop")
    o.add_argument("--label-model", default="", help="R2I: the model that votes on crops (default: --base)")
    o.add_argument("--min-agree", type=float, default=0.8, help="R2I: share of votes a label needs")
    o.add_argument("--variant-to-save", default="", help="method:name of the run whose first seed's model to save")
    pl = sub.add_parser("plot", help="curves of history_*.jsonl files into one PNG")
    pl.add_argument("png")
    pl.add_argument("history", nargs="+")
    v = sub.add_parser("views", help="validation accuracy per view (full:k, full, crop) of history files")
    v.add_argument("png")
    v.add_argument("history", nargs="+", help="<run>/logs/history_*.jsonl; the run folder names the line")
    g = sub.add_parser("gaps", help="the test gap per dimension of `opd` results.json files as bars")
    g.add_argument("png")
    g.add_argument("results", nargs="+", help="BASE and CEILING from the first; variants pooled by name")
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = True
    {"models": cmd_models, "opd": cmd_opd, "plot": cmd_plot, "views": cmd_views, "gaps": cmd_gaps}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
