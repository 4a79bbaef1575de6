"""Cost-reporting environments: safety-gymnasium tasks on gymnasium 1.x, any gymnasium env that reports
``info["cost"]``, and the built-in constrained task ``SpeedLimit-v0``."""

from rllib_cvpo.envs.compat import SafetyGymnasiumMissing, import_safety_gymnasium
from rllib_cvpo.envs.factory import (
    UnknownEnvError,
    episode_length,
    is_safety_gymnasium_id,
    make_env,
    supported_env_ids,
)
from rllib_cvpo.envs.ray_registration import register_with_ray
from rllib_cvpo.envs.speed_limit import SpeedLimitEnv, constrained_optimum
from rllib_cvpo.envs.wrappers import FixedLength, MissingCostError

__all__ = [
    "FixedLength",
    "MissingCostError",
    "SafetyGymnasiumMissing",
    "SpeedLimitEnv",
    "UnknownEnvError",
    "constrained_optimum",
    "episode_length",
    "import_safety_gymnasium",
    "is_safety_gymnasium_id",
    "make_env",
    "register_with_ray",
    "supported_env_ids",
]
