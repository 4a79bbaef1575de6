"""CVPO's M-step: weighted maximum likelihood with decoupled KL trust regions (MPO-style), on diagonal Gaussians.

The policy is a tanh-squashed diagonal Gaussian. Its KL terms and likelihoods are computed on the pre-squash
Gaussian, where they are exact: tanh is a fixed bijection, so the KL is unchanged and the Jacobian term of the
likelihood does not depend on the parameters.
"""

from __future__ import annotations

import math

import torch

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)

MIN_STD = 1e-3  # variance floor of the KL terms (1e-6 in FSRL), keeps 1/sigma^2 finite


def kl_mean_and_std(
    mu_old: torch.Tensor, std_old: torch.Tensor, mu: torch.Tensor, std: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoupled KL terms per state (shape [B]):

    C_mu    = KL(N(mu_o, S_o) || N(mu, S_o))  = 1/2 sum_d (mu - mu_o)^2 / s_o^2
    C_Sigma = KL(N(mu_o, S_o) || N(mu_o, S))  = 1/2 sum_d [log(s^2 / s_o^2) + s_o^2 / s^2 - 1]
    """
    std_old = std_old.clamp_min(MIN_STD)
    std = std.clamp_min(MIN_STD)
    kl_mu = 0.5 * (((mu - mu_old) / std_old) ** 2).sum(-1)
    ratio = (std_old / std) ** 2
    kl_std = 0.5 * (ratio - 1.0 - torch.log(ratio)).sum(-1)
    return kl_mu, kl_std


def weighted_mle_loss(
    u: torch.Tensor,
    weights: torch.Tensor,
    mu_old: torch.Tensor,
    std_old: torch.Tensor,
    mu: torch.Tensor,
    std: torch.Tensor,
) -> torch.Tensor:
    """-(1/B) sum_k sum_j q_kj [log N(u_kj; mu(s_k), S_o(s_k)) + log N(u_kj; mu_o(s_k), S(s_k))].

    ``u[N, B, d]`` are the pre-squash E-step samples, ``weights[B, N]`` the variational weights. The mean and the
    covariance are fitted separately (decoupled), each with the other held at pi_old. Unlike the original code and
    FSRL, the sum over the N samples is not divided by N again: q is already a distribution over them.
    """
    std_old = std_old.clamp_min(MIN_STD)
    std = std.clamp_min(MIN_STD)
    # log N(u; m, s) = -(u - m)^2 / (2 s^2) - log s - log sqrt(2 pi), summed over the action dimensions, written out
    # (torch.distributions adds argument validation and broadcasting work on every update).
    logp_mean = -(((u - mu) / std_old) ** 2).sum(-1) * 0.5 - std_old.log().sum(-1)  # [N, B]
    logp_std = -(((u - mu_old) / std) ** 2).sum(-1) * 0.5 - std.log().sum(-1)
    const = 2.0 * u.shape[-1] * _LOG_SQRT_2PI  # both terms' constants (q sums to 1 per state): no gradient
    return const - (weights.t() * (logp_mean + logp_std)).sum(0).mean()
