"""M-step: decoupled KL terms against torch.distributions, and the weighted-MLE loss."""

import torch
from torch.distributions import Independent, Normal, kl_divergence

from rllib_cvpo.cvpo.mstep import MIN_STD, WeightedMoments, kl_mean_and_std, mstep_terms, weighted_mle_loss


def _gaussians(seed, b=32, d=3):
    g = torch.Generator().manual_seed(seed)
    mu_o, mu = torch.randn(b, d, generator=g), torch.randn(b, d, generator=g)
    s_o, s = torch.rand(b, d, generator=g) + 0.2, torch.rand(b, d, generator=g) + 0.2
    return mu_o, s_o, mu, s


def test_kl_terms_match_torch_closed_forms():
    mu_o, s_o, mu, s = _gaussians(0)
    kl_mu, kl_std = kl_mean_and_std(mu_o, s_o, mu, s)
    d = lambda m, sd: Independent(Normal(m, sd), 1)  # noqa: E731
    torch.testing.assert_close(kl_mu, kl_divergence(d(mu_o, s_o), d(mu, s_o)))
    torch.testing.assert_close(kl_std, kl_divergence(d(mu_o, s_o), d(mu_o, s)))
    assert torch.allclose(kl_mean_and_std(mu_o, s_o, mu_o, s_o)[0], torch.zeros(32))


def test_weighted_mle_loss_is_the_weighted_log_likelihood_and_its_mean_optimum_is_the_weighted_sample_mean():
    mu_o, s_o, mu, s = _gaussians(1, b=4, d=2)
    n = 8
    u = torch.randn(n, 4, 2, generator=torch.Generator().manual_seed(2))
    w = torch.softmax(torch.randn(4, n, generator=torch.Generator().manual_seed(3)), dim=1)
    loss = weighted_mle_loss(u, w, mu_o, s_o, mu, s)
    manual = 0.0
    for k in range(4):
        for j in range(n):
            lp = Normal(mu[k], s_o[k]).log_prob(u[j, k]).sum() + Normal(mu_o[k], s[k]).log_prob(u[j, k]).sum()
            manual -= w[k, j] * lp
    torch.testing.assert_close(loss, manual / 4)
    # The mean part is minimised by the weighted sample mean.
    target = torch.einsum("bn,nbd->bd", w, u).requires_grad_(False)
    mu_var = target.clone().requires_grad_(True)
    weighted_mle_loss(u, w, mu_o, s_o, mu_var, s).backward()
    torch.testing.assert_close(mu_var.grad, torch.zeros_like(mu_var.grad), atol=1e-6, rtol=0)


def test_the_learners_fused_mstep_terms_equal_the_reference_in_value_and_gradient():
    """mstep_terms (weighted moments, closed-form gradients) against weighted_mle_loss and kl_mean_and_std, in
    float64, with one old and one new std below the variance floor (no gradient there), and a loss that weighs the
    three terms as the learner does."""
    g = torch.Generator().manual_seed(4)
    b, n, d = 16, 8, 3
    mu_o, s_o, mu, s = (x.double() for x in _gaussians(5, b=b, d=d))
    s_o[0, 0], s[1, 1] = 0.1 * MIN_STD, 0.5 * MIN_STD
    u = torch.randn(n, b, d, generator=g, dtype=torch.float64)
    w = torch.softmax(torch.randn(b, n, generator=g, dtype=torch.float64), dim=1)
    mu.requires_grad_(True)
    s.requires_grad_(True)

    def total(loss, kl_mu, kl_sigma):
        return loss + 0.7 * kl_mu.mean() + 1.3 * kl_sigma.mean()

    reference = (weighted_mle_loss(u, w, mu_o, s_o, mu, s), *kl_mean_and_std(mu_o, s_o, mu, s))
    fused = mstep_terms(WeightedMoments(u, w, mu_o, s_o), mu, s)
    for a, b_ in zip(fused, reference):
        torch.testing.assert_close(a, b_, rtol=1e-12, atol=1e-9)
    grads = torch.autograd.grad(total(*fused), [mu, s])
    expected = torch.autograd.grad(total(*reference), [mu, s])
    for a, b_ in zip(grads, expected):
        torch.testing.assert_close(a, b_, rtol=1e-10, atol=1e-9)
    assert grads[1][1, 1] == 0.0  # below the floor


def test_the_weighted_mean_std_fit_equals_its_reference_and_fits_the_weighted_variance_alone():
    """mstep_std_fit="weighted_mean": the fused terms equal the reference in value and gradient, and the covariance
    term's optimum is the samples' weighted variance about their weighted mean, where "old_mean" (MPO's decoupled
    fit) adds the square of that mean's shift from pi_old's: weights that favour samples on one side of mu_old
    widen the policy under the decoupled fit and not under this one."""
    g = torch.Generator().manual_seed(6)
    b, n, d = 8, 16, 2
    mu_o, s_o, mu, s = (x.double() for x in _gaussians(7, b=b, d=d))
    u = mu_o + s_o * torch.randn(n, b, d, generator=g, dtype=torch.float64)
    w = torch.softmax(3.0 * (u[..., 0] - mu_o[:, 0]).t() / s_o[:, :1], dim=1)  # favour large first components
    mu.requires_grad_(True)
    s.requires_grad_(True)
    reference = (weighted_mle_loss(u, w, mu_o, s_o, mu, s, std_fit="weighted_mean"), *kl_mean_and_std(mu_o, s_o, mu, s))
    fused = mstep_terms(WeightedMoments(u, w, mu_o, s_o, std_fit="weighted_mean"), mu, s)
    for a, b_ in zip(fused, reference):
        torch.testing.assert_close(a, b_, rtol=1e-12, atol=1e-9)
    for a, b_ in zip(torch.autograd.grad(sum(x.sum() for x in fused), [mu, s]),
                     torch.autograd.grad(sum(x.sum() for x in reference), [mu, s])):
        torch.testing.assert_close(a, b_, rtol=1e-10, atol=1e-9)

    wt = w.t().unsqueeze(-1)
    centre = (wt * u).sum(0)
    variance = (wt * (u - centre) ** 2).sum(0) / (1.0 - (wt * wt).sum(0))  # weights sum to 1 per state
    about_old = (wt * (u - mu_o) ** 2).sum(0)
    torch.testing.assert_close(about_old, (wt * (u - centre) ** 2).sum(0) + (centre - mu_o) ** 2)
    assert bool(((centre - mu_o)[:, 0] > 0).all())  # the weights moved the mean: the decoupled fit is wider
    for fit, optimum in (("weighted_mean", variance.sqrt()), ("old_mean", about_old.sqrt())):
        s_opt = optimum.clone().requires_grad_(True)
        loss, _, _ = mstep_terms(WeightedMoments(u, w, mu_o, s_o, std_fit=fit), mu.detach(), s_opt)
        (grad,) = torch.autograd.grad(loss, [s_opt])
        torch.testing.assert_close(grad, torch.zeros_like(grad), atol=1e-12, rtol=0)
    assert bool((variance[:, 0] < about_old[:, 0]).all())  # on the component the weights favour


def test_the_weighted_mean_std_fit_is_unbiased_for_weights_that_ignore_the_samples():
    """With equal weights (an E-step that prefers no action) the covariance term's optimum is pi_old's variance on
    average under both fits: about the samples' own mean the spread is corrected by N / (N - 1), without which the
    policy would narrow by 1/N in every update."""
    g = torch.Generator().manual_seed(9)
    b, n = 20000, 16
    mu_o, s_o = torch.zeros(b, 1, dtype=torch.float64), torch.full((b, 1), 0.7, dtype=torch.float64)
    u = mu_o + s_o * torch.randn(n, b, 1, generator=g, dtype=torch.float64)
    w = torch.full((b, n), 1.0 / n, dtype=torch.float64)
    for fit in ("old_mean", "weighted_mean"):
        fitted = WeightedMoments(u, w, mu_o, s_o, std_fit=fit).second_std.mean().item()
        assert abs(fitted / 0.49 - 1.0) < 0.01, (fit, fitted)
    uncorrected = ((u - u.mean(0)) ** 2).mean(0).mean().item()
    assert abs(uncorrected / 0.49 - (1.0 - 1.0 / n)) < 0.01


def test_an_unknown_std_fit_is_refused_with_the_accepted_values():
    import pytest

    mu_o, s_o, _, _ = _gaussians(8, b=2, d=1)
    u, w = torch.zeros(4, 2, 1), torch.full((2, 4), 0.25)
    with pytest.raises(ValueError, match="old_mean.*weighted_mean.*'pooled'"):
        WeightedMoments(u, w, mu_o, s_o, std_fit="pooled")
    from rllib_cvpo import CVPOConfig

    with pytest.raises(ValueError, match="mstep_std_fit must be one of 'old_mean', 'weighted_mean', got 'pooled'"):
        CVPOConfig().environment("SafetyPointCircle1-v0").training(mstep_std_fit="pooled").validate()
