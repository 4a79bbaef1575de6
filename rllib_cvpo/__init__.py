"""rllib-cvpo: Constrained Variational Policy Optimization for Ray RLlib."""

__version__ = "0.1.0"  # the one place the version is written (pyproject.toml reads it from here)

# What a run of the command defaults to (kept here, not in rllib_cvpo.training, so that `rllib-cvpo --help` does not
# import Ray Tune).
DEFAULT_ENV = "SafetyPointCircle1-v0"
DEFAULT_TOTAL_ENV_STEPS = 100_000


def _install_safety_gymnasium_hook() -> None:
    """After ``import rllib_cvpo``, a plain ``import safety_gymnasium`` gets the package with rllib_cvpo's
    compatibility fixes applied (``rllib_cvpo.envs.compat``), instead of failing on gymnasium 1.x. Cheap: nothing is
    imported until safety_gymnasium itself is."""
    import importlib.abc
    import importlib.machinery
    import sys

    class _Loader(importlib.abc.Loader):
        def create_module(self, spec):
            from rllib_cvpo.envs.compat import import_safety_gymnasium

            module = import_safety_gymnasium()
            self.original_spec = module.__spec__
            return module

        def exec_module(self, module):
            module.__spec__ = self.original_spec  # executed already, with the fixes; keep the package's own spec

    class _Finder(importlib.abc.MetaPathFinder):
        loading = False

        def find_spec(self, name, path=None, target=None):
            if name != "safety_gymnasium" or _Finder.loading:
                return None
            if importlib.machinery.PathFinder.find_spec(name) is None:
                return None  # not installed: the usual ModuleNotFoundError
            return importlib.machinery.ModuleSpec(name, _Loader())

    if not any(type(f).__name__ == "_Finder" and type(f).__module__ == __name__ for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
    globals()["_SafetyGymnasiumFinder"] = _Finder


_install_safety_gymnasium_hook()


def __getattr__(name):
    # Lazy: importing rllib_cvpo.envs in an EnvRunner should not import the whole algorithm.
    if name in ("CVPO", "CVPOConfig"):
        from rllib_cvpo.cvpo import cvpo

        return getattr(cvpo, name)
    if name in ("train", "resume"):
        from rllib_cvpo import training

        return getattr(training, name)
    if name in ("load_policy", "CVPOPolicy", "CheckpointError"):
        from rllib_cvpo import policy

        return getattr(policy, name)
    raise AttributeError(name)


__all__ = ["CVPO", "CVPOConfig", "CVPOPolicy", "CheckpointError", "load_policy", "resume", "train", "__version__"]
