"""The rllib-cvpo command, run as a user runs it (a subprocess): bad input, train -> checkpoint -> evaluate -> plot,
Ctrl-C and a crash mid-run, then --resume. Training runs join the tests' shared Ray through --address."""

import json
import math
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import SMALL_SETTINGS, iterations_logged, run_cli, start_cli
from helpers import gcs_address as _address
from helpers import learner_state as _learner_state
from helpers import trial_results as _results
from helpers import wait_for as _wait_for


@pytest.fixture(scope="module")
def small_yaml(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "small.yaml"
    path.write_text(SMALL_SETTINGS)
    return path


def assert_usage_error(proc, *fragments):
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr  # one line, no traceback
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# -- bad input -----------------------------------------------------------------------------------------------------
def test_unknown_env_is_one_line_and_exit_2():
    assert_usage_error(run_cli("train", "--env", "SafetyPointGoa1-v0"), "unknown env id 'SafetyPointGoa1-v0'",
                       "SafetyPointGoal1-v0")


@pytest.mark.parametrize("value", ["-5", "abc", "nan"])
def test_bad_cost_limit_is_one_line_and_exit_2(value):
    assert_usage_error(run_cli("train", "--cost-limit", value), "--cost-limit", f"expected a number >= 0, got '{value}'")


def test_missing_checkpoint_is_one_line_and_exit_2(tmp_path):
    assert_usage_error(run_cli("evaluate", tmp_path / "nope"), "checkpoint not found", "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_usage_error(run_cli("evaluate", empty), "no checkpoint in", "rllib-cvpo train")


def test_corrupt_checkpoint_is_one_line_and_exit_2(tmp_path):
    ckpt = tmp_path / "ckpt"
    module_dir = ckpt / "learner_group" / "learner" / "rl_module" / "default_policy"
    module_dir.mkdir(parents=True)
    (ckpt / "rllib_checkpoint.json").write_text('{"checkpoint_version": "2.1"}')
    (ckpt / "class_and_ctor_args.pkl").write_bytes(b"not a pickle")
    (ckpt / "algorithm_state.pkl").write_bytes(b"not a pickle")
    (module_dir / "module_state.pkl").write_bytes(b"\x00garbage")
    assert_usage_error(run_cli("evaluate", ckpt), "unreadable checkpoint", str(ckpt))
    # A checkpoint whose rllib_checkpoint.json a crash cut short is named incomplete, not loaded.
    (ckpt / "rllib_checkpoint.json").write_text('{"checkpoint_vers')
    assert_usage_error(run_cli("evaluate", ckpt), "incomplete checkpoint", "rllib_checkpoint.json is unreadable")


def test_unknown_config_key_names_file_line_and_key(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("cost_limit: 10\nestep_kll: 0.1\n")
    assert_usage_error(run_cli("train", "--config", cfg), f"{cfg}:2", "unknown config key 'estep_kll'", "estep_kl")


def test_malformed_config_and_bad_values_are_one_line_and_exit_2(tmp_path):
    cfg = tmp_path / "broken.yaml"
    cfg.write_text("cost_limit: 10\nestep_kl: [0.1\n")
    assert_usage_error(run_cli("train", "--config", cfg), f"{cfg}:", "malformed YAML")
    cfg.write_text("estep_kl: -0.1\n")
    assert_usage_error(run_cli("train", "--config", cfg), "estep_kl must be > 0.0, got -0.1")
    assert_usage_error(run_cli("train", "--resume", tmp_path), "cannot resume", "not a run directory")
    for bad in ("abc", "0", "-5", "2.5"):
        cfg.write_text(f"total_env_steps: {bad}\n")
        assert_usage_error(run_cli("train", "--config", cfg),
                           f"{cfg}: total_env_steps must be a positive whole number of env steps")


# -- envs ----------------------------------------------------------------------------------------------------------
def test_envs_lists_tasks_with_sizes_and_length(tmp_path):
    proc = run_cli("envs", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert list(tmp_path.iterdir()) == []  # MuJoCo's warnings go to logging, not to a MUJOCO_LOG.TXT left here
    rows = {line.split()[0]: line.split()[1:] for line in proc.stdout.splitlines()[1:] if line.startswith(("Safety", "Speed"))}
    assert rows["SpeedLimit-v0"] == ["2", "2", "200"]
    assert rows["SafetyPointGoal1-v0"] == ["60", "2", "1000"]
    assert rows["SafetyPointCircle1-v0"] == ["28", "2", "500"]
    assert rows["SafetyHalfCheetahVelocity-v1"] == ["17", "6", "1000"]


# -- end to end ----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_train_checkpoint_evaluate_plot_end_to_end(ray_local, small_yaml, tmp_path):
    proc = run_cli("train", "--env", "SpeedLimit-v0", "--total-env-steps", 3000, "--env-runners", 0, "--seed", 1,
                   "--config", small_yaml, "--output", tmp_path, "--name", "e2e", "--address", _address(ray_local))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = tmp_path / "e2e"
    # Progress lines (not a terminal: one per iteration) with steps, return, cost against the limit, time left.
    progress = [line for line in proc.stdout.splitlines() if line.startswith("[")]
    assert len(progress) == 3 and "3000/3000 steps" in progress[-1] and "/ 25" in progress[-1]
    assert "left" in progress[-1]
    assert "best feasible checkpoint:" in proc.stdout and "latest checkpoint:" in proc.stdout
    assert "env steps" in (run_dir / "summary.txt").read_text()
    trial, rows = _results(run_dir)
    assert [r["cvpo"]["env_steps"] for r in rows] == [1000, 2000, 3000]
    assert all(np.isfinite(r["cvpo"]["eval_return"]) and np.isfinite(r["cvpo"]["eval_cost"]) for r in rows)
    # Kept: the latest checkpoint and the best-scoring one (feasible first, then return), nothing else.
    from rllib_cvpo.runs import checkpoint_summary, find_checkpoints

    kept = sorted(trial.glob("checkpoint_*"))
    found = find_checkpoints(run_dir)
    assert set(kept) == {found["latest"], found["best"]}  # exactly those two (one, if the latest is the best)
    assert found["latest"] == kept[-1] and checkpoint_summary(kept[-1])["env_steps"] == 3000
    best_score = max(r["cvpo"]["score"] for r in rows)
    assert checkpoint_summary(found["best"])["score"] == best_score

    # evaluate: the run directory resolves to its best feasible checkpoint; deterministic, seeded episodes.
    ev = run_cli("evaluate", run_dir, "--episodes", 3, "--seed", 5, "--json", "--video", tmp_path / "videos")
    assert ev.returncode == 0, ev.stderr[-3000:]
    out = json.loads(ev.stdout.strip().splitlines()[-1])
    assert out["env"] == "SpeedLimit-v0" and out["episodes"] == 3 and len(out["returns"]) == 3
    assert np.isclose(out["return_mean"], np.mean(out["returns"])) and np.isclose(out["cost_mean"], np.mean(out["costs"]))
    assert out["over_limit_fraction"] == np.mean(np.array(out["costs"]) > 25.0)
    again = json.loads(run_cli("evaluate", run_dir, "--episodes", 3, "--seed", 5, "--json").stdout.splitlines()[-1])
    assert again["returns"] == out["returns"]  # deterministic
    # --stochastic: the exploring policy (a Gaussian draw per step), reproducible from its seed, other episodes.
    noisy = [json.loads(run_cli("evaluate", run_dir, "--episodes", 3, "--seed", 5, "--json", "--stochastic")
                        .stdout.splitlines()[-1]) for _ in range(2)]
    assert noisy[0]["policy"] == "stochastic" and out["policy"] == "deterministic"
    assert noisy[0]["returns"] == noisy[1]["returns"] and noisy[0]["returns"] != out["returns"]
    import imageio.v2 as imageio

    video = Path(out["videos"][0])
    frames = np.stack([f for f in imageio.get_reader(video, format="FFMPEG")])  # its len() is inf: no list()
    assert frames.shape[0] == 201 and frames.shape[-1] == 3 and frames.std() > 5  # reset frame + 200 steps

    # plot: the curves are the run's own data, drawn into a PNG; the run's curves.png exists too.
    from rllib_cvpo.runs import collect_curves

    png = tmp_path / "plot.png"
    pl = run_cli("plot", run_dir, run_dir, "--out", png)
    assert pl.returncode == 0, pl.stderr
    curves = collect_curves([run_dir])
    np.testing.assert_allclose(curves["eval_return"]["steps"], [1000, 2000, 3000])
    np.testing.assert_allclose(curves["eval_return"]["mean"], [r["cvpo"]["eval_return"] for r in rows])
    np.testing.assert_allclose(curves["episode_cost"]["mean"], [r["cvpo"]["episode_cost"] for r in rows])
    assert curves["cost_limit"] == 25.0
    image = imageio.imread(png)
    assert image.ndim == 3 and image.shape[0] > 300 and image.std() > 10
    assert (run_dir / "curves.png").stat().st_size > 10_000
    # --baseline draws other runs beside them (grey), and a missing baseline directory is a usage error.
    png2 = tmp_path / "plot_vs.png"
    pl = run_cli("plot", run_dir, "--baseline", run_dir, "--out", png2)
    assert pl.returncode == 0, pl.stderr
    assert np.abs(imageio.imread(png2).astype(float) - image).mean() > 1  # the grey curves are there
    pl = run_cli("plot", run_dir, "--baseline", tmp_path / "nope", "--out", png2)
    assert pl.returncode == 2 and "run directory not found" in pl.stderr and "nope" in pl.stderr


@pytest.mark.slow
def test_interrupt_and_crash_then_resume_continue_steps_and_duals(ray_local, small_yaml, tmp_path):
    address = _address(ray_local)
    run_dir = tmp_path / "resumable"
    args = ["train", "--env", "SpeedLimit-v0", "--total-env-steps", 6000, "--env-runners", 0, "--config", small_yaml,
            "--output", tmp_path, "--name", "resumable", "--address", address]
    proc = start_cli(tmp_path / "first.log", *args)
    try:
        _wait_for(lambda: iterations_logged(run_dir) >= 2, 300, "two iterations", proc)
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert proc.wait(timeout=300) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
    text = (tmp_path / "first.log").read_text()
    assert "interrupt: finishing this iteration and saving a checkpoint" in text
    assert f"resume with: rllib-cvpo train --resume {run_dir}" in text
    trial, rows = _results(run_dir)
    stopped_at = rows[-1]["cvpo"]["env_steps"]
    assert 2000 <= stopped_at < 6000
    # Ctrl-C saved a checkpoint of the last iteration it let finish.
    latest = max(trial.glob("checkpoint_*"))
    saved = _learner_state(latest)
    assert saved["__env_steps__"] == stopped_at and saved["default_policy"]["num_updates"] > 0
    assert json.loads((latest / "cvpo_metadata.json").read_text())["env_steps"] == stopped_at

    # Resume, then crash (SIGKILL, no chance to save) after one more iteration; resume again to the end.
    proc = start_cli(tmp_path / "second.log", "train", "--resume", run_dir, "--address", address)
    try:
        _wait_for(lambda: len(_results(run_dir)[1]) >= len(rows) + 1, 300, "an iteration after resuming", proc)
        proc.kill()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    _, rows2 = _results(run_dir)
    first_resumed = rows2[len(rows)]
    # Steps and the learner state continued from the checkpoint instead of starting over.
    assert first_resumed["cvpo"]["env_steps"] == stopped_at + 1000
    assert first_resumed["training_iteration"] == rows[-1]["training_iteration"] + 1
    # Exactly one iteration's updates on top of the checkpoint's count: 1000 env steps x 0.1 updates per env step.
    updates = first_resumed["learners"]["default_policy"]["num_cvpo_updates"]
    assert updates == saved["default_policy"]["num_updates"] + 100

    time.sleep(2)  # let the killed driver's trial actor be cleaned up
    final = run_cli("train", "--resume", run_dir, "--address", address)
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    from rllib_cvpo.runs import read_results

    trial, _ = _results(run_dir)
    steps = read_results(trial)["env_steps"].tolist()  # one row per iteration (a re-run iteration keeps its last)
    assert steps == list(range(1000, 6001, 1000))  # never restarted from 0
    end_state = _learner_state(max(trial.glob("checkpoint_*")))
    assert end_state["__env_steps__"] == 6000
    iterations_after = (6000 - first_resumed["cvpo"]["env_steps"]) // 1000
    assert end_state["default_policy"]["num_updates"] == updates + 100 * iterations_after


def _summary(limit, evaluation, runners=None):
    """CVPO.summarize itself on a result dict (its config from small_config with this cost limit)."""
    from types import SimpleNamespace

    from helpers import small_config

    from rllib_cvpo.cvpo.cvpo import CVPO

    algo = SimpleNamespace(config=small_config(cost_limit=limit))
    algo._constraint_costs = CVPO._constraint_costs.__get__(algo)
    result = {"env_runners": runners or {}, "evaluation": {"env_runners": evaluation},
              "num_env_steps_sampled_lifetime": 1000}
    return CVPO.summarize(algo, result)


def test_summary_scores_feasible_first_then_return_and_handles_missing_and_several_constraints():
    from rllib_cvpo.cvpo.cvpo import INFEASIBLE_SCORE_OFFSET

    feasible = _summary(25.0, {"episode_return_mean": 50.0, "episode_cost": 10.0})
    assert feasible["feasible"] == 1.0 and feasible["score"] == 50.0
    over = _summary(25.0, {"episode_return_mean": 90.0, "episode_cost": 40.0})
    assert over["feasible"] == 0.0 and over["score"] == INFEASIBLE_SCORE_OFFSET - 15.0
    assert over["score"] < _summary(25.0, {"episode_return_mean": -500.0, "episode_cost": 0.0})["score"]
    # No evaluation: judged by the training episodes; nothing at all: no score.
    judged = _summary(25.0, {}, runners={"episode_return_mean": 12.0, "episode_cost": 3.0})
    assert judged["feasible"] == 1.0 and judged["score"] == 12.0 and math.isnan(judged["eval_return"])
    # With an evaluation, it alone judges: training episodes over the limit do not make the policy infeasible.
    both = _summary(25.0, {"episode_return_mean": 50.0, "episode_cost": 10.0},
                    runners={"episode_return_mean": 80.0, "episode_cost": 60.0})
    assert both["feasible"] == 1.0 and both["score"] == 50.0 and both["episode_cost"] == 60.0
    assert math.isnan(_summary(25.0, {})["score"]) and _summary(25.0, {})["feasible"] == 0.0
    # Several constraints: each within its own limit; the score of an infeasible one sums the violations.
    two = {"a": 10.0, "b": 5.0}
    assert _summary(two, {"episode_return_mean": 7.0, "episode_cost": 14.0, "episode_a": 9.0,
                          "episode_b": 5.0})["score"] == 7.0
    violated = _summary(two, {"episode_return_mean": 7.0, "episode_cost": 17.0, "episode_a": 8.0, "episode_b": 9.0})
    assert violated["feasible"] == 0.0 and violated["score"] == INFEASIBLE_SCORE_OFFSET - 4.0
    assert violated["cost_limit"] == 15.0
    both_over = _summary(two, {"episode_return_mean": 7.0, "episode_cost": 21.0, "episode_a": 12.0, "episode_b": 9.0})
    assert both_over["score"] == INFEASIBLE_SCORE_OFFSET - (2.0 + 4.0)


def test_best_checkpoint_is_feasible_first_then_return(tmp_path):
    from rllib_cvpo.runs import find_checkpoints

    trial = tmp_path / "run" / "CVPO_x"
    trial.mkdir(parents=True)
    (trial / "result.json").write_text("")
    # Scores from CVPO.summarize: an infeasible high return ranks below every feasible one.
    for i, (ret, cost) in enumerate([(50.0, 10.0), (90.0, 40.0), (70.0, 20.0), (30.0, 5.0)]):
        ckpt = trial / f"checkpoint_{i:06d}"
        ckpt.mkdir()
        (ckpt / "rllib_checkpoint.json").write_text("{}")
        (ckpt / "algorithm_state.pkl").write_bytes(b"state")
        summary = _summary(25.0, {"episode_return_mean": ret, "episode_cost": cost})
        (ckpt / "cvpo_metadata.json").write_text(json.dumps({"training_iteration": i + 1, "summary": summary}))
    found = find_checkpoints(tmp_path / "run")
    assert found["best"].name == "checkpoint_000002" and found["latest"].name == "checkpoint_000003"
    # A newer checkpoint that a kill cut short is neither the latest nor the best.
    cut = trial / "checkpoint_000004"
    cut.mkdir()
    (cut / "rllib_checkpoint.json").write_text("{}")
    (cut / "cvpo_metadata.json").write_text(json.dumps({"summary": {"score": 1e9}}))
    found = find_checkpoints(tmp_path / "run")
    assert found["best"].name == "checkpoint_000002" and found["latest"].name == "checkpoint_000003"


def test_resume_refuses_every_option_it_would_ignore(tmp_path):
    proc = run_cli("train", "--resume", tmp_path, "--env-runners", 2, "--name", "other", "--output", tmp_path)
    assert_usage_error(proc, "--resume continues a run with its own settings and directory: drop --env-runners, "
                             "--output, --name")


def test_progress_line_fits_the_terminal(monkeypatch):
    import io

    from rllib_cvpo.training import ProgressBar

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setenv("COLUMNS", "60")
    out = Terminal()
    bar = ProgressBar(100_000, 25.0, out)
    bar.setup()
    bar._stop.set()  # no clock thread redraws during the test
    bar.on_trial_result(1, [], None, {"cvpo": {"env_steps": 5000, "episode_return": 12.5, "episode_cost": 30.0,
                                               "eval_return": 15.0, "eval_cost": 10.0}})
    drawn = [part for part in out.getvalue().split("\r") if part]
    assert drawn and all(len(part.rstrip("\n")) == 59 for part in drawn)  # one column spare: never wraps
    assert drawn[-1].startswith("[#") and "5000/100000" in drawn[-1]
