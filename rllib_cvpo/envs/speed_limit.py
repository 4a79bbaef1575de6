"""SpeedLimit-v0: a small constrained task in plain numpy, with a known constrained optimum.

A runner covers a track of ``T = 200`` segments, one per step. Segment ``t`` has a surface roughness
``k_t ~ U[K_LOW, K_HIGH]`` and a heading ``h_t ~ U[-1, 1]``, both observed. The action ``a = (throttle, steer)`` lies
in ``[-1, 1]^2``; the speed is ``v = (throttle + 1) / 2`` in ``[0, 1]``.

* reward ``r_t = v_t * (1 - (steer_t - h_t)^2 / 4)``: progress, lost when steering away from the heading;
* cost ``c_t = k_t * v_t^2``: wear, which grows with speed and roughness.

Episodes always last exactly ``T`` steps (truncated, never terminated), as CVPO's per-step cost threshold assumes.

**Optimum.** Without a constraint the best policy runs flat out (``v = 1``, steer on heading): return ``T = 200``
and expected cost ``T * E[k] = 225``. Under an expected episodic cost limit ``d`` the optimum is found pointwise from
the Lagrangian ``v - lam * k * v^2``: steer on heading and ``v(k) = min(1, c / k)`` (fast on smooth segments, slow on
rough ones), with ``c`` chosen so the expected cost equals ``d``. For ``d = 25`` this gives an expected return of
about 77.0 (see :func:`constrained_optimum`), against about 66.7 for the best constant speed: a good policy must use
the observation. The unconstrained policy exceeds ``d = 25`` nine times over.
"""

from __future__ import annotations

import math
from typing import Any

import gymnasium as gym
import numpy as np
from scipy.optimize import brentq

ENV_ID = "SpeedLimit-v0"
HORIZON = 200
K_LOW, K_HIGH = 0.25, 2.0


class SpeedLimitEnv(gym.Env):
    """The built-in constrained task (see the module docstring). ``info["cost"]`` carries the step cost."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 30}

    def __init__(self, horizon: int = HORIZON, render_mode: str | None = None) -> None:
        if int(horizon) < 1:
            raise ValueError(f"horizon must be a positive number of steps, got {horizon!r}")
        self.horizon = int(horizon)
        self.render_mode = render_mode
        self.observation_space = gym.spaces.Box(
            low=np.array([K_LOW, -1.0], np.float32), high=np.array([K_HIGH, 1.0], np.float32), dtype=np.float32
        )
        self.action_space = gym.spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32)
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        self._t = 0
        self._obs = np.zeros(2, np.float32)
        self._last = (0.0, 0.0, 0.0)  # speed, steer, cost of the last step, for render()

    def _draw(self) -> np.ndarray:
        k = self.np_random.uniform(K_LOW, K_HIGH)
        h = self.np_random.uniform(-1.0, 1.0)
        self._obs = np.array([k, h], np.float32)
        return self._obs.copy()

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self._t = 0
        self._last = (0.0, 0.0, 0.0)
        return self._draw(), {}

    def render(self) -> np.ndarray | None:
        """A 96x192 RGB frame: road roughness as the background shade, the speed as a bar (green to red as the
        step cost grows), and the steering (white) against the road heading (yellow)."""
        if self.render_mode != "rgb_array":
            return None
        v, steer, cost = self._last
        k, h = float(self._obs[0]), float(self._obs[1])
        frame = np.full((96, 192, 3), int(40 + 60 * (k - K_LOW) / (K_HIGH - K_LOW)), np.uint8)
        width = int(round(v * 180))
        red = min(1.0, cost / K_HIGH)
        frame[10:40, 6 : 6 + width] = (int(255 * red), int(255 * (1 - red)), 40)
        for value, colour in ((h, (255, 220, 0)), (steer, (255, 255, 255))):
            x = int(round(96 + 88 * value))
            frame[50:90, max(x - 2, 0) : x + 2] = colour
        return frame

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        throttle, steer = np.clip(np.asarray(action, np.float64), -1.0, 1.0)
        k, h = float(self._obs[0]), float(self._obs[1])
        v = 0.5 * (throttle + 1.0)
        reward = v * (1.0 - 0.25 * (steer - h) ** 2)
        cost = k * v * v
        self._t += 1
        self._last = (v, float(steer), float(cost))
        return self._draw(), float(reward), False, self._t >= self.horizon, {"cost": float(cost)}


def _per_step_cost(c: float) -> float:
    """E_k[k * min(1, c/k)^2] for k ~ U[K_LOW, K_HIGH]."""
    c = min(max(c, 0.0), K_HIGH)
    if c <= K_LOW:
        return c * c * math.log(K_HIGH / K_LOW) / (K_HIGH - K_LOW)
    return ((c * c - K_LOW**2) / 2.0 + c * c * math.log(K_HIGH / c)) / (K_HIGH - K_LOW)


def _per_step_speed(c: float) -> float:
    """E_k[min(1, c/k)] for k ~ U[K_LOW, K_HIGH]."""
    c = min(max(c, 0.0), K_HIGH)
    if c <= K_LOW:
        return c * math.log(K_HIGH / K_LOW) / (K_HIGH - K_LOW)
    return ((c - K_LOW) + c * math.log(K_HIGH / c)) / (K_HIGH - K_LOW)


def optimal_speed_scale(cost_limit: float, horizon: int = HORIZON) -> float:
    """The ``c`` of the optimal policy ``v(k) = min(1, c/k)`` under an expected episodic cost limit."""
    if cost_limit < 0:
        raise ValueError(f"cost_limit must be >= 0, got {cost_limit!r}")
    budget = cost_limit / horizon
    if budget >= _per_step_cost(K_HIGH):  # even full speed everywhere is within the limit
        return K_HIGH
    return brentq(lambda c: _per_step_cost(c) - budget, 0.0, K_HIGH, xtol=1e-12)


def constrained_optimum(cost_limit: float, horizon: int = HORIZON) -> float:
    """Expected episodic return of the best policy whose expected episodic cost is at most ``cost_limit``."""
    return horizon * _per_step_speed(optimal_speed_scale(cost_limit, horizon))


def constant_speed_return(cost: float, horizon: int = HORIZON) -> float:
    """Expected episodic return of the best policy that ignores the roughness (one constant speed v, steering on the
    heading) at an expected episodic cost of ``cost``: cost = T E[k] v^2 and return = T v, so
    T sqrt(cost / (T E[k])), capped at full speed. A learner must beat this to show it uses what it observes."""
    if cost < 0:
        raise ValueError(f"cost must be >= 0, got {cost!r}")
    mean_k = (K_LOW + K_HIGH) / 2.0
    return horizon * min(1.0, math.sqrt(cost / (horizon * mean_k)))


def optimal_action(obs: np.ndarray, cost_limit: float, horizon: int = HORIZON) -> np.ndarray:
    """The optimal constrained policy's action(s) for observation(s) ``obs`` (shape ``[2]`` or ``[B, 2]``)."""
    obs = np.asarray(obs, np.float64)
    c = optimal_speed_scale(cost_limit, horizon)
    v = np.minimum(1.0, c / obs[..., 0])
    return np.stack([2.0 * v - 1.0, obs[..., 1]], axis=-1).astype(np.float32)
