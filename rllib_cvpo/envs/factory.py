"""The one env factory: any supported id -> a gymnasium-1.x env whose step info carries ``cost`` (float)."""

from __future__ import annotations

import difflib
import functools
import importlib
from typing import Any

import gymnasium as gym

from rllib_cvpo.envs import compat, speed_limit
from rllib_cvpo.envs.wrappers import FixedLength, RequireCost, SafetyGymnasiumToGymnasium, ValidateAction

ROBOTS = ("Point", "Car", "Racecar", "Doggo", "Ant")
NAVIGATION_FAMILIES = ("Goal", "Button", "Push", "Circle")
VELOCITY_ROBOTS = ("HalfCheetah", "Hopper", "Swimmer", "Walker2d", "Ant", "Humanoid")

BUILTIN_ENVS = {speed_limit.ENV_ID: speed_limit.SpeedLimitEnv}


class UnknownEnvError(ValueError):
    """The env id is neither a supported task nor a registered gymnasium env."""


def navigation_env_ids() -> list[str]:
    return [f"Safety{r}{f}{lvl}-v0" for f in NAVIGATION_FAMILIES for r in ROBOTS for lvl in range(3)]


def velocity_env_ids() -> list[str]:
    return [f"Safety{r}Velocity-v{v}" for r in VELOCITY_ROBOTS for v in (0, 1)]


def supported_env_ids() -> list[str]:
    """Every id the factory knows without a gymnasium lookup: the built-in task and safety-gymnasium's
    single-agent navigation and velocity tasks."""
    return [*BUILTIN_ENVS, *navigation_env_ids(), *velocity_env_ids()]


def is_safety_gymnasium_id(env_id: str) -> bool:
    return env_id in _safety_ids()


@functools.lru_cache(maxsize=1)
def _safety_ids() -> frozenset[str]:
    return frozenset(navigation_env_ids() + velocity_env_ids())


def _unknown(env_id: str) -> UnknownEnvError:
    candidates = supported_env_ids() + [k for k in gym.registry if not k.startswith("Safety")]
    close = difflib.get_close_matches(env_id, candidates, n=3, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return UnknownEnvError(
        f"unknown env id {env_id!r}.{hint} Supported: {speed_limit.ENV_ID}, safety-gymnasium single-agent tasks "
        "(Safety{Point,Car,Racecar,Doggo,Ant}{Goal,Button,Push,Circle}{0,1,2}-v0, Safety<Robot>Velocity-v1), or any "
        "registered gymnasium id whose step info reports 'cost' (`rllib-cvpo envs` lists them)."
    )


def import_env_module(env_id: str) -> str:
    """For gymnasium's ``module:EnvId`` form, import ``module`` (which registers ``EnvId``) and return ``EnvId``;
    a plain id comes back unchanged. Works in any process, so remote EnvRunners resolve the id the same way."""
    if not isinstance(env_id, str) or ":" not in env_id:
        return env_id
    module, _, name = env_id.partition(":")
    try:
        importlib.import_module(module)
    except ImportError as err:
        raise UnknownEnvError(f"env id {env_id!r}: cannot import module {module!r} ({err}); it must be importable "
                              "(on PYTHONPATH or in the working directory)") from None
    return name


def is_users_module(module) -> bool:
    """Whether ``module`` is the user's own code (a file not in an installed package's site-/dist-packages), which
    Ray workers cannot be assumed to import: it must travel with the job."""
    where = str(getattr(module, "__file__", "") or "")
    return bool(where) and getattr(module, "__name__", "") != "__main__" and "-packages" not in where


def user_env_spec(env_id: str) -> "gym.envs.registration.EnvSpec | None":
    """The gymnasium spec of an id the user registered (neither built in nor safety-gymnasium's), else None."""
    name = import_env_module(env_id)
    if name in BUILTIN_ENVS or is_safety_gymnasium_id(name) or name not in gym.registry:
        return None
    return gym.spec(name)


def episode_length(env_id: str) -> int | None:
    """The task's own episode length T (its time limit), or None if it has none."""
    env_id = import_env_module(env_id)
    if env_id in BUILTIN_ENVS:
        return speed_limit.HORIZON
    if is_safety_gymnasium_id(env_id):
        compat.import_safety_gymnasium()
    try:
        return gym.spec(env_id).max_episode_steps
    except gym.error.Error as err:
        raise _unknown(env_id) from err


def make_env(
    env_id: str,
    *,
    fixed_length: bool = False,
    max_episode_steps: int | None = None,
    render_mode: str | None = None,
    **kwargs: Any,
) -> gym.Env:
    """Build a task as a gymnasium-1.x env whose ``info["cost"]`` is the step cost (a float).

    Args:
        env_id: ``SpeedLimit-v0``, a safety-gymnasium single-agent id (navigation ``Safety<Robot><Task><Level>-v0``
            or velocity ``Safety<Robot>Velocity-v1``), or any registered gymnasium id whose step info reports a
            numeric ``cost`` (checked at the first step); ``module:EnvId`` imports ``module`` first (gymnasium's
            form), which is how an env registered by the user's own module is found in every process.
        fixed_length: by default each task keeps its own episode semantics (velocity robots that fall end the
            episode early), so results compare with published ones. True makes every episode last exactly T steps;
            after a fall the episode continues in an absorbing state with zero reward and cost (see
            :class:`~rllib_cvpo.envs.wrappers.FixedLength`).
        max_episode_steps: override the task's time limit T.
        render_mode: e.g. ``"rgb_array"`` (MuJoCo tasks render headless through EGL); passed to the env's
            constructor only when given, so an env whose constructor takes no ``render_mode`` works.
        kwargs: passed to the task's constructor.

    Actions may be arrays, lists or tuples of the action space's shape; NaN or a wrong shape raises ``ValueError``;
    values outside the action box are clipped to it.
    """
    if not isinstance(env_id, str):
        raise TypeError(f"env id must be a string, got {env_id!r}")
    env_id = import_env_module(env_id)
    if env_id in BUILTIN_ENVS:
        if max_episode_steps is not None:
            kwargs["horizon"] = max_episode_steps
        env: gym.Env = BUILTIN_ENVS[env_id](render_mode=render_mode, **kwargs)
        env = RequireCost(env)
    elif is_safety_gymnasium_id(env_id):
        sg = compat.import_safety_gymnasium()
        if render_mode is not None:
            kwargs["render_mode"] = render_mode
        env = SafetyGymnasiumToGymnasium(sg.make(env_id, max_episode_steps=max_episode_steps, **kwargs))
    else:
        if env_id.startswith("Safety") and env_id not in gym.registry:
            raise _unknown(env_id)
        if render_mode is not None:
            kwargs["render_mode"] = render_mode
        try:
            env = gym.make(env_id, max_episode_steps=max_episode_steps, **kwargs)
        except gym.error.NameNotFound as err:
            raise _unknown(env_id) from err
        except gym.error.Error as err:
            if env_id not in gym.registry:
                raise _unknown(env_id) from err
            raise
        env = RequireCost(env)
    env = ValidateAction(env)
    if fixed_length:
        horizon = max_episode_steps or episode_length(env_id)
        if horizon is None:
            raise ValueError(f"fixed_length=True needs an episode length, and {env_id!r} has no time limit: "
                             "pass max_episode_steps")
        env = FixedLength(env, horizon)
    return env


def _register_gymnasium() -> None:
    if speed_limit.ENV_ID not in gym.registry:
        gym.register(speed_limit.ENV_ID, entry_point=speed_limit.SpeedLimitEnv, max_episode_steps=None)


_register_gymnasium()
