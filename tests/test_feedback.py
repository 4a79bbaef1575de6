"""The cost feedback on the E-step thresholds: the control law, and its path through CVPO and checkpoints."""

import math

import numpy as np
import pytest
from helpers import small_config

from rllib_cvpo.cvpo.cvpo import CVPO, COST_FEEDBACK
from rllib_cvpo.cvpo.feedback import SCALE_MAX, SCALE_MIN, update_log_scale


def test_control_law_tightens_over_the_limit_loosens_under_it_and_stays_bounded():
    # T = 100, limit 10: 400 steps with a summed cost of 80 is 20 per episode, twice the limit -> error +1 (clipped).
    out = update_log_scale(np.zeros(2), [80.0, 20.0], 400, [10.0, 10.0], 100, gain=0.1)
    np.testing.assert_allclose(out, [-0.1 * 4 * 1.0, -0.1 * 4 * (5.0 - 10.0) / 10.0])
    # The gain is per episode of experience: two calls of 200 steps move it as far as one of 400.
    half = update_log_scale(update_log_scale(np.zeros(1), [40.0], 200, [10.0], 100, 0.1), [40.0], 200, [10.0], 100, 0.1)
    np.testing.assert_allclose(half, out[:1])
    # The error is bounded: 100x over the limit moves log kappa no more than 2x over.
    np.testing.assert_allclose(update_log_scale(np.zeros(1), [4000.0], 400, [10.0], 100, 0.1), out[:1])
    # A zero limit is measured against a cost of 1 per episode.
    assert update_log_scale(np.zeros(1), [0.5], 100, [0.0], 100, 1.0)[0] == pytest.approx(-0.5)
    # Bounds, and gain 0 or no steps leave it unchanged.
    low = np.zeros(1)
    for _ in range(200):
        low = update_log_scale(low, [1e3], 100, [1.0], 100, 1.0)
    assert math.exp(low[0]) == pytest.approx(SCALE_MIN)
    high = np.zeros(1)
    for _ in range(200):
        high = update_log_scale(high, [0.0], 100, [1.0], 100, 1.0)
    assert math.exp(high[0]) == pytest.approx(SCALE_MAX)
    assert update_log_scale(np.array([0.3]), [1e3], 100, [1.0], 100, 0.0)[0] == 0.3
    assert update_log_scale(np.array([0.3]), [0.0], 0, [1.0], 100, 1.0)[0] == 0.3


def test_validate_rejects_a_negative_gain():
    with pytest.raises(ValueError, match="cost_feedback_gain must be >= 0, got -0.1"):
        small_config(cost_feedback_gain=-0.1).validate()


def test_feedback_scales_the_learners_thresholds_and_survives_a_checkpoint(ray_local, tmp_path):
    # SpeedLimit-v0 with limit 5: the early policy costs far more (a uniformly random one about 75 per episode), so
    # kappa must fall below 1 and the E-step must use the scaled threshold.
    config = small_config(cost_limit=5.0, cost_feedback_gain=0.5)
    base = config.qc_thresholds()[0]
    algo = config.build_algo()
    try:
        for _ in range(3):
            result = algo.train()
        scale = math.exp(algo._log_threshold_scale[0])
        assert SCALE_MIN <= scale < 1.0
        assert result[COST_FEEDBACK]["cost"] == pytest.approx(scale)
        learner = algo.learner_group._learner
        assert learner.last_estep["default_policy"]["thresholds"] == [pytest.approx(base * scale)]
        path = algo.save_to_path(str(tmp_path / "ckpt"))
    finally:
        algo.stop()
    restored = CVPO.from_checkpoint(path)
    try:
        assert math.exp(restored._log_threshold_scale[0]) == pytest.approx(scale, rel=1e-12)
        restored.train()
        assert restored._log_threshold_scale[0] != pytest.approx(math.log(scale), rel=1e-12)  # it keeps adapting
    finally:
        restored.stop()


def test_without_feedback_the_thresholds_are_the_limits(ray_local):
    config = small_config(cost_limit=5.0)
    algo = config.build_algo()
    try:
        result = algo.train()
        assert COST_FEEDBACK not in result
        assert algo.learner_group._learner.last_estep["default_policy"]["thresholds"] == [
            pytest.approx(config.qc_thresholds()[0])]
    finally:
        algo.stop()
