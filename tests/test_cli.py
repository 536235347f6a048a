"""The CLI is the interface: run it as a real subprocess, as a user would."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from zoomless.train import recipes

ROOT = Path(__file__).resolve().parents[1]


def zoomless(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "zoomless.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def test_every_command_has_help() -> None:
    for cmd in (["--help"], ["world", "--help"], ["eval", "--help"], ["model", "tiny", "--help"],
                ["train", "opd", "--help"], ["train", "sft", "--help"], ["train", "grpo", "--help"], ["coverage", "--help"], ["synth", "--help"], ["report", "--help"], ["serve", "--help"], ["demo", "--help"]):
        out = zoomless(*cmd)
        assert out.returncode == 0, (cmd, out.stderr)
        assert "Usage" in out.stdout


def test_world_model_eval_end_to_end(tmp_path: Path) -> None:
    out = zoomless("world", str(tmp_path / "zw"), "--split", "test", "-n", "6", "--size", "448", "--no-sheet")
    assert out.returncode == 0, out.stderr
    out = zoomless("model", "tiny", str(tmp_path / "m"))
    assert out.returncode == 0, out.stderr
    out = zoomless("eval", str(tmp_path / "m"), str(tmp_path / "zw" / "test.jsonl"), "--out", str(tmp_path / "ev"),
                   "--max-pixels", str(112 * 112), "--device", "cpu", "--no-chart")
    assert out.returncode == 0, out.stderr
    assert "gap" in out.stdout
    results = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert set(results["views"]) == {"full", "crop"}
    out = zoomless("coverage", str(tmp_path / "m"), str(tmp_path / "zw" / "test.jsonl"), "--out", str(tmp_path / "cov"),
                   "--form", "open", "--max-pixels", str(112 * 112), "--device", "cpu", "--heatmaps", "1", "--limit", "3")
    assert out.returncode == 0, out.stderr
    results = json.loads((tmp_path / "cov" / "results.json").read_text())
    assert results["settings"]["form"] == "open" and results["summary"]["n"] == 3


def test_world_lone_panel_with_words(tmp_path: Path) -> None:
    out = zoomless("world", str(tmp_path / "zw"), "-n", "4", "--size", "224", "--min-area-fraction", "0.03",
                   "--max-area-fraction", "0.06", "--panels", "1", "--ocr", "words", "--no-sheet")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in (tmp_path / "zw" / "test.jsonl").read_text().splitlines()]
    assert [len(r["meta"]["panels"]) for r in rows] == [1, 1, 1, 1] and rows[1]["dimension"] == "ocr"
    assert rows[1]["meta"]["ocr"] == "words" and rows[1]["answer"].isalpha()


def test_bad_input_gets_one_clear_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "image": "x.png"}\n')  # no question
    (tmp_path / "m").mkdir()
    out = zoomless("eval", str(tmp_path / "m"), str(bad), "--out", str(tmp_path / "ev"))
    assert out.returncode == 2
    assert "question" in out.stdout and "bad.jsonl:1" in out.stdout
    out = zoomless("world", str(tmp_path / "zw"), "--dimensions", "colour")
    assert out.returncode == 2 and "colour" in out.stdout
    out = zoomless("world", str(tmp_path / "zw"), "--ocr", "glyphs", "--size", "448")
    assert out.returncode == 2 and "glyphs" in out.stdout
    out = zoomless("world", str(tmp_path / "zw"), "--panels", "many", "--size", "448")
    assert out.returncode == 2 and "--panels" in out.stdout
    out = zoomless("train", "sft", "--set", "model_dir=x", "--set", "data=y", "--set", "out_dir=z", "--set", "lr=fast")
    assert out.returncode == 2 and "lr" in out.stdout


def test_print_config_shows_every_key_and_trains_nothing(tmp_path: Path) -> None:
    import yaml

    out = zoomless("train", "opd", str(ROOT / "configs" / "opd-zoomworld.yaml"), "--set", "lr=1e-4",
                   "--set", f"out_dir={tmp_path / 'run'}", "--set", "bf16_weights=true", "--print-config")
    assert out.returncode == 0, out.stderr
    cfg = yaml.safe_load(out.stdout)
    assert cfg["lr"] == 1e-4 and cfg["bf16_weights"] is True  # the overrides
    assert cfg["topk"] == 100 and cfg["compile_blocks"] is False  # the file's value, a default it leaves
    assert Path(cfg["model_dir"]).resolve() == (ROOT / "runs" / "sft-crop" / "checkpoint-000500").resolve()  # file-relative
    assert not (tmp_path / "run").exists()  # nothing trained, nothing written
    out = zoomless("train", "grpo", "--set", "model_dir=x", "--set", "data=y", "--set", "out_dir=z", "--set", "topk=5",
                   "--print-config")
    assert out.returncode == 2 and "topk" in out.stdout  # a bad config still fails, naming the key


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path: Path) -> None:
    method = path.name.split("-")[0]
    if method == "synth":
        from zoomless.synth import load_synth_config

        assert load_synth_config(path, {}).out_dir.resolve() == (ROOT / "runs" / "synth").resolve()
        return
    cfg = recipes.load(method, path)
    assert cfg.max_steps >= 1
