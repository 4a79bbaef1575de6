"""Per-run learning figures for docs/benchmarks.md section 5, from sweep or train run directories.

    .venv/bin/python benchmarks/learning/table.py STORE/goal_seeds STORE/goal_lifted

For each trial: the means over the second half of the run (iterations after half the final env steps) of the
training-episode return and cost and of the deterministic evaluation return and cost, how many of those evaluations
were within the limit, the mean of the last 3 evaluations (30 episodes with 10 per evaluation), and, from the trial's latest checkpoint, how the cost critic compares with the costs in its
replay buffer: the mean Q_c(s, a) over the replayed pairs against mean(cost) / (1 - gamma), the discounted cost-to-go
those pairs would have if the replayed state distribution were stationary (episodes here are 5-10x longer than
1 / (1 - gamma), so the truncation correction is small). That snapshot swings by 2-3x between checkpoints 12k env
steps apart, so the next column is the same comparison from the learner's own readings (once per sampling round, on
4096 replayed pairs spread through the replay), averaged over the second half: the mean Q_c over the mean
cost-to-go ("-" for runs made before the learner logged them). The last column describes how the training episodes' cost
moves from one iteration to the next over the second half: its standard deviation across iterations and its lag-1
autocorrelation (near -0.5 or below: the cost alternates high and low, a feedback loop cycling with period two).
"""

from __future__ import annotations

import argparse
import json
import pickle
from pathlib import Path

import numpy as np

from rllib_cvpo.runs import read_results, trial_dirs


def critic_calibration(trial: Path) -> tuple[float, float] | None:
    """(mean critic Q_c on the replayed (s, a), stationary cost-to-go of the replay) at the latest checkpoint."""
    from rllib_cvpo import load_policy
    from rllib_cvpo.cvpo.cvpo import REPLAY_STATE

    checkpoints = sorted(trial.glob("checkpoint_*"))
    if not checkpoints:
        return None
    latest = checkpoints[-1]
    with open(latest / "algorithm_state.pkl", "rb") as fh:
        saved = pickle.load(fh)[REPLAY_STATE]
    shards = [s["data"] for s in saved["shards"]] if "shards" in saved else [saved["buffer"]["data"]]
    data = {k: np.concatenate([shard[k] for shard in shards]) for k in shards[0]}  # every learner's shard
    gamma = json.loads((trial / "params.json").read_text()).get("gamma", 0.99)
    policy = load_policy(latest, which="latest")
    q = policy.cost_value(data["obs"], data["actions"]).reshape(-1)
    return float(q.mean()), float(data["costs"][:, 0].mean() / (1.0 - gamma))


def logged_calibration(trial: Path, after_steps: float) -> tuple[float, float] | None:
    """(mean Q_c, mean cost-to-go) of the learner's per-round calibration readings (``qc_replay`` and
    ``qc_replay_cost_to_go``, logged since 2026-12-08) over the iterations after ``after_steps`` env steps; None
    for runs that did not log them."""
    readings = {}
    with open(trial / "result.json") as fh:
        for line in fh:
            try:
                r = json.loads(line)
            except ValueError:
                continue
            module = (r.get("learners") or {}).get("default_policy") or {}
            steps = r.get("num_env_steps_sampled_lifetime") or 0
            if "qc_replay" in module and steps > after_steps:
                readings[r.get("training_iteration")] = (module["qc_replay"], module["qc_replay_cost_to_go"])
    if not readings:
        return None
    q, to_go = np.mean(list(readings.values()), axis=0)  # (a resumed run's repeated iterations: the latest)
    return float(q), float(to_go)


def ratio_text(calib: tuple[float, float] | None) -> str:
    """'Q_c / cost-to-go (ratio)', the ratio only where the replay holds any cost."""
    if not calib:
        return "-"
    return f"{calib[0]:.2f} / {calib[1]:.2f}" + (f" ({calib[0] / calib[1]:.2f})" if calib[1] > 0 else "")


def iteration_swing(costs) -> str:
    """'sd / lag-1 autocorrelation' of the per-iteration training cost (iterations without an episode skipped)."""
    c = np.asarray(costs, np.float64)
    c = c[np.isfinite(c)]
    if len(c) < 3 or c.std() == 0:
        return "-"
    return f"{c.std():.1f} / {np.corrcoef(c[:-1], c[1:])[0, 1]:+.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--no-critic", action="store_true", help="skip the cost-critic calibration column")
    args = parser.parse_args()
    print("| run | trial | env steps | training return | training cost | eval return | eval cost | "
          "evaluations within the limit | last 3 evaluations: return / cost | critic Q_c / replay cost-to-go | "
          "the same, second half | training cost per iteration: sd / lag-1 autocorrelation |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for run in args.runs:
        for trial in trial_dirs(run):
            df = read_results(trial)
            if not len(df):
                continue
            final = float(df["env_steps"].iloc[-1])
            half = df[df["env_steps"] > final / 2]
            limit = float(df["cost_limit"].iloc[-1])
            ev = half["eval_cost"].dropna()
            within = f"{int((ev <= limit).sum())} of {len(ev)}"
            calib = None if args.no_critic else critic_calibration(trial)
            calib_text, half_calib_text = ratio_text(calib), ratio_text(logged_calibration(trial, final / 2))
            name = trial.name.split("_", 3)[-1].rsplit("_", 2)[0]  # e.g. 0_cost_limit=25,seed=0
            last3 = df.dropna(subset=["eval_cost"]).tail(3)  # the final figure: 3 x 10 episodes
            print(f"| {Path(run).name} | {name} | {final:,.0f} | {half['episode_return'].mean():.1f} | "
                  f"{half['episode_cost'].mean():.1f} | {half['eval_return'].mean():.1f} | "
                  f"{half['eval_cost'].mean():.1f} | {within} | {last3['eval_return'].mean():.1f} / "
                  f"{last3['eval_cost'].mean():.1f} | {calib_text} | {half_calib_text} | "
                  f"{iteration_swing(half['episode_cost'])} |")


if __name__ == "__main__":
    main()
