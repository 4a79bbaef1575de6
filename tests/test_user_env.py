"""A user's own env, from outside the package (tests/user_envs/cost_pendulum.py), through the command: trained with a
remote EnvRunner, evaluated and served; and a gymnasium registration made in the user's process reaching remote
EnvRunners."""

import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from helpers import SMALL_SETTINGS, free_port, gcs_address, interrupt, run_cli, start_cli, trial_results

USER_ENVS = Path(__file__).parent / "user_envs"


@pytest.fixture(scope="module")
def user_env():
    """The environment of a user whose module lives outside the package (on PYTHONPATH)."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(USER_ENVS), os.environ.get("PYTHONPATH", "")]))


def _post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return resp.status, json.loads(resp.read())


@pytest.mark.slow
def test_user_env_trains_with_a_remote_env_runner_evaluates_and_serves(ray_local, user_env, tmp_path):
    config = tmp_path / "small.yaml"
    config.write_text(SMALL_SETTINGS)
    address = gcs_address(ray_local)
    train = run_cli("train", "--import", "cost_pendulum", "--env", "CostPendulum-v0", "--env-runners", 1,
                    "--total-env-steps", 2000, "--config", config, "--output", tmp_path, "--name", "pendulum",
                    "--address", address, env=user_env)
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    run_dir = tmp_path / "pendulum"
    _, rows = trial_results(run_dir)
    assert [r["cvpo"]["env_steps"] for r in rows] == [1000, 2000]
    assert rows[-1]["env_runners"]["num_env_steps_sampled_lifetime"] == 2000  # sampled by the remote EnvRunner
    assert np.isfinite(rows[-1]["cvpo"]["episode_cost"])  # the user env's info["cost"] was read

    ev = run_cli("evaluate", run_dir, "--episodes", 2, "--json", env=user_env)
    assert ev.returncode == 0, ev.stdout[-2000:] + ev.stderr[-2000:]
    out = json.loads(ev.stdout.strip().splitlines()[-1])
    assert out["env"] == "cost_pendulum:CostPendulum-v0" and len(out["costs"]) == 2

    from rllib_cvpo import load_policy

    policy = load_policy(run_dir)
    assert policy.action_low.tolist() == [-2.0] and policy.action_high.tolist() == [2.0]
    port = free_port()
    proc = start_cli(tmp_path / "serve.log", "serve", run_dir, "--port", port, "--address", address, env=user_env)
    try:
        deadline = time.time() + 180
        while "serving " not in (tmp_path / "serve.log").read_text():
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(0.5)
        obs = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, -3.0], [-1.0, 0.0, 7.5]], np.float32)
        status, answer = _post(f"http://127.0.0.1:{port}/", {"obs": obs.tolist()})
        assert status == 200
        actions = np.asarray(answer["actions"])
        # The policy acts in env units on the [-2, 2] box, as load_policy does.
        np.testing.assert_allclose(actions, policy.act(obs), rtol=1e-6, atol=1e-6)
        assert np.all(np.abs(actions) <= 2.0)
    finally:
        interrupt(proc, timeout=60)


def test_a_registration_made_in_the_users_process_reaches_remote_env_runners(ray_local):
    # The user registers an env in their own process (here, the test's) under a new id, then builds CVPO with a
    # remote EnvRunner: that process never ran the registration.
    import gymnasium as gym

    from cost_pendulum_local import LocalCostPendulum

    from rllib_cvpo import CVPOConfig

    gym.register("LocalCostPendulum-v0", entry_point=LocalCostPendulum, max_episode_steps=100)
    config = (CVPOConfig().environment("LocalCostPendulum-v0")
              .env_runners(num_env_runners=1, num_envs_per_env_runner=1, rollout_fragment_length=50)
              .training(num_steps_sampled_before_learning_starts=100, train_batch_size_per_learner=32,
                        num_action_samples=4)
              .reporting(min_sample_timesteps_per_iteration=200)
              .evaluation(evaluation_interval=None)
              .rl_module(model_config={"fcnet_hiddens": [16, 16]}))
    algo = config.build_algo()
    try:
        result = algo.train()
        assert result["env_runners"]["num_env_steps_sampled_lifetime"] >= 200
        assert algo.env_runner_group.num_healthy_remote_workers() == 1
    finally:
        algo.stop()
