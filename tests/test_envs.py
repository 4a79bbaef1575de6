"""The env factory: safety-gymnasium tasks as gymnasium-1.x envs with info['cost'], errors, the built-in task."""

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from rllib_cvpo.envs import (
    MissingCostError,
    UnknownEnvError,
    constrained_optimum,
    episode_length,
    import_safety_gymnasium,
    make_env,
)
from rllib_cvpo.envs.speed_limit import HORIZON, optimal_action

# The tasks of the compatibility table, plus one Car task of each navigation family.
TABLE_TASKS = [
    "SafetyPointGoal1-v0",
    "SafetyCarGoal1-v0",
    "SafetyPointButton1-v0",
    "SafetyPointCircle1-v0",
    "SafetyCarCircle1-v0",
    "SafetyPointPush1-v0",
    "SafetyHalfCheetahVelocity-v1",
    "SafetyHopperVelocity-v1",
    "SafetyAntVelocity-v1",
    "SafetyWalker2dVelocity-v1",
    "SafetySwimmerVelocity-v1",
]
CAR_TASKS = ["SafetyCarButton1-v0", "SafetyCarPush1-v0"]


@pytest.mark.parametrize("env_id", TABLE_TASKS + CAR_TASKS)
def test_factory_cost_equals_safety_gymnasium_cost_for_same_seed_and_actions(env_id):
    sg = import_safety_gymnasium()
    ours, ref = make_env(env_id), sg.make(env_id)
    rng = np.random.default_rng(0)
    ours.reset(seed=7)
    ref.reset(seed=7)
    costs, seed = [], 7
    for _ in range(1000):
        action = rng.uniform(-1, 1, ours.action_space.shape).astype(ours.action_space.dtype)
        obs, reward, terminated, truncated, info = ours.step(action)
        r_obs, r_reward, r_cost, r_term, r_trunc, _ = ref.step(action)
        assert isinstance(info["cost"], float)
        assert info["cost"] == r_cost and reward == r_reward and terminated == r_term and truncated == r_trunc
        np.testing.assert_array_equal(obs, r_obs)
        costs.append(info["cost"])
        if terminated or truncated:
            seed += 1
            ours.reset(seed=seed)
            ref.reset(seed=seed)
    assert len(costs) == 1000 and all(c >= 0 for c in costs)


def test_navigation_info_carries_per_source_costs():
    # Seed 2 with a constant forward-and-turn action crosses hazards (27 cost over 500 steps, the first at step
    # 388), so the sum is checked on steps that have a cost, not only on zeros.
    env = make_env("SafetyPointGoal1-v0")
    env.reset(seed=2)
    total = 0.0
    for _ in range(500):
        *_, info = env.step(np.array([1.0, 0.3]))
        parts = sum(v for k, v in info.items() if k.startswith("cost_") and k != "cost_sum")
        assert "cost_hazards" in info and info["cost"] == pytest.approx(parts)
        total += info["cost"]
    assert total > 0


@pytest.mark.parametrize(
    "env_id", ["SafetyPointGoal1-v0", "SafetyPointCircle1-v0", "SafetyPointButton1-v0", "SafetyHopperVelocity-v1"]
)
def test_check_env_passes(env_id):
    check_env(make_env(env_id), skip_render_check=True)


def test_check_env_passes_on_builtin_task():
    check_env(make_env("SpeedLimit-v0"))


def test_unknown_env_id_names_the_id_and_closest_ids():
    with pytest.raises(UnknownEnvError, match=r"'SafetyPointGoal7-v0'.*SafetyPointGoal[012]-v0"):
        make_env("SafetyPointGoal7-v0")
    with pytest.raises(UnknownEnvError, match=r"'SpeedLimt-v0'.*SpeedLimit-v0"):
        make_env("SpeedLimt-v0")
    with pytest.raises(UnknownEnvError, match="NoSuchEnv-v3"):
        episode_length("NoSuchEnv-v3")


def test_env_without_cost_fails_at_first_step():
    env = make_env("Pendulum-v1")
    env.reset(seed=0)
    with pytest.raises(MissingCostError, match=r"'Pendulum-v1' reports no cost"):
        env.step(np.zeros(1, np.float32))


def test_actions_lists_wrong_shapes_nan_and_out_of_box():
    env = make_env("SpeedLimit-v0")
    env.reset(seed=0)
    env.step([0.0, 0.0])  # a list is accepted
    with pytest.raises(ValueError, match=r"shape \(3,\), expected \(2,\)"):
        env.step([0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="NaN"):
        env.step(np.array([np.nan, 0.0]))
    with pytest.raises(ValueError, match="not numeric"):
        env.step(["fast", "left"])
    # Out of the box: clipped, so 5.0 acts as full throttle (v = 1 -> cost k).
    obs, _ = env.reset(seed=1)
    *_, info = env.step([5.0, obs[1]])
    assert info["cost"] == pytest.approx(float(obs[0]), rel=1e-6)


def test_default_episode_semantics_and_fixed_length_option():
    assert episode_length("SafetyHopperVelocity-v1") == 1000
    assert episode_length("SafetyPointCircle1-v0") == 500
    zero = np.zeros(3, np.float32)  # a hopper doing nothing falls within a few hundred steps

    env = make_env("SafetyHopperVelocity-v1")
    env.reset(seed=0)
    steps, done = 0, False
    while not done:
        _, _, terminated, truncated, _ = env.step(zero - 1.0)
        steps += 1
        done = terminated or truncated
    assert terminated and steps < 1000

    env = make_env("SafetyHopperVelocity-v1", fixed_length=True)
    env.reset(seed=0)
    infos, flags = [], []
    for _ in range(1000):
        obs, reward, terminated, truncated, info = env.step(zero - 1.0)
        infos.append((reward, info))
        flags.append((terminated, truncated))
    assert flags[-1] == (False, True) and not any(t or tr for t, tr in flags[:-1])
    fell = [i for i, (_, info) in enumerate(infos) if info.get("fell")]
    assert fell == [steps - 1]
    assert all(r == 0.0 and info["cost"] == 0.0 and info["absorbing"] for r, info in infos[steps:])


def test_mujoco_task_renders_a_non_blank_frame_headless():
    env = make_env("SafetyCarGoal1-v0", render_mode="rgb_array")
    env.reset(seed=0)
    frame = env.render()
    assert frame.ndim == 3 and frame.shape[2] == 3 and frame.dtype == np.uint8
    assert frame.std() > 10 and len(np.unique(frame.reshape(-1, 3), axis=0)) > 50


def test_velocity_task_renders_a_non_blank_frame_headless():
    env = make_env("SafetyHalfCheetahVelocity-v1", render_mode="rgb_array")
    env.reset(seed=0)
    frame = env.render()
    assert frame.shape[2] == 3 and frame.std() > 10


def _rollouts(policy, episodes=300):
    env = make_env("SpeedLimit-v0")
    returns, costs = [], []
    for ep in range(episodes):
        obs, _ = env.reset(seed=ep)
        ret = cost = 0.0
        done = False
        while not done:
            obs_next, r, terminated, truncated, info = env.step(policy(obs))
            ret, cost, obs, done = ret + r, cost + info["cost"], obs_next, terminated or truncated
        returns.append(ret)
        costs.append(cost)
    return np.mean(returns), np.mean(costs)


def test_builtin_task_documented_optimum_is_reached_by_the_scripted_policy():
    limit = 25.0
    optimum = constrained_optimum(limit)
    assert optimum == pytest.approx(76.98, abs=0.01)  # the value the docs state
    ret, cost = _rollouts(lambda o: optimal_action(o, limit))
    assert ret == pytest.approx(optimum, rel=0.01)
    assert cost == pytest.approx(limit, rel=0.02)
    # The best constant speed within the limit earns clearly less: the observation matters.
    v = np.sqrt(limit / HORIZON / 1.125)
    const_ret, const_cost = _rollouts(lambda o: np.array([2 * v - 1, o[1]]))
    assert const_cost == pytest.approx(limit, rel=0.02) and const_ret < 0.9 * optimum
    from rllib_cvpo.envs.speed_limit import constant_speed_return

    assert const_ret == pytest.approx(constant_speed_return(const_cost), rel=0.01)  # the learning test's baseline
    # Unconstrained, the best policy runs flat out and exceeds the limit by a wide margin.
    full_ret, full_cost = _rollouts(lambda o: np.array([1.0, o[1]]), episodes=50)
    assert full_ret == pytest.approx(HORIZON) and full_cost > 8 * limit


def test_builtin_task_is_registered_with_gymnasium():
    env = gym.make("SpeedLimit-v0")
    env.reset(seed=0)
    assert "cost" in env.step(env.action_space.sample())[4]
