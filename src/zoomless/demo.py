"""`zoomless demo`: the story on a CPU, on the embedded default, in a few minutes.

1. Generate ZoomWorld splits as the shipped models were trained on them: 224 px scenes, the
   answer in the one framed panel (3-6% of the scene) among loose distractors of every kind,
   text panels showing one of ten words (the "lone-panel world", docs/ZOOMWORLD.md).
2. Load the shipped ZoomWorld BASE model (trained on crops only; see docs/ZOOMWORLD.md), or build a
   tiny random Qwen2.5-VL when the package carries none.
3. Ask every test question twice, on the full image and on the crop: the dual-view table and its
   zooming gap.
4. A short Vision-OPD run without labels: the student answers from the full image, a frozen copy
   of the base scores those answers looking at the crop (on a CPU, 100 steps: the frozen teacher at
   lr 5e-5 kept more crop accuracy than the EMA teacher at 1e-4, docs/RESULTS.md).
5. The dual-view table again, before -> after, and a chart of the change per dimension.
6. The same method at length, when the package ships it (assets/zoomworld-opd: Vision-OPD from the
   BASE with a committed command, docs/RESULTS.md): its table against the BASE, and its chart.
"""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

from rich.console import Console

SIZE = 224  # scene side = pixel budget of every view (the shipped models' setting)
AREA = (0.03, 0.06)  # evidence panel, fraction of the scene
PANELS = (1, 1)  # framed panels per scene: the evidence alone among unframed distractors
OCR = "words"  # text panels show one of ten words
# The world of the shipped models, as `generate_split` / `WorldSpec` arguments.
WORLD = dict(size=SIZE, min_area_fraction=AREA[0], max_area_fraction=AREA[1], panels=PANELS, ocr=OCR)
DEMO_STEPS = 100  # Vision-OPD steps: about 2.5 minutes on 2 CPU cores
LONG_RUN = "zoomworld-opd"  # the BASE after a longer Vision-OPD run, when shipped


def shipped_model_dir(name: str = "zoomworld-base") -> Path | None:
    """A model committed with the package (assets/<name>), if present."""
    path = Path(str(resources.files("zoomless"))) / "assets" / name
    return path if (path / "config.json").exists() else None


def _world(out_dir: Path, split: str, n: int) -> Path:
    from zoomless.world import generate_split

    return generate_split(out_dir / "world", split, n, seed=0, **WORLD)


def _dual_view(samples, model_dir: Path, out_dir: Path, name: str):
    from zoomless.engines.hf import HFEngine
    from zoomless.eval.single_pass import evaluate

    engine = HFEngine.from_dir(model_dir, device="cpu", batch_size=30, name=name)
    return evaluate(samples, engine, views=("full", "crop"), form="open", max_new_tokens=8, max_pixels=SIZE * SIZE,
                    out_dir=out_dir, benchmark="ZoomWorld test", model=name)


def _distill(model_dir: Path, train: Path, out_dir: Path, steps: int) -> Path:
    from zoomless.train.config import OPDConfig
    from zoomless.train.opd import train_opd

    cfg = OPDConfig(
        model_dir=model_dir, data=train, out_dir=out_dir, student_view="full", teacher_view="crop", form="open",
        n=4, max_new_tokens=8, topk=50, batch_size=8, micro_batch_size=32, rollout_batch_size=32, lr=5e-5,
        warmup_steps=5, teacher="frozen", max_steps=steps, save_every=0, log_every=10,
        max_pixels=SIZE * SIZE, device="cpu", dtype="float32", tensorboard=False,
    )
    return train_opd(cfg)


def run_demo(out_dir: Path, n: int = 60, steps: int = DEMO_STEPS, console: Console | None = None) -> dict:
    from zoomless.eval.report import compare_table, dual_view_table, gap_change_chart
    from zoomless.models.tiny import build_tiny_vlm
    from zoomless.sample import read_samples
    from zoomless.world import contact_sheet

    console = console or Console()
    out_dir = Path(out_dir)
    t0 = time.perf_counter()

    console.rule("[bold]1. ZoomWorld")
    test = read_samples(_world(out_dir, "test", n))
    train = _world(out_dir, "train", max(8, 8 * steps))  # every distillation step sees new scenes
    sheet = contact_sheet(test[:8], out_dir / "contact_sheet.png")
    console.print(f"{len(test)} test scenes, {8 * steps} training scenes (labels unused); look at {sheet}")

    console.rule("[bold]2. Model")
    model_dir = shipped_model_dir()
    if model_dir is None:
        model_dir = out_dir / "tiny-model"
        if not (model_dir / "config.json").exists():
            build_tiny_vlm(model_dir, family="qwen2_5_vl", size="test", seed=0, max_pixels=SIZE * SIZE)
        console.print(f"no shipped ZoomWorld model: a tiny random Qwen2.5-VL at {model_dir} (expect chance level)")
    else:
        console.print(f"shipped ZoomWorld BASE (trained on crops only): {model_dir}")

    console.rule("[bold]3. Dual view: full image vs crop")
    before = _dual_view(test, model_dir, out_dir / "eval-before", "base")
    console.print(dual_view_table(before))

    console.rule(f"[bold]4. Vision-OPD, {steps} steps: student on the full image, frozen teacher on the crop, no labels")
    final = _distill(model_dir, train, out_dir / "opd", steps)

    console.rule("[bold]5. Dual view after Vision-OPD")
    after = _dual_view(test, final, out_dir / "eval-after", "base + Vision-OPD")
    console.print(compare_table(before, after))
    chart = gap_change_chart(before, after, out_dir / "gap_before_after.png")
    gb, ga = before.gap()["all"], after.gap()["all"]
    console.print(f"zooming gap (crop - full, all dimensions): {100 * gb.gap:.1f} -> {100 * ga.gap:.1f} points; "
                  f"chart: {chart}")
    out = {"model_dir": model_dir, "final": final, "before": before, "after": after}
    long_dir = shipped_model_dir(LONG_RUN)
    if model_dir == shipped_model_dir() and long_dir is not None:
        console.rule("[bold]6. The same Vision-OPD at length (shipped, made by benchmarks/zoomworld_fast.py)")
        out["long"] = _dual_view(test, long_dir, out_dir / "eval-long", "base + Vision-OPD (shipped run)")
        console.print(compare_table(before, out["long"]))
        chart = gap_change_chart(before, out["long"], out_dir / "gap_before_after_long.png")
        gl = out["long"].gap()["all"]
        console.print(f"zooming gap: BASE {100 * gb.gap:.1f}, after {steps} steps here {100 * ga.gap:.1f}, "
                      f"after the shipped run {100 * gl.gap:.1f} points; chart: {chart}")
    console.print(f"done in {time.perf_counter() - t0:.0f} s; everything is in {out_dir}")
    return out
