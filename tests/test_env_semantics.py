"""End to end on envs the other tests do not cover: one that terminates (the critics' not-done path: no bootstrap past
a termination), and one with two named costs under a dict cost limit (two constraints, two cost critics, per-key
thresholds, duals, metrics, feasibility and Q_c)."""

import gymnasium as gym
import numpy as np
import pytest
from helpers import small_config

from rllib_cvpo.cvpo.estep import qc_threshold
from rllib_cvpo.cvpo.replay import BOOTSTRAP_DISCOUNT, COSTS
from rllib_cvpo.envs.speed_limit import SpeedLimitEnv


class TerminatingSpeedLimit(SpeedLimitEnv):
    """SpeedLimit-v0 whose runner crashes (the episode terminates) on a rough segment taken at full speed."""

    def step(self, action):
        k = float(self._obs[0])
        obs, reward, terminated, truncated, info = super().step(action)
        crashed = k > 1.8 and float(np.asarray(action)[0]) > 0.8
        return obs, reward, crashed, truncated and not crashed, info


class TwoCostSpeedLimit(SpeedLimitEnv):
    """SpeedLimit-v0 reporting two named costs: the wear k v^2 ("cost_wear", the task's own cost) and the steering
    error |steer - h| ("cost_drift")."""

    def step(self, action):
        h = float(self._obs[1])
        obs, reward, terminated, truncated, info = super().step(action)
        drift = abs(float(np.clip(np.asarray(action)[1], -1, 1)) - h)
        return obs, reward, terminated, truncated, {"cost_wear": info["cost"], "cost_drift": drift,
                                                    "cost": info["cost"] + drift}


for env_id, cls in (("TerminatingSpeedLimit-v0", TerminatingSpeedLimit), ("TwoCostSpeedLimit-v0", TwoCostSpeedLimit)):
    if env_id not in gym.registry:
        gym.register(env_id, entry_point=cls, max_episode_steps=200)


def test_a_terminating_env_trains_without_bootstrapping_past_terminations(ray_local):
    algo = small_config("TerminatingSpeedLimit-v0", n_step=3).build_algo()
    try:
        for _ in range(2):
            result = algo.train()
        replay = algo.replay
        terminated = replay._data["terminateds"][: len(replay)] > 0
        assert terminated.sum() >= 3  # random warm-up actions crash now and then
        assert result["learners"]["default_policy"]["num_cvpo_updates"] > 0
        assert np.isfinite(result["learners"]["default_policy"]["critic_loss_reward"])
        # A row that is itself a terminal step never bootstraps (1-step: exactly the terminated rows get 0); 3-step
        # rows bootstrap with gamma^k, or not at all when their episode terminated within the k steps.
        import copy

        idx = copy.deepcopy(replay.rng).integers(0, len(replay), size=4000)  # the indices sample() will draw
        one = replay.sample(4000, n_step=1, gamma=0.97)
        np.testing.assert_array_equal(one[BOOTSTRAP_DISCOUNT] == 0, terminated[idx])
        three = replay.sample(4000, n_step=3, gamma=0.97)[BOOTSTRAP_DISCOUNT]
        allowed = np.array([0.0, 0.97, 0.97**2, 0.97**3], np.float32)
        assert np.isclose(three[:, None], allowed[None], atol=1e-6).any(1).all() and (three == 0).mean() > (
            one[BOOTSTRAP_DISCOUNT] == 0).mean()
    finally:
        algo.stop()


def test_two_named_costs_under_a_dict_limit_end_to_end(ray_local, tmp_path):
    limits = {"cost_wear": 20.0, "cost_drift": 1000.0}
    # (the cost feedback off, so each E-step threshold is its own limit's)
    algo = small_config("TwoCostSpeedLimit-v0", cost_limit=limits, cost_feedback_gain=0.0).build_algo()
    try:
        for _ in range(2):
            result = algo.train()
        learner = result["learners"]["default_policy"]
        for key, limit in limits.items():
            assert learner[f"qc_threshold_{key}"] == pytest.approx(qc_threshold(limit, 0.97, 200), rel=1e-6)
            assert np.isfinite(learner[f"lambda_{key}"]) and np.isfinite(learner[f"q_cost_{key}"])
        # The replay keeps both costs per step, in the order of the limits; their sum is the env's total cost.
        costs = algo.replay._data[COSTS][: len(algo.replay)]
        assert costs.shape[1] == 2 and (costs >= 0).all() and costs[:, 1].max() > 0
        # Training and evaluation report each key; feasibility needs every constraint within its own limit.
        runners, evaluation = result["env_runners"], result["evaluation"]["env_runners"]
        for key in limits:
            assert np.isfinite(runners[f"episode_{key}"]) and np.isfinite(evaluation[f"episode_{key}"])
        summary = result["cvpo"]
        feasible = all(evaluation[f"episode_{k}"] <= v for k, v in limits.items())
        assert summary["feasible"] == float(feasible) and summary["cost_limit"] == 1020.0
        path = algo.save_to_path(str(tmp_path / "ckpt"))
    finally:
        algo.stop()
    from rllib_cvpo import load_policy

    policy = load_policy(path)
    obs = np.array([[1.0, 0.2], [1.9, -0.5]], np.float32)
    assert policy.cost_value(obs, policy.act(obs)).shape == (2, 2)  # Q_c of each constraint
