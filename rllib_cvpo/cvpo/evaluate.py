"""Deterministic evaluation of a CVPO policy: tanh of the Gaussian mean, mapped to the env's action box."""

from __future__ import annotations

from typing import Tuple

import numpy as np
import torch
from ray.rllib.core.columns import Columns


def deterministic_actions(module, obs: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Greedy actions of a CVPO RLModule for a batch of observations ``[B, ...]``, in the env's units."""
    with torch.no_grad():
        out = module.forward_inference({Columns.OBS: torch.as_tensor(np.asarray(obs), dtype=torch.float32)})
    mean, _ = out[Columns.ACTION_DIST_INPUTS].chunk(2, dim=-1)
    squashed = torch.tanh(mean).numpy()
    return low + (squashed + 1.0) * 0.5 * (high - low)


def evaluate_module(module, env_id: str, episodes: int = 10, seed: int = 10_000) -> Tuple[np.ndarray, np.ndarray]:
    """Per-episode returns and costs of the deterministic policy over ``episodes`` seeded episodes."""
    from rllib_cvpo.envs import make_env

    env = make_env(env_id)
    low, high = env.action_space.low, env.action_space.high
    returns, costs = [], []
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed + ep)
        ret = cost = 0.0
        done = False
        while not done:
            action = deterministic_actions(module, obs[None], low, high)[0]
            obs, reward, terminated, truncated, info = env.step(action)
            ret, cost, done = ret + reward, cost + info["cost"], terminated or truncated
        returns.append(ret)
        costs.append(cost)
    return np.array(returns), np.array(costs)
