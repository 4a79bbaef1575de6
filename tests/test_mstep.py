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
