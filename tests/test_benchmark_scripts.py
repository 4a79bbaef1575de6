"""The benchmark scripts that docs/benchmarks.md quotes still run against the learner as it is now (its defaults
included): the learner throughput script once, on its smallest setting, with one training call."""

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_learner_throughput_runs_on_the_current_learner():
    out = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "learner_throughput.py"), "--settings", "fsrl-circle", "--calls", "1"],
        capture_output=True, text=True, cwd=REPO, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(s for s in out.stdout.splitlines() if "training path" in s)
    match = re.search(r"training path\s+([\d.]+) updates/s .* \(([\d.]+) ms\) .* update/matmuls ([\d.]+)", line)
    assert match, line
    rate, update_ms, ratio = (float(x) for x in match.groups())
    assert rate > 0 and update_ms > 0 and ratio > 0
    phases = next(s for s in out.stdout.splitlines() if "phases" in s)
    assert all(f"{p} " in phases for p in ("critic", "estep", "dual", "mstep"))
