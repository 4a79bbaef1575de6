"""num_learners=2 on CPU: two learner processes train one policy from shards of each batch. Weights and duals must
stay identical across them, and their E-step must solve the dual of the whole (combined) batch."""

import sys

import numpy as np
import pytest
import torch
from ray import cloudpickle

from rllib_cvpo.cvpo import estep
from helpers import small_config

# The learner actors cannot import this test module: ship _snapshot by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _snapshot(learner):
    module = learner.module["default_policy"].unwrapped()
    weights = {k: v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()}
    optim = {
        name: [s["exp_avg"].cpu().numpy().copy() for s in opt.state_dict()["state"].values()]
        for name, opt in learner.get_optimizers_for_module("default_policy")
    }
    last = learner.last_estep["default_policy"]
    return {
        "rank": torch.distributed.get_rank(),
        "weights": weights,
        "optim": optim,
        "duals": {k: np.array(v, dtype=float) for k, v in learner._cvpo["default_policy"].items()},
        "qr": last["qr"].double().cpu().numpy(),
        "qc": last["qc"].double().cpu().numpy(),
        "thresholds": list(last["thresholds"]),
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
    config = small_config(updates_per_env_step=0.5, cost_limit=40.0).learners(num_learners=2, num_cpus_per_learner=0.5)
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

    # The E-step dual both learners solved is the single-learner dual of the combined batch.
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
