"""The synth runner as a process: SIGKILL in the middle of a stage, rerun, same output as an
uninterrupted run; and `--shard i/n` across two "machines" that a final run merges."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from test_synth_oracle import Oracle, funnel, make_world, oracle_server, synth_config
from zoomless.sample import read_samples
from zoomless.synth.runner import run_synth

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("zw")
    samples, images = make_world(root, n=2)
    return root, samples, images


def runner(cfg_path: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.Popen([sys.executable, "-m", "zoomless.synth.runner", str(cfg_path), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def lines(path: Path) -> int:
    return path.read_text().count("\n") if path.exists() else 0


def store_keys(out: Path) -> dict[str, list[str]]:
    keys = {}
    for f in sorted((out / "store").glob("*.jsonl")):
        if f.stem != "usage":
            keys[f.stem] = [json.loads(line)["key"] for line in f.read_text().splitlines() if line.strip()]
    return keys


def portable(rows: list[dict], out: Path) -> list[dict]:
    """Rows with this run's output folder written as <out>, to compare two runs."""
    return json.loads(json.dumps(rows, default=str).replace(str(out), "<out>"))


def outputs(out: Path) -> dict:
    samples = [s.with_(teacher_image=Path(s.teacher_image).relative_to(out).as_posix()) for s in
               read_samples(out / "samples.parquet")]
    return {
        "samples": samples,
        "easyr1": portable(pq.read_table(out / "easyr1.parquet").to_pylist(), out),
        "vision_opd": portable(pq.read_table(out / "vision_opd.parquet").to_pylist(), out),
        "funnel": funnel(out)["stages"],
    }


def test_sigkill_mid_stage_then_rerun_equals_an_uninterrupted_run(tmp_path, world):
    root, samples, images = world
    oracle = Oracle(samples, images, easy={0})
    few = {"regions.max_per_image": 3}
    with oracle_server(oracle) as url:
        clean = outputs(run_synth(synth_config(tmp_path / "clean", root / "images", url, **few)))

        oracle.delay = 0.01  # slow enough to be killed inside a stage
        # writes killed/synth.yaml, which the runner subprocess reads
        synth_config(tmp_path / "killed", root / "images", url, chunk_size=2,
                     **{"endpoint.max_concurrency": 2}, **few)
        cfg_path = tmp_path / "killed" / "synth.yaml"
        out = tmp_path / "killed" / "out"
        validation = out / "store" / "validation.jsonl"
        proc = runner(cfg_path)
        deadline = time.monotonic() + 60
        while lines(validation) < 4 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        assert proc.returncode == -signal.SIGKILL
        done = lines(validation)
        assert 4 <= done < clean["funnel"][4]["in"]  # killed inside the validation stage
        assert not (out / "samples.parquet").exists()
        calls_before = dict(oracle.calls)

        proc = runner(cfg_path)
        stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "| export | sample |" in stdout  # the funnel is printed
    assert oracle.calls["questioner"] == calls_before["questioner"]  # finished stages are not asked again
    assert oracle.calls["validator"] - calls_before["validator"] <= clean["funnel"][4]["in"] - done + 2

    resumed = outputs(out)
    assert resumed == clean
    assert len(resumed["samples"]) > 0
    for stage_name, keys in store_keys(out).items():
        assert len(keys) == len(set(keys)), f"duplicate records in {stage_name}"


def test_shards_split_the_work_and_a_final_run_merges(tmp_path, world):
    root, samples, images = world
    oracle = Oracle(samples, images)
    with oracle_server(oracle) as url:
        few = {"regions.max_per_image": 3}
        whole = outputs(run_synth(synth_config(tmp_path / "whole", root / "images", url, **few)))
        cfg = synth_config(tmp_path / "sharded", root / "images", url, **few)
        out = cfg.out_dir
        parts = []
        for i in range(2):
            cfg.shard = f"{i}/2"
            run_synth(cfg)
            parts.append(read_samples(out / f"samples.{i}of2.parquet"))
            assert (out / "store" / f"questions.{i}of2.jsonl").exists() or not parts[-1]
        calls = sum(oracle.calls.values())
        cfg.shard = "0/1"
        run_synth(cfg)
        assert sum(oracle.calls.values()) == calls  # everything was done by the shards
    ids = [[s.id for s in p] for p in parts]
    assert all(ids) and not set(ids[0]) & set(ids[1])
    merged = outputs(out)
    assert sorted(ids[0] + ids[1]) == [s.id for s in merged["samples"]]
    assert merged["samples"] == whole["samples"] and merged["funnel"] == whole["funnel"]


def test_runner_reports_bad_config_in_one_line(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump({"images": [str(tmp_path)], "out_dir": str(tmp_path / "o"),
                                   "regions": {"backend": "sam"}}))
    proc = runner(cfg)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert stderr.startswith("error:") and "regions.backend" in stderr and len(stderr.strip().splitlines()) == 1
