"""A user's own constrained env, outside the rllib_cvpo package: gymnasium's Pendulum whose step info carries a cost
of 1 while the pendulum spins faster than a speed limit. Importing the module registers ``CostPendulum-v0``.

Its constructor takes no ``render_mode`` and its action box is [-2, 2] (not [-1, 1]), as many users' envs do.
"""

import gymnasium as gym
from gymnasium.envs.classic_control.pendulum import PendulumEnv

ENV_ID = "CostPendulum-v0"


class CostPendulum(PendulumEnv):
    def __init__(self, speed_limit: float = 4.0):
        super().__init__()  # no render_mode argument, as many users' envs
        self.speed_limit = speed_limit

    def step(self, action):
        obs, reward, terminated, truncated, info = super().step(action)
        info["cost"] = float(abs(obs[2]) > self.speed_limit)
        return obs, reward, terminated, truncated, info


if ENV_ID not in gym.registry:
    gym.register(ENV_ID, entry_point=CostPendulum, max_episode_steps=200)
