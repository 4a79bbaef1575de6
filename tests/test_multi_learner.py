"""num_learners=2 on CPU: two learner processes train one policy from shards of each batch. Weights and duals must
stay identical across them, and their E-step must solve the dual of the whole (combined) batch."""

import sys

import numpy as np
import pytest
import torch
from ray import cloudpickle

from rllib_cvpo.cvpo import estep
import helpers
from helpers import same_draws_per_state, small_config

# The learner actors cannot import this test module: ship _snapshot by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])
cloudpickle.register_pickle_by_value(helpers)


def _learner_snapshot(learner):
    module = learner.module["default_policy"].unwrapped()
    return {
        "rank": learner._rank,
        "weights": {k: v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()},
        "optim": {name: [s[m].cpu().numpy().copy() for s in opt.state_dict()["state"].values()
                         for m in ("exp_avg", "exp_avg_sq")]
                  for name, opt in learner.get_optimizers_for_module("default_policy")},
        "duals": {k: np.array(v, dtype=float) for k, v in learner._cvpo["default_policy"].items()},
    }


def _snapshot(learner):
    """The learner's state and its last E-step's shard of the dual problem."""
    last = learner.last_estep["default_policy"]
    return {
        **_learner_snapshot(learner),
        "qr": last["qr"].double().cpu().numpy(),
        "qc": last["qc"].double().cpu().numpy(),
        "thresholds": list(last["thresholds"]),
        "limit_thresholds": list(learner._thresholds("default_policy", learner.config)),
        "eta": last["solution"].eta,
        "lam": np.array(last["solution"].lam),
    }


def _global_problem(seed=3, batch=64, samples=8):
    """A batch with two constraints: the first active at an interior lambda, the second inactive."""
    rng = np.random.default_rng(seed)
    qr = rng.normal(size=(2 * batch, samples))
    qc = np.stack([0.8 * qr + rng.normal(size=qr.shape) + 3.0, rng.normal(size=qr.shape)], axis=-1)
    thresholds = [float(qc[..., 0].mean() - 0.15), float(qc[..., 1].mean() + 1.0)]
    return qr, qc, thresholds


def _solve_my_shard(learner):
    """Each learner solves the E-step dual from its own half of the global batch, as in its update."""
    rank = torch.distributed.get_rank()
    qr, qc, thresholds = _global_problem()
    half = qr.shape[0] // 2
    shard = slice(rank * half, (rank + 1) * half)
    problem = estep.DualProblem(torch.from_numpy(qr[shard]), torch.from_numpy(qc[shard]), 0.05, thresholds,
                                reduce=learner._allreduce_numpy)
    sol = estep.solve_dual_newton(problem, 1.0, np.zeros(2), eta_min=1e-6, eta_max=1e4, lam_max=1e3)
    return rank, sol.eta, np.array(sol.lam), sol.value


def test_two_learners_keep_identical_weights_and_solve_the_global_dual(ray_local):
    # (estep_constraint_rate < 1 and a smoothed baseline: the thresholds come from the global batch's mean Q_c and
    # the baseline from every learner's batches, checked below)
    config = small_config(updates_per_env_step=0.5, cost_limit=40.0, estep_constraint_rate=0.5,
                          estep_qc_smoothing=0.5).learners(
        num_learners=2, num_cpus_per_learner=0.5)
    algo = config.build_algo()
    try:
        for _ in range(3):
            algo.train()
        snaps = sorted((r.get() for r in algo.learner_group.foreach_learner(_snapshot)), key=lambda s: s["rank"])
        answers = [r.get() for r in algo.learner_group.foreach_learner(_solve_my_shard)]
    finally:
        algo.stop()

    assert [s["rank"] for s in snaps] == [0, 1]
    a, b = snaps
    assert a["duals"]["num_updates"] >= 20  # several updates, every one with an E-step on both learners
    # The shards really differ (each learner saw its own half of every batch) ...
    assert a["qr"].shape == b["qr"].shape == (config.train_batch_size_per_learner, config.num_action_samples)
    assert not np.allclose(a["qr"], b["qr"])
    # ... yet weights (policy, pi_old, critics, targets), Adam moments and duals are identical, bit for bit.
    assert a["weights"].keys() == b["weights"].keys()
    for key in a["weights"]:
        np.testing.assert_array_equal(a["weights"][key], b["weights"][key], err_msg=key)
    for name in a["optim"]:
        for x, y in zip(a["optim"][name], b["optim"][name]):
            np.testing.assert_array_equal(x, y, err_msg=name)
    for key in a["duals"]:
        np.testing.assert_array_equal(a["duals"][key], b["duals"][key], err_msg=key)

    # The E-step dual both learners solved is the single-learner dual of the combined batch, at the thresholds that
    # ask the combined batch's mean Q_c for half of the gap between the (shared) baseline and the limit's. The
    # baseline has moved off the last batch's mean: it averages every batch so far.
    qc_mean = np.concatenate([a["qc"], b["qc"]]).mean(axis=(0, 1))
    baseline = a["duals"]["qc_baseline"]
    assert not np.allclose(baseline, qc_mean)
    assert a["limit_thresholds"] == b["limit_thresholds"]
    assert a["thresholds"] == b["thresholds"] == [
        pytest.approx(m + 0.5 * (t - c), rel=1e-9) for m, t, c in zip(qc_mean, a["limit_thresholds"], baseline)]
    combined = estep.DualProblem(
        torch.from_numpy(np.concatenate([a["qr"], b["qr"]])), torch.from_numpy(np.concatenate([a["qc"], b["qc"]])),
        config.estep_kl, a["thresholds"],
    )
    bounds = dict(eta_min=config.eta_min, eta_max=config.eta_max, lam_max=config.lambda_max)
    single = estep.solve_dual_newton(combined, config.eta_init, np.full(1, config.lambda_init), **bounds)
    assert a["eta"] == pytest.approx(single.eta, rel=1e-4)
    np.testing.assert_allclose(a["lam"], single.lam, rtol=1e-4, atol=1e-6)

    # A crafted two-constraint batch split across the learners (one active constraint, one inactive): both learners
    # solve the dual of the whole batch through their all-reduce.
    qr, qc, thresholds = _global_problem()
    full = estep.solve_dual_newton(estep.DualProblem(torch.from_numpy(qr), torch.from_numpy(qc), 0.05, thresholds),
                                   1.0, np.zeros(2), eta_min=1e-6, eta_max=1e4, lam_max=1e3)
    assert 0 < full.lam[0] < 1e3 and full.lam[1] == 0
    halves = [
        estep.solve_dual_newton(
            estep.DualProblem(torch.from_numpy(qr[s]), torch.from_numpy(qc[s]), 0.05, thresholds),
            1.0, np.zeros(2), eta_min=1e-6, eta_max=1e4, lam_max=1e3,
        )
        for s in (slice(0, 64), slice(64, 128))
    ]
    assert abs(np.mean([h.lam[0] for h in halves]) - full.lam[0]) > 1e-3 * full.lam[0]  # averaging would be wrong
    assert sorted(a[0] for a in answers) == [0, 1]
    for _, eta, lam, value in answers:
        assert eta == pytest.approx(full.eta, rel=1e-6)
        np.testing.assert_allclose(lam, full.lam, rtol=1e-6, atol=1e-9)
        assert value == pytest.approx(full.value, rel=1e-8)


# -- the replay in the learners ------------------------------------------------------------------------------------
def _update_on(learner, batches, minibatch_size):
    """One update of this learner on its own batch (batches[rank]), with the per-state draws."""
    from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch
    from ray.rllib.utils.metrics import NUM_ENV_STEPS_SAMPLED_LIFETIME

    learner._standard_normal_like = same_draws_per_state
    columns = batches[learner._rank]
    learner.update(batch=MultiAgentBatch({"default_policy": SampleBatch(dict(columns))}, env_steps=minibatch_size),
                   minibatch_size=minibatch_size, timesteps={NUM_ENV_STEPS_SAMPLED_LIFETIME: 10_000})
    return _learner_snapshot(learner)


def _updates_from_replay(learner, num_updates):
    from ray.rllib.utils.metrics import NUM_ENV_STEPS_SAMPLED_LIFETIME

    learner._standard_normal_like = same_draws_per_state
    learner.update_from_replay(num_updates, {NUM_ENV_STEPS_SAMPLED_LIFETIME: 10_000})
    return _learner_snapshot(learner)


def _sample_shard(learner, size, n_step, gamma):
    return learner.replay.sample(size, n_step=n_step, gamma=gamma)


def _assert_same(a, b, exact, what):
    check = np.testing.assert_array_equal if exact else (
        lambda x, y, err_msg: np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-6, err_msg=err_msg))
    for key in a["weights"]:
        check(a["weights"][key], b["weights"][key], err_msg=f"{what}: {key}")
    for name in a["optim"]:
        for x, y in zip(a["optim"][name], b["optim"][name]):
            check(x, y, err_msg=f"{what}: {name} Adam moments")
    for key in ("eta", "lam", "alpha_mu", "alpha_sigma", "num_updates"):
        check(np.atleast_1d(a["duals"][key]), np.atleast_1d(b["duals"][key]), err_msg=f"{what}: {key}")


def test_the_replay_is_sharded_over_the_learners_resumes_exactly_and_an_update_equals_one_on_the_combined_batch(
        ray_local, tmp_path):
    from rllib_cvpo import CVPO
    from rllib_cvpo.checkpoints import CheckpointError

    base = dict(updates_per_env_step=0.5, cost_limit=1.0)  # a limit the early policy exceeds: lambda > 0
    config = small_config(**base).learners(num_learners=2, num_cpus_per_learner=0.5)
    size = config.train_batch_size_per_learner
    algo = config.build_algo()
    try:
        for _ in range(2):
            result = algo.train()
        shards = algo.replay_states()
        # Every sampled transition is stored exactly once, in one of the two shards; both hold data.
        sampled = result["env_runners"]["num_env_steps_sampled_lifetime"]
        assert [s["num_added"] for s in shards] == algo._shard_sizes
        assert sum(algo._shard_sizes) == sampled and min(algo._shard_sizes) > 0
        # Rows trained are counted once each: B per update on each of the 2 learners.
        assert result["learners"]["__all_modules__"]["num_env_steps_trained_lifetime"] == \
            result["learners"]["default_policy"]["num_cvpo_updates"] * 2 * size
        path = algo.save_to_path(str(tmp_path / "ckpt"))
        continued = sorted(algo._foreach_learner(_updates_from_replay, num_updates=3), key=lambda s: s["rank"])
    finally:
        algo.stop()

    restored = CVPO.from_checkpoint(path)
    single = small_config(**base, train_batch_size_per_learner=2 * size).build_algo()
    try:
        again = restored.replay_states()
        assert len(again) == 2
        for saved, back in zip(shards, again):
            assert back["rng"] == saved["rng"] and back["num_added"] == saved["num_added"]
            for column in saved["data"]:
                np.testing.assert_array_equal(back["data"][column], saved["data"][column])
            np.testing.assert_array_equal(back["links"], saved["links"])
        # The same 3 updates from the restored shards: bit for bit what the original run did after its save.
        resumed = sorted(restored._foreach_learner(_updates_from_replay, num_updates=3), key=lambda s: s["rank"])
        assert resumed[0]["duals"]["num_updates"] == continued[0]["duals"]["num_updates"] > 3
        for a, b in zip(continued, resumed):
            _assert_same(a, b, exact=True, what=f"rank {a['rank']}")

        # A checkpoint of 2 shards cannot be spread over 1 learner: one clear error.
        with pytest.raises(CheckpointError, match=r"split over 2 learner\(s\), this run has 1 .*num_learners=2"):
            single.restore_from_path(path)

        # One update on the two learners (B rows each) equals one update of a single learner on their 2 B rows,
        # from the same state and with the same draws per state.
        single.learner_group.set_state(restored.learner_group.get_state())
        cfg = restored.config
        batches = restored._foreach_learner(_sample_shard, size=size, n_step=cfg.n_step, gamma=cfg.gamma)
        split = sorted(restored._foreach_learner(_update_on, batches=batches, minibatch_size=size),
                       key=lambda s: s["rank"])
        combined = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
        whole = single._foreach_learner(_update_on, batches=[combined], minibatch_size=2 * size)[0]
    finally:
        restored.stop()
        single.stop()
    _assert_same(split[0], split[1], exact=True, what="the two learners")
    assert split[0]["duals"]["lam"][0] > 0, split[0]["duals"]  # the constraint is active: not just 0 = 0
    _assert_same(split[0], whole, exact=False, what="two learners against one on the combined batch")
