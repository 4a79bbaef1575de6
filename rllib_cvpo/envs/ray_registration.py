"""Registration of tasks with Ray, so that ``config.environment("SafetyPointGoal1-v0")`` builds them through the env
factory in every EnvRunner process (remote ones included: the creator is imported there by reference, which also
applies the safety-gymnasium fixes in that process).

An env the user registered with gymnasium in their own process (``gym.register(...)`` in a script or module) does
not exist in the registry of a remote process. So its gymnasium spec travels with the creator and is registered
there before the env is made; a ``module:EnvId`` id imports its module in each process instead."""

from __future__ import annotations

import functools
from typing import Any, Mapping, Optional

import gymnasium as gym

from rllib_cvpo.envs.factory import episode_length, is_users_module, make_env, user_env_spec


def _portable(spec: Optional[gym.envs.registration.EnvSpec]) -> Optional[gym.envs.registration.EnvSpec]:
    """The spec with its entry point as the class itself, and the class's module pickled by value when it is the
    user's own (not installed in site-packages): a remote process can then build the env without importing
    anything the user wrote."""
    if spec is None:
        return None
    import dataclasses
    import sys

    from gymnasium.envs.registration import load_env_creator
    from ray import cloudpickle

    entry = spec.entry_point
    if isinstance(entry, str):
        entry = load_env_creator(entry)
    module = sys.modules.get(getattr(entry, "__module__", "") or "")
    if module is not None and is_users_module(module):
        cloudpickle.register_pickle_by_value(module)
    return dataclasses.replace(spec, entry_point=entry)


def _create(env_id: str, spec: Optional[gym.envs.registration.EnvSpec], env_config: Mapping[str, Any]):
    if spec is not None and spec.id not in gym.registry:
        gym.registry[spec.id] = spec  # a user's registration, made in the driver, repeated in this process
    return make_env(env_id, **dict(env_config))


def register_with_ray(env_id: str) -> None:
    """Register ``env_id`` with Ray Tune's env registry (idempotent). Raises ``UnknownEnvError`` for an unknown id.

    ``CVPOConfig.environment`` calls this for you; call it yourself to use a task with another RLlib algorithm.
    """
    episode_length(env_id)  # fails early, with suggestions, on an unknown id
    from ray.tune.registry import ENV_CREATOR, _global_registry, register_env

    if not _global_registry.contains(ENV_CREATOR, env_id):
        register_env(env_id, functools.partial(_create, env_id, _portable(user_env_spec(env_id))))
