"""M-step: decoupled KL terms against torch.distributions, and the weighted-MLE loss."""

import torch
from torch.distributions import Independent, Normal, kl_divergence

from rllib_cvpo.cvpo.mstep import kl_mean_and_std, weighted_mle_loss


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
