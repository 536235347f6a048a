"""`zoomless demo`: the story on a CPU, on the embedded default.

1. Generate a ZoomWorld test split (1024 px scenes, the answer inside one small marked panel).
2. Load the shipped ZoomWorld model if the package carries one, else build a tiny random Qwen2.5-VL.
3. Ask every question twice, on the full image and on the crop, and print the dual-view table:
   the difference is the zooming gap that the training recipes exist to close.
"""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

from rich.console import Console

DEMO_PIXELS = 448 * 448  # the image budget: a 1024 px scene shrinks ~2.3x, a crop does not


def shipped_model_dir() -> Path | None:
    """The model committed with the package (assets/zoomworld-base), if present."""
    path = Path(str(resources.files("zoomless"))) / "assets" / "zoomworld-base"
    return path if (path / "config.json").exists() else None


def run_demo(out_dir: Path, n: int = 36, console: Console | None = None) -> dict:
    from zoomless.engines.hf import HFEngine
    from zoomless.eval.report import dual_view_table, gap_chart
    from zoomless.eval.single_pass import evaluate
    from zoomless.models.tiny import build_tiny_vlm
    from zoomless.sample import read_samples
    from zoomless.world import contact_sheet, generate_split

    console = console or Console()
    out_dir = Path(out_dir)
    t0 = time.perf_counter()

    console.rule("[bold]1. ZoomWorld test split")
    data = generate_split(out_dir / "world", "test", n, seed=0, size=1024)
    samples = read_samples(data)
    sheet = contact_sheet(samples[:8], out_dir / "contact_sheet.png")
    console.print(f"{len(samples)} samples in {data}; look at {sheet}")

    console.rule("[bold]2. Model")
    model_dir = shipped_model_dir()
    if model_dir is None:
        model_dir = out_dir / "tiny-model"
        if not (model_dir / "config.json").exists():
            build_tiny_vlm(model_dir, family="qwen2_5_vl", size="test", seed=0)
        console.print(f"no shipped ZoomWorld model: a tiny random Qwen2.5-VL at {model_dir} (expect chance level)")
    else:
        console.print(f"shipped ZoomWorld model: {model_dir}")
    engine = HFEngine.from_dir(model_dir, device="cpu", batch_size=8, name=model_dir.name)

    console.rule("[bold]3. Dual view: full image vs crop")
    eval_dir = out_dir / "eval-before"
    result = evaluate(
        samples, engine, views=("full", "crop"), form="mcq", max_pixels=DEMO_PIXELS, out_dir=eval_dir,
        benchmark="ZoomWorld test", model=str(model_dir),
    )
    console.print(dual_view_table(result))
    console.print(f"chart: {gap_chart(result, out_dir / 'gap_chart.png')}")
    console.print(f"done in {time.perf_counter() - t0:.0f} s; results in {eval_dir}")
    return {"data": data, "model_dir": model_dir, "result": result}
