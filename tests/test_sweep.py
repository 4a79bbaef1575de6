"""Sweeps: the file schema and its errors, an interrupted sweep resumed without repeating finished trials, and the
report's choice of the best feasible configuration."""

import json
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import CLI, result_rows, start_cli, sweep_yaml
from rllib_cvpo.sweep import load_sweep, report
from rllib_cvpo.training import ConfigFileError

REPO = Path(__file__).resolve().parents[1]


SHIPPED = sorted((REPO / "tune_configs").glob("*.yaml")) + sorted((REPO / "benchmarks" / "learning").glob("*.yaml"))


def test_the_shipped_sweep_files_are_all_found():
    assert {p.stem for p in SHIPPED} >= {"cost_limit_sweep", "kl_bounds_sweep", "speed_limit_quick", "goal_seeds",
                                         "goal_lifted", "cheetah_seeds", "cheetah_lifted", "circle_seeds",
                                         "circle_lifted"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_sweep_files_parse_and_build(path):
    from rllib_cvpo.sweep import build_param_space

    from ray.tune.search.sample import Categorical, Float

    spec = load_sweep(path)
    space = build_param_space(spec)
    for key, dist in spec["search"].items():
        (kind, values), = dist.items()
        if kind == "grid":
            assert space[key] == {"grid_search": values}
        elif kind == "choice":
            assert isinstance(space[key], Categorical) and space[key].categories == values
        else:  # uniform / loguniform: a float domain with the file's bounds
            assert isinstance(space[key], Float) and (space[key].lower, space[key].upper) == tuple(values)
    assert space["seed"] == {"grid_search": spec["seeds"]}
    for key, value in spec["base"].items():  # the base settings reach every trial unchanged
        if key not in spec["search"] and key != "model_config":
            assert space[key] == value, key


@pytest.mark.parametrize(
    "text, line, fragment",
    [
        ("env: SpeedLimit-v0\nsearch:\n  cost_limit: {grid: [1, 2]}\nseedz: [0]\n", 4, "unknown key 'seedz'; did you mean seeds"),
        ("env: SpeedLimit-v0\nsearch:\n  cost_limt: {grid: [1, 2]}\n", 3, "unknown CVPOConfig setting 'cost_limt' in 'search'"),
        ("env: SpeedLimit-v0\nbase:\n  gama: 0.9\nsearch:\n  cost_limit: {grid: [1]}\n", 3, "unknown CVPOConfig setting 'gama'"),
        ("env: SpeedLimit-v0\nsearch:\n  cost_limit: {range: [1, 2]}\n", 3, "search.cost_limit must be one of"),
        ("env: SpeedLimit-v0\nsearch:\n  actor_lr: {loguniform: [0, 1]}\n", 3, "loguniform needs low > 0"),
        ("env: SpeedLimit-v0\nsearch:\n  kl_mean: {uniform: [2, 1]}\n", 3, "low < high"),
        ("env: SpeedLimit-v0\nsearch:\n  cost_limit: {grid: [1]}\nresources: {gpus: 1}\n", 4, "unknown key 'gpus' in 'resources'"),
        ("env: SpeedLimit-v0\nsearch:\n  cost_limit: {grid: [1, 2]\n", 4, "malformed YAML"),
        ("env: SpeedLimit-v0\nsearch:\n  cost_limit: {grid: [1]}\nseeds: [a]\n", 4, "'seeds' must be a non-empty list of integers"),
        # Values a trial would reject, found before Ray starts (CVPOConfig.validate on every grid value).
        ("env: SpeedLimit-v0\nsearch:\n  cost_limit:\n    grid: [-5, .nan]\n", 4, "cost_limit for 'cost' must be a number >= 0, got -5"),
        ("env: SpeedLimit-v0\nsearch:\n  estep_kl: {choice: [0.1, 0]}\n", 3, "estep_kl must be > 0.0, got 0"),
        ("env: SpeedLimit-v0\nsearch:\n  kl_mean: {uniform: [-1, 1]}\n", 3, "kl_mean must be > 0.0, got -1"),
        ("env: SpeedLimit-v0\nbase:\n  gamma: 2\nsearch:\n  cost_limit: {grid: [1]}\n", 3, "gamma must be <= 1.0, got 2"),
        ("env: SpeedLimit-v0\nsearch:\n  cost_limit: {grid: [1]}\nmax_failures: two\n", 4, "max_failures: Input should be a valid integer"),
        ("env: SpeedLimit-v0\nsearch:\n  cost_limit: {grid: [1]}\nmax_concurrent_trials: -3\n", 4, "max_concurrent_trials: Input should be greater than or equal to 0, got -3"),
        ("env: SpeedLimit-v0\nsearch:\n  cost_limit: {grid: [1]}\nstop: 5\n", 4, "stop: Input should be a valid dictionary"),
        ("env: SpeedLimit-v0\nsearch:\n  cost_limit: {grid: [1]}\nresources: {env_runners: -1}\n", 4, "resources.env_runners: Input should be greater than or equal to 0"),
        ("env: SpeedLimit-v0\nsearch:\n  cost_limit: {grid: [1]}\nloggers: [comet]\n", 4, "loggers.0: Input should be 'tensorboard', 'mlflow' or 'wandb'"),
        ("env: SpeedLimit-v0\nbase:\n  model_config: {fcnet_hiddens: big}\nsearch:\n  cost_limit: {grid: [1]}\n", 3, "model_config.fcnet_hiddens must be a list of positive integers, got 'big'"),
        ("env: NoSuchEnv-v0\nsearch:\n  cost_limit: {grid: [1]}\n", 1, "unknown env id 'NoSuchEnv-v0'"),
    ],
)
def test_malformed_sweep_file_names_key_and_line(tmp_path, text, line, fragment):
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    with pytest.raises(ConfigFileError) as info:
        load_sweep(path)
    assert str(info.value).startswith(f"{path}:{line}:"), str(info.value)
    assert fragment in str(info.value)


def test_malformed_sweep_file_through_the_command_is_one_line_exit_2(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text("env: SpeedLimit-v0\nsearch:\n  cost_limt: {grid: [1, 2]}\n")
    proc = subprocess.run([*CLI, "sweep", str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and f"{path}:3: unknown CVPOConfig setting 'cost_limt'" in proc.stderr


# -- report on a constructed sweep ---------------------------------------------------------------------------------
def _fake_trial(root: Path, name: str, cost_limit: float, seed: int, returns, costs):
    trial = root / name
    ckpt = trial / "checkpoint_000001"
    ckpt.mkdir(parents=True)
    (ckpt / "rllib_checkpoint.json").write_text("{}")
    (ckpt / "algorithm_state.pkl").write_bytes(b"state")  # a complete checkpoint (written before the manifest)
    (trial / "params.json").write_text(json.dumps({"cost_limit": cost_limit, "seed": seed, "gamma": 0.99}))
    with open(trial / "result.json", "w") as fh:
        for i, (r, c) in enumerate(zip(returns, costs)):
            summary = {"env_steps": 1000 * (i + 1), "eval_return": r, "eval_cost": c,
                       "eval_over_limit": float(c > cost_limit), "episode_return": r, "episode_cost": c,
                       "episode_over_limit": 0.0, "cost_limit": cost_limit, "feasible": float(c <= cost_limit),
                       "score": r if c <= cost_limit else -1e9 - c}
            fh.write(json.dumps({"training_iteration": i + 1, "cvpo": summary}) + "\n")


def test_report_picks_the_feasible_best_not_the_highest_return(tmp_path):
    root = tmp_path / "sweep"
    # limit 50: the highest return (about 120) at a cost above its limit on average -> infeasible.
    _fake_trial(root, "t_50_0", 50.0, 0, [10, 118], [20, 70])
    _fake_trial(root, "t_50_1", 50.0, 1, [10, 122], [20, 64])
    # limit 25: feasible, return about 80; seed 1 violates on its own, seed 0 does not.
    _fake_trial(root, "t_25_0", 25.0, 0, [5, 78], [30, 20])
    _fake_trial(root, "t_25_1", 25.0, 1, [5, 84], [30, 28])
    # limit 10: feasible, lower return.
    _fake_trial(root, "t_10_0", 10.0, 0, [5, 40], [5, 6])
    _fake_trial(root, "t_10_1", 10.0, 1, [5, 44], [5, 8])
    out = report(root)
    table, best = out["table"], out["best"]
    assert list(table["cost_limit"]) == [10.0, 25.0, 50.0]
    row50 = table[table["cost_limit"] == 50.0].iloc[0]
    assert row50["return_mean"] == pytest.approx(120.0) and not row50["feasible"]
    row25 = table[table["cost_limit"] == 25.0].iloc[0]
    assert row25["return_mean"] == pytest.approx(81.0) and row25["cost_mean"] == pytest.approx(24.0)
    assert row25["return_std"] == pytest.approx(np.std([78, 84], ddof=1))
    assert row25["over_limit"] == pytest.approx(0.5)
    assert best["cost_limit"] == 25.0 and best["feasible"]
    # Its checkpoint: the best-returning seed that is itself within the limit (seed 0), not seed 1.
    assert best["checkpoint"].endswith("t_25_0/checkpoint_000001")
    csv = (root / "report.csv").read_text().splitlines()
    assert csv[0].startswith("cost_limit,return_mean,return_std,cost_mean,cost_std") and len(csv) == 4
    assert (root / "pareto.png").stat().st_size > 10_000
    proc = subprocess.run([*CLI, "report", str(root)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "best feasible configuration: cost_limit=25.0" in proc.stdout
    assert "t_25_0/checkpoint_000001" in proc.stdout


# -- a real sweep, interrupted and resumed -------------------------------------------------------------------------
SWEEP = sweep_yaml("interrupted", 2000, tail="resources: {env_runners: 0}\nmax_concurrent_trials: 1\n").replace(
    "cost_limit: {grid: [15, 30]}", "cost_limit: {grid: [15, 30, 45]}")


def test_plot_legend_names_a_sweeps_trial_by_its_sweep(tmp_path):
    # One seed picked out of a sweep is one of Tune's trial directories (long, per trial); a plot's legend names it
    # by the sweep, and any other run by its own directory.
    from rllib_cvpo.runs import run_label

    sweep = tmp_path / "circle_leaky"
    trial = sweep / "CVPO_SafetyPointCircle1-v0_1b69b_00001_1_cost_limit=25,seed=0_2026-12-05_02-59-59"
    trial.mkdir(parents=True)
    (trial / "result.json").write_text("")
    assert run_label(trial) == "CVPO_SafetyPointCircle1-v0_1b69b_00001_1_cost_limit=25,seed=0_2026-12-05_02-59-59"
    (sweep / "experiment_state-2026-12-05_02-03-47.json").write_text("{}")
    assert run_label(trial) == "circle_leaky"
    assert run_label(sweep) == "circle_leaky"
    single = tmp_path / "my_run"
    (single / "result.json").parent.mkdir()
    (single / "result.json").write_text("")
    assert run_label(single) == "my_run"


def test_plot_legend_tells_apart_two_groups_of_one_sweep_by_their_seeds(tmp_path):
    # Seed 0 of a sweep against its seeds 1 and 2: both groups are the sweep's trials, so the sweep's name alone
    # would name both; each names its seeds. A group whose name is its own keeps it as it is.
    from rllib_cvpo.runs import group_labels

    sweep = tmp_path / "circle_leaky"
    trials = []
    for seed in (0, 1, 2):
        trial = sweep / f"CVPO_SafetyPointCircle1-v0_1b69b_0000{seed}_{seed}_cost_limit=25,seed={seed}_2026-12-05_02-59-59"
        trial.mkdir(parents=True)
        (trial / "result.json").write_text("")
        (trial / "params.json").write_text(json.dumps({"seed": seed, "cost_limit": 25}))
        trials.append(trial)
    (sweep / "experiment_state-2026-12-05_02-03-47.json").write_text("{}")
    lifted = tmp_path / "circle_lifted"
    (lifted / "result.json").parent.mkdir()
    (lifted / "result.json").write_text("")
    assert group_labels([[trials[0]], trials[1:]]) == ["circle_leaky (seed 0)", "circle_leaky (seeds 1, 2)"]
    assert group_labels([trials, [lifted]]) == ["circle_leaky", "circle_lifted"]


def test_plot_legend_names_one_sweep_file_per_seed_by_their_common_name(tmp_path):
    # Seeds run from one sweep file each (circle_round_seed0, _seed1, _seed2) are one group: the legend names the
    # group by the name they share and its seeds, not by the first run's directory.
    from rllib_cvpo.runs import group_labels

    def run(name, seed):
        trial = tmp_path / name / f"CVPO_SafetyPointCircle1-v0_1b69b_00000_0_cost_limit=25,seed={seed}_2026-12-07"
        trial.mkdir(parents=True)
        (trial / "result.json").write_text("")
        (trial / "params.json").write_text(json.dumps({"seed": seed, "cost_limit": 25}))
        (tmp_path / name / "experiment_state-2026-12-07_21-45-14.json").write_text("{}")
        return tmp_path / name

    rounds = [run(f"circle_round_seed{s}", s) for s in (0, 1, 2)]
    defaults = [run(f"circle_recent_seed{s}", s) for s in (0, 1)]
    assert group_labels([rounds, defaults]) == ["circle_round (seeds 0, 1, 2)", "circle_recent (seeds 0, 1)"]
    assert group_labels([rounds[:1], rounds[1:]]) == ["circle_round_seed0", "circle_round (seeds 1, 2)"]


@pytest.mark.slow
def test_interrupted_sweep_resumes_without_repeating_finished_trials(ray_local, tmp_path):
    """Three trials one at a time, interrupted while the second runs: on resume the first (finished) is not run
    again, the second continues from its checkpoint, and the third (not started) runs whole with its configuration
    from the restored param space."""
    address = ray_local.get_runtime_context().gcs_address
    path = tmp_path / "sweep.yaml"
    path.write_text(SWEEP)
    storage = tmp_path / "store"
    sweep_dir = storage / "interrupted"
    proc = start_cli(tmp_path / "first.log", "sweep", path, "--storage", storage, "--address", address)

    def trials():
        return sorted(p for p in sweep_dir.glob("CVPO_*") if p.is_dir()) if sweep_dir.is_dir() else []

    def first_done_second_started():
        ts = [t for t in trials() if result_rows(t)]
        done = [t for t in ts if result_rows(t)[-1]["cvpo"]["env_steps"] >= 2000]
        return len(done) == 1 and len(ts) == 2

    try:
        deadline = time.time() + 400
        while not first_done_second_started():
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.time() < deadline, "timed out waiting for the second trial"
            time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert len(trials()) == 2  # the third has not started
    finished = next(t for t in trials() if result_rows(t)[-1]["cvpo"]["env_steps"] >= 2000)
    unfinished = next(t for t in trials() if t != finished)
    before = (finished / "result.json").read_bytes()
    assert result_rows(unfinished)[-1]["cvpo"]["env_steps"] < 2000  # interrupted mid-way

    # As if the sweep had been started by a version without the setting `cost_feedback_source`: its tuner.pkl does
    # not list it, and the resume (with this version's CVPOConfig) must still be accepted.
    import pickle

    from ray import cloudpickle

    state = pickle.loads((sweep_dir / "tuner.pkl").read_bytes())
    keys = state["__flattened_param_space_keys"]
    assert "cost_feedback_source" in keys
    state["__flattened_param_space_keys"] = [k for k in keys if k != "cost_feedback_source"]
    (sweep_dir / "tuner.pkl").write_bytes(cloudpickle.dumps(state))

    resumed = subprocess.run([*CLI, "sweep", str(path), "--storage", str(storage), "--address", address, "--resume"],
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert (finished / "result.json").read_bytes() == before  # not run again
    assert len(trials()) == 3
    third, = [t for t in trials() if t not in (finished, unfinished)]
    for trial in (unfinished, third):  # each iteration once: the second continued, the third ran whole
        assert [r["cvpo"]["env_steps"] for r in result_rows(trial)] == [1000, 2000]
    out = report(sweep_dir)
    assert sorted(out["table"]["cost_limit"]) == [15.0, 30.0, 45.0] and set(out["table"]["seeds"]) == {1}
    assert out["best"] is not None and Path(out["best"]["checkpoint"]).is_dir()
