"""Make safety-gymnasium 1.0.0 run on gymnasium 1.2.2, numpy 2 and Python 3.11.

safety-gymnasium 1.0.0 (its latest release) was written for gymnasium 0.28 and Python <= 3.10. Every fix here is
applied in memory when :func:`import_safety_gymnasium` first runs; no installed file is edited. The env factory calls it
in every process that builds an env, which covers RLlib's remote EnvRunners. Each fix is numbered as in the project
notes and has its own test in ``tests/test_compat.py``.

1. gymnasium 1.x moved the wrapper modules that safety-gymnasium imports (``gymnasium.wrappers.time_limit`` and
   friends): the old module names are aliased to the new objects.
2. ``gymnasium_robotics`` is imported by the package only for multi-agent tasks: a placeholder satisfies the import
   while safety-gymnasium loads and is removed afterwards.
3. Python 3.11 dataclasses reject ndarray class defaults (``color: np.array = COLOR[...]`` in every asset): while the
   package loads, such defaults become ``default_factory`` copies.
4. ``safety_gymnasium.make`` builds an ``EnvSpec`` with fields gymnasium 1.x removed: it is replaced by a ``make`` with
   the same wrapper order (SafePassiveEnvChecker -> OrderEnforcing -> SafeTimeLimit -> optional SafeAutoReset).
5. numpy >= 2.4 breaks the Car robots (a one-element array used as an index): numpy is pinned below 2.4 in
   ``pyproject.toml``; :func:`check_numpy` says so if another numpy was installed.
6. ``np.array(action, copy=False)`` fails on Python lists under numpy 2: the env factory hands the env an ndarray.
7. ``Builder.reset(seed=...)`` never seeds ``np_random`` (gymnasium's ``check_env`` fails): it is seeded now.
8. ``OffScreenViewer`` is built without its size: the size comes from the model's ``offwidth``/``offheight``.
   ``MUJOCO_GL`` defaults to ``egl`` when there is no display, so ``rgb_array`` works on servers.
9. Not a compatibility fix, a cost one: every navigation task's world (rebuilt and recompiled on every reset) carries a
   star skybox of six PNG faces, 182 MB of texture once decoded. An env that never renders (made without a render
   mode, and not a vision task) gets a 32x32 gradient skybox instead: on SafetyPointGoal1-v0 a reset took 380-450 ms
   instead of 11 ms (5 ms with the parse below) and each env held about 210 MB more (``benchmarks/env_worlds.py``, docs/benchmarks.md section 3).
   Textures are not physics: observations, rewards and costs are the same (``tests/test_compat.py``). The world's
   assets config, which ``World.build`` parsed on every reset (5 ms), is parsed once per process.
10. Also a cost one: every reset places the world's objects by rejection sampling, and each distance test built three
   small numpy arrays; on SafetyCarButton1-v0 these tests were 80% of a reset (about 50 layouts drawn per reset, 160
   tests each). The same tests in Python floats (the same IEEE operations in the same order, so the same decisions,
   the same random draws and the same layouts: ``tests/test_compat.py``).
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import dataclasses
import functools
import importlib
import math
import os
import pkgutil
import sys
import threading
import types
from typing import Any

import numpy as np

SAFETY_GYMNASIUM_VERSION = "1.0.0"
INSTALL_COMMAND = f"pip install --no-deps safety-gymnasium=={SAFETY_GYMNASIUM_VERSION}"

_lock = threading.Lock()
_module: types.ModuleType | None = None


class SafetyGymnasiumMissing(ImportError):
    """safety-gymnasium is not installed."""


def import_safety_gymnasium() -> types.ModuleType:
    """Import safety-gymnasium with every compatibility fix applied (idempotent, thread-safe)."""
    global _module
    if _module is not None:
        return _module
    with _lock:
        if _module is None:
            _module = _load()
    return _module


def _load() -> types.ModuleType:
    check_numpy()
    if importlib.util.find_spec("safety_gymnasium") is None:
        raise SafetyGymnasiumMissing(
            "safety-gymnasium tasks need the package safety-gymnasium, which is not installed. Add it with:\n"
            f"    {INSTALL_COMMAND}\n"
            "(--no-deps is required: its declared pins conflict with ray[rllib]; rllib-cvpo supplies what it needs)."
        )
    if "DISPLAY" not in os.environ and "mujoco" not in sys.modules:
        os.environ.setdefault("MUJOCO_GL", "egl")  # fix 8: headless rgb_array rendering
    # A previous failed import can leave half-initialised submodules behind.
    for name in [n for n in sys.modules if n == "safety_gymnasium" or n.startswith("safety_gymnasium.")]:
        del sys.modules[name]
    _route_mujoco_warnings()
    _alias_gymnasium_wrapper_modules()  # fix 1
    import rllib_cvpo

    finder = getattr(rllib_cvpo, "_SafetyGymnasiumFinder", None)  # step past rllib_cvpo's own import hook
    with _robotics_placeholder(), _ndarray_defaults_as_factories(), _finder_off(finder):  # fixes 2 and 3
        sg = importlib.import_module("safety_gymnasium")
        assets = importlib.import_module("safety_gymnasium.assets")
        for info in pkgutil.walk_packages(assets.__path__, prefix="safety_gymnasium.assets."):
            importlib.import_module(info.name)  # load every asset while fix 3 is active
    _replace_make(sg)  # fix 4
    _seed_builder_reset()  # fix 7
    _size_offscreen_viewer()  # fix 8
    _plain_skybox_unless_rendered()  # fix 9
    _float_placement_tests()  # fix 10
    return sg


# -- fix 1 ---------------------------------------------------------------------------------------------------------
def _alias_gymnasium_wrapper_modules() -> None:
    import gymnasium.wrappers as w
    from gymnasium.wrappers.utils import RunningMeanStd

    class EnvCompatibility:  # gymnasium 1.x removed the old-step-API converter.
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise RuntimeError("apply_api_compatibility is not supported with gymnasium 1.x")

    aliases = {
        "gymnasium.wrappers.compatibility": {"EnvCompatibility": EnvCompatibility},
        "gymnasium.wrappers.autoreset": {"AutoResetWrapper": w.Autoreset},
        "gymnasium.wrappers.env_checker": {"PassiveEnvChecker": w.PassiveEnvChecker},
        "gymnasium.wrappers.time_limit": {"TimeLimit": w.TimeLimit},
        "gymnasium.wrappers.normalize": {
            "NormalizeObservation": w.NormalizeObservation,
            "NormalizeReward": w.NormalizeReward,
            "RunningMeanStd": RunningMeanStd,
        },
    }
    for name, attrs in aliases.items():
        if name in sys.modules:
            continue
        module = types.ModuleType(name, f"rllib-cvpo alias of gymnasium 0.28's {name} for safety-gymnasium")
        module.__dict__.update(attrs)
        sys.modules[name] = module
        setattr(w, name.rsplit(".", 1)[1], module)


# -- fix 2 ---------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _robotics_placeholder():
    if importlib.util.find_spec("gymnasium_robotics") is not None:
        yield
        return

    class MultiAgentMujocoEnv:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise RuntimeError("safety-gymnasium multi-agent tasks need gymnasium-robotics; rllib-cvpo is single-agent")

    names = [
        "gymnasium_robotics",
        "gymnasium_robotics.envs",
        "gymnasium_robotics.envs.multiagent_mujoco",
        "gymnasium_robotics.envs.multiagent_mujoco.mujoco_multi",
    ]
    for name in names:
        sys.modules[name] = types.ModuleType(name)
    sys.modules[names[-1]].MultiAgentMujocoEnv = MultiAgentMujocoEnv
    try:
        yield
    finally:
        for name in names:
            sys.modules.pop(name, None)


# -- fix 3 ---------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _ndarray_defaults_as_factories():
    original = dataclasses.dataclass

    def patched(cls=None, /, **kwargs):
        def wrap(c):
            for name in getattr(c, "__annotations__", {}):
                value = c.__dict__.get(name)
                if isinstance(value, np.ndarray):
                    setattr(c, name, dataclasses.field(default_factory=functools.partial(np.array, value)))
            return original(**kwargs)(c)

        return wrap if cls is None else wrap(cls)

    dataclasses.dataclass = patched
    try:
        yield
    finally:
        dataclasses.dataclass = original


# -- fix 4 ---------------------------------------------------------------------------------------------------------
def _replace_make(sg: types.ModuleType) -> None:
    import gymnasium
    from gymnasium.envs.registration import EnvSpec, load_env_creator
    from gymnasium.wrappers import OrderEnforcing

    registration = sys.modules["safety_gymnasium.utils.registration"]
    wrappers = sys.modules["safety_gymnasium.wrappers"]

    def make(
        id: str,  # noqa: A002 - same signature as safety_gymnasium.make
        max_episode_steps: int | None = None,
        autoreset: bool | None = None,
        disable_env_checker: bool | None = None,
        **kwargs: Any,
    ) -> gymnasium.Env:
        """safety_gymnasium.make for gymnasium 1.x: returns an env whose step gives a 6-tuple with the cost."""
        if id not in registration.safe_registry:
            raise gymnasium.error.UnregisteredEnv(f"Environment {id} is not registered in safety-gymnasium.")
        spec = gymnasium.spec(id)
        spec_kwargs = {**spec.kwargs, **kwargs}
        creator = spec.entry_point if callable(spec.entry_point) else load_env_creator(spec.entry_point)
        env = creator(**spec_kwargs)
        env.unwrapped.spec = EnvSpec(
            id=spec.id,
            entry_point=spec.entry_point,
            reward_threshold=spec.reward_threshold,
            nondeterministic=spec.nondeterministic,
            max_episode_steps=None,
            order_enforce=False,
            disable_env_checker=True,
            kwargs=spec_kwargs,
        )
        if not (disable_env_checker if disable_env_checker is not None else spec.disable_env_checker):
            env = wrappers.SafePassiveEnvChecker(env)
        if spec.order_enforce:
            env = OrderEnforcing(env)
        limit = max_episode_steps if max_episode_steps is not None else spec.max_episode_steps
        if limit is not None:
            env = wrappers.SafeTimeLimit(env, limit)
        if autoreset:
            env = wrappers.SafeAutoResetWrapper(env)
        return env

    registration.make = make
    sg.make = make


@contextlib.contextmanager
def _finder_off(finder):
    if finder is not None:
        finder.loading = True
    try:
        yield
    finally:
        if finder is not None:
            finder.loading = False


def _route_mujoco_warnings() -> None:
    """MuJoCo's default warning handler appends to MUJOCO_LOG.TXT in the working directory (several velocity robots'
    XML use the deprecated 'settotalmass'); send its warnings to Python's logging instead, once per message."""
    import logging

    import mujoco

    seen: set = set()
    log = logging.getLogger("mujoco")

    def warn(message: str) -> None:
        if message not in seen:
            seen.add(message)
            log.debug("MuJoCo: %s", message)

    mujoco.set_mju_user_warning(warn)


# -- fix 5 ---------------------------------------------------------------------------------------------------------
def check_numpy() -> None:
    major, minor = (int(p) for p in np.__version__.split(".")[:2])
    if (major, minor) >= (2, 4):
        raise ImportError(
            f"numpy {np.__version__} breaks safety-gymnasium's Car robots (one-element arrays are no longer "
            "indices); rllib-cvpo needs numpy 2.3: pip install numpy==2.3.5"
        )


# -- fix 7 ---------------------------------------------------------------------------------------------------------
def _seed_builder_reset() -> None:
    from gymnasium.utils import seeding

    builder = importlib.import_module("safety_gymnasium.builder").Builder
    original = builder.reset
    if getattr(original, "_rllib_cvpo_seeded", False):
        return

    @functools.wraps(original)
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if seed is not None:
            self._np_random, self._np_random_seed = seeding.np_random(seed)
        return original(self, seed=seed, options=options)

    reset._rllib_cvpo_seeded = True
    builder.reset = reset


# -- fix 8 ---------------------------------------------------------------------------------------------------------
def _size_offscreen_viewer() -> None:
    underlying = importlib.import_module("safety_gymnasium.bases.underlying")
    viewer_cls = underlying.OffScreenViewer
    if getattr(viewer_cls, "_rllib_cvpo_sized", False):
        return

    class SizedOffScreenViewer(viewer_cls):
        _rllib_cvpo_sized = True

        def __init__(self, model, data, width: int | None = None, height: int | None = None, **kwargs: Any):
            width = width or model.vis.global_.offwidth
            height = height or model.vis.global_.offheight
            super().__init__(model, data, width, height, **kwargs)

    underlying.OffScreenViewer = SizedOffScreenViewer


# -- fix 9 ---------------------------------------------------------------------------------------------------------
PLAIN_SKYBOX = {"@type": "skybox", "@builtin": "gradient", "@rgb1": "0.4 0.6 0.8", "@rgb2": "0 0 0",
                "@width": "32", "@height": "32"}
_plain_skybox: contextvars.ContextVar[bool] = contextvars.ContextVar("rllib_cvpo_plain_skybox", default=False)


class _AssetsYaml:
    """Stands in for the ``yaml`` module inside ``safety_gymnasium.world``, whose ``World.build`` parses its assets
    config file on every build (5 ms, half of a reset once the skybox is plain): each file is parsed once per
    process and every build gets its own copy; while a task that never renders builds its world, the copy's skybox
    entry is the plain one."""

    def __init__(self, module: types.ModuleType) -> None:
        self._module = module
        self._parsed: dict[str, Any] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)

    def load(self, stream: Any, Loader: Any) -> Any:  # noqa: N803 (yaml's own argument name)
        name = getattr(stream, "name", None)
        if not isinstance(name, str):
            config = self._module.load(stream, Loader=Loader)
        else:
            if name not in self._parsed:
                self._parsed[name] = self._module.load(stream, Loader=Loader)
            config = copy.deepcopy(self._parsed[name])
        if _plain_skybox.get() and isinstance(config, dict) and "skybox" in config.get("textures", {}):
            config["textures"]["skybox"] = dict(PLAIN_SKYBOX)
        return config


def _plain_skybox_unless_rendered() -> None:
    world = importlib.import_module("safety_gymnasium.world")
    underlying = importlib.import_module("safety_gymnasium.bases.underlying").Underlying
    builder = importlib.import_module("safety_gymnasium.builder").Builder
    if getattr(builder.__init__, "_rllib_cvpo_skybox", False):
        return
    world.yaml = _AssetsYaml(world.yaml)
    init, build = builder.__init__, underlying._build

    @functools.wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        # The world is first built at reset, so the task knows by then. A vision task renders its observations.
        self.task._rllib_cvpo_plain_skybox = self.render_parameters.mode is None and not self.task.observe_vision

    @functools.wraps(build)
    def _build(self) -> None:
        token = _plain_skybox.set(getattr(self, "_rllib_cvpo_plain_skybox", False))
        try:
            build(self)
        finally:
            _plain_skybox.reset(token)

    __init__._rllib_cvpo_skybox = True
    builder.__init__ = __init__
    underlying._build = _build


# -- fix 10 --------------------------------------------------------------------------------------------------------
def _far_enough(gen: Any, xy: Any, keepout: float, layout: dict[str, tuple[float, float]]) -> bool:
    """safety-gymnasium's placement test, ``sqrt(sum(square(xy - other))) >= other_keepout + margin + keepout`` for
    every placed object, in Python floats: for two coordinates numpy's sum is one addition, and square, subtract
    and sqrt are exactly rounded in both, so each comparison is decided alike."""
    x, y = float(xy[0]), float(xy[1])
    for other_name, (ox, oy) in layout.items():
        dx, dy = x - ox, y - oy
        if math.sqrt(dx * dx + dy * dy) < gen.placements[other_name][1] + gen.placements_margin + keepout:
            return False
    return True


def _float_placement_tests() -> None:
    generator = importlib.import_module("safety_gymnasium.utils.random_generator").RandomGenerator
    if getattr(generator.sample_layout, "_rllib_cvpo_floats", False):
        return

    @functools.wraps(generator.sample_layout)
    def sample_layout(self) -> bool:
        layout, placed = {}, {}
        for name, (placements, keepout) in self.placements.items():
            for _ in range(100):
                xy = self.draw_placement(placements, keepout)
                if _far_enough(self, xy, keepout, placed):
                    break
            else:
                return False
            layout[name] = xy
            placed[name] = (float(xy[0]), float(xy[1]))
        self.layout = layout
        return True

    @functools.wraps(generator.sample_goal_position)
    def sample_goal_position(self) -> bool:
        placements, keepout = self.placements["goal"]
        goal_xy = self.draw_placement(placements, keepout)
        placed = {name: (float(xy[0]), float(xy[1])) for name, xy in self.layout.items()}
        if not _far_enough(self, goal_xy, keepout, placed):
            return False
        self.layout["goal"] = goal_xy
        return True

    sample_layout._rllib_cvpo_floats = True
    generator._rllib_cvpo_original = (generator.sample_layout, generator.sample_goal_position)
    generator.sample_layout = sample_layout
    generator.sample_goal_position = sample_goal_position
