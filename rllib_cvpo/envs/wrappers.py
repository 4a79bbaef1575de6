"""gymnasium wrappers of the env factory. Each records its constructor arguments, so that an env can be re-created
from its spec (gymnasium's ``check_env`` does this)."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np


class MissingCostError(RuntimeError):
    """The env's step info has no numeric ``cost``."""


class SafetyGymnasiumToGymnasium(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """safety-gymnasium's 6-tuple step -> gymnasium's 5-tuple, with ``info["cost"]`` (float).

    The per-source costs that navigation tasks report (``cost_hazards``, ``cost_vases``, ...) stay in ``info``.
    """

    def __init__(self, env: gym.Env) -> None:
        gym.utils.RecordConstructorArgs.__init__(self)
        gym.Wrapper.__init__(self, env)

    def step(self, action):
        obs, reward, cost, terminated, truncated, info = self.env.step(action)
        info["cost"] = float(cost)
        return obs, float(reward), bool(terminated), bool(truncated), info


class ValidateAction(gym.ActionWrapper, gym.utils.RecordConstructorArgs):
    """Turns lists and scalars into an ndarray of the action space's dtype, rejects a wrong shape or a NaN with a
    ``ValueError``, and clips finite values to the action box (as MuJoCo clamps controls to their range)."""

    def __init__(self, env: gym.Env) -> None:
        gym.utils.RecordConstructorArgs.__init__(self)
        gym.ActionWrapper.__init__(self, env)
        if not isinstance(env.action_space, gym.spaces.Box):
            raise TypeError(f"only continuous (Box) action spaces are supported, got {env.action_space}")

    def action(self, action):
        space = self.action_space
        try:
            arr = np.asarray(action, dtype=space.dtype)
        except (TypeError, ValueError) as err:
            raise ValueError(f"action {action!r} is not numeric; expected an array of shape {space.shape}") from err
        if arr.shape != space.shape:
            if arr.size == int(np.prod(space.shape)) and arr.squeeze().shape == tuple(d for d in space.shape if d != 1):
                arr = arr.reshape(space.shape)
            else:
                raise ValueError(f"action has shape {arr.shape}, expected {space.shape}")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"action contains NaN or infinite values: {arr}")
        return np.clip(arr, space.low, space.high)


class RequireCost(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """Fails at the first step whose info has no numeric ``cost`` (CVPO cannot learn a constraint without one)."""

    def __init__(self, env: gym.Env) -> None:
        gym.utils.RecordConstructorArgs.__init__(self)
        gym.Wrapper.__init__(self, env)

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        cost = info.get("cost") if isinstance(info, dict) else None
        if cost is None or not np.isscalar(cost) or isinstance(cost, (str, bytes)):
            env_id = self.env.spec.id if self.env.spec is not None else type(self.env.unwrapped).__name__
            raise MissingCostError(
                f"env {env_id!r} reports no cost: its step info must hold a number under 'cost' "
                f"(got info keys {sorted(info) if isinstance(info, dict) else type(info).__name__}). "
                "Wrap it to add info['cost'], or use a safety-gymnasium task."
            )
        info["cost"] = float(cost)
        if not np.isfinite(info["cost"]):
            env_id = self.env.spec.id if self.env.spec is not None else type(self.env.unwrapped).__name__
            raise ValueError(f"env {env_id!r} reported cost {info['cost']} at a step (costs must be finite numbers)")
        return obs, reward, terminated, truncated, info


class FixedLength(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """Makes every episode last exactly ``horizon`` steps.

    When the task terminates early (a velocity-task robot falls), the rest of the episode is an absorbing state: the
    observation stays the last one, reward and cost are 0, ``info["absorbing"]`` is True, and the episode is
    truncated at ``horizon``. The transition into the absorbing state is the one that carried the fall. This keeps
    the episode length that CVPO's per-step cost threshold assumes; a fall then costs the reward the robot would have
    earned, as it does with early termination.
    """

    def __init__(self, env: gym.Env, horizon: int) -> None:
        gym.utils.RecordConstructorArgs.__init__(self, horizon=horizon)
        gym.Wrapper.__init__(self, env)
        if int(horizon) < 1:
            raise ValueError(f"horizon must be a positive number of steps, got {horizon!r}")
        self.horizon = int(horizon)
        self._t = 0
        self._absorbing_obs: Any = None

    def reset(self, **kwargs):
        self._t = 0
        self._absorbing_obs = None
        return self.env.reset(**kwargs)

    def step(self, action):
        self._t += 1
        if self._absorbing_obs is not None:
            info = {"cost": 0.0, "absorbing": True}
            return self._absorbing_obs, 0.0, False, self._t >= self.horizon, info
        obs, reward, terminated, truncated, info = self.env.step(action)
        if terminated and self._t < self.horizon:
            self._absorbing_obs = obs
            info["fell"] = True
        return obs, reward, False, self._t >= self.horizon, info
