"""CVPO's E-step: the convex dual over (eta, lambda) and the optimal non-parametric variational weights.

Notation (paper / cvpo_spec.md): B states, N actions sampled per state from pi_old, m constraints.
``qr[B, N]`` holds Q_r(s_k, a_kj), ``qc[B, N, m]`` holds Q_c,i(s_k, a_kj). With x_kj = Q^r_kj - sum_i lambda_i Q^c_ikj,

    g(eta, lambda) = eta * eps + lambda . eps_c + eta * (1/B) sum_k log( (1/N) sum_j exp(x_kj / eta) )

is jointly convex on {eta > 0, lambda >= 0} (the perspective of log-mean-exp composed with an affine map), and the
E-step's optimal weights are q_kj = softmax_j(x_kj / eta*). Everything here runs in float64.

Several learners hold different shards of the batch: the solver takes a ``reduce`` callable that sums the per-state
sums across them (an all-reduce), so every learner solves the dual of the *global* batch and gets the same answer.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np
import torch

Reduce = Callable[[torch.Tensor], torch.Tensor]


class NonFiniteError(FloatingPointError):
    """NaN or infinity where the E-step needs numbers (critic outputs, thresholds, warm starts)."""


def qc_threshold(cost_limit: float, gamma: float, horizon: int) -> float:
    """The per-step Q_c threshold eps_c for an episodic (undiscounted) cost limit d over T steps.

    The budget is spread evenly (d/T per step); a constant per-step cost c has discounted value
    c * (1 - gamma^T) / (1 - gamma). Hence eps_c = d * (1 - gamma^T) / ((1 - gamma) * T). This is the only place
    where an episodic limit becomes a threshold (paper App. B.1; same formula in the original code and FSRL).
    """
    if cost_limit < 0:
        raise ValueError(f"cost_limit must be >= 0, got {cost_limit!r}")
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma!r}")
    if int(horizon) < 1:
        raise ValueError(f"horizon must be a positive number of steps, got {horizon!r}")
    if gamma == 1.0:
        return float(cost_limit)
    return float(cost_limit) * (1.0 - gamma**horizon) / ((1.0 - gamma) * horizon)


def _identity(x: np.ndarray) -> np.ndarray:
    return x


def batch_mean_qc(qc, reduce: Reduce = _identity) -> np.ndarray:
    """m_i: per constraint i, the mean of ``qc[B, N, m]`` (pi_old's samples, or ``[B, N]`` for one constraint) over the
    batch's states and samples, summed over learners by ``reduce`` (the global batch's mean), in float64."""
    if qc.ndim == 2:
        qc = qc[..., None]
    if isinstance(qc, torch.Tensor):  # summed in float64 where it lies, without a float64 copy of the batch
        sums = qc.detach().sum(dim=(0, 1), dtype=torch.float64).cpu().numpy()
    else:
        sums = np.asarray(qc, np.float64).sum(axis=(0, 1))
    total = reduce(np.concatenate([sums, [qc.shape[0] * qc.shape[1]]]))
    return total[:-1] / total[-1]


def smoothed_qc_baseline(previous, mean, rate: float) -> np.ndarray:
    """One step of the E-step's cost baseline: the exponential average, with ``rate`` (beta) per update, of the
    batches' mean Q_c ``mean`` (:func:`batch_mean_qc`); the first batch's mean where there is none yet."""
    mean = np.asarray(mean, np.float64)
    if previous is None:
        return mean.copy()
    previous = np.asarray(previous, np.float64)
    return previous + rate * (mean - previous)


def rate_thresholds(mean, thresholds: Sequence[float], rate: float, baseline=None) -> list:
    """The thresholds of an E-step that asks q to change the batch's mean Q_c by only the share ``rate`` (kappa) of
    the gap between a baseline and the constraint: per constraint i, m_i + kappa (eps_i - b_i), with m_i the batch's
    mean Q_c under pi_old (``mean``, from :func:`batch_mean_qc`) and b_i = m_i (``baseline`` None) or a smoothed
    baseline (:func:`smoothed_qc_baseline`). With kappa = 1 and no baseline this is eps_c itself.

    Why kappa: inside the KL ball the E-step can move the batch's mean Q_c only by a little (on SafetyPointCircle1-v0,
    measured on a 300k checkpoint, from -0.041 to +0.029 at eps = 0.02), while m itself varies from one batch of
    256 states to the next by much more (sd 0.23: the states differ, the actions barely do). Against eps_c - m the
    exact dual is then a switch: slack (lambda 0, reward-greedy) or infeasible (lambda at its bound, cost-greedy:
    the actions' Q_c differ ten times more than their Q_r, so every lambda above about 1 gives the same weights),
    flipped by which states were drawn, and the policy alternates between the two. With kappa < 1 the asked change
    kappa (eps_c - m) is proportional to the excess over a band 1/kappa times as wide, and the batch's noise in it
    shrinks by kappa; as pi settles, q stays near pi_old and m near eps_c, the same fixed point as kappa = 1.
    Measured on Circle (docs/benchmarks.md section 5): the alternation ends, but the cost's swings, which come from
    the policy crossing the edge of the safe region, do not; kappa stays 1 by default.

    Why a baseline: the asked change kappa (eps_c - m) still carries kappa times the batch's noise in m, which at
    kappa 0.05 is about half of what the E-step can move. Against a baseline averaged over many batches the asked
    change kappa (eps_c - b) is the same for every batch of one moment, and each batch is measured against its own
    m (its states' Q_c under pi_old): the constraint asks for a change of Q_c per batch, not for a level that the
    batch's states decide. Since b tracks the mean of m, the fixed point is still eps_c."""
    mean = np.asarray(mean, np.float64)
    ref = mean if baseline is None else np.asarray(baseline, np.float64)
    return [float(m + rate * (t - b)) for m, t, b in zip(mean, thresholds, ref)]


def _as_float64(x, contiguous: bool = True) -> np.ndarray:
    """A float64 numpy array of ``x``. A tensor's ``.to()`` keeps its strides, so with ``contiguous=False`` a
    transposed view stays a view of the converted data (no second copy)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    return np.ascontiguousarray(x, dtype=np.float64) if contiguous else np.asarray(x, dtype=np.float64)


def _state_sums(eta: float, lam: np.ndarray, qr: np.ndarray, qc: np.ndarray) -> np.ndarray:
    """Sums over the local states of everything the dual's value, gradient and Hessian need, packed in one vector:
    [B, sum LME, sum E_w[x], sum E_w[Q_c] (m), sum Var_w(x), sum Cov_w(x, Q_c) (m), sum Cov_w(Q_c, Q_c) (m*m)].
    Written with flat matmuls and in-place updates: this runs a few times per update on a [B, N] batch. One
    constraint takes the faster ``_state_sums_one`` path (``DualProblem`` picks it)."""
    b, n = qr.shape
    m = qc.shape[-1]
    qc_flat = qc.reshape(b * n, m)
    x = qr - (qc_flat @ np.asarray(lam, np.float64)).reshape(b, n)  # [B, N]
    w = x * (1.0 / float(eta))
    zmax = w.max(axis=1, keepdims=True)
    w -= zmax
    np.exp(w, out=w)
    s = w.sum(axis=1, keepdims=True)
    w /= s  # softmax over the N samples of each state
    lme = zmax[:, 0] + np.log(s[:, 0]) - np.log(n)  # log-mean-exp of x/eta, [B]
    ex = (w * x).sum(1)
    eqc = np.matmul(w[:, None, :], qc)[:, 0, :]  # [B, m]
    dx = x - ex[:, None]
    wdx = (w * dx).reshape(-1)
    var_x = float(wdx @ dx.reshape(-1))
    dqc = (qc - eqc[:, None, :]).reshape(b * n, m)
    cov_xc = wdx @ dqc
    cov_cc = (dqc * w.reshape(-1, 1)).T @ dqc
    return np.concatenate([[float(b), lme.sum(), ex.sum()], eqc.sum(0), [var_x], cov_xc, cov_cc.reshape(-1)])


def _state_sums_one(eta: float, lam: float, qr_t: np.ndarray, c_t: np.ndarray) -> np.ndarray:
    """``_state_sums`` for one constraint, on sample-major [N, B] arrays: the per-state reductions then run over
    axis 0, where numpy vectorises across states (2-3x faster than over rows of N). Moments of x are taken about
    each state's max (x' <= 0) and those of Q_c as raw second moments: the Hessian entries they feed tolerate the
    ~1e-13 relative rounding."""
    n, b = qr_t.shape
    x = c_t * -lam
    x += qr_t
    xmax = x.max(axis=0)
    x -= xmax
    w = x * (1.0 / eta)
    np.exp(w, out=w)
    s = w.sum(axis=0)
    w *= 1.0 / s
    wx = w * x
    ex = wx.sum(0)  # E_w[x'] per state
    wc = w * c_t
    ec = wc.sum(0)
    var_x = float(np.vdot(wx, x) - ex @ ex)
    cov_xc = float(np.vdot(wx, c_t) - ex @ ec)
    cov_cc = float(np.vdot(wc, c_t) - ec @ ec)
    lme = float(xmax.sum()) / eta + float(np.log(s).sum()) - b * np.log(n)
    return np.array([float(b), lme, float(ex.sum() + xmax.sum()), float(ec.sum()), var_x, cov_xc, cov_cc])


@dataclasses.dataclass
class DualProblem:
    """The dual of one (possibly sharded) batch. ``qr[B, N]``, ``qc[B, N, m]`` (torch tensors on any device, or
    arrays) are copied once to float64 numpy: the dual has 1 + m variables, so its Newton iterations are dominated
    by per-call overhead, which numpy keeps small (see benchmarks/estep_solvers.py). With one constraint the data
    is held sample-major ([N, B], for ``_state_sums_one``) and ``qr`` / ``qc`` are views of it; the learner's
    critic outputs already have that layout underneath, so the float64 conversion is the only copy."""

    qr: np.ndarray
    qc: np.ndarray
    eps_kl: float
    thresholds: Sequence[float]
    reduce: Reduce = _identity

    def __post_init__(self) -> None:
        qr, qc = _as_float64(self.qr, contiguous=False), _as_float64(self.qc, contiguous=False)
        if qc.ndim == 2:
            qc = qc[..., None]
        self.m = qc.shape[-1]
        self.eps_c = np.asarray(self.thresholds, np.float64).reshape(-1)
        if self.eps_c.shape != (self.m,):
            raise ValueError(f"{self.m} cost critics but {self.eps_c.size} thresholds")
        for name, values in (("Q_r", qr), ("Q_c", qc), ("cost threshold eps_c", self.eps_c)):
            if not np.all(np.isfinite(values)):
                bad = values[~np.isfinite(values)].reshape(-1)[0]
                raise NonFiniteError(f"E-step input {name} holds {bad} ({np.size(values) - np.isfinite(values).sum()} "
                                     f"of {np.size(values)} values non-finite)")
        if not (np.isfinite(self.eps_kl) and self.eps_kl > 0):
            raise NonFiniteError(f"E-step KL bound must be a finite number > 0, got {self.eps_kl!r}")

        if self.m == 1:
            self._one = (np.ascontiguousarray(qr.T), np.ascontiguousarray(qc[..., 0].T))  # [N, B] each
            self.qr, self.qc = self._one[0].T, self._one[1].T[..., None]
        else:
            self._one = None
            self.qr, self.qc = np.ascontiguousarray(qr), np.ascontiguousarray(qc)

    def local_sums(self, theta) -> np.ndarray:
        """This shard's ``_state_sums`` at theta = (eta, lambda_1..m), before the reduce."""
        theta = _as_float64(theta)
        if self._one is not None:
            return _state_sums_one(float(theta[0]), float(theta[1]), *self._one)
        return _state_sums(float(theta[0]), theta[1:], self.qr, self.qc)

    def evaluate(self, theta) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
        """Value, gradient [1+m], Hessian [1+m, 1+m] of g at theta = (eta, lambda_1..m), and the reduced sums."""
        theta = _as_float64(theta)
        m = self.m
        eta, lam = float(theta[0]), theta[1:]
        s = self.reduce(self.local_sums(theta))
        b = s[0]
        lme, ex, eqc = s[1] / b, s[2] / b, s[3 : 3 + m] / b
        var_x, cov_xc = s[3 + m] / b, s[4 + m : 4 + 2 * m] / b
        cov_cc = s[4 + 2 * m :].reshape(m, m) / b
        value = eta * self.eps_kl + float(lam @ self.eps_c) + eta * lme
        grad = np.concatenate([[self.eps_kl + lme - ex / eta], self.eps_c - eqc])
        hess = np.empty((1 + m, 1 + m))
        hess[0, 0] = var_x / eta**3
        hess[0, 1:] = hess[1:, 0] = cov_xc / eta**2
        hess[1:, 1:] = cov_cc / eta
        return float(value), grad, hess, s

    def value(self, theta) -> float:
        return self.evaluate(theta)[0]


@dataclasses.dataclass
class DualSolution:
    eta: float
    lam: np.ndarray  # [m]
    value: float
    iterations: int
    eta_at_bound: bool
    lam_at_bound: np.ndarray  # [m] bool: lambda_i at its upper bound (the constraint looks infeasible)
    expected_qc: np.ndarray  # [m] (1/B) sum_k E_q[Q_c]
    kl: float  # (1/B) sum_k KL(q_k || U_N)


def _solution(problem: DualProblem, theta: np.ndarray, iters: int, bounds, evaluated=None) -> DualSolution:
    value, grad, _, _ = evaluated if evaluated is not None else problem.evaluate(theta)
    eta_lo, eta_hi, lam_hi = bounds
    eta = float(theta[0])
    lam = np.array(theta[1:], np.float64)
    return DualSolution(
        eta=eta,
        lam=lam,
        value=value,
        iterations=iters,
        eta_at_bound=bool(eta <= eta_lo * (1 + 1e-9) or eta >= eta_hi * (1 - 1e-9)),
        lam_at_bound=lam >= lam_hi * (1 - 1e-9),
        expected_qc=problem.eps_c - grad[1:],
        kl=float(problem.eps_kl - grad[0]),
    )


def _newton_direction(h: np.ndarray, g: np.ndarray, ridge: np.ndarray) -> np.ndarray:
    """The Newton direction -H^-1 g on the free variables, H with its ridge. H is positive semi-definite in exact
    arithmetic, but where the weights are nearly one-hot its entries are rounding noise and the computed matrix may be
    indefinite, so that -H^-1 g is not a descent direction; then each variable takes its own Newton step on its
    diagonal curvature (a descent direction whenever the gradient is not 0)."""
    k = h.shape[0]
    diag = np.diag(h) + ridge
    if k == 1:
        if diag[0] > 0:
            return -g / diag
    elif k == 2:  # closed form: np.linalg.solve's overhead exceeds the arithmetic here
        a, bb, d = diag[0], h[0, 1], diag[1]
        det = a * d - bb * bb
        if a > 0 and det > 0:
            return -np.array([d * g[0] - bb * g[1], a * g[1] - bb * g[0]]) / det
    else:
        try:
            factor = np.linalg.cholesky(h + np.diag(ridge))
        except np.linalg.LinAlgError:
            pass
        else:
            return -np.linalg.solve(factor.T, np.linalg.solve(factor, g))
    return -g / np.maximum(diag, ridge)


def solve_dual_newton(
    problem: DualProblem,
    eta0: float,
    lam0: Sequence[float],
    *,
    eta_min: float = 1e-6,
    eta_max: float = 1e4,
    lam_max: float = 1e3,
    tol: float = 1e-14,
    model_tol: float = 1e-9,
    max_iter: int = 100,
) -> DualSolution:
    """Projected, damped Newton on g over [eta_min, eta_max] x [0, lam_max]^m, warm-started at (eta0, lam0).

    Variables sitting at a bound with the gradient pushing outwards are held fixed (projected Newton); the Newton
    step on the rest is damped by an Armijo backtracking line search along the projected path. Stops when the
    Newton decrement (about twice the remaining gap in g) falls below ``tol * (|g| + S)``, S the scale of the data
    (the largest |Q| or |eps_c|): g and eta* scale with the data, so the stopping rule is relative for Q of any
    magnitude. Every learner runs the same iterations on the same reduced sums. A non-finite warm start raises
    :class:`NonFiniteError`.
    """
    start = np.array([eta0, *np.asarray(lam0, np.float64).reshape(-1)], np.float64)
    if not np.all(np.isfinite(start)):
        raise NonFiniteError(f"E-step warm start (eta, lambda) = {start.tolist()} is not finite")
    lo = np.array([eta_min] + [0.0] * problem.m)
    hi = np.array([eta_max] + [lam_max] * problem.m)
    theta = np.clip(start, lo, hi)
    current = problem.evaluate(theta)
    value, grad, hess, _ = current
    # The dual is positively homogeneous in the data: scaling Q_r, Q_c and eps_c by s scales g and eta* by s. The
    # tolerances are relative to the data's scale S, so the accuracy does not depend on the units. S comes from the
    # reduced sums (the mean E_w[x], E_w[Q_c], the spread of x, eps_c), so every learner of a sharded batch uses the
    # same S and runs the same iterations.
    sums, m = current[3], problem.m
    scale = float(max(abs(sums[2]) / sums[0], np.abs(sums[3:3 + m]).max() / sums[0],
                      np.sqrt(max(sums[3 + m], 0.0) / sums[0]), np.abs(problem.eps_c).max(),
                      np.finfo(np.float64).tiny))
    curvature_unit = np.array([1.0 / scale] + [scale] * problem.m)
    iters = 0
    for iters in range(1, max_iter + 1):
        pinned = ((theta <= lo) & (grad > 0)) | ((theta >= hi) & (grad < 0))
        free = ~pinned
        if not free.any():
            break
        step = np.zeros_like(theta)
        if free.all():
            hf, gf = hess, grad
        else:
            hf, gf = hess[free][:, free], grad[free]
        # A ridge per variable, relative to its own curvature: eta's curvature is of order 1 / S, lambda's of order
        # S (S the data's scale), and either may vanish (at a tiny eta every state's weight sits on one sample).
        ridge = 1e-12 * np.maximum(np.abs(np.diag(hf)), curvature_unit[free])
        step[free] = _newton_direction(hf, gf, ridge)
        decrement = float(-(grad[free] @ step[free]))
        if decrement <= tol * (scale + abs(value)):
            break
        # eta's curvature grows like 1/eta^3: a Newton step computed at a moderate eta may point far below 0, and
        # clipped to eta_min it lands where every state's weight sits on one sample. There the computed Hessian is
        # rounding noise (possibly indefinite) and the solver used to stop, at a point far from the optimum. So a
        # step may shrink eta by at most 10x (the fraction-to-the-boundary rule of interior-point methods): an
        # optimum at eta_min is still reached, geometrically.
        if free[0] and step[0] < -0.9 * theta[0]:
            step *= 0.9 * theta[0] / -step[0]
        full = theta + step
        if decrement <= model_tol * (scale + abs(value)) and np.all((full >= lo) & (full <= hi)):
            # Close to the optimum Newton's error squares at each step, so the remaining gap after this step is
            # about decrement^2 (< 1e-18 relative at the default model_tol): take it without evaluating g again, and
            # report the quadratic model's value and gradient there. benchmarks/estep_solvers.py measures the gap.
            value, grad = value - 0.5 * decrement, grad + hess @ step
            theta = full
            current = (value, grad, hess, current[3])
            break
        pg = float(np.abs(grad[free]).max())
        # The floor of the backtracking is relative, per variable (eta and lambda have unrelated scales): a step far
        # outside the box (a near-flat direction) may need many halvings before it moves theta by a sensible amount.
        step_size, theta_size = np.abs(step), 1e-15 * np.abs(theta)
        t = 1.0
        while True:
            cand = np.clip(theta + t * step, lo, hi)
            evaluated = problem.evaluate(cand)
            cand_value, cand_grad = evaluated[0], evaluated[1]
            if cand_value <= value + 1e-4 * float(grad @ (cand - theta)):
                break
            # Near the optimum the decrease falls below float64 noise in g: accept a step that shrinks the gradient.
            if abs(cand_value - value) <= 1e-13 * (scale + abs(value)) and float(np.abs(cand_grad[free]).max()) < pg:
                break
            t *= 0.5
            if np.all(t * step_size <= theta_size):
                break
        if np.all(t * step_size <= theta_size):  # no progress possible at float64 precision: at the optimum
            break
        moved = np.abs(cand - theta)
        theta, current = cand, evaluated
        value, grad, hess, _ = current
        if np.all(moved <= 1e-15 * np.abs(theta)):
            break
    return _solution(problem, theta, iters, (eta_min, eta_max, lam_max), current)


def solve_dual_cvxpy(
    problem: DualProblem,
    *,
    eta_min: float = 1e-6,
    eta_max: float = 1e4,
    lam_max: float = 1e3,
) -> DualSolution:
    """The reference solver: the dual as an exponential-cone program (Clarabel).

    t_k >= eta * log mean_j exp(x_kj / eta)  <=>  (x_kj - t_k, eta, u_kj) in K_exp and (1/N) sum_j u_kj <= eta.
    About a second per solve: for tests and validation. Sharded batches are not supported (``reduce`` is ignored).
    """
    import cvxpy as cp

    qr, qc = problem.qr, problem.qc
    b, n = qr.shape
    m = problem.m
    eta, lam = cp.Variable(), cp.Variable(m)
    t, u = cp.Variable(b), cp.Variable((b, n))
    x = qr - sum(lam[i] * qc[:, :, i] for i in range(m))
    constraints = [
        cp.constraints.ExpCone(x - t[:, None] @ np.ones((1, n)), eta * np.ones((b, n)), u),
        cp.sum(u, axis=1) / n <= eta,
        eta >= eta_min,
        eta <= eta_max,
        lam >= 0,
        lam <= lam_max,
    ]
    objective = eta * problem.eps_kl + lam @ problem.eps_c + cp.sum(t) / b
    program = cp.Problem(cp.Minimize(objective), constraints)
    try:
        program.solve(solver=cp.CLARABEL, tol_gap_abs=1e-11, tol_gap_rel=1e-11, tol_feas=1e-11, tol_ktratio=1e-9,
                      max_iter=500)
    except cp.error.SolverError:  # tight tolerances can stall on hard batches: Clarabel's defaults, then SCS
        try:
            program.solve(solver=cp.CLARABEL)
        except cp.error.SolverError:
            program.solve(solver=cp.SCS, eps=1e-10, max_iters=200_000)
    if eta.value is None:
        raise RuntimeError("cvxpy did not solve the E-step dual")
    theta = np.array([np.clip(float(eta.value), eta_min, eta_max), *np.clip(lam.value, 0.0, lam_max)])
    return _solution(problem, theta, 0, (eta_min, eta_max, lam_max))


def variational_weights(qr: torch.Tensor, qc: torch.Tensor, eta: float, lam: Sequence[float]) -> torch.Tensor:
    """q_kj = softmax_j((Q^r_kj - sum_i lambda_i Q^c_ikj) / eta), normalised over the N samples of each state."""
    if qc.dim() == 2:
        qc = qc[..., None]
    lam_t = torch.as_tensor(np.asarray(lam, np.float64), dtype=qr.dtype, device=qr.device)
    return torch.softmax((qr - (qc * lam_t).sum(-1)) / eta, dim=1)
