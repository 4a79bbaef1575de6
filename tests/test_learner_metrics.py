"""The learner's counters and metrics mean what they say: each trained row counted once, per-update metrics reduced
to the mean over all updates of a call, the update counter exact, the E-step critic path equal to the plain one."""

import numpy as np
import pytest
import torch
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch
from ray.rllib.utils.metrics import ALL_MODULES, NUM_ENV_STEPS_TRAINED, NUM_ENV_STEPS_TRAINED_LIFETIME

from rllib_cvpo.cvpo.replay import BOOTSTRAP_DISCOUNT, COSTS

B = 32


def _value(x) -> float:
    """A reduced learner result leaf (a Stats object, or a number) as a float."""
    return float(x.peek()) if hasattr(x, "peek") else float(x)


def _learner_group(**training):
    import gymnasium as gym

    from rllib_cvpo import CVPOConfig

    obs_space = gym.spaces.Box(-np.inf, np.inf, (5,), np.float32)
    act_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    config = (
        CVPOConfig()
        .environment(observation_space=obs_space, action_space=act_space)
        .training(num_action_samples=4, train_batch_size_per_learner=B, episode_len=100, **training)
        .learners(num_learners=0)
        .rl_module(model_config={"fcnet_hiddens": [16, 16]})
        .debugging(seed=0)
    )
    return config.build_learner_group(env=None, spaces={DEFAULT_MODULE_ID: (obs_space, act_space)})


def _batch(rows: int, seed: int = 0) -> MultiAgentBatch:
    rng = np.random.default_rng(seed)
    columns = {
        "obs": rng.normal(size=(rows, 5)).astype(np.float32),
        "actions": rng.uniform(-1, 1, (rows, 2)).astype(np.float32),
        "rewards": rng.normal(size=rows).astype(np.float32),
        COSTS: rng.uniform(0, 1, (rows, 1)).astype(np.float32),
        "new_obs": rng.normal(size=(rows, 5)).astype(np.float32),
        BOOTSTRAP_DISCOUNT: np.where(rng.uniform(size=rows) < 0.1, 0.0, 0.99).astype(np.float32),
    }
    return MultiAgentBatch({DEFAULT_MODULE_ID: SampleBatch(columns)}, env_steps=rows)


def test_rows_trained_are_counted_once_and_metrics_are_means_over_all_updates(ray_local):
    group = _learner_group()
    learner = group._learner
    logged = []
    original = learner._log_update_metrics

    def recording(mid, d):
        logged.append({k: float(v) for k, v in d.items()})
        return original(mid, d)

    learner._log_update_metrics = recording
    try:
        minibatches = 5
        results = group.update(batch=_batch(minibatches * B), minibatch_size=B, num_epochs=1,
                               shuffle_batch_per_epoch=False, timesteps={"num_env_steps_sampled_lifetime": 1000})
        result = results[0] if isinstance(results, list) else results
        assert len(logged) == minibatches
        # 5 minibatches of 32 rows: 160 rows trained (RLlib alone reports 5 x 160 = 800).
        assert _value(result[ALL_MODULES][NUM_ENV_STEPS_TRAINED]) == minibatches * B
        assert _value(result[ALL_MODULES][NUM_ENV_STEPS_TRAINED_LIFETIME]) == minibatches * B
        module = result[DEFAULT_MODULE_ID]
        for key in ("eta", "lambda", "critic_loss_reward", "q_cost", "kl_mu", "estep_iterations", "dual_at_bound"):
            values = [d[key] for d in logged]
            if key in ("eta", "critic_loss_reward", "q_cost", "kl_mu"):
                assert len(set(values)) == minibatches, key  # the updates really differ
            assert _value(module[key]) == pytest.approx(np.mean(values), rel=1e-5, abs=1e-9), key
        assert _value(module["num_cvpo_updates"]) == minibatches
        group.update(batch=_batch(2 * B, seed=1), minibatch_size=B, num_epochs=1, shuffle_batch_per_epoch=False,
                     timesteps={"num_env_steps_sampled_lifetime": 1100})
        assert learner._cvpo[DEFAULT_MODULE_ID]["num_updates"] == minibatches + 2
    finally:
        group.shutdown()


def test_target_critics_no_grad_path_equals_the_autograd_path():
    """Targets are evaluated by the no-grad path (per-member matmuls into reused buffers); its values equal the
    training forward's, call after call (the buffers are reused, the result is not), and after the parameters
    change in place or are replaced."""
    from rllib_cvpo.cvpo.torch.cvpo_torch_rl_module import ACTIVATIONS, CriticEnsemble

    torch.manual_seed(0)
    assert set(ACTIVATIONS) == {"relu", "leaky_relu", "tanh", "elu", "silu"}
    for activation in ACTIVATIONS:
        critics = CriticEnsemble(3, 7 + 2, [16, 24, 8], activation)
        obs, actions = torch.randn(10, 7), torch.rand(10, 2) * 2 - 1
        expected = critics(obs, actions).detach()
        first = critics.forward_sampled(obs, actions.unsqueeze(0))
        again = critics.forward_sampled(obs * 2, actions.unsqueeze(0))
        torch.testing.assert_close(first, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(again, critics(obs * 2, actions).detach(), rtol=1e-5, atol=1e-6)
        assert not first.requires_grad
        # The reused buffers and views follow the parameters: updated in place (as Polyak averaging and loading a
        # state dict do), and replaced by new tensors.
        with torch.no_grad():
            for p in critics.parameters():
                p.mul_(0.5).add_(0.1)
        torch.testing.assert_close(critics.forward_sampled(obs, actions.unsqueeze(0)), critics(obs, actions).detach(),
                                   rtol=1e-5, atol=1e-6)
        critics.net[2].weight = torch.nn.Parameter(torch.randn_like(critics.net[2].weight))
        torch.testing.assert_close(critics.forward_sampled(obs, actions.unsqueeze(0)), critics(obs, actions).detach(),
                                   rtol=1e-5, atol=1e-6)


def test_pi_old_is_a_copy_of_pi_after_each_round_with_round_sync_and_lags_with_polyak(ray_local):
    for sync in ("round", "polyak"):
        group = _learner_group(pi_old_sync=sync)
        learner = group._learner
        try:
            group.update(batch=_batch(3 * B), minibatch_size=B, num_epochs=1, shuffle_batch_per_epoch=False,
                         timesteps={"num_env_steps_sampled_lifetime": 1000})
            module = learner.module[DEFAULT_MODULE_ID]
            same = [torch.equal(a, b) for a, b in zip(module.pi.parameters(), module.pi_old.parameters())]
            state = learner._cvpo[DEFAULT_MODULE_ID]
            if sync == "round":
                assert all(same) and state["alpha_mu"] == 0.0 and state["alpha_sigma"] == 0.0
            else:
                assert not any(same)
        finally:
            group.shutdown()


def test_every_cost_head_trains_and_the_ensemble_combines_to_mean_plus_k_std(ray_local):
    group = _learner_group(qc_ensemble=4, qc_pessimism=0.5)
    try:
        module = group._learner.module[DEFAULT_MODULE_ID]
        assert module.critics.members == 2 + 4  # twin reward critics + 4 cost heads
        first = [layer.weight.detach().clone() for layer in module.critics.net if hasattr(layer, "weight")]
        group.update(batch=_batch(3 * B), minibatch_size=B, num_epochs=1, shuffle_batch_per_epoch=False,
                     timesteps={"num_env_steps_sampled_lifetime": 1000})
        last = [layer.weight.detach() for layer in module.critics.net if hasattr(layer, "weight")]
        for before, after in zip(first, last):  # every member of every layer moved
            assert ((after - before).abs().flatten(1).amax(1) > 0).all()
        obs, actions = torch.randn(50, 5), torch.rand(50, 2) * 2 - 1
        with torch.no_grad():
            _, heads = module.q_values(obs, actions, combine=False)
            _, combined = module.q_values(obs, actions)
        assert heads.shape == (4, 50) and combined.shape == (1, 50)
        assert not torch.allclose(heads[0], heads[1])  # independent heads, not one copied
        torch.testing.assert_close(combined[0], heads.mean(0) + 0.5 * heads.std(0))
    finally:
        group.shutdown()


def test_the_estep_reward_value_is_the_twin_minimum_or_with_estep_twin_min_false_the_first_critic(ray_local):
    for twin_min in (True, False):
        group = _learner_group(estep_twin_min=twin_min)
        learner = group._learner
        module = learner.module[DEFAULT_MODULE_ID].unwrapped()
        expected = {}
        original = module.q_values_sampled

        def recording(obs, actions, target=False, reward_critics=None):
            # The target critics' values on the repeated states by the autograd path, before this update moves them.
            n, b, _ = actions.shape
            with torch.no_grad():
                q = module.target_critics(obs.repeat(n, 1), actions.reshape(n * b, -1))
            expected["qr"] = (q[:2].min(0).values if twin_min else q[0]).reshape(n, b).t()
            return original(obs, actions, target=target, reward_critics=reward_critics)

        module.q_values_sampled = recording
        try:
            group.update(batch=_batch(B), minibatch_size=B, num_epochs=1, shuffle_batch_per_epoch=False,
                         timesteps={"num_env_steps_sampled_lifetime": 1000})
            got = learner.last_estep[DEFAULT_MODULE_ID]["qr"]
            torch.testing.assert_close(got, expected["qr"], rtol=1e-5, atol=1e-5)
        finally:
            group.shutdown()


def test_critic_updates_per_update_steps_the_critics_on_each_batch_then_the_policy_on_the_last(ray_local):
    # critic_updates_per_update=2: each update's 2B rows are two critic batches; the critics take a TD step on each
    # (their next states feed pi for the targets), the E- and M-step use the second batch's states.
    group = _learner_group(critic_updates_per_update=2)
    learner = group._learner
    try:
        module = learner.module[DEFAULT_MODULE_ID].unwrapped()
        batch = _batch(3 * 2 * B)
        columns = batch.policy_batches[DEFAULT_MODULE_ID]
        seen = []
        handle = module.pi.register_forward_hook(lambda _m, args, _out: seen.append(args[0].detach().numpy().copy()))
        try:
            results = group.update(batch=batch, minibatch_size=2 * B, num_epochs=1, shuffle_batch_per_epoch=False,
                                   timesteps={"num_env_steps_sampled_lifetime": 1000})
        finally:
            handle.remove()
        result = results[0] if isinstance(results, list) else results
        assert len(seen) == 3 * 3
        for update in range(3):
            rows = slice(update * 2 * B, (update + 1) * 2 * B)
            obs, new_obs = columns["obs"][rows], columns["new_obs"][rows]
            first, second, mstep = seen[3 * update : 3 * update + 3]
            np.testing.assert_array_equal(first, new_obs[:B])
            np.testing.assert_array_equal(second, new_obs[B:])
            np.testing.assert_array_equal(mstep, obs[B:])
        steps = {name: max(int(s["step"]) for s in learner.get_optimizer(DEFAULT_MODULE_ID, name).state.values())
                 for name in ("critic", "policy")}
        assert steps == {"critic": 6, "policy": 3}
        assert _value(result[ALL_MODULES][NUM_ENV_STEPS_TRAINED]) == 3 * 2 * B
        assert learner._cvpo[DEFAULT_MODULE_ID]["num_updates"] == 3
    finally:
        group.shutdown()


def test_each_round_logs_the_cost_critics_calibration_on_the_replay_before_its_updates(ray_local):
    """qc_replay is the cost critic's mean Q_c over replayed (s, a) as the round found it (before its updates),
    qc_replay_cost_to_go the same rows' mean cost over 1 - gamma; each iteration's figure is the mean of its rounds."""
    from ray.rllib.core.columns import Columns

    from rllib_cvpo.cvpo.torch.cvpo_torch_learner import CALIBRATION_ROWS

    group = _learner_group()
    learner = group._learner
    try:
        rng = np.random.default_rng(0)
        n = 6000  # more rows than one reading takes
        learner.replay.add_chunks([{
            "id": "episode", "obs": rng.normal(size=(n + 1, 5)).astype(np.float32),
            Columns.ACTIONS: rng.uniform(-1, 1, (n, 2)).astype(np.float32),
            Columns.REWARDS: rng.normal(size=n).astype(np.float32),
            COSTS: (rng.uniform(size=(n, 1)) < 0.2).astype(np.float32), "terminated": False, "done": True}])
        module = learner.module[DEFAULT_MODULE_ID].unwrapped()
        rows = learner.replay.spread(CALIBRATION_ROWS)
        assert len(rows["obs"]) == CALIBRATION_ROWS
        gamma = learner.config.gamma

        def reading():
            with torch.no_grad():
                _, qc = module.q_values(torch.as_tensor(rows["obs"]), torch.as_tensor(rows["actions"]))
            return float(qc.mean()), float(rows[COSTS].mean() / (1 - gamma))

        expected = []
        for call in range(2):
            expected.append(reading())
            result = learner.update_from_replay(num_updates=3, timesteps={"num_env_steps_sampled_lifetime": 1000})
            result = result[DEFAULT_MODULE_ID]
            assert _value(result["qc_replay"]) == pytest.approx(expected[-1][0], rel=1e-5)
            assert _value(result["qc_replay_cost_to_go"]) == pytest.approx(expected[-1][1], rel=1e-6)
        assert expected[0][0] != expected[1][0]  # the critic moved between the rounds: a reading per round
        assert expected[0][1] == pytest.approx(0.2 / (1 - gamma), rel=0.1)
    finally:
        group.shutdown()
