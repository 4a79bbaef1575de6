"""CVPO as an RLlib algorithm: configuration, cost plumbing, checkpoints, a remote EnvRunner on safety-gymnasium."""

import math

import numpy as np
import pytest
import torch

from rllib_cvpo import CVPO, CVPOConfig
from rllib_cvpo.cvpo.replay import COSTS

from helpers import small_config


@pytest.mark.parametrize(
    "training, message",
    [
        (dict(cost_limit=-1.0), "cost_limit for 'cost' must be a number >= 0, got -1.0"),
        (dict(cost_limit="high"), "cost_limit for 'cost' must be a number >= 0, got 'high'"),
        (dict(cost_limit={"cost_hazards": 5.0, "cost_vases": -2}), "cost_limit for 'cost_vases'"),
        (dict(estep_kl=0.0), "estep_kl must be > 0.0, got 0.0"),
        (dict(estep_constraint_rate=0.0), "estep_constraint_rate must be > 0.0, got 0.0"),
        (dict(estep_constraint_rate=1.5), "estep_constraint_rate must be <= 1.0, got 1.5"),
        (dict(estep_qc_smoothing=0.0), "estep_qc_smoothing must be > 0.0, got 0.0"),
        (dict(estep_qc_smoothing="ema"), "estep_qc_smoothing must be a finite number, got 'ema'"),
        (dict(num_action_samples=1), "num_action_samples must be an integer >= 2, got 1"),
        (dict(estep_solver="lbfgs"), "estep_solver must be 'newton' or 'cvxpy', got 'lbfgs'"),
        (dict(tau=1.5), "tau must be <= 1.0, got 1.5"),
        (dict(gamma=float("nan")), "gamma must be a finite number, got nan"),
        (dict(mstep_iterations=0), "mstep_iterations must be an integer >= 1, got 0"),
        (dict(replay_capacity=10), "replay_capacity must be an integer >= train_batch_size_per_learner"),
        (dict(cost_limit=10.0, cost_limit_start=5.0), "cost_limit_start for 'cost' must be a number >= its cost_limit"),
        (dict(episode_len=0), "episode_len must be a positive integer or None, got 0"),
        (dict(estep_recent_steps=0), "estep_recent_steps must be an integer >= 1, got 0"),
        (dict(estep_recent_steps=2.5), "estep_recent_steps must be an integer >= 1, got 2.5"),
        (dict(critic_updates_per_update=0), "critic_updates_per_update must be an integer >= 1, got 0"),
        (dict(estep_twin_min="yes"), "estep_twin_min must be True or False, got 'yes'"),
    ],
)
def test_validate_rejects_bad_settings_naming_them(training, message):
    config = small_config(**training)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config.validate()


def test_unknown_env_is_rejected_with_suggestions():
    from rllib_cvpo.envs import UnknownEnvError

    with pytest.raises(UnknownEnvError, match="SafetyPointGoal1-v0"):
        CVPOConfig().environment("SafetyPointGoa1-v0")


def test_thresholds_come_from_the_episodic_limit_once_and_anneal():
    config = small_config(cost_limit=25.0, gamma=0.99, cost_limit_start=100.0, cost_limit_anneal_steps=1000)
    assert config.horizon == 200
    final = 25.0 * (1 - 0.99**200) / (0.01 * 200)
    assert config.qc_thresholds(10_000) == [pytest.approx(final)]
    start = config.qc_thresholds(0)[0]
    assert start == pytest.approx(4 * final)
    assert final < config.qc_thresholds(500)[0] < start
    multi = small_config(cost_limit={"a": 10.0, "b": 20.0})
    assert multi.cost_keys == ["a", "b"] and multi.qc_thresholds()[1] == pytest.approx(2 * multi.qc_thresholds()[0])


def test_each_transition_is_trained_with_its_own_cost(ray_local):
    """SpeedLimit's step cost is k * v^2, a function of (s_t, a_t) alone. With gamma = 0 the cost critic must learn
    exactly that function; a cost taken from a neighbouring step would be unpredictable from (s_t, a_t)."""
    algo = small_config(gamma=0.0, updates_per_env_step=1.0, num_steps_sampled_before_learning_starts=1000,
                        critic_lr=3e-3).rl_module(model_config={"fcnet_hiddens": [64, 64]}).build_algo()
    try:
        for _ in range(4):
            algo.train()
        batch = algo.replay.sample(2000)
        obs, act, cost = batch["obs"], batch["actions"], batch[COSTS][:, 0]
        expected = obs[:, 0] * ((act[:, 0] + 1) / 2) ** 2
        np.testing.assert_allclose(cost, expected, rtol=1e-5, atol=1e-6)  # each row stores its own step's cost
        module = algo.learner_group._learner.module["default_policy"]
        with torch.no_grad():
            _, qc = module.q_values(torch.as_tensor(obs), torch.as_tensor(act))
        pred = qc[0].numpy()
        assert np.corrcoef(pred, expected)[0, 1] > 0.97
        assert np.mean(np.abs(pred - expected)) < 0.1 * np.mean(expected)
    finally:
        algo.stop()


def _learner_state(algo):
    learner = algo.learner_group._learner
    module = learner.module["default_policy"]
    weights = {k: v.detach().clone() for k, v in module.state_dict().items()}
    optim = {name: opt.state_dict() for name, opt in learner.get_optimizers_for_module("default_policy")}
    duals = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in learner._cvpo["default_policy"].items()}
    return weights, optim, duals


def test_save_restore_and_continue(ray_local, tmp_path):
    # (with the E-step's smoothed cost baseline, which the checkpoint must carry)
    algo = small_config(estep_qc_smoothing=0.1).build_algo()
    try:
        for _ in range(3):
            result = algo.train()
        steps = result["num_env_steps_sampled_lifetime"]
        assert math.isfinite(result["learners"]["default_policy"]["eta"])
        weights, optim, duals = _learner_state(algo)
        assert duals["num_updates"] > 0 and duals["alpha_mu"] >= 0 and "qc_baseline" in duals
        buffer_len, buffer_sample = len(algo.replay), algo.replay._data["obs"][: len(algo.replay)].copy()
        algo_credit = algo._update_credit
        path = algo.save_to_path(str(tmp_path / "ckpt"))
    finally:
        algo.stop()

    restored = CVPO.from_checkpoint(path)
    try:
        r_weights, r_optim, r_duals = _learner_state(restored)
        assert weights.keys() == r_weights.keys()
        for k in weights:
            torch.testing.assert_close(weights[k], r_weights[k], rtol=0, atol=0)
        assert duals.keys() == r_duals.keys()
        for k in duals:
            np.testing.assert_array_equal(duals[k], r_duals[k])
        for name in optim:
            a, b = optim[name]["state"], r_optim[name]["state"]
            assert a.keys() == b.keys()
            for i in a:  # every entry of Adam's state: step, exp_avg, exp_avg_sq
                assert a[i].keys() == b[i].keys() == {"step", "exp_avg", "exp_avg_sq"}
                for key in a[i]:
                    torch.testing.assert_close(a[i][key], b[i][key], rtol=0, atol=0)
        assert len(restored.replay) == buffer_len
        np.testing.assert_array_equal(restored.replay._data["obs"][:buffer_len], buffer_sample)
        assert restored._update_credit == algo_credit and restored.iteration == 3
        result = restored.train()
        added = result["num_env_steps_sampled_lifetime"] - steps
        assert added >= 400
        # Exactly the updates the sampled steps earn (0.25 per env step, the fraction carried over in the credit).
        expected = int(algo_credit + 0.25 * added)
        assert restored.learner_group._learner._cvpo["default_policy"]["num_updates"] == duals["num_updates"] + expected
    finally:
        restored.stop()


def test_two_iterations_on_safety_point_goal_with_a_remote_env_runner(ray_local):
    config = (
        small_config("SafetyPointGoal1-v0", num_steps_sampled_before_learning_starts=500)
        .env_runners(num_env_runners=1, create_local_env_runner=False, rollout_fragment_length=100)
        .reporting(min_sample_timesteps_per_iteration=1000)
        .evaluation(evaluation_interval=1, evaluation_duration=1, evaluation_num_env_runners=0)
    )
    algo = config.build_algo()
    try:
        for _ in range(2):
            result = algo.train()
        runners = result["env_runners"]
        learner = result["learners"]["default_policy"]
        assert result["num_env_steps_sampled_lifetime"] >= 2000
        for value in (runners["episode_return_mean"], runners["episode_cost"], learner["eta"], learner["lambda"]):
            assert math.isfinite(value)
        # The cost critic's calibration on the replay reaches the iteration's results (benchmarks/learning/table.py).
        assert math.isfinite(learner["qc_replay"]) and learner["qc_replay_cost_to_go"] >= 0.0
        # The updates the sampled steps earned (0.25 per env step), and the E-step's exact dual: its
        # KL(q || pi_old) is the bound wherever eta is not at a bound.
        steps = result["num_env_steps_sampled_lifetime"]
        # (the 100-step round that completes the warm-up counts: updates start once 500 steps are in the replay)
        assert learner["num_cvpo_updates"] == int(0.25 * (steps - 500 + 100))
        last = algo.learner_group._learner.last_estep["default_policy"]["solution"]
        if not last.eta_at_bound:
            assert last.kl == pytest.approx(config.estep_kl, rel=1e-3)
        evaluation = result["evaluation"]["env_runners"]
        assert math.isfinite(evaluation["episode_return_mean"]) and math.isfinite(evaluation["episode_cost"])
    finally:
        algo.stop()


def _run_and_read(config, iterations):
    """(every replay column, every module weight) after ``iterations`` training iterations."""
    algo = config.build_algo()
    try:
        for _ in range(iterations):
            algo.train()
        learner = algo.learner_group._learner
        replay = {k: np.array(v[: learner.replay._size]) for k, v in learner.replay._data.items()}
        weights = {k: v.detach().clone() for k, v in learner.module["default_policy"].state_dict().items()}
    finally:
        algo.stop()
    return replay, weights


@pytest.mark.parametrize("remote", [False, True])
def test_a_seeded_run_repeats_exactly(ray_local, remote):
    # The same seed gives the same random warm-up actions, episodes, updates and weights (RLlib seeds the envs but
    # not the action space that the warm-up samples from: CostMetricsCallback.on_environment_created does), with
    # the EnvRunner in the driver and with a remote one sampling beside the update; another seed does not.
    def config(seed):
        c = small_config(num_steps_sampled_before_learning_starts=400).debugging(seed=seed)
        if remote:
            c = c.env_runners(num_env_runners=1, create_local_env_runner=False)
        return c.evaluation(evaluation_interval=None)

    first, again, other = (_run_and_read(config(seed), 3) for seed in (0, 0, 1))
    assert len(first[0]["actions"]) >= 800 and first[0].keys() == again[0].keys()
    for key in first[0]:
        np.testing.assert_array_equal(first[0][key], again[0][key], err_msg=key)
    for key in first[1]:
        assert torch.equal(first[1][key], again[1][key]), key
    assert not np.array_equal(first[0]["actions"][:400], other[0]["actions"][:400])
    assert any(not torch.equal(first[1][k], other[1][k]) for k in first[1])


def test_twin_cost_critics_train_both_heads_and_use_their_maximum(ray_local):
    algo = small_config(twin_qc=True).build_algo()
    try:
        initial = [layer.weight.detach().clone() for layer in
                   algo.learner_group._learner.module["default_policy"].critics._linears]
        for _ in range(2):
            result = algo.train()
        assert math.isfinite(result["learners"]["default_policy"]["lambda"])
        module = algo.learner_group._learner.module["default_policy"]
        assert module.critics.members == 2 + 2  # twin reward + twin cost
        obs = torch.as_tensor(algo.replay.sample(64)["obs"])
        act = torch.rand(64, 2) * 2 - 1
        with torch.no_grad():
            _, heads = module.q_values(obs, act, combine=False)
            _, combined = module.q_values(obs, act)
        assert heads.shape == (2, 64) and combined.shape == (1, 64)
        torch.testing.assert_close(combined[0], heads.max(0).values)
        assert not torch.allclose(heads[0], heads[1])  # two independently initialised and trained heads
        for before, layer in zip(initial, module.critics._linears):  # members 2 and 3 are the cost heads
            for member in (2, 3):
                assert not torch.equal(before[member], layer.weight[member].detach()), f"cost head {member} untrained"
    finally:
        algo.stop()


def test_learner_thresholds_follow_the_annealed_limit_then_stay_cached(ray_local):
    # While the limit anneals the learner's eps_c follows the env steps of each update; afterwards it is the final
    # threshold, computed once.
    config = small_config(cost_limit=10.0, cost_limit_start=50.0, cost_limit_anneal_steps=2000)
    algo = config.build_algo()
    try:
        learner = algo.learner_group._learner
        cfg = learner.config.get_config_for_module("default_policy")
        seen = []
        for steps in (0, 500, 1500, 1999, 2000, 10_000):
            learner._env_steps = steps
            got = learner._thresholds("default_policy", cfg)
            assert got == [pytest.approx(config.qc_thresholds(steps)[0], rel=1e-12)], steps
            seen.append(got[0])
        assert seen[0] > seen[1] > seen[2] > seen[3] > seen[4] == seen[5]
        assert learner._threshold_cache["default_policy"][0] == "final"
        learner._env_steps = 20_000
        cached = learner._threshold_cache["default_policy"]
        learner._thresholds("default_policy", cfg)
        assert learner._threshold_cache["default_policy"] is cached  # not recomputed
    finally:
        algo.stop()


def test_the_estep_takes_its_states_from_the_newest_steps_with_estep_recent_steps(ray_local):
    # The E- and M-step states of every update are drawn from the replay's 300 newest steps (the critics' rows from
    # all of it): the policy network sees exactly those states in the update.
    algo = small_config(estep_recent_steps=300).build_algo()
    try:
        algo.train()  # warm-up and the first updates
        learner = algo.learner_group._learner
        module = learner.module["default_policy"].unwrapped()
        replay = learner.replay
        slots = (replay._next - 1 - np.arange(300)) % replay.capacity
        newest = {tuple(np.round(s, 5)) for s in replay._data["obs"][slots]}
        seen = []
        handle = module.pi.register_forward_hook(lambda _m, args, _out: seen.append(args[0].detach().numpy().copy()))
        try:
            learner.update_from_replay(num_updates=2, timesteps={})
        finally:
            handle.remove()
        # pi's inputs, per update: the next states of the critics' targets, then the M-step's states (the E-step's,
        # through pi_old).
        assert len(seen) == 4
        estep_states = np.concatenate(seen[1::2])
        assert {tuple(np.round(s, 5)) for s in estep_states} <= newest
    finally:
        algo.stop()
