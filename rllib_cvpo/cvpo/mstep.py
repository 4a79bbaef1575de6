"""CVPO's M-step: weighted maximum likelihood with decoupled KL trust regions (MPO-style), on diagonal Gaussians.

The policy is a tanh-squashed diagonal Gaussian. Its KL terms and likelihoods are computed on the pre-squash
Gaussian, where they are exact: tanh is a fixed bijection, so the KL is unchanged and the Jacobian term of the
likelihood does not depend on the parameters.

The learner computes the M-step's terms with :func:`mstep_terms` (one autograd node with closed-form gradients from the
samples' weighted moments); :func:`weighted_mle_loss` and :func:`kl_mean_and_std` are the same quantities written
out term by term, the reference it is tested against.
"""

from __future__ import annotations

import math

import torch

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)

MIN_STD = 1e-3  # variance floor of the KL terms (1e-6 in FSRL), keeps 1/sigma^2 finite

# Where the covariance's likelihood term centres the samples (``CVPOConfig.mstep_std_fit``): "old_mean", at pi_old's
# mean (MPO's decoupled update, as the original code and FSRL), whose optimum s^2 = sum_j q (u - mu_old)^2 is the
# samples' weighted variance plus the square of the shift delta of their weighted mean from mu_old; or
# "weighted_mean", at the weighted samples' own mean, whose optimum is their weighted variance alone (with the
# unbiased weights' correction 1 / (1 - sum_j q_j^2 / (sum_j q_j)^2): about their own mean N samples spread less than
# the distribution they come from, by 1 - 1/N for equal weights, which would otherwise narrow the policy in every
# update whatever the critics say). With pi_old copied once per round, a mean that keeps moving the same way adds
# delta^2 to the decoupled fit's variance in every round.
STD_FITS = ("old_mean", "weighted_mean")


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
    std_fit: str = "old_mean",
) -> torch.Tensor:
    """-(1/B) sum_k sum_j q_kj [log N(u_kj; mu(s_k), S_o(s_k)) + log N(u_kj; c(s_k), S(s_k))].

    ``u[N, B, d]`` are the pre-squash E-step samples, ``weights[B, N]`` the variational weights. The mean and the
    covariance are fitted separately (decoupled), the mean with the covariance held at pi_old's; the covariance's
    centre c is pi_old's mean (``std_fit="old_mean"``) or the weighted samples' mean sum_j q u / sum_j q
    (``"weighted_mean"``, see ``STD_FITS``). Unlike the original code and FSRL, the sum over the N samples is not
    divided by N again: q is already a distribution over them.
    """
    std_old = std_old.clamp_min(MIN_STD)
    std = std.clamp_min(MIN_STD)
    if std_fit not in STD_FITS:
        raise ValueError(f"std_fit must be one of {STD_FITS}, got {std_fit!r}")
    centre, spread = mu_old, 1.0
    if std_fit == "weighted_mean":
        w = weights.t().unsqueeze(-1)
        centre = ((w * u).sum(0) / w.sum(0)).detach()
        spread = 1.0 / unbiased_weights_correction(w.sum(0), (w * w).sum(0))
    # log N(u; m, s) = -(u - m)^2 / (2 s^2) - log s - log sqrt(2 pi), summed over the action dimensions, written out
    # (torch.distributions adds argument validation and broadcasting work on every update).
    logp_mean = -(((u - mu) / std_old) ** 2).sum(-1) * 0.5 - std_old.log().sum(-1)  # [N, B]
    logp_std = -((spread * ((u - centre) / std) ** 2).sum(-1)) * 0.5 - std.log().sum(-1)
    const = 2.0 * u.shape[-1] * _LOG_SQRT_2PI  # both terms' constants (q sums to 1 per state): no gradient
    return const - (weights.t() * (logp_mean + logp_std)).sum(0).mean()


def unbiased_weights_correction(total: torch.Tensor, total_sq: torch.Tensor) -> torch.Tensor:
    """1 - sum q^2 / (sum q)^2 per state (floored at 1e-6: one-hot weights have no spread to correct)."""
    return (1.0 - total_sq / (total * total)).clamp_min(1e-6)


class WeightedMoments:
    """The E-step samples' sufficient statistics for the M-step, per state (no gradient): with e = u - mu_old,
    ``total`` = sum_j q_kj [B, 1], ``first`` = sum_j q_kj e_kj [B, d], ``second`` = sum_j q_kj e_kj^2 [B, d].

    Both likelihood terms are quadratic in u, so these three replace the N samples: sum_j q (u - mu)^2 =
    second - 2 (mu - mu_old) first + (mu - mu_old)^2 total. ``second_std`` is the covariance term's second moment:
    ``second`` about pi_old's mean, or with ``std_fit="weighted_mean"`` about the weighted samples' own mean,
    (second - first^2 / total) / (1 - sum q^2 / total^2) (``STD_FITS``)."""

    def __init__(self, u: torch.Tensor, weights: torch.Tensor, mu_old: torch.Tensor, std_old: torch.Tensor,
                 std_fit: str = "old_mean") -> None:
        if std_fit not in STD_FITS:
            raise ValueError(f"std_fit must be one of {STD_FITS}, got {std_fit!r}")
        with torch.no_grad():
            e = u - mu_old  # [N, B, d]
            w = weights.t().unsqueeze(-1)  # [N, B, 1]
            self.total = w.sum(0)
            self.first = (w * e).sum(0)
            self.second = (w * e * e).sum(0)
            if std_fit == "weighted_mean":
                about_own_mean = (self.second - self.first * self.first / self.total).clamp_min(0.0)
                self.second_std = about_own_mean / unbiased_weights_correction(self.total, (w * w).sum(0))
            else:
                self.second_std = self.second
            self.mu_old = mu_old
            std_old = std_old.clamp_min(MIN_STD)
            self.var_old = std_old * std_old
            self.inv_var_old = 1.0 / self.var_old  # both reused by every M-step iteration on these samples
            # The terms without a gradient, as in weighted_mle_loss (whose constant takes q to sum to 1 per state).
            self.const = 2.0 * u.shape[-1] * _LOG_SQRT_2PI + (self.total * std_old.log()).sum(-1).mean()


class _MStepTerms(torch.autograd.Function):
    """(weighted MLE loss, C_mu per state, C_Sigma per state) of (mu, std), with their gradients in closed form:

    d loss / d mu   = [total (mu - mu_o) - first] / (B s_o^2)      d C_mu / d mu   = (mu - mu_o) / s_o^2
    d loss / d s    = [total / s - second_std / s^3] / B              d C_Sigma / d s = (1 - s_o^2 / s^2) / s

    (s = max(std, MIN_STD): no gradient below the floor). One node instead of about sixty elementwise ones."""

    @staticmethod
    def forward(ctx, mu: torch.Tensor, std: torch.Tensor, m: WeightedMoments):  # noqa: D102
        s = std.clamp_min(MIN_STD)
        delta = mu - m.mu_old
        inv_var_old = m.inv_var_old
        inv_var = s.pow(-2)
        batch = mu.shape[0]
        fit_mean = 0.5 * ((m.second - 2.0 * delta * m.first + delta * delta * m.total) * inv_var_old).sum()
        fit_std = 0.5 * (m.second_std * inv_var).sum() + (m.total * s.log()).sum()
        loss = m.const + (fit_mean + fit_std) / batch
        ratio = m.var_old * inv_var
        kl_mu = 0.5 * (delta * delta * inv_var_old).sum(-1)
        kl_sigma = 0.5 * (ratio - 1.0 - ratio.log()).sum(-1)
        ctx.save_for_backward(delta, s, inv_var, ratio, std >= MIN_STD)
        ctx.m = m
        return loss, kl_mu, kl_sigma

    @staticmethod
    def backward(ctx, g_loss: torch.Tensor, g_kl_mu: torch.Tensor, g_kl_sigma: torch.Tensor):  # noqa: D102
        delta, s, inv_var, ratio, above_floor = ctx.saved_tensors
        m, batch = ctx.m, delta.shape[0]
        g_mu = ((g_loss / batch) * (m.total * delta - m.first) + g_kl_mu.unsqueeze(-1) * delta) * m.inv_var_old
        g_s = (g_loss / batch) * (m.total - m.second_std * inv_var) + g_kl_sigma.unsqueeze(-1) * (1.0 - ratio)
        g_std = torch.where(above_floor, g_s / s, 0.0)
        return g_mu, g_std, None


def mstep_terms(
    moments: WeightedMoments, mu: torch.Tensor, std: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(:func:`weighted_mle_loss`, and :func:`kl_mean_and_std`'s C_mu and C_Sigma per state) for the policy's (mu, std),
    from the samples' :class:`WeightedMoments`, differentiable in mu and std."""
    return _MStepTerms.apply(mu, std, moments)
