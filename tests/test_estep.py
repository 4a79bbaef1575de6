"""E-step: the dual, its derivatives, the Newton solver against cvxpy, and the variational weights."""

import numpy as np
import pytest
import torch

from rllib_cvpo.cvpo.estep import (
    DualProblem,
    NonFiniteError,
    batch_mean_qc,
    qc_threshold,
    rate_thresholds,
    smoothed_qc_baseline,
    solve_dual_cvxpy,
    solve_dual_newton,
    variational_weights,
)


def _batch(seed, b=64, n=16, m=1):
    g = torch.Generator().manual_seed(seed)
    qr = torch.randn(b, n, generator=g, dtype=torch.float64) * 3 + 10
    qc = torch.rand(b, n, m, generator=g, dtype=torch.float64) * 2 + torch.rand(b, 1, m, generator=g, dtype=torch.float64)
    return qr, qc


def _close(a, b, rel=1e-4, abs_zero=1e-6):
    a, b = np.asarray(a, float), np.asarray(b, float)
    for x, y in zip(a.ravel(), b.ravel()):
        if abs(y) < abs_zero or abs(x) < abs_zero:
            assert abs(x - y) <= abs_zero, (x, y)
        else:
            assert abs(x - y) <= rel * abs(y), (x, y)


def test_qc_threshold_matches_the_published_table():
    assert qc_threshold(10, 0.99, 400) == pytest.approx(2.455, abs=1e-3)
    assert qc_threshold(20, 0.99, 300) == pytest.approx(6.340, abs=1e-3)
    assert qc_threshold(25, 0.995, 1000) == pytest.approx(4.967, abs=1e-3)
    assert qc_threshold(25, 0.98, 1000) == pytest.approx(1.25, abs=1e-3)
    assert qc_threshold(25, 1.0, 1000) == 25.0
    with pytest.raises(ValueError, match="cost_limit must be >= 0, got -1"):
        qc_threshold(-1, 0.99, 100)


@pytest.mark.parametrize("seed", range(4))
def test_dual_matches_cvxpy_on_random_batches_one_constraint(seed):
    qr, qc = _batch(seed)
    thr = [float(qc.mean()) * 0.9]  # active: the unconstrained q would cost more
    p = DualProblem(qr, qc, 0.1, thr)
    newton, ref = solve_dual_newton(p, 1.0, [0.0]), solve_dual_cvxpy(p)
    assert newton.lam[0] > 0.1
    _close([newton.eta, *newton.lam, newton.value], [ref.eta, *ref.lam, ref.value])
    assert not newton.eta_at_bound and not newton.lam_at_bound.any()
    # KKT, computed from the variational weights themselves (not from the solver's gradient): the active constraint
    # holds with equality, and the KL bound is met.
    q = variational_weights(qr, qc, newton.eta, newton.lam).numpy()
    n = q.shape[1]
    assert float((q * qc[..., 0].numpy()).sum(1).mean()) == pytest.approx(thr[0], rel=1e-6)
    assert float((q * np.log(q * n)).sum(1).mean()) == pytest.approx(0.1, rel=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_dual_matches_cvxpy_two_constraints_one_inactive(seed):
    qr, qc = _batch(100 + seed, m=2)
    thr = [float(qc[..., 0].mean()) * 0.9, float(qc[..., 1].mean()) * 3]  # the second cannot bind
    p = DualProblem(qr, qc, 0.05, thr)
    newton, ref = solve_dual_newton(p, 1.0, [0.0, 0.0]), solve_dual_cvxpy(p)
    _close([newton.eta, *newton.lam, newton.value], [ref.eta, *ref.lam, ref.value])
    assert newton.lam[1] == 0.0 and newton.lam[0] > 0


def test_dual_matches_cvxpy_two_active_constraints():
    qr, qc = _batch(7, m=2)
    thr = [float(qc[..., 0].mean()) * 0.93, float(qc[..., 1].mean()) * 0.93]
    p = DualProblem(qr, qc, 0.1, thr)
    newton, ref = solve_dual_newton(p, 1.0, [0.0, 0.0]), solve_dual_cvxpy(p)
    _close([newton.eta, *newton.lam, newton.value], [ref.eta, *ref.lam, ref.value])
    assert (newton.lam > 0).all()


def test_inactive_constraint_gives_zero_lambda():
    qr, qc = _batch(3)
    p = DualProblem(qr, qc, 0.1, [float(qc.max()) + 1.0])
    newton, ref = solve_dual_newton(p, 2.0, [5.0]), solve_dual_cvxpy(p)
    assert newton.lam[0] == 0.0
    _close([newton.eta, newton.lam[0], newton.value], [ref.eta, ref.lam[0], ref.value])


def test_infeasible_constraint_puts_lambda_at_its_bound_and_flags_it():
    qr, qc = _batch(4)
    thr = [float(qc.min(dim=1).values.mean()) * 0.5]  # below the cheapest action of every state
    p = DualProblem(qr, qc, 0.1, thr)
    newton, ref = solve_dual_newton(p, 1.0, [0.0], lam_max=100.0), solve_dual_cvxpy(p, lam_max=100.0)
    assert newton.lam[0] == 100.0 and newton.lam_at_bound.all()
    _close([newton.eta, newton.lam[0], newton.value], [ref.eta, ref.lam[0], ref.value])


def test_warm_start_converges_in_few_iterations_to_the_same_point():
    qr, qc = _batch(5)
    p = DualProblem(qr, qc, 0.1, [float(qc.mean()) * 0.9])
    cold = solve_dual_newton(p, 1.0, [0.0])
    warm = solve_dual_newton(p, cold.eta * 1.2, cold.lam * 0.8)
    assert warm.iterations < cold.iterations
    _close([warm.eta, *warm.lam], [cold.eta, *cold.lam], rel=1e-8)


def _hard_batch(seed):
    """A batch of the kind that stopped the Newton solver far from the optimum (found by a random search, seeds
    below): the Q_r spread per state ranges from 1e-3 to 10, the Q_c spread from 1e-2 to 10, Q_c sometimes
    correlated with Q_r, thresholds near the mean Q_c, and warm starts anywhere in the box. From such a start the
    first Newton step pointed eta below 0; clipped to eta_min, every state's weight sat on one sample, the computed
    Hessian was rounding noise (indefinite) and the solver stopped there (KL log N instead of eps)."""
    rng = np.random.default_rng(seed)
    m = 1 if seed % 3 else 2
    b, n = int(rng.choice([8, 32, 128])), int(rng.choice([4, 16, 64]))
    sr, sc = 10 ** rng.uniform(-3, 1), 10 ** rng.uniform(-2, 1)
    qr = rng.normal(0, 1, (b, 1)) * 10 ** rng.uniform(-1, 1) + sr * rng.normal(size=(b, n))
    c0 = rng.uniform(0, 10)
    qc = c0 + rng.normal(0, 0.5, (b, 1, m)) + sc * rng.normal(size=(b, n, m))
    if rng.random() < 0.5:
        qc = qc + rng.uniform(0, 2) * (qr[..., None] - qr.mean(1, keepdims=True)[..., None])
    thresholds = list(c0 + rng.uniform(-1, 1, m))
    eps = float(rng.choice([0.01, 0.02, 0.1]))
    eta0, lam0 = 10 ** rng.uniform(-3, 1), rng.choice([0.0, 40.0, rng.uniform(0, 40)], m)
    return DualProblem(qr, qc, eps, thresholds), eta0, lam0


@pytest.mark.parametrize("seed", [542, 1075, 1076, 1083, 1151])
def test_newton_reaches_the_optimum_from_warm_starts_that_once_stranded_it(seed):
    problem, eta0, lam0 = _hard_batch(seed)
    bounds = dict(eta_min=1e-6, eta_max=1e4, lam_max=40.0)
    newton, ref = solve_dual_newton(problem, eta0, lam0, **bounds), solve_dual_cvxpy(problem, **bounds)
    assert newton.value <= ref.value + 1e-7 * (abs(ref.value) + 1)
    _close([newton.eta, *newton.lam], [ref.eta, *ref.lam], rel=1e-3, abs_zero=1e-3)
    assert not newton.eta_at_bound and newton.kl == pytest.approx(problem.eps_kl, rel=1e-6)


@pytest.mark.parametrize("m", [1, 2])
def test_dual_gradient_and_hessian_match_finite_differences(m):
    qr, qc = _batch(11, m=m)
    p = DualProblem(qr, qc, 0.1, [float(qc[..., i].mean()) for i in range(m)])
    theta = np.array([1.7] + [0.6] * m)
    _, grad, hess, _ = p.evaluate(theta)
    h = 1e-6
    for i in range(1 + m):
        e = np.zeros_like(theta)
        e[i] = h
        fd = (p.value(theta + e) - p.value(theta - e)) / (2 * h)
        assert grad[i].item() == pytest.approx(fd, rel=1e-6, abs=1e-8)
        g_plus, g_minus = p.evaluate(theta + e)[1], p.evaluate(theta - e)[1]
        np.testing.assert_allclose(hess[i], (g_plus - g_minus) / (2 * h), rtol=1e-5, atol=1e-7)
    assert np.linalg.eigvalsh(hess).min() >= -1e-12  # convex


@pytest.mark.parametrize("offset,eta,lam", [(0.0, 1.0, 0.5), (500.0, 0.05, 3.0), (-80.0, 20.0, 0.0), (10.0, 0.3, 40.0)])
def test_one_constraint_sums_equal_the_general_sums(offset, eta, lam):
    # The one-constraint path works sample-major with moments about each state's max; the general path about the
    # weighted means. They must agree, also with large Q offsets, sharp weights (small eta) and a large lambda.
    from rllib_cvpo.cvpo.estep import _state_sums, _state_sums_one

    qr, qc = _batch(7, b=48, n=32)
    qr, qc = qr.numpy() + offset, qc.numpy() + offset / 10
    fast = _state_sums_one(eta, lam, np.ascontiguousarray(qr.T), np.ascontiguousarray(qc[..., 0].T))
    general = _state_sums(eta, np.array([lam]), qr, qc)
    np.testing.assert_allclose(fast[:4], general[:4], rtol=1e-12)
    np.testing.assert_allclose(fast[4:], general[4:], rtol=1e-8, atol=1e-10 * np.abs(general[4:]).max())


def test_sharded_dual_with_summed_sums_equals_the_full_batch_dual():
    qr, qc = _batch(12, b=64)
    thr = [float(qc.mean()) * 0.9]
    full = solve_dual_newton(DualProblem(qr, qc, 0.1, thr), 1.0, [0.0])
    # Two "learners" each holding half: reduce = add the other half's sums (what all_reduce(SUM) does).
    halves = [(qr[:32], qc[:32]), (qr[32:], qc[32:])]
    # Emulate all_reduce exactly: evaluate both shards at the same theta and add their sums.
    class Pair:
        def __init__(self):
            self.p0 = DualProblem(*halves[0], 0.1, thr)
            self.p1 = DualProblem(*halves[1], 0.1, thr)

    pair = Pair()
    def reduce0(local):
        theta = pair.theta
        return local + pair.p1.local_sums(theta)

    orig_eval = pair.p0.evaluate

    def evaluate(theta):
        pair.theta = theta
        return orig_eval(theta)

    pair.p0.reduce = reduce0
    pair.p0.evaluate = evaluate
    pair.p0.value = lambda theta: evaluate(theta)[0]
    sharded = solve_dual_newton(pair.p0, 1.0, [0.0])
    _close([sharded.eta, *sharded.lam, sharded.value], [full.eta, *full.lam, full.value], rel=1e-10)
    # Averaging per-shard solutions is not the same thing.
    s0 = solve_dual_newton(DualProblem(*halves[0], 0.1, thr), 1.0, [0.0])
    s1 = solve_dual_newton(DualProblem(*halves[1], 0.1, thr), 1.0, [0.0])
    assert abs((s0.lam[0] + s1.lam[0]) / 2 - full.lam[0]) > 1e-6


def test_variational_weights_are_normalised_per_state_and_follow_the_closed_form():
    qr, qc = _batch(13, m=2)
    w = variational_weights(qr, qc, 0.7, [0.3, 1.1])
    assert w.shape == qr.shape and (w >= 0).all()
    torch.testing.assert_close(w.sum(1), torch.ones(qr.shape[0], dtype=torch.float64))
    x = qr - 0.3 * qc[..., 0] - 1.1 * qc[..., 1]
    expected = torch.exp(x / 0.7) / torch.exp(x / 0.7).sum(1, keepdim=True)
    torch.testing.assert_close(w, expected)
    # Tiny eta: one-hot on the best sample; no NaN.
    w0 = variational_weights(qr, qc, 1e-6, [0.3, 1.1])
    assert torch.isfinite(w0).all() and (w0.max(1).values > 0.999).all()


@pytest.mark.parametrize("scale", [1e-6, 1e-3, 1.0, 1e3, 1e5])
def test_solution_is_accurate_for_q_of_any_magnitude(scale):
    """The dual is homogeneous: scaling Q_r, Q_c and eps_c by s scales eta* by s and leaves lambda*. Against an
    independent solve (cvxpy at s = 1), eta/s and lambda are within 1e-6 relative at every scale."""
    qr, qc = _batch(7)
    thr = [float(qc.mean()) * 0.9]
    ref = solve_dual_cvxpy(DualProblem(qr, qc, 0.1, thr), eta_min=1e-9, eta_max=1e9, lam_max=1e6)
    p = DualProblem(qr * scale, qc * scale, 0.1, [thr[0] * scale])
    sol = solve_dual_newton(p, 1.0, [0.0], eta_min=1e-9 * scale, eta_max=1e9 * scale, lam_max=1e6)
    assert sol.eta / scale == pytest.approx(ref.eta, rel=1e-6)
    assert sol.lam[0] == pytest.approx(ref.lam[0], rel=1e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_inputs_are_refused_naming_the_quantity(bad):
    qr, qc = _batch(3)
    broken_qr, broken_qc = qr.clone(), qc.clone()
    broken_qr[5, 3], broken_qc[2, 1, 0] = bad, bad
    with pytest.raises(NonFiniteError, match=r"Q_r holds"):
        DualProblem(broken_qr, qc, 0.1, [1.0])
    with pytest.raises(NonFiniteError, match=r"Q_c holds"):
        DualProblem(qr, broken_qc, 0.1, [1.0])
    with pytest.raises(NonFiniteError, match=r"cost threshold eps_c holds"):
        DualProblem(qr, qc, 0.1, [bad])
    p = DualProblem(qr, qc, 0.1, [1.0])
    with pytest.raises(NonFiniteError, match=r"warm start"):
        solve_dual_newton(p, bad, [0.0])
    with pytest.raises(NonFiniteError, match=r"warm start"):
        solve_dual_newton(p, 1.0, [bad])


def test_rate_thresholds_close_a_share_of_the_gap_to_the_global_batchs_mean():
    qr, qc = _batch(5, m=2)
    eps = [0.8, 2.5]
    m = qc.mean(dim=(0, 1)).numpy()
    assert batch_mean_qc(qc) == pytest.approx(m, rel=1e-12)
    assert rate_thresholds(batch_mean_qc(qc), eps, 1.0) == pytest.approx(eps, rel=1e-12)
    got = rate_thresholds(batch_mean_qc(qc), eps, 0.1)
    assert got == pytest.approx([m[i] + 0.1 * (eps[i] - m[i]) for i in range(2)], rel=1e-12)
    # A shard's sums, summed with the other shard's (the learners' all-reduce): the combined batch's mean.
    other = qc[40:].numpy()
    other_sums = np.concatenate([other.sum(axis=(0, 1)), [other.shape[0] * other.shape[1]]])
    assert batch_mean_qc(qc[:40], reduce=lambda x: x + other_sums) == pytest.approx(m, rel=1e-12)
    assert batch_mean_qc(qc[..., 0]) == pytest.approx(m[:1], rel=1e-12)
    # Against a baseline b the asked change is kappa (eps - b), measured from the batch's own mean.
    b = [1.5, 2.0]
    assert rate_thresholds(m, eps, 0.1, baseline=b) == pytest.approx(
        [m[i] + 0.1 * (eps[i] - b[i]) for i in range(2)], rel=1e-12)
    assert rate_thresholds(m, eps, 1.0, baseline=m) == pytest.approx(eps, rel=1e-12)


def test_the_smoothed_baseline_is_the_exponential_average_of_the_batch_means():
    means = [np.array([1.0, 4.0]), np.array([3.0, 0.0]), np.array([2.0, 2.0])]
    b = None
    for mean in means:
        b = smoothed_qc_baseline(b, mean, 0.25)
    first = means[0]
    expected = first + 0.25 * (means[1] - first)
    expected = expected + 0.25 * (means[2] - expected)
    assert b == pytest.approx(expected, rel=1e-12)
    assert smoothed_qc_baseline(None, means[1], 0.25) == pytest.approx(means[1])
    assert smoothed_qc_baseline(first, means[1], 1.0) == pytest.approx(means[1])  # beta 1: the batch's own mean


def test_against_a_smoothed_baseline_every_batch_is_asked_the_same_change_of_its_mean_qc():
    """Circle-shaped batches (as in the next test) whose policy is 0.2 over eps_c on average (the batch's mean has an
    sd of 0.24). Against each batch's own mean (kappa 0.05) the sign of the asked change follows the batch's draw of
    states: those that drew safer states than usual are allowed to raise their Q_c, and q does. Against the
    smoothed baseline every batch is asked the same reduction, kappa (eps_c - b) = -0.01, and each meets it exactly
    inside the KL ball."""
    rng = np.random.default_rng(1)
    eps, rate, lam_max = 4.0, 0.05, 40.0
    baseline = np.array([eps + 0.2])
    raised = {"batch": 0, "smoothed": 0}
    batches = 40
    for _ in range(batches):
        states = rng.normal(eps + 0.2, 3.8, size=(256, 1))
        z = rng.normal(size=(256, 16))
        qc = torch.from_numpy(states + 0.14 * z)
        qr = torch.from_numpy(9.0 + 0.01 * (0.44 * z + np.sqrt(1 - 0.44**2) * rng.normal(size=z.shape)))
        mean = batch_mean_qc(qc)
        for name, ref in (("batch", None), ("smoothed", baseline)):
            threshold = rate_thresholds(mean, [eps], rate, baseline=ref)
            sol = solve_dual_newton(DualProblem(qr, qc, 0.02, threshold), 1.0, [0.0], lam_max=lam_max)
            w = variational_weights(qr, qc, sol.eta, sol.lam)
            change = float((w * qc).sum(1).mean()) - mean[0]
            raised[name] += change > 0
            if name == "smoothed":
                assert 1e-6 < sol.lam[0] < lam_max * (1 - 1e-9)
                assert change == pytest.approx(-0.01, abs=1e-6)
    assert raised["smoothed"] == 0
    assert raised["batch"] >= 0.1 * batches


def test_a_rate_below_one_turns_the_duals_switch_into_an_interior_answer():
    """Batches shaped like SafetyPointCircle1-v0's (measured on a 300k checkpoint): the states' mean Q_c differ
    by about 3.8, so the mean over 256 of them varies by about 0.24 from batch to batch; within a state the
    actions' Q_c differ by about 0.14 and their Q_r by about 0.01, correlated (0.44). Inside a KL ball of 0.02 the
    E-step moves the mean Q_c by less than 0.05 either way, so against eps_c itself (kappa = 1) most batches are
    slack (lambda 0) or infeasible (lambda at its bound); asked for a fiftieth of the gap, nearly all are interior,
    and the weighted mean Q_c then meets the rate's threshold exactly."""
    rng = np.random.default_rng(0)
    eps, lam_max = 4.0, 40.0
    interior = {1.0: 0, 0.02: 0}
    batches = 60
    for _ in range(batches):
        states = rng.normal(4.0, 3.8, size=(256, 1))
        z = rng.normal(size=(256, 16))
        qc = torch.from_numpy(states + 0.14 * z)
        qr = torch.from_numpy(9.0 + 0.01 * (0.44 * z + np.sqrt(1 - 0.44**2) * rng.normal(size=z.shape)))
        for rate in interior:
            threshold = rate_thresholds(batch_mean_qc(qc), [eps], rate)
            sol = solve_dual_newton(DualProblem(qr, qc, 0.02, threshold), 1.0, [0.0], lam_max=lam_max)
            if 1e-6 < sol.lam[0] < lam_max * (1 - 1e-9):
                interior[rate] += 1
                w = variational_weights(qr, qc, sol.eta, sol.lam)
                assert float((w * qc).sum(1).mean()) == pytest.approx(threshold[0], abs=1e-6)
    assert interior[1.0] <= 0.3 * batches
    assert interior[0.02] >= 0.9 * batches
