"""Run several `zoomworld_fast.py` jobs at once on one GPU, each into its own folder of $OUT.

The ZoomWorld trainer is launch-bound (11 ms of GPU work per 250 ms step on an H100, see
docs/ZOOMWORLD.md), so one process leaves the GPU mostly idle: jobs run side by side cost little
more device time than one. A jobs file holds one job per line, `name: <zoomworld_fast.py arguments>`
(`#` starts a comment); each job gets `--out $OUT/<name>`, packed as <name>.tar.gz, and all of
them come back in one $OUT/jobs.tar with gpu_use.csv (a device call returns at most 8 files):

    OUT=$OUT BUDGET=560 bash benchmarks/gpu_run.sh benchmarks/gpu_jobs.py benchmarks/jobs/ceiling.txt

Each job fits its steps to its own wall-clock budget from its own measured step time, so
sharing the GPU shortens runs rather than overrunning them. Jobs start `--stagger` seconds apart
so that their scene rendering (CPU workers) does not all happen at once.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def read_jobs(path: Path) -> list[tuple[str, list[str]]]:
    jobs = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, rest = line.partition(":")
        if not sep or not name.strip().isidentifier():
            raise SystemExit(f"{path}:{n}: expected 'name: arguments', got {line!r}")
        jobs.append((name.strip(), shlex.split(rest)))
    if len({name for name, _ in jobs}) != len(jobs):
        raise SystemExit(f"{path}: job names must be unique")
    return jobs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("jobs", type=Path)
    p.add_argument("--out", default=None, help="default: $OUT")
    p.add_argument("--stagger", type=float, default=20.0, help="seconds between job starts")
    args = p.parse_args(argv)
    out = Path(args.out or os.environ["OUT"])
    jobs = read_jobs(args.jobs)
    procs = {}
    # GPU utilisation and memory every 5 s, to see how much of the GPU the jobs together used
    smi = subprocess.Popen(["nvidia-smi", "--query-gpu=timestamp,utilization.gpu,memory.used", "--format=csv",
                            "-l", "5"], stdout=open(out / "gpu_use.csv", "w"), stderr=subprocess.DEVNULL) \
        if shutil.which("nvidia-smi") else None
    try:
        for i, (name, job_args) in enumerate(jobs):
            if i:
                time.sleep(args.stagger)
            folder = out / name
            folder.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, str(ROOT / "benchmarks/zoomworld_fast.py"), *job_args, "--out", str(folder)]
            (folder / "command.txt").write_text(shlex.join(cmd) + "\n")
            log = open(folder / "console.log", "w")
            procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
            print(time.strftime("%H:%M:%S"), "started", name, flush=True)
        for name, proc in procs.items():
            rc = proc.wait()
            print(time.strftime("%H:%M:%S"), name, "exit", rc, flush=True)
    except KeyboardInterrupt:  # the outer timeout: let every job write what it has, then pack
        for proc in procs.values():
            proc.send_signal(signal.SIGINT)
        for proc in procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
    if smi is not None:
        smi.terminate()
    for name in procs:
        folder = out / name
        tail = (folder / "console.log").read_text().splitlines()[-6:]
        print(f"--- {name}\n" + "\n".join(tail), flush=True)
        with tarfile.open(out / f"{name}.tar.gz", "w:gz") as tar:
            tar.add(folder, arcname=name)
        subprocess.run(["rm", "-rf", str(folder)], check=False)
    bundle(out, [out / f"{name}.tar.gz" for name in procs] + [out / "gpu_use.csv"])
    return 0


def bundle(out: Path, parts: list[Path]) -> Path:
    """The parts that exist, moved into one uncompressed out/jobs.tar (already compressed inside)."""
    with tarfile.open(out / "jobs.tar", "w") as tar:
        for part in parts:
            if part.exists():
                tar.add(part, arcname=part.name)
                part.unlink()
    return out / "jobs.tar"


if __name__ == "__main__":
    sys.exit(main())
