"""`make demo`: the report is written even when a bench run failed, and make fails afterwards.

The recipe runs against a stand-in `prunekit` (VENV pointed at a folder holding it), so the test
checks the Makefile's own logic in milliseconds, without installing or benching anything.
"""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

MAKEFILE = Path(__file__).resolve().parents[1] / "Makefile"

STAND_IN = """#!/bin/sh
echo "$@" >> calls.log
case "$1" in
  bench) exit {bench_status} ;;
  report) mkdir -p report && echo "# report" > report/report.md ;;
esac
"""


def make_demo(folder: Path, bench_status: int) -> subprocess.CompletedProcess:
    """`make demo` in `folder` with the stand-in prunekit; its venv counts as installed."""
    venv = folder / "venv"
    (venv / "bin").mkdir(parents=True)
    prunekit = venv / "bin" / "prunekit"
    prunekit.write_text(STAND_IN.format(bench_status=bench_status))
    prunekit.chmod(0o755)
    (folder / "pyproject.toml").touch()
    stamp = venv / ".installed"
    stamp.touch()
    os.utime(folder / "pyproject.toml", (0, 0))  # older than the stamp: nothing to install
    return subprocess.run(["make", "-s", "-f", str(MAKEFILE), "demo", f"VENV={venv}"], cwd=folder,
                          capture_output=True, text=True)


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
@pytest.mark.parametrize("bench_status", [0, 2])
def test_demo_writes_the_report_and_then_fails_if_a_run_failed(tmp_path, bench_status):
    result = make_demo(tmp_path, bench_status)
    assert (result.returncode == 0) == (bench_status == 0), result.stderr
    assert (tmp_path / "report" / "report.md").exists()
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert calls == ["bench --suite demo", "report --suite demo --out report"]
