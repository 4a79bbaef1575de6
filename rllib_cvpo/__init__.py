"""rllib-cvpo: Constrained Variational Policy Optimization for Ray RLlib."""

__version__ = "0.1.0"  # the one place the version is written (pyproject.toml reads it from here)

# What a run of the command defaults to (kept here, not in rllib_cvpo.training, so that `rllib-cvpo --help` does not
# import Ray Tune).
DEFAULT_ENV = "SafetyPointCircle1-v0"
DEFAULT_TOTAL_ENV_STEPS = 100_000


def __getattr__(name):
    # Lazy: importing rllib_cvpo.envs in an EnvRunner should not import the whole algorithm.
    if name in ("CVPO", "CVPOConfig"):
        from rllib_cvpo.cvpo import cvpo

        return getattr(cvpo, name)
    if name in ("load_policy", "CVPOPolicy", "CheckpointError"):
        from rllib_cvpo import policy

        return getattr(policy, name)
    raise AttributeError(name)


__all__ = ["CVPO", "CVPOConfig", "CVPOPolicy", "CheckpointError", "load_policy", "__version__"]
