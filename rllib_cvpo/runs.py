"""Run directories: what `rllib-cvpo train` (one Tune trial) and `rllib-cvpo sweep` (many) write, read back.

A run directory is a Ray Tune experiment directory: ``tuner.pkl`` and the experiment state, plus one trial directory
per trial holding Tune's ``result.json`` (one JSON line per iteration, CVPO's summary under ``"cvpo"``) and its
``checkpoint_NNNNNN`` directories. ``rllib-cvpo train`` adds ``run.json`` (what was asked for) and, at the end,
``summary.txt`` and ``curves.png``.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Dict, List, Optional

import pandas as pd

from rllib_cvpo.checkpoints import complete_checkpoints

RUN_FILE = "run.json"
SUMMARY_COLUMNS = [
    "env_steps", "episode_return", "episode_cost", "episode_over_limit", "eval_return", "eval_cost",
    "eval_over_limit", "cost_limit", "feasible", "score",
]


def trial_dirs(run_dir: str | Path) -> List[Path]:
    """The trial directories under a run directory (or the directory itself if it is a trial directory)."""
    root = Path(run_dir)
    if (root / "result.json").is_file():
        return [root]
    return sorted(p for p in root.iterdir() if p.is_dir() and (p / "result.json").is_file()) if root.is_dir() else []


def read_results(trial_dir: str | Path) -> pd.DataFrame:
    """One row per training iteration: CVPO's summary columns, ``time_total_s`` and ``training_iteration``. Rows
    repeated by a resumed run (an iteration trained again after restoring an earlier checkpoint) keep their latest
    version."""
    rows = []
    with open(Path(trial_dir) / "result.json") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                r = json.loads(line)
            except ValueError:
                continue  # a line cut short by a crash
            row = {k: r.get("cvpo", {}).get(k, math.nan) for k in SUMMARY_COLUMNS}
            row.update(
                training_iteration=r.get("training_iteration"),
                time_total_s=r.get("time_total_s", math.nan),
                trial_id=r.get("trial_id"),
            )
            rows.append(row)
    df = pd.DataFrame(rows, columns=SUMMARY_COLUMNS + ["training_iteration", "time_total_s", "trial_id"])
    if len(df):
        df = df.drop_duplicates("training_iteration", keep="last").sort_values("training_iteration")
    return df.reset_index(drop=True)


def _checkpoint_dirs(trial: Path) -> List[Path]:
    """The trial's complete checkpoints, oldest first (one a kill cut short is never used)."""
    return complete_checkpoints(trial)


def checkpoint_summary(checkpoint: Path) -> Dict:
    """The iteration summary CVPO wrote into a checkpoint (``cvpo_metadata.json``), or {}."""
    try:
        meta = json.loads((Path(checkpoint) / "cvpo_metadata.json").read_text())
    except (OSError, ValueError):
        return {}
    summary = dict(meta.get("summary") or {})
    summary["training_iteration"] = meta.get("training_iteration")
    return summary


def find_checkpoints(run_dir: str | Path) -> Dict[str, Optional[Path]]:
    """{"latest": newest checkpoint, "best": best feasible (evaluation cost within the limit first, then return;
    the least-violating one if none is feasible)} for a single-trial run directory (or a trial directory). Ranks
    by the summary each checkpoint carries, so it holds whatever Tune kept."""
    trials = trial_dirs(run_dir)
    if len(trials) != 1:
        return {"latest": None, "best": None}
    existing = _checkpoint_dirs(trials[0])
    if not existing:
        return {"latest": None, "best": None}
    latest = existing[-1]
    ranked = []
    for index, ckpt in enumerate(existing):
        score = checkpoint_summary(ckpt).get("score")
        if isinstance(score, (int, float)) and math.isfinite(score):
            ranked.append((score, index, ckpt))
    best = max(ranked)[2] if ranked else latest
    return {"latest": latest, "best": best}


def read_run_file(run_dir: str | Path) -> Dict:
    path = Path(run_dir) / RUN_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def summary_table(df: pd.DataFrame, limit: float) -> str:
    """A plain-text table of a run: first, best and last evaluated iterations."""
    if not len(df):
        return "no iterations finished"
    shown = {"first": df.iloc[0], "last": df.iloc[-1]}
    feasible = df[df["feasible"] > 0]
    if len(feasible):
        shown["best feasible"] = feasible.sort_values("eval_return").iloc[-1]
    header = f"{'':14s} {'env steps':>10s} {'return':>9s} {'cost':>8s} {'eval return':>12s} {'eval cost':>10s}  feasible"
    lines = [header, "-" * len(header)]
    for name, row in shown.items():
        lines.append(
            f"{name:14s} {int(row['env_steps']):>10d} {row['episode_return']:>9.2f} {row['episode_cost']:>8.2f} "
            f"{row['eval_return']:>12.2f} {row['eval_cost']:>10.2f}  {'yes' if row['feasible'] else 'no'}"
        )
    lines.append(f"cost limit {limit:g}; return and cost are per-episode means (eval: deterministic policy)")
    return "\n".join(lines)


def collect_curves(run_dirs: List[str | Path]) -> Dict[str, Dict[str, "object"]]:
    """The curves ``plot_runs`` draws: for each of eval_return, episode_return, eval_cost, episode_cost, the env-step
    grid (the union of all runs' iteration steps), and the mean, min and max across runs (each run interpolated
    linearly onto the grid, NaN outside its range), and the number of runs; plus ``cost_limit``."""
    import warnings

    import numpy as np

    frames = []
    for run in run_dirs:
        trials = trial_dirs(run)
        if not trials:
            raise FileNotFoundError(f"no results in {str(run)!r}: expected a run directory written by rllib-cvpo")
        for trial in trials:
            df = read_results(trial)
            if len(df):
                frames.append(df)
    if not frames:
        raise FileNotFoundError(f"no finished iterations in {', '.join(map(str, run_dirs))}")
    grid = np.unique(np.concatenate([f["env_steps"].to_numpy(float) for f in frames]))
    out: Dict[str, Dict] = {"cost_limit": float(frames[0]["cost_limit"].dropna().iloc[-1])}
    for col in ("eval_return", "episode_return", "eval_cost", "episode_cost"):
        curves = []
        for f in frames:
            ok = f[col].notna()
            if ok.any():
                x, y = f.loc[ok, "env_steps"].to_numpy(float), f.loc[ok, col].to_numpy(float)
                curves.append(np.interp(grid, x, y, left=np.nan, right=np.nan))
        if curves:
            stack = np.vstack(curves)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                out[col] = {"steps": grid, "mean": np.nanmean(stack, 0), "min": np.nanmin(stack, 0),
                            "max": np.nanmax(stack, 0), "runs": len(curves)}
    return out


def run_label(run_dir: str | Path) -> str:
    """The name a run goes by in a plot's legend: its directory's, or for one trial of a sweep (Tune's long
    per-trial directory, e.g. one seed picked out of several) the sweep's name."""
    path = Path(run_dir).resolve()
    if (path / "result.json").is_file() and any(path.parent.glob("experiment_state*.json")):
        return path.parent.name
    return path.name


def run_seeds(run_dirs: List[str | Path]) -> List[int]:
    """The seeds of the trials under ``run_dirs`` (each trial's ``params.json``), sorted; trials without one are
    left out."""
    seeds = set()
    for run in run_dirs:
        for trial in trial_dirs(run):
            try:
                seed = json.loads((trial / "params.json").read_text()).get("seed")
            except (OSError, ValueError):
                continue
            if isinstance(seed, int):
                seeds.add(seed)
    return sorted(seeds)


def _common_name(dirs: List[str | Path]) -> Optional[str]:
    """The name several differently named runs share, from one sweep file per seed (``circle_seed0``,
    ``circle_seed1``: ``circle``): their names' common start without a trailing ``_seed``; None where that is empty
    or the names are all the same."""
    names = [run_label(d) for d in dirs]
    if len(set(names)) < 2:
        return None
    common = os.path.commonprefix(names)
    common = re.sub(r"_?(seeds?\d*)?_?$", "", common)
    return common or None


def group_labels(groups: List[List[str | Path]]) -> List[str]:
    """The legend's name for each group of runs: its first directory's :func:`run_label`, or where the group's runs
    are named apart (one sweep file per seed) their common name and their seeds; where two groups would get the same
    name (e.g. two sets of seeds picked out of one sweep) each of those also names its seeds."""

    def with_seeds(label: str, dirs) -> str:
        seeds = run_seeds(dirs)
        return f"{label} (seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))})" if seeds else label

    commons = [_common_name(dirs) for dirs in groups]
    names = [with_seeds(common, dirs) if common else run_label(dirs[0]) for common, dirs in zip(commons, groups)]
    return [with_seeds(name, dirs) if names.count(name) > 1 and not common else name
            for name, common, dirs in zip(names, commons, groups)]


def plot_runs(run_dirs: List[str | Path], out: str | Path, title: Optional[str] = None,
              cost_limit: Optional[float] = None, baseline: Optional[List[str | Path]] = None) -> Path:
    """Return and cost against env steps for one or several runs (e.g. seeds): the mean line and the min-max band
    across runs, evaluation (deterministic) and training episodes, the cost limit dashed. ``baseline``: other runs
    drawn beside them in grey (e.g. the same budget with the limit lifted), each group labelled by its cost limit
    (by :func:`group_labels` where both have the same limit).
    Returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    groups = [(collect_curves(run_dirs), ("tab:blue", "tab:orange"), run_dirs)]
    if baseline:
        groups.append((collect_curves(baseline), ("dimgray", "darkgray"), baseline))
    limit = cost_limit if cost_limit is not None else groups[0][0]["cost_limit"]
    # Groups are told apart by their cost limits, or where the limits are the same by group_labels (names, then seeds).
    by_limit = len({g[0]["cost_limit"] for g in groups}) == len(groups)
    names = group_labels([dirs for _, _, dirs in groups])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (metric, label) in zip(axes, (("return", "episode return"), ("cost", "episode cost"))):
        for (curves, colors, dirs), group_name in zip(groups, names):
            if not baseline:
                group = ""
            elif by_limit:
                group = f"limit {curves['cost_limit']:g}: "
            else:
                group = f"{group_name}: "
            for (prefix, style), color in zip((("eval_", "-"), ("episode_", ":")), colors):
                c = curves.get(prefix + metric)
                if c is None:
                    continue
                name = group + ("evaluation (deterministic)" if prefix == "eval_" else "training episodes")
                ax.plot(c["steps"], c["mean"], style, marker="o", markersize=2.5, color=color,
                        label=f"{name}, mean of {c['runs']}" if c["runs"] > 1 else name)
                if c["runs"] > 1:
                    ax.fill_between(c["steps"], c["min"], c["max"], color=color, alpha=0.2)
        if metric == "cost":
            ax.axhline(limit, color="red", linestyle="--", label=f"cost limit {limit:g}")
        ax.set_xlabel("env steps")
        # 100k rather than 100000: six-digit tick labels run into each other
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x / 1000:g}k" if abs(x) >= 1000 else f"{x:g}"))
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title or ", ".join(Path(r).name for r in run_dirs)[:120], fontsize=10)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
