"""On an env whose action box is not [-1, 1] ([0, 10] x [-2, 2]): every stored action (random warm-up ones included)
is in the policy's [-1, 1] units, and the trained policy acts in the env's units through evaluate and load_policy."""

import gymnasium as gym
import numpy as np
import torch
from helpers import small_config
from ray.rllib.core.columns import Columns

from rllib_cvpo.envs.speed_limit import SpeedLimitEnv

ENV_ID = "ScaledSpeedLimit-v0"
LOW, HIGH = np.array([0.0, -2.0], np.float32), np.array([10.0, 2.0], np.float32)


class ScaledActions(gym.ActionWrapper):
    """SpeedLimit-v0 whose actions are given in [0, 10] x [-2, 2] (mapped linearly onto the task's [-1, 1]^2)."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self.action_space = gym.spaces.Box(LOW, HIGH, dtype=np.float32)

    def action(self, action):
        return (2.0 * (np.asarray(action, np.float32) - LOW) / (HIGH - LOW) - 1.0).astype(np.float32)


def _make(**kwargs):
    return ScaledActions(SpeedLimitEnv(**kwargs))


if ENV_ID not in gym.registry:
    gym.register(ENV_ID, entry_point=_make, max_episode_steps=200)


def test_stored_actions_are_in_policy_units_and_the_policy_acts_in_env_units(ray_local, tmp_path):
    from rllib_cvpo import load_policy
    from rllib_cvpo.cvpo.evaluate import evaluate_module

    algo = small_config(env=ENV_ID, num_steps_sampled_before_learning_starts=400).build_algo()
    try:
        algo.train()  # 400 random warm-up steps (actions sampled in env units), then policy steps
        algo.train()
        stored = algo.replay._data["actions"][: len(algo.replay)]
        assert len(algo.replay) >= 800
        assert np.all(np.abs(stored) <= 1.0 + 1e-6)
        # The warm-up actions were uniform on the env's box: in policy units uniform on [-1, 1] (mean 0, not 5).
        warmup = stored[:400]
        assert np.all(np.abs(warmup.mean(0)) < 0.15) and warmup.min() < -0.9 and warmup.max() > 0.9
        module = algo.learner_group._learner.module["default_policy"]
        returns, costs = evaluate_module(module, ENV_ID, episodes=1)
        assert np.isfinite(returns).all() and np.isfinite(costs).all()
        path = algo.save_to_path(str(tmp_path / "ckpt"))
    finally:
        algo.stop()
    policy = load_policy(path)
    obs = np.array([[0.3, 0.5], [1.9, -0.7], [1.0, 0.0]], np.float32)
    actions = policy.act(obs)
    with torch.no_grad():
        out = policy.module.forward_inference({Columns.OBS: torch.as_tensor(obs)})
    squashed = torch.tanh(out[Columns.ACTION_DIST_INPUTS].chunk(2, dim=-1)[0]).numpy()
    np.testing.assert_allclose(actions, LOW + (squashed + 1.0) * 0.5 * (HIGH - LOW), rtol=1e-6, atol=1e-6)
    assert np.all(actions >= LOW) and np.all(actions <= HIGH) and np.any(np.abs(actions) > 1.0)

    # Exported (TorchScript) through the command, then loaded and run in a process where ray and rllib_cvpo cannot be
    # imported: the same actions in env units, to 1e-6.
    import json

    from helpers import run_cli, run_without_ray

    out = tmp_path / "policy.pt"
    export = run_cli("export", path, "--out", out)
    assert export.returncode == 0, export.stdout[-2000:] + export.stderr[-2000:]
    loaded = run_without_ray(
        "import json, torch\n"
        f"m = torch.jit.load({str(out)!r})\n"
        f"obs = torch.tensor({obs.tolist()!r})\n"
        "print(json.dumps({'actions': m(obs).tolist(), 'shape': list(m.observation_shape), 'env': m.env,\n"
        "                  'low': m.action_low.tolist(), 'high': m.action_high.tolist()}))\n")
    np.testing.assert_allclose(loaded["actions"], actions, rtol=1e-6, atol=1e-6)
    assert loaded["shape"] == [2] and loaded["env"] == ENV_ID
    assert loaded["low"] == LOW.tolist() and loaded["high"] == HIGH.tolist()

    # ONNX, run by onnxruntime in the same kind of process (batches of 3 and of 1).
    onnx_file = tmp_path / "policy.onnx"
    export = run_cli("export", path, "--format", "onnx", "--out", onnx_file)
    assert export.returncode == 0, export.stdout[-2000:] + export.stderr[-2000:]
    loaded = run_without_ray(
        "import json, numpy as np, onnxruntime\n"
        f"s = onnxruntime.InferenceSession({str(onnx_file)!r})\n"
        f"obs = np.array({obs.tolist()!r}, np.float32)\n"
        "meta = s.get_modelmeta().custom_metadata_map\n"
        "print(json.dumps({'actions': s.run(None, {'obs': obs})[0].tolist(),\n"
        "                  'one': s.run(None, {'obs': obs[:1]})[0].tolist(), 'meta': meta}))\n")
    np.testing.assert_allclose(loaded["actions"], actions, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(loaded["one"], actions[:1], rtol=1e-6, atol=1e-6)
    assert json.loads(loaded["meta"]["action_high"]) == HIGH.tolist() and json.loads(loaded["meta"]["env"]) == ENV_ID
