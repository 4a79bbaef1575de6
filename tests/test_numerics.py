"""NaN and infinity are caught where they enter, with the quantity and the step named; never a NaN policy."""

import gymnasium as gym
import numpy as np
import pytest
import torch
from helpers import small_config

from rllib_cvpo.cvpo.estep import NonFiniteError
from rllib_cvpo.envs.speed_limit import SpeedLimitEnv


class Corrupt(gym.Wrapper):
    """SpeedLimit-v0 whose reward (or cost) is ``value`` at step ``at`` of every episode."""

    def __init__(self, env, what, value, at=30):
        super().__init__(env)
        self.what, self.value, self.at, self.t = what, value, at, 0

    def reset(self, **kwargs):
        self.t = 0
        return self.env.reset(**kwargs)

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        if self.t == self.at:
            if self.what == "reward":
                reward = self.value
            else:
                info = dict(info, cost=self.value)
        self.t += 1
        return obs, reward, terminated, truncated, info


for what in ("reward", "cost"):
    env_id = f"SpeedLimitNaN{what.capitalize()}-v0"
    if env_id not in gym.registry:
        gym.register(env_id, entry_point=lambda what=what, **kw: Corrupt(SpeedLimitEnv(**kw), what, float("nan")),
                     max_episode_steps=200)


def test_a_nan_reward_stops_training_naming_the_step(ray_local):
    algo = small_config(env="SpeedLimitNaNReward-v0").build_algo()
    try:
        with pytest.raises(NonFiniteError, match=r"non-finite reward at step 30 of episode"):
            algo.train()
        assert len(algo.replay) == 0  # nothing of it was stored
    finally:
        algo.stop()


def test_a_nan_cost_is_refused_by_the_env_wrapper(ray_local):
    algo = small_config(env="SpeedLimitNaNCost-v0").build_algo()
    try:
        with pytest.raises(Exception) as caught:  # RLlib's EnvRunner re-raises the env's error as the cause
            algo.train()
        chain, err = [], caught.value
        while err is not None:
            chain.append(str(err))
            err = err.__cause__
        assert any("'SpeedLimitNaNCost-v0' reported cost nan at a step (costs must be finite numbers)" in m
                   for m in chain), chain
        assert len(algo.replay) == 0
    finally:
        algo.stop()


def test_a_diverged_critic_stops_training_before_the_policy_changes(ray_local):
    algo = small_config().build_algo()
    try:
        algo.train()
        module = algo.learner_group._learner.module["default_policy"]
        with torch.no_grad():
            module.target_critics.net[0].bias[0, 0, 3] = float("nan")  # one unit of the first reward critic
        before = [p.detach().clone() for p in module.pi.parameters()]
        with pytest.raises(NonFiniteError, match=r"E-step input Q_r holds nan .* at CVPO update \d+ after \d+ env steps"):
            algo.train()
        for p, q in zip(module.pi.parameters(), before):
            torch.testing.assert_close(p.detach(), q)
            assert torch.isfinite(p).all()
        obs = torch.as_tensor(np.array([[1.0, 0.2]], np.float32))
        assert torch.isfinite(module.policy(obs)[0]).all()
    finally:
        algo.stop()
