"""rllib-cvpo: Constrained Variational Policy Optimization for Ray RLlib."""

__version__ = "0.1.0"


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
