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


def test_job_archives_come_back_as_one_file(tmp_path):
    """A device call returns at most 8 files: every job's archive travels inside jobs.tar."""
    import tarfile

    parts = [tmp_path / f"job{i}.tar.gz" for i in range(9)] + [tmp_path / "gpu_use.csv"]
    for i, part in enumerate(parts[:-1]):
        part.write_bytes(bytes([i]) * 10)
    path = gpu_jobs.bundle(tmp_path, parts)  # gpu_use.csv missing: skipped
    assert sorted(p.name for p in tmp_path.iterdir()) == ["jobs.tar"]
    with tarfile.open(path) as tar:
        assert sorted(tar.getnames()) == sorted(p.name for p in parts[:-1])
        assert tar.extractfile("job3.tar.gz").read() == bytes([3]) * 10
