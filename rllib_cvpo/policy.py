"""Load a trained CVPO policy in-process and get actions in the env's units.

    >>> from rllib_cvpo import load_policy
    >>> policy = load_policy("runs/SafetyPointCircle1-v0_seed0_20261121-080000")  # a run dir: its best checkpoint
    >>> action = policy.act(obs)             # one observation -> one action
    >>> actions = policy.act(batch_of_obs)   # [B, *obs_shape] -> [B, *action_shape]
    >>> qc = policy.cost_value(batch_of_obs, actions)  # the cost critic's Q_c of those actions
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np

from rllib_cvpo.checkpoints import MANIFEST_FILE, CheckpointError, incomplete_reason

METADATA_FILE = "cvpo_metadata.json"
MODULE_SUBDIR = Path("learner_group", "learner", "rl_module", "default_policy")


def is_checkpoint(path: Path) -> bool:
    return (path / "rllib_checkpoint.json").is_file() or (path / MANIFEST_FILE).is_file()


def resolve_checkpoint(path: str | Path, which: str = "best") -> Path:
    """An RLlib checkpoint directory for ``path``: the path itself if it is one; for a run directory of
    ``rllib-cvpo train`` (or a Tune trial directory) its best feasible checkpoint (``which="best"``) or its latest
    (``which="latest"``); for a sweep directory, the checkpoint ``rllib-cvpo report`` names best (the best feasible
    configuration's best seed)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {str(path)!r} does not exist")
    if is_checkpoint(p):
        reason = incomplete_reason(p)
        if reason is not None:
            raise CheckpointError(f"incomplete checkpoint {str(path)!r}: {reason} (a save or a deletion was cut "
                                  "short; the run directory's other checkpoints may be complete)")
        return p
    if p.is_dir():
        from rllib_cvpo.runs import find_checkpoints, trial_dirs

        found = find_checkpoints(p)
        if found.get(which) is not None:
            return found[which]
        if found.get("latest") is not None:
            return found["latest"]
        if len(trial_dirs(p)) > 1 and which == "best":  # a sweep: the report's best feasible configuration's
            from rllib_cvpo.sweep import collect_trials, summarize

            _, best = summarize(collect_trials(p))
            if best is not None and best.get("checkpoint"):
                return Path(best["checkpoint"])
    raise CheckpointError(
        f"no checkpoint in {str(path)!r}: expected an RLlib checkpoint directory (with rllib_checkpoint.json) or a "
        "run directory written by `rllib-cvpo train`"
    )


def read_metadata(checkpoint: Path) -> Dict[str, Any]:
    """What CVPO writes next to each checkpoint (env, spaces, cost limits, env steps, last evaluation); for
    checkpoints saved without it, the same fields read from the pickled algorithm config and learner state."""
    meta_file = checkpoint / METADATA_FILE
    if meta_file.is_file():
        try:
            return json.loads(meta_file.read_text())
        except (OSError, ValueError) as err:
            raise CheckpointError(f"unreadable checkpoint metadata {str(meta_file)!r}: {err}") from None
    try:
        with open(checkpoint / "class_and_ctor_args.pkl", "rb") as fh:
            config = pickle.load(fh)["ctor_args_and_kwargs"][0][0]
        with open(checkpoint / "learner_group" / "learner" / "state.pkl", "rb") as fh:
            env_steps = int(pickle.load(fh).get("cvpo_state", {}).get("__env_steps__", 0))
    except Exception as err:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        raise CheckpointError(f"unreadable checkpoint {str(checkpoint)!r}: {type(err).__name__}: {err}") from None
    limit = config.get("cost_limit", 25.0)
    return {"env": config.get("env"), "cost_limit": limit, "env_steps": env_steps}


@dataclass
class CVPOPolicy:
    """A trained CVPO policy: the deterministic action (tanh of the Gaussian mean, mapped to the action box) and the
    cost critic's estimate for any action."""

    module: Any
    checkpoint: Path
    metadata: Dict[str, Any] = field(default_factory=dict)

    @property
    def env_id(self) -> Optional[str]:
        return self.metadata.get("env")

    @property
    def observation_shape(self) -> tuple:
        return tuple(self.module.observation_space.shape)

    @property
    def action_low(self) -> np.ndarray:
        return self._box()[0]

    @property
    def action_high(self) -> np.ndarray:
        return self._box()[1]

    @property
    def cost_limit(self):
        return self.metadata.get("cost_limit")

    def _box(self):
        meta = self.metadata
        if "action_low" in meta:
            return np.asarray(meta["action_low"], np.float64), np.asarray(meta["action_high"], np.float64)
        space = self.module.action_space
        return np.asarray(space.low, np.float64), np.asarray(space.high, np.float64)

    def _check_obs(self, obs) -> tuple[np.ndarray, bool]:
        try:
            arr = np.asarray(obs, dtype=np.float32)
        except (TypeError, ValueError):
            raise ValueError(f"observation must be numeric, got {type(obs).__name__}") from None
        shape = self.observation_shape
        if arr.shape == shape:
            single = True
            arr = arr[None]
        elif arr.ndim == len(shape) + 1 and arr.shape[1:] == shape:
            single = False
        else:
            raise ValueError(
                f"observation shape {list(arr.shape)} does not match the policy's {list(shape)} "
                f"(one observation) or [B, {', '.join(map(str, shape))}] (a batch)"
            )
        if not np.all(np.isfinite(arr)):
            raise ValueError("observation contains NaN or infinite values")
        return arr, single

    def act(self, obs) -> np.ndarray:
        """Deterministic action(s) in the env's units for one observation or a batch ``[B, *obs_shape]``."""
        from rllib_cvpo.cvpo.evaluate import deterministic_actions

        arr, single = self._check_obs(obs)
        low, high = self._box()
        actions = deterministic_actions(self.module, arr, low, high)
        return actions[0] if single else actions

    def sample(self, obs, rng: Optional[np.random.Generator] = None) -> np.ndarray:
        """Stochastic action(s) in the env's units: tanh of a draw from the policy's Gaussian (the exploring policy
        that training samples with, whose cost the E-step constrains), for one observation or a batch."""
        import torch

        arr, single = self._check_obs(obs)
        rng = rng if rng is not None else np.random.default_rng()
        with torch.no_grad():
            mean, std = self.module.policy(torch.as_tensor(arr))
        u = mean.numpy() + std.numpy() * rng.standard_normal(mean.shape).astype(np.float32)
        low, high = self._box()
        actions = low + (np.tanh(u) + 1.0) * 0.5 * (high - low)
        return actions[0] if single else actions

    def cost_value(self, obs, actions) -> np.ndarray:
        """Q_c(s, a) of every cost critic ([m] for one observation, [B, m] for a batch) for env-unit actions."""
        import torch

        arr, single = self._check_obs(obs)
        low, high = self._box()
        act = np.asarray(actions, np.float64).reshape(arr.shape[0], -1)
        squashed = np.clip(2.0 * (act - low) / (high - low) - 1.0, -1.0, 1.0)
        if not hasattr(self.module, "critics"):
            raise ValueError("this policy was loaded without its critics")
        with torch.no_grad():
            _, qc = self.module.q_values(torch.as_tensor(arr), torch.as_tensor(squashed, dtype=torch.float32))
        out = qc.t().numpy().astype(np.float64)
        return out[0] if single else out


def load_policy(path: str | Path, which: str = "best") -> CVPOPolicy:
    """Load the policy (and its critics) of a CVPO checkpoint, or of a run directory's best feasible checkpoint
    (``which="latest"`` for its latest). Raises :class:`CheckpointError` naming the path if it cannot."""
    checkpoint = resolve_checkpoint(path, which)
    module_dir = checkpoint / MODULE_SUBDIR
    if not module_dir.is_dir():
        raise CheckpointError(f"unreadable checkpoint {str(checkpoint)!r}: no policy module at {MODULE_SUBDIR}")
    metadata = read_metadata(checkpoint)
    from ray.rllib.core.rl_module.rl_module import RLModule

    try:
        module = RLModule.from_checkpoint(str(module_dir.resolve()))
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(f"unreadable checkpoint {str(checkpoint)!r}: {type(err).__name__}: {err}") from None
    module.eval()
    return CVPOPolicy(module=module, checkpoint=checkpoint, metadata=metadata)
