"""Cost feedback: an outer correction of the E-step's cost thresholds from the costs the policy actually incurs,
which only ever tightens them.

The E-step keeps the expected Q_c of the variational distribution under eps_c, so the constraint is only as good as
the cost critic. Off-policy cost critics underestimate under constraint pressure: the E-step and M-step move the
policy toward actions whose Q_c is underestimated, and the TD targets then carry that bias (the same mechanism as
Q-learning's overestimation, in the minimising direction; docs/benchmarks.md section 5 measures it).

The correction is the integral term of a PID Lagrangian (Stooke et al., 2020) acting on the threshold instead of on
lambda, so the E-step still solves its dual exactly inside the KL trust region. Per constraint i, an offset
o_i >= 0 in episodic-cost units lowers the limit the E-step sees from d_i to d_i - o_i (the threshold falls by the
same amount in Q_c units, and may go below 0 where the critic's bias needs it):

    J_i   = (cost of the env steps just sampled) / (their number) * T        (episodic cost at the current rate)
    e_i   = clip(J_i - (1 - m) d_i, -c D_i, c D_i),  D_i = max(d_i, 1)       (excess over the target, bounded)
    o_i  <- clip(o_i + gain * (steps / T) * e_i, 0, OFFSET_MAX * D_i)

The gain is per episode's worth of experience, independent of how the sampling is chunked; the margin m puts the
target below the limit; c is ``cost_feedback_error_clip`` (default 1).

With ``cost_feedback_window`` W, J_i is the rate over the newest rounds that cover at least W env steps (the round
just sampled included), while each round's step keeps its own weight (its steps / T). Why: where the exploring
policy's cost swings between rounds by more than the offset (on SafetyPointCircle1-v0 from 0 to 30-100 per episode
from one iteration to the next), the high rounds' errors are cut to +D while the low ones count in full, and the
offset falls back to 0 in the low halves: the integral sees a fraction of the excess (SafetyPointCircle1-v0, gain
0.05, seed 1: per iteration +2.1 of +5.9), and the mean cost settles above the target. Over a window spanning a
swing the error is the swing's mean. But the window delays the error by about half its length: on Circle a window
of 10,000 env steps made the offset swing between 0 and 50 over 5-10 iterations, and the run did worse on every
count (docs/benchmarks.md section 5), so it is off by default.

With ``cost_feedback_antiwindup``, o_i does not grow while the E-step's lambda_i sat at its bound in at least half of
the last round's updates (it may still shrink): the threshold is then already below what the E-step can reach
inside its KL trust region, so lowering it further changes no update now, and only has to be unwound later, while
the policy keeps minimising cost after the measured cost has fallen (conditional integration, the standard
anti-windup of an integral controller whose actuator saturates).

What J_i measures is ``cost_feedback_source``: "training", the exploring (stochastic) policy's episodes just sampled;
"evaluation", the deployed (deterministic) policy's last evaluation, held between evaluations; or "both", the larger
of the two errors, so the correction tightens until both policies are under the target. The deployed policy is not
the one the E-step constrains (it plays the Gaussian's mean, without the exploration noise), and its cost can be
several times the exploring policy's: only a measurement of it can hold it. The offset is additive, so it also corrects a critic whose batch mean is at or below zero
(a scale cannot), and it never goes below 0: the correction tightens while the measured cost is over the target and
relaxes back to the critic's own threshold, never past it, while under.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np

ANTIWINDUP_AT_BOUND = 0.5  # the share of a round's updates with lambda_i at its bound from which o_i is held
OFFSET_MAX = 4.0  # in units of max(d, 1): the limit the E-step sees goes no lower than d - 4 max(d, 1)
THRESHOLD_OFFSET = "cvpo_threshold_offset"  # the key of Learner.update()'s timesteps that hands the offsets over


SOURCES = ("training", "evaluation", "both")


def update_offset(offset: np.ndarray, step_costs: Sequence[float], steps: int, limits: Sequence[float],
                  horizon: int, gain: float, margin: float, source: str = "training",
                  evaluation_costs: Optional[Sequence[float]] = None,
                  hold: Optional[Sequence[bool]] = None, weight_steps: Optional[int] = None,
                  error_clip: float = 1.0) -> np.ndarray:
    """One integral step of the offsets o (see the module docstring), weighted by the ``steps`` env steps just
    sampled (``weight_steps``, when the measurement covers more than the new steps: a window). ``step_costs``: the
    summed cost of each constraint over the ``steps`` measured; ``evaluation_costs``: each
    constraint's mean episodic cost in the last evaluation (None: none yet, and then "evaluation" makes no step and
    "both" uses the training error alone). ``hold``: per constraint, True where the offset must not grow this step
    (it may still shrink): conditional-integration anti-windup, see ``CVPOConfig.cost_feedback_antiwindup``.
    ``error_clip``: c, the error is clipped to [-c D_i, c D_i] (``CVPOConfig.cost_feedback_error_clip``)."""
    offset = np.asarray(offset, np.float64)
    weight_steps = steps if weight_steps is None else weight_steps
    if source not in SOURCES:
        raise ValueError(f"cost feedback source must be one of {SOURCES}, got {source!r}")
    if steps <= 0 or weight_steps <= 0 or gain <= 0:
        return offset.copy()
    limits = np.asarray(limits, np.float64)
    scale = np.maximum(limits, 1.0)
    target = (1.0 - margin) * limits
    errors = []
    if source in ("training", "both"):
        errors.append(np.asarray(step_costs, np.float64) / steps * horizon - target)
    if source in ("evaluation", "both") and evaluation_costs is not None:
        errors.append(np.asarray(evaluation_costs, np.float64) - target)
    if not errors:
        return offset.copy()
    error = np.clip(np.max(errors, axis=0), -error_clip * scale, error_clip * scale)
    if hold is not None:
        error = np.where(np.asarray(hold, bool), np.minimum(error, 0.0), error)
    return np.clip(offset + gain * (weight_steps / horizon) * error, 0.0, OFFSET_MAX * scale)


def window_rounds(rounds: List[Tuple[int, np.ndarray]], steps: int, costs: Sequence[float],
                  window: int) -> List[Tuple[int, np.ndarray]]:
    """The feedback's window after a round of ``steps`` env steps with summed ``costs`` per constraint: the newest
    rounds (oldest first) that cover at least ``window`` steps, or all of them while they cover fewer."""
    rounds = [*rounds, (int(steps), np.asarray(costs, np.float64))]
    while len(rounds) > 1 and sum(s for s, _ in rounds[1:]) >= window:
        rounds.pop(0)
    return rounds
