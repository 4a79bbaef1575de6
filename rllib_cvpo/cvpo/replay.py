"""Uniform replay of single transitions with a cost column.

Why not RLlib's ``EpisodeReplayBuffer``: its ``sample()`` builds one ``SingleAgentEpisode`` per sampled transition and
the learner connector then walks each of them, which costs more than a whole CVPO update at B = 256
(benchmarks/learner_throughput.py measures it). Here transitions live in flat arrays and a batch is one fancy-index
per column. The cost of (s_t, a_t) is read from ``infos[t + 1]`` (the info returned by ``env.step(a_t)``) when
episodes are added, so every transition carries its own cost (RLlib's infos are indexed like observations).
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, Sequence

import numpy as np
from ray.rllib.core.columns import Columns

from rllib_cvpo.envs.wrappers import MissingCostError

COSTS = "costs"


class CostReplayBuffer:
    """FIFO ring buffer of (obs, action, reward, costs[m], next_obs, terminated)."""

    def __init__(self, capacity: int, cost_keys: Sequence[str], seed: int | None = None) -> None:
        if int(capacity) < 1:
            raise ValueError(f"replay capacity must be a positive number of transitions, got {capacity!r}")
        self.capacity = int(capacity)
        self.cost_keys = list(cost_keys)
        self.rng = np.random.default_rng(seed)
        self._data: Dict[str, np.ndarray] = {}
        self._next = 0
        self._size = 0
        self.num_added = 0
        self.last_added_costs = np.zeros(len(self.cost_keys))  # summed costs of the last add(), per cost key

    def __len__(self) -> int:
        return self._size

    def _allocate(self, columns: Dict[str, np.ndarray]) -> None:
        self._data = {k: np.zeros((self.capacity, *v.shape[1:]), v.dtype) for k, v in columns.items()}

    def add(self, episodes: Iterable[Any]) -> int:
        """Add the transitions of ``SingleAgentEpisode`` chunks; returns the number added."""
        added = 0
        cost_sums = np.zeros(len(self.cost_keys))
        for ep in episodes:
            n = len(ep)
            if n == 0:
                continue
            obs = np.asarray(ep.get_observations(slice(0, n + 1)), np.float32).reshape(n + 1, -1)
            infos = ep.get_infos(slice(1, n + 1))
            try:
                costs = np.array([[info[k] for k in self.cost_keys] for info in infos], np.float32)
            except KeyError as err:
                raise MissingCostError(
                    f"a step info has no {err.args[0]!r} (found keys {sorted(infos[0]) if infos else []}); "
                    f"the cost limit names the cost keys {self.cost_keys}"
                ) from None
            terminated = np.zeros(n, np.float32)
            terminated[-1] = float(ep.is_terminated)
            columns = {
                Columns.OBS: obs[:-1],
                Columns.ACTIONS: np.asarray(ep.get_actions(slice(0, n)), np.float32).reshape(n, -1),
                Columns.REWARDS: np.asarray(ep.get_rewards(slice(0, n)), np.float32),
                COSTS: costs,
                Columns.NEXT_OBS: obs[1:],
                Columns.TERMINATEDS: terminated,
            }
            if not self._data:
                self._allocate(columns)
            idx = (self._next + np.arange(n)) % self.capacity
            for k, v in columns.items():
                self._data[k][idx] = v
            self._next = int((self._next + n) % self.capacity)
            self._size = min(self.capacity, self._size + n)
            added += n
            cost_sums += costs.sum(0, dtype=np.float64)
        self.num_added += added
        self.last_added_costs = cost_sums
        return added

    def sample(self, num_items: int) -> Dict[str, np.ndarray]:
        """``num_items`` transitions drawn uniformly with replacement."""
        if self._size == 0:
            raise ValueError("cannot sample from an empty replay buffer")
        idx = self.rng.integers(0, self._size, size=int(num_items))
        return {k: v[idx] for k, v in self._data.items()}

    def get_state(self) -> Dict[str, Any]:
        return {
            "data": {k: v[: self._size].copy() for k, v in self._data.items()},
            "next": self._next,
            "size": self._size,
            "num_added": self.num_added,
            "rng": self.rng.bit_generator.state,
            "capacity": self.capacity,
            "cost_keys": self.cost_keys,
        }

    def set_state(self, state: Dict[str, Any]) -> None:
        if list(state["cost_keys"]) != self.cost_keys:
            raise ValueError(f"checkpoint replay holds costs {state['cost_keys']}, this run needs {self.cost_keys}")
        self._data = {}
        data = state["data"]
        size = min(int(state["size"]), self.capacity)
        if data:
            self._allocate({k: v[:1] for k, v in data.items()})
            # Keep the newest `size` transitions in their ring order.
            order = (int(state["next"]) - int(state["size"]) + np.arange(int(state["size"]))) % int(state["size"])
            newest = order[-size:]
            for k, v in data.items():
                self._data[k][:size] = v[newest]
        self._size = size
        self._next = size % self.capacity
        self.num_added = int(state["num_added"])
        self.rng.bit_generator.state = state["rng"]
