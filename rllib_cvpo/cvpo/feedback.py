"""Cost feedback: an outer correction of the E-step's cost thresholds from the costs the policy actually incurs.

The E-step keeps the expected Q_c of the variational distribution under eps_c, so the constraint is only as good as
the cost critic. Off-policy cost critics underestimate under constraint pressure: the E-step and M-step move the
policy toward actions whose Q_c is underestimated, and the TD targets then carry that bias (the same mechanism as
Q-learning's overestimation, in the minimising direction). docs/benchmarks.md section 5 measures it: on the replayed
state-action pairs the critic's mean Q_c is 0.3-0.6 of the discounted cost-to-go that the replayed costs give.

The correction scales each threshold by kappa_i and adapts kappa_i by integral control on the measured cost:

    J_i   = (cost of the env steps just sampled) / (their number) * T        (episodic cost at the current rate)
    e_i   = clip((J_i - d_i) / max(d_i, 1), -1, 1)                            (relative excess, bounded)
    log kappa_i <- clip(log kappa_i - gain * (steps / T) * e_i, log SCALE_MIN, log SCALE_MAX)

so the gain is per episode's worth of experience, independent of how the sampling is chunked. kappa < 1 tightens
the E-step's constraint while the measured cost is over the limit, kappa > 1 loosens it while under (a critic that
overestimates costs would otherwise leave return on the table). The measured cost comes from the exploring policy
the constraint is defined for, on the freshest experience, not from a window of finished episodes.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

SCALE_MIN = 0.05
SCALE_MAX = 2.0
THRESHOLD_SCALE = "cvpo_threshold_scale"  # the key of Learner.update()'s timesteps that hands kappa to the learners


def update_log_scale(log_scale: np.ndarray, step_costs: Sequence[float], steps: int, limits: Sequence[float],
                     horizon: int, gain: float) -> np.ndarray:
    """One integral-control step of log kappa (see the module docstring). ``step_costs``: the summed cost of each
    constraint over the ``steps`` env steps just sampled."""
    log_scale = np.asarray(log_scale, np.float64)
    if steps <= 0 or gain <= 0:
        return log_scale.copy()
    episodic = np.asarray(step_costs, np.float64) / steps * horizon
    limits = np.asarray(limits, np.float64)
    error = np.clip((episodic - limits) / np.maximum(limits, 1.0), -1.0, 1.0)
    updated = log_scale - gain * (steps / horizon) * error
    return np.clip(updated, math.log(SCALE_MIN), math.log(SCALE_MAX))
