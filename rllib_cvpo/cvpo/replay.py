"""Uniform replay of single transitions with a cost column, sampled as n-step transitions.

Why not RLlib's ``EpisodeReplayBuffer``: its ``sample()`` builds one ``SingleAgentEpisode`` per sampled transition and
the learner connector then walks each of them, which costs more than a whole CVPO update at B = 256
(benchmarks/learner_throughput.py measures it); and with ``n_step > 1`` it keeps only the last step's info, which
would drop the costs of the other steps. Here transitions live in flat arrays and a batch is a few fancy-indexes per
column. The cost of (s_t, a_t) is read from ``infos[t + 1]`` (the info returned by ``env.step(a_t)``) when episodes
are added, so every transition carries its own cost (RLlib's infos are indexed like observations).

n-step: each stored transition links to the next transition of its episode (``-1`` when the episode ended there or
its next step has not arrived yet). An episode's steps arrive in chunks, one per sampling round, interleaved with
other episodes' chunks, so the link from a chunk's last step is set when the episode's next chunk is added. A sampled
transition t then carries R = sum_{i<k} gamma^i r_{t+i}, the same for every cost, the state s_{t+k} and the bootstrap
discount gamma^k (0 if the episode terminated within the k steps), with k = n, or fewer where the episode ended
(terminated or truncated) or its next steps are not stored. With n = 1 this is the 1-step transition.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Sequence

import numpy as np
from ray.rllib.core.columns import Columns

from rllib_cvpo.cvpo.estep import NonFiniteError
from rllib_cvpo.envs.wrappers import MissingCostError

COSTS = "costs"
BOOTSTRAP_DISCOUNT = "bootstrap_discount"  # gamma^k (1 - terminated within the k steps) of each sampled row
POLICY_OBS = "policy_obs"  # with sample(recent=w): states for the E- and M-step, from the w most recent steps
_STORED = (Columns.OBS, Columns.ACTIONS, Columns.REWARDS, COSTS, Columns.NEXT_OBS, Columns.TERMINATEDS)


class CostReplayBuffer:
    """FIFO ring buffer of (obs, action, reward, costs[m], next_obs, terminated) with links between the consecutive
    steps of an episode, sampled uniformly as n-step transitions."""

    def __init__(self, capacity: int, cost_keys: Sequence[str], seed: int | None = None) -> None:
        if int(capacity) < 1:
            raise ValueError(f"replay capacity must be a positive number of transitions, got {capacity!r}")
        self.capacity = int(capacity)
        self.cost_keys = list(cost_keys)
        self.rng = np.random.default_rng(seed)
        self._data: Dict[str, np.ndarray] = {}
        self._next_index = np.full(self.capacity, -1, np.int64)  # ring index of the episode's next step, or -1
        self._serial = np.full(self.capacity, -1, np.int64)  # num_added when the slot was written
        self._open: Dict[Any, tuple] = {}  # episode id -> (slot, serial) of its last stored step, while it runs
        self._next = 0
        self._size = 0
        self.num_added = 0
        self.last_added_costs = np.zeros(len(self.cost_keys))  # summed costs of the last add(), per cost key

    def __len__(self) -> int:
        return self._size

    def _allocate(self, columns: Dict[str, np.ndarray]) -> None:
        self._data = {k: np.zeros((self.capacity, *v.shape[1:]), v.dtype) for k, v in columns.items()}

    def add(self, episodes: Iterable[Any], action_space=None) -> int:
        """Add the transitions of ``SingleAgentEpisode`` chunks; returns the number added. (The algorithm converts
        episodes with :func:`episode_chunks` where they arrive and ships the chunks to the learners' replays.)"""
        return self.add_chunks(episode_chunks(episodes, self.cost_keys, action_space))

    def add_chunks(self, chunks: Sequence[Dict[str, Any]]) -> int:
        """Add :func:`episode_chunks` output; returns the number of transitions added."""
        added = 0
        cost_sums = np.zeros(len(self.cost_keys))
        for chunk in chunks:
            obs, costs = chunk["obs"], chunk[COSTS]
            n = len(costs)
            terminated = np.zeros(n, np.float32)
            terminated[-1] = float(chunk["terminated"])
            columns = {
                Columns.OBS: obs[:-1],
                Columns.ACTIONS: chunk[Columns.ACTIONS],
                Columns.REWARDS: chunk[Columns.REWARDS],
                COSTS: costs,
                Columns.NEXT_OBS: obs[1:],
                Columns.TERMINATEDS: terminated,
            }
            if not self._data:
                self._allocate(columns)
            idx = (self._next + np.arange(n)) % self.capacity
            for k, v in columns.items():
                self._data[k][idx] = v
            serials = self.num_added + added + np.arange(n)
            self._serial[idx] = serials
            self._next_index[idx[:-1]] = idx[1:]
            self._next_index[idx[-1]] = -1
            # Link the episode's previous chunk to this one, if that step is still stored (not overwritten since).
            previous = self._open.pop(chunk["id"], None)
            if previous is not None and self._serial[previous[0]] == previous[1]:
                self._next_index[previous[0]] = idx[0]
            if not chunk["done"]:
                self._open[chunk["id"]] = (int(idx[-1]), int(serials[-1]))
            self._next = int((self._next + n) % self.capacity)
            self._size = min(self.capacity, self._size + n)
            added += n
            cost_sums += costs.sum(0, dtype=np.float64)
        self.num_added += added
        self.last_added_costs = cost_sums
        # Episodes whose last stored step was overwritten can no longer be linked (e.g. an EnvRunner restarted).
        oldest = self.num_added - self._size
        if len(self._open) > 1024:
            self._open = {k: v for k, v in self._open.items() if v[1] >= oldest}
        return added

    def sample(self, num_items: int, n_step: int = 1, gamma: float = 0.99,
               recent: int | None = None) -> Dict[str, np.ndarray]:
        """``num_items`` n-step transitions from uniformly drawn start steps (with replacement): obs, actions, the
        discounted n-step sums of rewards and of costs, the state to bootstrap from (``new_obs``) and its discount
        (``bootstrap_discount``); see the module docstring. With ``recent`` = w, also ``policy_obs``: as many
        states drawn uniformly from the w most recently stored steps (all of them while fewer are stored)."""
        if self._size == 0:
            raise ValueError("cannot sample from an empty replay buffer")
        d = self._data
        idx = self.rng.integers(0, self._size, size=int(num_items))
        rewards = d[Columns.REWARDS][idx].astype(np.float32)
        costs = d[COSTS][idx].astype(np.float32)
        last = idx
        discount = np.full(idx.shape, gamma, np.float32)  # gamma^k for the chain's length k so far
        running = d[Columns.TERMINATEDS][idx] == 0  # the chain may continue past its last step
        for _ in range(1, int(n_step)):
            nxt = self._next_index[last]
            running &= nxt >= 0
            if not running.any():
                break
            step = np.where(running, nxt, last)
            rewards += np.where(running, discount * d[Columns.REWARDS][step], 0.0).astype(np.float32)
            costs += np.where(running[:, None], discount[:, None] * d[COSTS][step], 0.0).astype(np.float32)
            discount = np.where(running, discount * gamma, discount).astype(np.float32)
            last = step
            running &= d[Columns.TERMINATEDS][step] == 0
        not_terminated = 1.0 - d[Columns.TERMINATEDS][last]
        out = {
            Columns.OBS: d[Columns.OBS][idx],
            Columns.ACTIONS: d[Columns.ACTIONS][idx],
            Columns.REWARDS: rewards,
            COSTS: costs,
            Columns.NEXT_OBS: d[Columns.NEXT_OBS][last],
            BOOTSTRAP_DISCOUNT: (discount * not_terminated).astype(np.float32),
        }
        if recent is not None:  # the newest slot is just before the write position, the ring wrapping round
            back = self.rng.integers(0, min(int(recent), self._size), size=int(num_items))
            out[POLICY_OBS] = d[Columns.OBS][(self._next - 1 - back) % self.capacity]
        return out

    def spread(self, max_rows: int) -> Dict[str, np.ndarray]:
        """Up to ``max_rows`` stored transitions (obs, actions, costs), evenly spaced through the slots, without
        drawing from the sampling rng (reading them changes no later minibatch)."""
        if self._size == 0:
            raise ValueError("cannot read rows of an empty replay buffer")
        idx = np.linspace(0, self._size - 1, num=min(int(max_rows), self._size)).astype(np.int64)
        return {k: self._data[k][idx] for k in (Columns.OBS, Columns.ACTIONS, COSTS)}

    def get_state(self) -> Dict[str, Any]:
        """The stored slots as they are (a restore into the same capacity samples exactly as this buffer would)."""
        size = self._size
        return {
            "data": {k: v[:size].copy() for k, v in self._data.items()},
            "links": self._next_index[:size].copy(),
            "serial": self._serial[:size].copy(),
            "open": dict(self._open),
            "next": self._next,
            "size": size,
            "num_added": self.num_added,
            "rng": self.rng.bit_generator.state,
            "capacity": self.capacity,
            "cost_keys": self.cost_keys,
        }

    def set_state(self, state: Dict[str, Any]) -> None:
        """Restore a :meth:`get_state`; into a smaller capacity the newest transitions are kept (links remapped)."""
        if list(state["cost_keys"]) != self.cost_keys:
            raise ValueError(f"checkpoint replay holds costs {state['cost_keys']}, this run needs {self.cost_keys}")
        data, size, nxt = state["data"], int(state["size"]), int(state["next"])
        links = np.asarray(state.get("links", np.full(size, -1)), np.int64)  # none in checkpoints before n-step
        serial = np.asarray(state.get("serial", int(state["num_added"]) - size + (np.arange(size) - nxt) % max(size, 1)),
                            np.int64)
        opened = dict(state.get("open", {}))
        self.num_added = int(state["num_added"])
        self.rng.bit_generator.state = state["rng"]
        self._data, self._open = {}, {}
        self._next_index = np.full(self.capacity, -1, np.int64)
        self._serial = np.full(self.capacity, -1, np.int64)
        if size == 0 or not data:
            self._size = self._next = 0
            return
        self._allocate({k: v[:1] for k, v in data.items()})
        if size <= self.capacity and int(state["capacity"]) == self.capacity:  # same layout: slot for slot
            slots = np.arange(size)
            self._next, self._size = nxt, size
        else:  # oldest first into slots 0.., keeping the newest that fit
            order = (nxt - size + np.arange(size)) % size
            keep = order[max(size - self.capacity, 0):]
            slots = np.full(size, -1, np.int64)
            slots[keep] = np.arange(len(keep))
            self._size, self._next = len(keep), len(keep) % self.capacity
        kept = slots >= 0
        for k, v in data.items():
            self._data[k][slots[kept]] = v[kept]
        new_links = np.where(links >= 0, slots[np.maximum(links, 0)], -1)
        self._next_index[slots[kept]] = new_links[kept]
        self._serial[slots[kept]] = serial[kept]
        self._open = {k: (int(slots[slot]), ser) for k, (slot, ser) in opened.items() if slots[slot] >= 0}


def episode_chunks(episodes: Iterable[Any], cost_keys: Sequence[str], action_space=None) -> List[Dict[str, Any]]:
    """``SingleAgentEpisode`` chunks -> compact arrays for :meth:`CostReplayBuffer.add_chunks`: per chunk its episode
    id, observations [n + 1, d], actions [n, a] in the policy's units, rewards [n], costs [n, m] (the cost of
    (s_t, a_t) read from ``infos[t + 1]``), whether it ends the episode (``done``) by termination (``terminated``).
    Empty chunks are dropped. Raises :class:`MissingCostError` for a step info without a cost key and
    :class:`NonFiniteError` for a NaN or infinite observation, action, reward or cost, naming the step.

    ``action_space``: the env's action Box when the chunks' actions are in the env's units (RLlib's random warm-up
    actions); they are then mapped to the policy's [-1, 1] units, as RLlib's action normalisation would have
    produced them, so every stored action is in the policy's units."""
    cost_keys = list(cost_keys)
    chunks = []
    for ep in episodes:
        n = len(ep)
        if n == 0:
            continue
        obs = np.asarray(ep.get_observations(slice(0, n + 1)), np.float32).reshape(n + 1, -1)
        infos = ep.get_infos(slice(1, n + 1))
        try:
            costs = np.array([[info[k] for k in cost_keys] for info in infos], np.float32)
        except KeyError as err:
            raise MissingCostError(
                f"a step info has no {err.args[0]!r} (found keys {sorted(infos[0]) if infos else []}); "
                f"the cost limit names the cost keys {cost_keys}"
            ) from None
        actions = np.asarray(ep.get_actions(slice(0, n)), np.float32).reshape(n, -1)
        if action_space is not None:
            actions = normalize_actions(actions, action_space)
        rewards = np.asarray(ep.get_rewards(slice(0, n)), np.float32)
        for name, values in ((Columns.REWARDS, rewards), (COSTS, costs), (Columns.OBS, obs),
                             (Columns.ACTIONS, actions)):
            finite = np.isfinite(values).reshape(n + (name == Columns.OBS), -1).all(1)
            if not finite.all():
                step = int(np.argmin(finite))
                raise NonFiniteError(
                    f"the env returned a non-finite {name[:-1] if name != COSTS else 'cost'} at step "
                    f"{ep.t_started + step} of episode {ep.id_}: {values.reshape(len(finite), -1)[step].tolist()}"
                    " (NaN or infinity cannot be learned from; check the env or its wrappers)")
        chunks.append({"id": ep.id_, "obs": obs, Columns.ACTIONS: actions, Columns.REWARDS: rewards, COSTS: costs,
                       "terminated": bool(ep.is_terminated), "done": bool(ep.is_done)})
    return chunks


def normalize_actions(actions: np.ndarray, space) -> np.ndarray:
    """Env-unit actions [n, d] -> the policy's [-1, 1] units: RLlib's ``normalize_action`` (the inverse of the
    unsquashing its module-to-env connector applies), for a bounded Box. RLlib leaves an unbounded Box's actions
    unscaled, and its ``normalize_action`` would return NaN there, so those are kept as they are."""
    from ray.rllib.utils.spaces.space_utils import normalize_action

    if not (np.all(space.bounded_below) and np.all(space.bounded_above)):
        return actions
    return np.asarray(normalize_action(actions.reshape(-1, *space.shape), space), np.float32).reshape(actions.shape)
