"""One test per safety-gymnasium compatibility fix (rllib_cvpo/envs/compat.py). Each would fail without its fix."""

import importlib
import sys

import numpy as np
import pytest

from rllib_cvpo.envs import compat, make_env


@pytest.fixture(scope="module")
def sg():
    return compat.import_safety_gymnasium()


def test_fix1_old_gymnasium_wrapper_modules_are_aliased(sg):
    import gymnasium.wrappers as w

    assert sys.modules["gymnasium.wrappers.time_limit"].TimeLimit is w.TimeLimit
    assert sys.modules["gymnasium.wrappers.autoreset"].AutoResetWrapper is w.Autoreset
    # safety-gymnasium's own wrappers built on the aliases work: the time limit truncates at its step count.
    env = sg.make("SafetySwimmerVelocity-v1", max_episode_steps=7)
    env.reset(seed=0)
    flags = [env.step(env.action_space.sample())[4] for _ in range(7)]
    assert flags == [False] * 6 + [True]


def test_fix2_no_gymnasium_robotics_placeholder_is_left_behind(sg):
    assert importlib.util.find_spec("gymnasium_robotics") is None
    assert "gymnasium_robotics" not in sys.modules
    assert "safety_gymnasium.tasks.safe_multi_agent.safe_mujoco_multi" in sys.modules


def test_fix3_asset_colors_are_per_instance_defaults(sg):
    from safety_gymnasium.assets.geoms.apples import Apples

    a, b = Apples(), Apples()
    assert isinstance(a.color, np.ndarray)
    a.color[0] = 123.0
    assert b.color[0] != 123.0


def test_fix4_make_returns_six_tuple_with_time_limit_and_checker(sg):
    env = sg.make("SafetyPointGoal1-v0")
    names = []
    e = env
    while hasattr(e, "env"):
        names.append(type(e).__name__)
        e = e.env
    assert names == ["SafeTimeLimit", "OrderEnforcing", "SafePassiveEnvChecker"]
    assert env._max_episode_steps == 1000
    env.reset(seed=1)
    out = env.step(env.action_space.sample())
    assert len(out) == 6 and isinstance(out[2], float)


def test_fix5_numpy_is_below_2_4_and_car_robots_build(sg, monkeypatch):
    from rllib_cvpo.envs.compat import check_numpy

    check_numpy()  # the installed numpy passes
    monkeypatch.setattr(np, "__version__", "2.4.1")
    with pytest.raises(ImportError, match=r"numpy 2.4.1 breaks safety-gymnasium's Car robots .*pip install numpy==2.3"):
        check_numpy()
    monkeypatch.undo()
    env = sg.make("SafetyCarGoal1-v0")
    env.reset(seed=0)
    env.step(env.action_space.sample())


def test_fix6_list_actions_reach_the_env_as_arrays():
    env = make_env("SafetyPointGoal1-v0")
    env.reset(seed=0)
    obs, *_ = env.step([0.1, -0.2])  # safety-gymnasium alone raises on a list under numpy 2
    assert obs.shape == env.observation_space.shape


def test_fix7_seeded_reset_seeds_np_random(sg):
    env = sg.make("SafetyPointButton1-v0")
    env.reset(seed=42)
    first = env.unwrapped.np_random.random()
    env.reset(seed=42)
    assert env.unwrapped.np_random.random() == first
    assert env.unwrapped.np_random_seed == 42


def test_fix8_offscreen_rendering_is_sized_and_headless(sg):
    env = sg.make("SafetyPointGoal1-v0", render_mode="rgb_array")
    env.reset(seed=0)
    frame = env.render()
    model = env.unwrapped.task.model
    assert frame.shape == (model.vis.global_.offheight, model.vis.global_.offwidth, 3)


def _texture_mb(env) -> float:
    return env.unwrapped.task.model.ntexdata / 2**20


def test_fix9_an_env_that_never_renders_builds_a_plain_skybox_and_the_same_episode(sg):
    plain = sg.make("SafetyPointGoal1-v0")
    rendered = sg.make("SafetyPointGoal1-v0", render_mode="rgb_array")
    vision = sg.make("SafetyPointGoal0Vision-v0")
    for env in (plain, rendered, vision):
        env.reset(seed=3)
    # The star skybox (182 MB decoded) where the env renders, frames or vision observations; 32x32 where it never does.
    assert _texture_mb(plain) < 1.0
    assert _texture_mb(rendered) > 100.0 and _texture_mb(vision) > 100.0
    # Textures are not physics: one seed and one action sequence give the same episode, through several resets
    # (each rebuilds the world).
    rng = np.random.default_rng(0)
    for episode in range(3):
        obs_p, _ = plain.reset(seed=10 + episode)
        obs_r, _ = rendered.reset(seed=10 + episode)
        np.testing.assert_array_equal(obs_p, obs_r)
        for _ in range(50):
            action = rng.uniform(-1, 1, size=plain.action_space.shape)
            out_p, out_r = plain.step(action), rendered.step(action)
            np.testing.assert_array_equal(out_p[0], out_r[0])
            assert out_p[1:5] == out_r[1:5]  # reward, cost, terminated, truncated
    assert _texture_mb(plain) < 1.0 and _texture_mb(rendered) > 100.0
    frame = rendered.render()
    assert frame.shape[-1] == 3 and frame.std() > 0


def test_fix9_the_worlds_assets_config_is_parsed_once_per_process(sg, monkeypatch):
    import safety_gymnasium.world as world

    env = sg.make("SafetyPointGoal1-v0")
    env.reset(seed=0)
    parses = []
    real = world.yaml._module

    class Counting:
        def __getattr__(self, name):
            return getattr(real, name)

        def load(self, *args, **kwargs):
            parses.append(1)
            return real.load(*args, **kwargs)

    monkeypatch.setattr(world.yaml, "_module", Counting())
    for seed in range(3):  # every reset rebuilds the world from a copy of the parsed config
        env.reset(seed=seed)
    assert parses == []
    assert _texture_mb(env) < 1.0


def test_missing_safety_gymnasium_error_gives_the_install_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(compat, "_module", None)
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "safety_gymnasium" else real_find_spec(name, *a)
    )
    with pytest.raises(compat.SafetyGymnasiumMissing, match=r"pip install --no-deps safety-gymnasium==1\.0\.0"):
        make_env("SafetyPointGoal1-v0")
    make_env("SpeedLimit-v0")  # the built-in task needs no safety-gymnasium


def test_plain_import_of_safety_gymnasium_works_after_importing_rllib_cvpo():
    import subprocess
    import sys

    script = ("import rllib_cvpo, safety_gymnasium\n"
              "env = safety_gymnasium.make('SafetyPointGoal1-v0')\n"
              "obs, info = env.reset(seed=0)\n"
              "print(obs.shape, safety_gymnasium.__spec__.name)\n")
    ran = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert ran.stdout.strip().splitlines()[-1] == "(60,) safety_gymnasium"


@pytest.mark.parametrize("task", ["SafetyCarButton1-v0", "SafetyPointGoal2-v0", "SafetyPointPush1-v0"])
def test_fix10_float_placement_tests_draw_the_same_layouts(sg, task):
    from safety_gymnasium.utils.random_generator import RandomGenerator

    original_layout, original_goal = RandomGenerator._rllib_cvpo_original
    assert RandomGenerator.sample_layout is not original_layout  # the fix is in place
    env = sg.make(task)
    env.reset(seed=0)
    gen = env.unwrapped.task.random_generator

    def draw(layout_fn, goal_fn, seed):
        gen.set_random_seed(seed)
        while not layout_fn(gen):  # build_layout's loop
            pass
        layout = {k: v.copy() for k, v in gen.layout.items()}
        goals = [goal_fn(gen) for _ in range(20)]  # accepted or rejected, as a task resamples a reached goal
        return layout, goals, {k: v.copy() for k, v in gen.layout.items()}, gen.random_generator.get_state()[1]

    rejected = 0
    for seed in range(30):
        a = draw(original_layout, original_goal, seed)
        b = draw(RandomGenerator.sample_layout, RandomGenerator.sample_goal_position, seed)
        for la, lb in ((a[0], b[0]), (a[2], b[2])):
            assert la.keys() == lb.keys()
            for k in la:
                np.testing.assert_array_equal(la[k], lb[k])
        assert a[1] == b[1]
        np.testing.assert_array_equal(a[3], b[3])  # the same number of random draws: the generator ends alike
        rejected += a[1].count(False)
    if task != "SafetyPointPush1-v0":
        assert rejected > 0  # the rejection branch is exercised too
