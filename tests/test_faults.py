"""A run killed at controlled points of a checkpoint save and of a checkpoint rotation (tests/failpoints), then
evaluated and resumed; one writer per run directory.

Each killed run starts its own Ray (no --address), so that SIGKILL takes down the command and every process of its
Ray at once, as a machine losing power or an OOM kill of the session would; the resumes join the tests' shared Ray.
"""

import json
import os
import signal
import uuid
from pathlib import Path

import pytest

from helpers import (SMALL_SETTINGS, gcs_address, iterations_logged, learner_state, ray_worker_pids, result_rows, run_cli,
                     start_cli, sweep_yaml, trial_results, wait_for)

from rllib_cvpo.checkpoints import LOCK_FILE, complete_checkpoints, incomplete_reason
from rllib_cvpo.runs import read_results

FAILPOINTS = Path(__file__).parent / "failpoints"
TOTAL = 4000  # 1000 env steps per iteration (SMALL_SETTINGS): 4 iterations, a checkpoint after each


@pytest.fixture(scope="module")
def small_yaml(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "small.yaml"
    path.write_text(SMALL_SETTINGS)
    return path


def kill_run_at(failpoint: str, run_dir: Path, small_yaml: Path) -> None:
    """Train in ``run_dir`` with ``failpoint`` armed, wait until a process of the run reaches it, then SIGKILL the
    command and every process of its Ray (all carry a tag in their environment)."""
    tag = uuid.uuid4().hex
    marker = run_dir.parent / f"{run_dir.name}.failpoint"
    env = dict(os.environ, PYTHONWARNINGS="ignore", RLLIB_CVPO_FAILPOINT=failpoint,
               RLLIB_CVPO_FAILPOINT_MARKER=str(marker), RLLIB_CVPO_FAULT_TAG=tag,
               PYTHONPATH=os.pathsep.join([str(FAILPOINTS), os.environ.get("PYTHONPATH", "")]))
    args = ["train", "--env", "SpeedLimit-v0", "--total-env-steps", TOTAL, "--env-runners", 0, "--config",
            small_yaml, "--output", run_dir.parent, "--name", run_dir.name]
    proc = start_cli(run_dir.parent / f"{run_dir.name}.log", *args, env={k: str(v) for k, v in env.items()},
                     start_new_session=True)
    try:
        wait_for(marker.exists, 600, f"the failpoint {failpoint}", proc)
    finally:
        victims = tagged_processes(tag)
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=30)
        wait_for(lambda: not tagged_processes(tag), 60, "the killed run's processes to go")
    assert proc.pid in victims and len(victims) > 3  # the command, and its Ray (GCS, raylet, workers)


def recorded_checkpoint(run_dir: Path) -> Path:
    """The checkpoint Tune's experiment state names as the trial's latest (what a resume hands the trainable)."""
    from ray.tune.utils.serialization import TuneFunctionDecoder

    (state_file,) = run_dir.glob("experiment_state-*.json")
    trial = json.loads(state_file.read_text())["trial_data"][0][1]
    manager = json.loads(trial, cls=TuneFunctionDecoder, allow_cloudpickle=True)["checkpoint_manager"]
    return Path(manager.latest_checkpoint_result.checkpoint.path)


def tagged_processes(tag: str) -> list:
    """The pids of live processes whose environment carries RLLIB_CVPO_FAULT_TAG=tag (read from /proc)."""
    needle = f"RLLIB_CVPO_FAULT_TAG={tag}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                if needle in fh.read().split(b"\0"):
                    with open(f"/proc/{entry}/stat") as st:
                        if st.read().rsplit(")", 1)[1].split()[0] != "Z":  # zombies are already dead
                            pids.append(int(entry))
        except OSError:
            pass
    return pids


def resume_to_the_end(run_dir: Path, address: str) -> None:
    """Resume the killed run to its end: it must continue from the newest complete checkpoint (its env steps, its
    learner state), keep every iteration logged before the kill, and number iterations and env steps consistently."""
    trial, _ = trial_results(run_dir)
    before = read_results(trial)
    newest = complete_checkpoints(trial)[-1]
    saved = learner_state(newest)
    final = run_cli("train", "--resume", run_dir, "--address", address)
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    assert "Traceback" not in final.stdout + final.stderr
    _, rows = trial_results(run_dir)
    last = {r["training_iteration"]: r for r in rows}  # a re-run iteration keeps its latest row
    steps = {i: r["cvpo"]["env_steps"] for i, r in last.items()}
    assert all(s == 1000 * i for i, s in steps.items()), steps  # iteration numbers and env steps agree
    assert max(steps.values()) == TOTAL
    assert all(steps[i] == s for i, s in zip(before["training_iteration"], before["env_steps"]))
    # The first iteration after the resume continued the newest complete checkpoint: its env steps, and its
    # learner's update count plus exactly one iteration's updates (1000 env steps x 0.1). (That iteration may
    # have a row from before the kill too, when Tune logged it before the save was cut: the resumed row is later.)
    first = last[saved["__env_steps__"] // 1000 + 1]
    assert len(rows) > len(before)
    assert first["cvpo"]["env_steps"] == saved["__env_steps__"] + 1000
    assert first["learners"]["default_policy"]["num_cvpo_updates"] == saved["default_policy"]["num_updates"] + 100
    assert learner_state(complete_checkpoints(trial)[-1])["__env_steps__"] == TOTAL


@pytest.mark.slow
def test_kill_during_a_checkpoint_save_then_evaluate_and_resume(ray_local, small_yaml, tmp_path):
    run_dir = tmp_path / "killed_in_save"
    kill_run_at("save:3", run_dir, small_yaml)  # the third checkpoint (after iteration 3) is half copied
    trial, _ = trial_results(run_dir)
    cut = trial / "checkpoint_000002"
    assert cut.is_dir() and incomplete_reason(cut) is not None  # the failpoint left it half written
    complete = complete_checkpoints(trial)
    assert complete and cut not in complete
    newest = complete[-1]
    assert learner_state(newest)["__env_steps__"] == 2000
    # evaluate and load_policy take the newest complete checkpoint; the half-copied one, named, is refused.
    ev = run_cli("evaluate", run_dir, "--latest", "--episodes", 1, "--json")
    assert ev.returncode == 0, ev.stdout[-2000:] + ev.stderr[-2000:]
    assert json.loads(ev.stdout.strip().splitlines()[-1])["checkpoint"] == str(newest)
    bad = run_cli("evaluate", cut)
    assert bad.returncode == 2 and "incomplete checkpoint" in bad.stderr, bad.stderr[-2000:]
    resume_to_the_end(run_dir, gcs_address(ray_local))


@pytest.mark.slow
def test_kill_during_a_checkpoint_rotation_then_resume(ray_local, small_yaml, tmp_path):
    run_dir = tmp_path / "killed_in_rotation"
    kill_run_at("rotate:1", run_dir, small_yaml)  # the first checkpoint the rotation deletes is half deleted
    trial, _ = trial_results(run_dir)
    half = [p for p in trial.glob("checkpoint_*") if incomplete_reason(p) is not None]
    assert len(half) == 1 and not (half[0] / "learner_group").exists()
    # Tune's experiment state still names the half-deleted checkpoint as the one to restore (its snapshot came
    # before the rotation): the resume must take the newest complete one instead.
    assert recorded_checkpoint(run_dir) == half[0]
    resume_to_the_end(run_dir, gcs_address(ray_local))


@pytest.mark.slow
def test_a_second_resume_of_a_live_run_is_refused(ray_local, small_yaml, tmp_path):
    run_dir = tmp_path / "live"
    args = ["train", "--env", "SpeedLimit-v0", "--total-env-steps", 3000, "--env-runners", 0, "--config", small_yaml,
            "--output", tmp_path, "--name", "live", "--address", gcs_address(ray_local)]
    proc = start_cli(tmp_path / "live.log", *args)
    try:
        wait_for(lambda: (run_dir / "tuner.pkl").exists(), 300, "the run to start", proc)
        second = run_cli("train", "--resume", run_dir, "--address", gcs_address(ray_local))
        assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
        assert f"is in use by another rllib-cvpo process (pid {proc.pid})" in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1
        assert proc.wait(timeout=600) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    # The lock went with its process: the finished run can be resumed (it has nothing left to do).
    again = run_cli("train", "--resume", run_dir, "--address", gcs_address(ray_local))
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert (run_dir / LOCK_FILE).is_file()


def test_a_run_whose_tuner_state_is_empty_is_refused_in_one_line(tmp_path):
    run_dir = tmp_path / "empty_state"
    run_dir.mkdir()
    (run_dir / "tuner.pkl").write_bytes(b"")
    proc = run_cli("train", "--resume", run_dir)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "tuner.pkl is unreadable" in lines[0] and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_an_env_runner_killed_mid_run_is_restarted_and_the_run_completes(ray_local, small_yaml, tmp_path):
    # kill -9 of the remote EnvRunner's process while the command trains: RLlib restarts it (restart_failed_env_runners
    # is on, as CVPOConfig keeps it) and the run finishes with every iteration's env steps in order.
    from rllib_cvpo import CVPOConfig

    assert CVPOConfig().restart_failed_env_runners
    run_dir = tmp_path / "runner_killed"
    args = ["train", "--env", "SpeedLimit-v0", "--total-env-steps", 4000, "--env-runners", 1, "--config", small_yaml,
            "--output", tmp_path, "--name", run_dir.name, "--address", gcs_address(ray_local)]
    proc = start_cli(tmp_path / "runner_killed.log", *args)

    def runner_pids():
        return ray_worker_pids(ray_local, b"ray::SingleAgentEnvRunner")

    try:
        wait_for(lambda: iterations_logged(run_dir) >= 2 and runner_pids(), 300, "two iterations", proc)
        (victim,) = runner_pids()
        os.kill(victim, signal.SIGKILL)
        assert proc.wait(timeout=600) == 0, (tmp_path / "runner_killed.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    trial, rows = trial_results(run_dir)
    steps = read_results(trial)["env_steps"].tolist()
    assert steps == sorted(steps) and steps[-1] >= 4000 and len(set(steps)) == len(steps)
    assert rows[-1]["env_runners"]["num_env_steps_sampled_lifetime"] == steps[-1]
    restarts = [r["fault_tolerance"]["num_remote_worker_restarts"] for r in rows]
    assert restarts[0] == 0 and restarts[-1] == 1, restarts  # the killed runner was replaced, once
    assert rows[-1]["fault_tolerance"]["num_healthy_workers"] == 1
    checkpoints = complete_checkpoints(trial)
    assert checkpoints and learner_state(checkpoints[-1])["__env_steps__"] == steps[-1]


@pytest.mark.slow
def test_a_trial_killed_in_a_sweep_is_retried_from_its_checkpoint_and_the_sweep_completes(ray_local, tmp_path):
    from rllib_cvpo.sweep import report

    path = tmp_path / "sweep.yaml"
    path.write_text(sweep_yaml("killed_trial", 3000, tail="resources: {env_runners: 0}\nmax_concurrent_trials: 1\n"
                                                         "max_failures: 1\nloggers: [mlflow]\n"))
    storage = tmp_path / "store"
    mlruns = (tmp_path / "mlruns").as_uri()
    proc = start_cli(tmp_path / "sweep.log", "sweep", path, "--storage", storage, "--address", gcs_address(ray_local),
                     env=dict(os.environ, MLFLOW_TRACKING_URI=mlruns))

    def first_trial_checkpointed():
        trials = sorted((storage / "killed_trial").glob("CVPO_*"))
        return bool(trials) and bool(complete_checkpoints(trials[0])) and ray_worker_pids(ray_local, b"ray::CVPO")

    try:
        wait_for(first_trial_checkpointed, 300, "the first trial's first checkpoint", proc)
        (victim,) = ray_worker_pids(ray_local, b"ray::CVPO")
        os.kill(victim, signal.SIGKILL)
        assert proc.wait(timeout=600) == 0, (tmp_path / "sweep.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    trials = sorted((storage / "killed_trial").glob("CVPO_*"))
    assert len(trials) == 2
    assert "The actor died unexpectedly" in (trials[0] / "error.txt").read_text()  # Tune saw the kill, then retried
    for trial in trials:  # both complete; the killed one continued from its checkpoint, never from 0
        assert read_results(trial)["env_steps"].tolist() == [1000, 2000, 3000]
    first_rows = result_rows(trials[0])
    assert [r["cvpo"]["env_steps"] for r in first_rows][0] == 1000
    assert sum(r["cvpo"]["env_steps"] == 1000 for r in first_rows) == 1
    best = report(storage / "killed_trial")["best"]
    assert best is not None
    # evaluate (and load_policy) on the sweep directory take the checkpoint the report names best.
    ev = run_cli("evaluate", storage / "killed_trial", "--episodes", 1, "--json")
    assert ev.returncode == 0, ev.stderr[-2000:]
    assert json.loads(ev.stdout.strip().splitlines()[-1])["checkpoint"] == best["checkpoint"]
    # The sweep file's `loggers: [mlflow]`: each trial's iterations reached MLflow, the killed one's too.
    import mlflow

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = mlflow.tracking.MlflowClient(tracking_uri=mlruns)
    runs = client.search_runs([client.get_experiment_by_name("killed_trial").experiment_id])
    limits = {float(r.data.params["cost_limit"]) for r in runs}
    assert limits == {15.0, 30.0}
    assert all(max(m.step for m in client.get_metric_history(r.info.run_id, "cvpo/env_steps")) >= 2 for r in runs)


def test_a_local_ray_that_times_out_during_startup_is_started_again_and_other_errors_are_raised(monkeypatch, capsys):
    """ray.init's "timed out during startup" (its raylet missed Ray's fixed 30 s on a busy machine) starts the local
    Ray again, up to STARTUP_ATTEMPTS starts; any other error, or the same one when joining a cluster, is raised."""
    import ray

    from rllib_cvpo import training

    def fake_init(outcomes):
        calls = []

        def init(**kwargs):
            calls.append(kwargs)
            outcome = outcomes.pop(0)
            if outcome is not None:
                raise outcome

        return calls, init

    timeout = Exception("The current node timed out during startup. This could happen because ...")
    shutdowns = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "shutdown", lambda: shutdowns.append(1))

    calls, init = fake_init([timeout, timeout, None])
    monkeypatch.setattr(ray, "init", init)
    training._init_ray(None)
    assert len(calls) == 3 and len(shutdowns) == 2
    assert "starting it again (attempt 3 of 3)" in capsys.readouterr().err

    calls, init = fake_init([timeout] * training.STARTUP_ATTEMPTS)
    monkeypatch.setattr(ray, "init", init)
    with pytest.raises(Exception, match="timed out during startup"):
        training._init_ray(None)
    assert len(calls) == training.STARTUP_ATTEMPTS

    for address, error in ((None, RuntimeError("port in use")), ("10.0.0.1:6379", timeout)):
        calls, init = fake_init([error, None])
        monkeypatch.setattr(ray, "init", init)
        with pytest.raises(Exception, match=str(error)[:20]):
            training._init_ray(address)
        assert len(calls) == 1
