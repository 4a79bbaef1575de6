"""Tasks built through Ray: remote EnvRunner processes get the factory (and its safety-gymnasium fixes)."""

import os

import numpy as np
import pytest

from rllib_cvpo.envs import register_with_ray


def test_remote_env_runner_samples_safety_task_with_every_step_cost(ray_local):
    ray = ray_local
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner

    register_with_ray("SafetyPointGoal1-v0")
    config = (
        PPOConfig()
        .environment("SafetyPointGoal1-v0")
        .env_runners(num_env_runners=1, num_envs_per_env_runner=1, rollout_fragment_length=600)
    )
    runner = ray.remote(num_cpus=0)(SingleAgentEnvRunner).remote(config=config, worker_index=1)
    remote_pid = ray.get(runner.__ray_call__.remote(lambda self: os.getpid()))
    assert remote_pid != os.getpid()
    episodes = ray.get(runner.sample.remote(num_timesteps=1200, random_actions=True))
    steps = 0
    costs = []
    for ep in episodes:
        infos = ep.get_infos()
        assert len(infos) == len(ep) + 1  # the reset info, then one per step
        for info in infos[1:]:
            assert isinstance(info["cost"], float)
            parts = sum(v for k, v in info.items() if k.startswith("cost_") and k != "cost_sum")
            assert info["cost"] == pytest.approx(parts)
            costs.append(info["cost"])
        steps += len(ep)
    assert steps >= 1200 and len(costs) == steps
    assert np.isfinite(costs).all()

    # The same check on steps that do have a cost (random actions may cross no hazard, and 0 == 0 proves nothing):
    # in the EnvRunner's process, on the env it built, seed 2 with a constant forward-and-turn action crosses hazards
    # (as in test_envs).
    def drive(self):
        env = self.env.unwrapped.envs[0]
        env.reset(seed=2)
        out = []
        for _ in range(500):
            *_, info = env.step(np.array([1.0, 0.3]))
            out.append((info["cost"], sum(v for k, v in info.items() if k.startswith("cost_") and k != "cost_sum")))
        return out

    driven = np.array(ray.get(runner.__ray_call__.remote(drive)))
    assert driven[:, 0].sum() > 0
    np.testing.assert_allclose(driven[:, 0], driven[:, 1])
    ray.kill(runner)


def test_unknown_id_fails_before_ray_sees_it():
    from rllib_cvpo.envs import UnknownEnvError

    with pytest.raises(UnknownEnvError, match="SafetyPointGoall1-v0"):
        register_with_ray("SafetyPointGoall1-v0")
