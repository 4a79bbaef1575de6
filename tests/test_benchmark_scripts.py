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


def test_learning_table_averages_the_learners_critic_readings_over_the_second_half(tmp_path):
    """table.py's "second half" critic column is the mean logged Q_c over the mean logged cost-to-go of the
    iterations after half the run's env steps (the latest version of an iteration a resumed run repeated)."""
    import json

    trial = tmp_path / "seeds" / "CVPO_Env_00000_0_cost_limit=25,seed=0_2026-12-08_00-00-00"
    trial.mkdir(parents=True)
    rows = []
    for it, (q, to_go) in enumerate([(9.0, 1.0), (1.0, 2.0), (2.0, 3.0), (5.0, 5.0)], start=1):
        rows.append({"training_iteration": it, "num_env_steps_sampled_lifetime": 1000 * it,
                     "cvpo": {"env_steps": 1000 * it, "episode_return": 1.0, "episode_cost": 10.0 + it,
                              "eval_return": 2.0, "eval_cost": 20.0, "cost_limit": 25.0},
                     "learners": {"default_policy": {"qc_replay": q, "qc_replay_cost_to_go": to_go}}})
    rows.append(dict(rows[2], learners={"default_policy": {"qc_replay": 4.0, "qc_replay_cost_to_go": 3.0}}))  # resumed
    (trial / "result.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "learning" / "table.py"), "--no-critic",
                          str(tmp_path / "seeds")], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(s for s in out.stdout.splitlines() if s.startswith("| seeds |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    # Iterations 3 and 4 (after 2000 of 4000 steps), iteration 3 in its resumed version: (4 + 5) / 2 over (3 + 5) / 2.
    assert cells[9] == "-" and cells[10] == "4.50 / 4.00 (1.12)", cells
