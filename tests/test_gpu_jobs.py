"""The committed GPU jobs files (benchmarks/jobs/*.txt) stay runnable: every job parses with the
arguments `benchmarks/zoomworld_fast.py` takes today, and the jobs reader rejects bad lines."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import gpu_jobs  # noqa: E402
import zoomworld_fast  # noqa: E402

JOB_FILES = sorted((BENCH / "jobs").glob("*.txt"))


@pytest.mark.parametrize("path", JOB_FILES, ids=[p.name for p in JOB_FILES])
def test_every_committed_job_parses(path):
    jobs = gpu_jobs.read_jobs(path)
    assert jobs
    parser = zoomworld_fast.build_parser()
    for name, args in jobs:
        parsed = parser.parse_args([*args, "--out", f"/tmp/{name}"])
        assert parsed.cmd in ("models", "opd")
        if parsed.cmd == "models" and parsed.ceiling_seconds > 0:
            zoomworld_fast.parse_schedule(parsed.ceiling_schedule)  # view names checked too


def test_bad_jobs_files_fail_clearly(tmp_path):
    bad = tmp_path / "jobs.txt"
    bad.write_text("no colon here\n")
    with pytest.raises(SystemExit, match="expected 'name: arguments'"):
        gpu_jobs.read_jobs(bad)
    bad.write_text("a: models\na: opd\n")
    with pytest.raises(SystemExit, match="unique"):
        gpu_jobs.read_jobs(bad)
