"""Registration of tasks with Ray, so that ``config.environment("SafetyPointGoal1-v0")`` builds them through the env
factory in every EnvRunner process (remote ones included: the creator is imported there by reference, which also
applies the safety-gymnasium fixes in that process)."""

from __future__ import annotations

import functools
from typing import Any, Mapping

from rllib_cvpo.envs.factory import episode_length, make_env


def _create(env_id: str, env_config: Mapping[str, Any]):
    return make_env(env_id, **dict(env_config))


def register_with_ray(env_id: str) -> None:
    """Register ``env_id`` with Ray Tune's env registry (idempotent). Raises ``UnknownEnvError`` for an unknown id.

    ``CVPOConfig.environment`` calls this for you; call it yourself to use a task with another RLlib algorithm.
    """
    episode_length(env_id)  # fails early, with suggestions, on an unknown id
    from ray.tune.registry import ENV_CREATOR, _global_registry, register_env

    if not _global_registry.contains(ENV_CREATOR, env_id):
        register_env(env_id, functools.partial(_create, env_id))
