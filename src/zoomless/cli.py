"""The `zoomless` command line: a thin layer over the library (no logic lives here).

Heavy imports (torch, transformers) happen inside the commands so that `--help` stays instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

app = typer.Typer(
    help="Teach vision-language models to see small details in one glance, by distilling what they see zoomed in.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)
model_app = typer.Typer(help="Build and inspect vision-language model directories.", no_args_is_help=True)
train_app = typer.Typer(help="Train a model: supervised fine-tuning, Vision-OPD self-distillation, or GRPO.", no_args_is_help=True)
app.add_typer(model_app, name="model")
app.add_typer(train_app, name="train")

console = Console()


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code=2)


def _split_csv(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


# ----------------------------------------------------------------------------- world

@app.command()
def world(
    out_dir: Path = typer.Argument(..., help="Folder to write images/ and <split>.jsonl into."),
    split: str = typer.Option("test", help="train, val or test: splits never share a scene."),
    n: int = typer.Option(60, "--n", "-n", help="Number of samples."),
    seed: int = typer.Option(0, help="Seed; the same seed gives byte-identical scenes."),
    size: int = typer.Option(1024, help="Scene side in pixels."),
    dimensions: str = typer.Option("", help="Comma-separated subset of: counting,ocr,color,structure,material,object."),
    max_area_fraction: float = typer.Option(0.03, help="Largest evidence region, as a fraction of the image."),
    min_area_fraction: float = typer.Option(0.005, help="Smallest evidence region, as a fraction of the image."),
    frame_fraction: float = typer.Option(0.05, help="Panel frame width, as a fraction of the panel's shorter side."),
    panels: str = typer.Option("4-6", help="Framed panels per scene, N or LO-HI; 1: the evidence panel alone in the clutter."),
    ocr: str = typer.Option("strings", help="OCR panels show random 3-4 character 'strings' or one of ten 'words'."),
    workers: int = typer.Option(0, help="Render in this many processes (0: in this one); same output."),
    sheet: bool = typer.Option(True, help="Also write contact_sheet_<split>.png."),
) -> None:
    """Generate a ZoomWorld split: synthetic high-resolution scenes whose answer hides in one small region."""
    from zoomless import world as zw
    from zoomless.sample import read_samples

    dims = _split_csv(dimensions) or zw.DIMENSIONS
    unknown = set(dims) - set(zw.DIMENSIONS)
    if unknown:
        _fail(f"unknown dimension(s) {sorted(unknown)}; choose from {list(zw.DIMENSIONS)}")
    try:
        path = zw.generate_split(
            out_dir, split, n, seed=seed, size=size, dimensions=dims, max_area_fraction=max_area_fraction,
            min_area_fraction=min_area_fraction, frame_fraction=frame_fraction, panels=zw.parse_panels(panels),
            ocr=ocr, workers=workers,
        )
    except ValueError as e:
        _fail(str(e))
    console.print(f"wrote [bold]{n}[/] samples to {path}")
    if sheet:
        png = zw.contact_sheet(read_samples(path)[:16], Path(out_dir) / f"contact_sheet_{split}.png")
        console.print(f"contact sheet: {png}")


# ----------------------------------------------------------------------------- model

@model_app.command("tiny")
def model_tiny(
    out_dir: Path = typer.Argument(..., help="Folder to save the model and processor into."),
    family: str = typer.Option("qwen2_5_vl", help="qwen2_5_vl, qwen3_vl or qwen3_5 (hybrid linear attention)."),
    size: str = typer.Option("test", help="test (~1M params), small (~5-10M) or base (~50M)."),
    seed: int = typer.Option(0, help="Initialisation seed."),
) -> None:
    """Build a small randomly initialised Qwen-VL model with an offline tokenizer, as a standard HF directory."""
    from zoomless.models.loading import load_vlm
    from zoomless.models.tiny import build_tiny_vlm, count_parameters

    path = build_tiny_vlm(out_dir, family=family, size=size, seed=seed)
    model, _ = load_vlm(path)
    console.print(f"saved {family} ({size}, {count_parameters(model) / 1e6:.2f}M parameters) to {path}")


@model_app.command("info")
def model_info(model_dir: Path = typer.Argument(..., help="A local HF model directory.")) -> None:
    """Load a local model directory and print its type, size and image budget."""
    from zoomless.models.loading import load_vlm
    from zoomless.models.tiny import count_parameters

    model, processor = load_vlm(model_dir)
    ip = processor.image_processor
    console.print(f"{model_dir}: {model.config.model_type}, {count_parameters(model) / 1e6:.2f}M parameters")
    console.print(f"image pixels: min {getattr(ip, 'min_pixels', '?')}, max {getattr(ip, 'max_pixels', '?')}")


# ----------------------------------------------------------------------------- eval

def _load_samples(data: Path, benchmark: str | None, seed: int, limit: int | None) -> tuple[list, str]:
    """Samples from a public benchmark file (format given or guessed) or from our own / the generic form."""
    from zoomless.eval import benchmarks, generic

    name = benchmark or benchmarks.detect_benchmark(data)
    if name:
        return benchmarks.load_benchmark(name, data, seed=seed, limit=limit), name
    return generic.load_benchmark(data)[:limit], Path(data).name


def _engine(model: str, base_url: str | None, api_key: str | None, device: str, batch_size: int):
    """An OpenAI-compatible endpoint when --base-url is given (MODEL is the served name), else a local directory."""
    if base_url:
        from zoomless.engines.openai_engine import OpenAIEngine

        return OpenAIEngine(base_url, model, api_key=api_key, max_concurrency=batch_size)
    from zoomless.engines.hf import HFEngine

    return HFEngine.from_dir(model, device=device, batch_size=batch_size, name=Path(model).name)


_BENCHMARK = typer.Option(
    None, help="Public benchmark format (zoombench, vstar, hrbench-4k, hrbench-8k, mme-realworld[-cn|-lite], "
    "mmstar, pope, cvbench, mmvp, visualprobe); guessed from the file when omitted.")
_FORM = typer.Option("mcq", help="mcq (options and a letter) or open (a word or phrase): the prompt's answer form.")
_DATA = typer.Argument(..., help="A benchmark file or folder, zoomless JSONL/parquet, or the generic JSON form.")


@app.command("eval")
def eval_cmd(
    model: str = typer.Argument(..., help="A local HF model directory, or the served model name with --base-url."),
    data: Path = _DATA,
    out_dir: Path = typer.Option(Path("runs/eval"), "--out", help="Where predictions.jsonl, results.json, summary.md go."),
    benchmark: Optional[str] = _BENCHMARK,
    views: str = typer.Option("full,crop", help="Comma-separated views: full, crop, zoom, overlay."),
    form: str = _FORM,
    tool_loop: bool = typer.Option(False, help="Thinking-with-Images baseline: the model may call a zoom tool."),
    oracle_box: bool = typer.Option(False, help="Tool loop only: the zoom tool uses the evidence box (for models that cannot ground)."),
    max_turns: int = typer.Option(4, help="Tool loop only: model calls per sample."),
    max_pixels: Optional[int] = typer.Option(None, help="Pixel budget per image (printed in the report)."),
    max_new_tokens: Optional[int] = typer.Option(None, help="Tokens per answer (default 16, tool loop 512)."),
    batch_size: int = typer.Option(8, help="Conversations per generate call (concurrency over HTTP)."),
    limit: Optional[int] = typer.Option(None, help="Evaluate only the first N samples."),
    seed: int = typer.Option(0, help="Generation seed (and the V* option order)."),
    device: str = typer.Option("auto", help="cpu, cuda or auto."),
    base_url: Optional[str] = typer.Option(None, help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1."),
    api_key: Optional[str] = typer.Option(None, envvar="OPENAI_API_KEY", help="Key for --base-url."),
    judge_base_url: Optional[str] = typer.Option(None, help="LLM judge endpoint for answers the rules cannot decide."),
    judge_model: Optional[str] = typer.Option(None, help="Served name of the judge model (with --judge-base-url)."),
    judge_model_dir: Optional[Path] = typer.Option(None, help="A local judge model directory, run in-process."),
    judge_api_key: Optional[str] = typer.Option(None, envvar="ZOOMLESS_JUDGE_API_KEY", help="Key for --judge-base-url."),
    judge_on_malformed: str = typer.Option("wrong", help="A judge reply that is neither yes nor no: wrong, or skip (excluded)."),
    chart: bool = typer.Option(True, help="Write gap_chart.png."),
) -> None:
    """Single-pass dual-view evaluation (accuracy on the full image and on the crop, the zooming gap), or
    the Thinking-with-Images tool loop. Resumable: run again with the same --out and finished items are skipped."""
    from zoomless.eval.report import dual_view_table, gap_chart

    from zoomless.eval.judge import make_judge

    samples, name = _load_samples(data, benchmark, seed, limit)
    engine = _engine(model, base_url, api_key, device, batch_size)
    judge = make_judge(base_url=judge_base_url, model=judge_model, model_dir=judge_model_dir,
                       api_key=judge_api_key, on_malformed=judge_on_malformed, device=device)
    common = dict(form=form, max_pixels=max_pixels, batch_size=batch_size, seed=seed, out_dir=out_dir,
                  benchmark=name, model=model, judge=judge)
    if tool_loop:
        from zoomless.eval.tool_loop import evaluate_tool_loop, to_markdown

        result = evaluate_tool_loop(samples, engine, max_turns=max_turns, oracle_box=oracle_box,
                                    max_new_tokens=max_new_tokens or 512, **common)
        console.print(to_markdown(result))
    else:
        from zoomless.eval.single_pass import evaluate

        result = evaluate(samples, engine, views=_split_csv(views), max_new_tokens=max_new_tokens or 16, **common)
        console.print(dual_view_table(result))
        if chart:
            console.print(f"chart: {gap_chart(result, Path(out_dir) / 'gap_chart.png')}")
    console.print(f"results: {Path(out_dir) / 'results.json'}")


@app.command()
def coverage(
    model_dir: Path = typer.Argument(..., help="A local Qwen2.5-VL or Qwen3-VL model directory."),
    data: Path = _DATA,
    out_dir: Path = typer.Option(Path("runs/coverage"), "--out", help="Where coverage.jsonl, results.json and heatmaps go."),
    benchmark: Optional[str] = _BENCHMARK,
    layer: Optional[int] = typer.Option(None, help="Decoder layer (0-based); default: --relative-depth."),
    relative_depth: float = typer.Option(0.5, help="Layer as a fraction of the depth, when --layer is not given."),
    view: str = typer.Option("full", help="full, overlay, crop or zoom."),
    form: str = _FORM,
    max_pixels: Optional[int] = typer.Option(None, help="Pixel budget per image."),
    heatmaps: int = typer.Option(8, help="How many heatmap PNGs to write."),
    limit: Optional[int] = typer.Option(None, help="Only the first N samples."),
    device: str = typer.Option("auto", help="cpu, cuda or auto."),
) -> None:
    """Attention coverage: the share of the last prompt token's image attention that falls in the evidence box."""
    from zoomless.eval.coverage import coverage as run_coverage
    from zoomless.models.loading import load_vlm

    samples, _ = _load_samples(data, benchmark, 0, limit)
    model, processor = load_vlm(model_dir, device=device)
    run_coverage(samples, model, processor, layer=layer, relative_depth=relative_depth, view=view, form=form,
                 max_pixels=max_pixels, out_dir=out_dir, heatmaps=heatmaps, model_name=str(model_dir))
    console.print(f"results: {Path(out_dir) / 'results.json'}")


@app.command()
def report(
    run_dirs: list[Path] = typer.Argument(..., help="Run folders of eval (single pass or tool loop) and coverage."),
    out_dir: Path = typer.Option(Path("runs/report"), "--out", help="Where report.md, report.json and charts go."),
) -> None:
    """Combine runs into one report: full vs crop per dimension, speed vs accuracy, coverage distribution."""
    from zoomless.eval.report_runs import build_report

    console.print(f"report: {build_report(run_dirs, out_dir)}")


# ----------------------------------------------------------------------------- synth

@app.command()
def synth(
    config: Path = typer.Argument(..., help="YAML config: images, out_dir, endpoint(s) per role, stage settings."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override a config key: --set consensus.min_votes=5."),
    shard: Optional[str] = typer.Option(None, help="i/n: process only shard i of n (merge with a final run without it)."),
) -> None:
    """R2I data synthesis: teachers write and answer questions on micro-crops; consensus-verified answers go
    back onto the full image (red box, pointing sentence, multiple choice, difficulty filter).

    Resumable: rerun after any crash and only missing model calls are made. Writes funnel.md/json,
    samples.parquet (our trainers), easyr1.parquet (EasyR1/verl) and vision_opd.parquet."""
    from zoomless.synth import SynthError, load_synth_config, parse_overrides, run_synth
    from zoomless.synth.runner import output_suffix

    overrides = parse_overrides(set_)
    if shard is not None:
        overrides["shard"] = shard
    cfg = load_synth_config(config, overrides)
    try:
        out = run_synth(cfg)
    except SynthError as e:
        _fail(str(e))
    console.print((out / f"funnel{output_suffix(cfg)}.md").read_text())
    console.print(f"output: {out}")


# ----------------------------------------------------------------------------- serve

@app.command()
def serve(
    model_dir: Path = typer.Argument(..., help="A local HF vision-language model directory."),
    host: str = typer.Option("127.0.0.1", help="Address to bind (loopback by default)."),
    port: int = typer.Option(8000, help="Port."),
    api_key: Optional[str] = typer.Option(None, envvar="ZOOMLESS_API_KEY", help="Require this Bearer key."),
    model_name: Optional[str] = typer.Option(None, help="Name reported by /v1/models (default: the folder name)."),
    device: str = typer.Option("auto", help="cpu, cuda or auto."),
    max_request_bytes: int = typer.Option(64 * 2**20, help="Largest accepted request body (413 above)."),
    max_image_pixels: int = typer.Option(4096 * 4096, help="Largest accepted image, in pixels (400 above)."),
) -> None:
    """Serve a local model over an OpenAI-compatible /v1/chat/completions endpoint (and /v1/models)."""
    from zoomless.serve import serve as run_server

    run_server(
        model_dir, host=host, port=port, api_key=api_key, model_name=model_name, device=device,
        max_request_bytes=max_request_bytes, max_image_pixels=max_image_pixels,
    )


# ----------------------------------------------------------------------------- train

def _train(method: str, config: Path | None, overrides: list[str], resume: bool, print_config: bool) -> None:
    from zoomless.train import recipes

    try:
        cfg = recipes.load(method, config, overrides, resume=resume)
    except ValueError as e:  # pydantic errors name the offending key
        _fail(str(e))
    if print_config:  # every key the run would use, defaults included; nothing is loaded or written
        import yaml

        typer.echo(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), nl=False)
        return
    recipes.run(method, cfg)


_CONFIG = typer.Argument(None, help="YAML config (keys as in the recipe's config class; its relative paths are relative to the file).")
_SET = typer.Option([], "--set", "-s", help="Override a config key: --set lr=1e-4 (repeatable).")
_RESUME = typer.Option(False, help="Continue from the last checkpoint in out_dir.")
_PRINT_CONFIG = typer.Option(False, "--print-config",
                             help="Validate the config, print every key it sets (defaults included) as YAML, and exit.")


@train_app.command("sft")
def train_sft(config: Optional[Path] = _CONFIG, set_: list[str] = _SET, resume: bool = _RESUME,
              print_config: bool = _PRINT_CONFIG) -> None:
    """Supervised fine-tuning on sample records (loss on answer tokens only)."""
    _train("sft", config, set_, resume, print_config)


@train_app.command("opd")
def train_opd(config: Optional[Path] = _CONFIG, set_: list[str] = _SET, resume: bool = _RESUME,
              print_config: bool = _PRINT_CONFIG) -> None:
    """Vision-OPD: the model on the crop teaches itself on the full image (top-k JSD, EMA teacher)."""
    _train("opd", config, set_, resume, print_config)


@train_app.command("grpo")
def train_grpo(config: Optional[Path] = _CONFIG, set_: list[str] = _SET, resume: bool = _RESUME,
               print_config: bool = _PRINT_CONFIG) -> None:
    """R2I reinforcement learning: GRPO with clip-higher and rule / judge rewards; `objective: hybrid` adds Vision-OPD."""
    _train("grpo", config, set_, resume, print_config)


# ----------------------------------------------------------------------------- demo

@app.command()
def demo(
    out_dir: Path = typer.Option(Path("runs/demo"), help="Where the demo writes its data, model and report."),
    n: int = typer.Option(60, "--n", "-n", help="ZoomWorld test samples."),
    steps: int = typer.Option(100, help="Vision-OPD steps (about 1 s each on 2 CPU cores)."),
) -> None:
    """The whole story on a CPU: ZoomWorld, the shipped base model's dual-view table, a short label-free
    Vision-OPD run, the table again and a before/after chart (plus a longer run's result, if one is shipped)."""
    from zoomless.demo import run_demo

    run_demo(out_dir, n=n, steps=steps, console=console)


def main() -> None:
    """Entry point: user errors (bad files, rows, configs, model folders) end in one red line and exit 2;
    set ZOOMLESS_DEBUG=1 for the full traceback."""
    import os

    try:
        app()
    except (FileNotFoundError, ValueError) as e:  # SampleError, ImageError, ConfigError are ValueErrors
        if os.environ.get("ZOOMLESS_DEBUG"):
            raise
        console.print(f"[bold red]error:[/] {e}")
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
