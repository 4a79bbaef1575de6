"""The cost feedback on the E-step thresholds: the control law, and its path through CVPO and checkpoints."""

import numpy as np
import pytest
from helpers import small_config

from rllib_cvpo.cvpo.cvpo import CVPO, COST_FEEDBACK
from rllib_cvpo.cvpo.estep import qc_threshold
from rllib_cvpo.cvpo.feedback import ANTIWINDUP_AT_BOUND, OFFSET_MAX, update_offset, window_rounds


def record_stored_rounds(algo, row) -> list:
    """Wrap ``algo._store`` so that each stored sampling round appends ``row(added, costs)`` (its transitions and
    summed costs, read when the round is stored, before the feedback's step) to the returned list."""
    rows, original = [], algo._store

    def recording(rounds):
        added, costs = original(rounds)
        rows.append(row(added, costs))
        return added, costs

    algo._store = recording
    return rows


def test_control_law_tightens_over_the_target_relaxes_to_zero_under_it_and_stays_bounded():
    # T = 100, limit 10, margin 0.1 (target 9): 400 steps with a summed cost of 40 is 10 per episode, 1 over the
    # target; 400 steps are 4 episodes: o = 0.1 * 4 * 1 = 0.4. The second constraint's 20 per 400 steps is 5 per
    # episode, 4 under: it stays at 0 (never below).
    out = update_offset(np.zeros(2), [40.0, 20.0], 400, [10.0, 10.0], 100, gain=0.1, margin=0.1)
    np.testing.assert_allclose(out, [0.4, 0.0])
    # The gain is per episode of experience: two calls of 200 steps move it as far as one of 400.
    half = update_offset(np.zeros(1), [20.0], 200, [10.0], 100, 0.1, 0.1)
    np.testing.assert_allclose(update_offset(half, [20.0], 200, [10.0], 100, 0.1, 0.1), out[:1])
    # Under the target it relaxes by the same law: from 0.4, 5 per episode (4 under) for 1 episode: 0.4 - 0.4 = 0.
    assert update_offset(np.array([0.4]), [5.0], 100, [10.0], 100, 0.1, 0.1)[0] == pytest.approx(0.0)
    assert update_offset(np.array([1.0]), [5.0], 100, [10.0], 100, 0.1, 0.1)[0] == pytest.approx(0.6)
    # The error is bounded by max(d, 1): 100x over the limit moves it as far as 10 over (d = 10).
    np.testing.assert_allclose(update_offset(np.zeros(1), [4000.0], 100, [10.0], 100, 0.1, 0.1), [1.0])
    # A zero limit: target 0, bound 1.
    assert update_offset(np.zeros(1), [0.5], 100, [0.0], 100, 1.0, 0.1)[0] == pytest.approx(0.5)
    # Upper bound, and gain 0 or no steps leave it unchanged.
    high = np.zeros(1)
    for _ in range(200):
        high = update_offset(high, [1e3], 100, [2.0], 100, 1.0, 0.1)
    assert high[0] == pytest.approx(OFFSET_MAX * 2.0)
    assert update_offset(np.array([0.3]), [1e3], 100, [1.0], 100, 0.0, 0.1)[0] == 0.3
    assert update_offset(np.array([0.3]), [0.0], 0, [1.0], 100, 1.0, 0.1)[0] == 0.3


def test_anti_windup_holds_an_offset_that_would_grow_and_lets_it_shrink():
    # As above (T = 100, limit 10, target 9, 4 episodes, gain 0.1): the first constraint 1 over the target, the
    # second 4 under with an offset of 2.
    start = np.array([0.0, 2.0])
    free = update_offset(start, [40.0, 20.0], 400, [10.0, 10.0], 100, 0.1, 0.1)
    np.testing.assert_allclose(free, [0.4, 0.4])
    held = update_offset(start, [40.0, 20.0], 400, [10.0, 10.0], 100, 0.1, 0.1, hold=[True, True])
    np.testing.assert_allclose(held, [0.0, 0.4])  # no growth where over the target; shrinking is not held
    np.testing.assert_allclose(update_offset(start, [40.0, 20.0], 400, [10.0, 10.0], 100, 0.1, 0.1,
                                             hold=[False, True]), [0.4, 0.4])


def test_a_window_keeps_the_newest_rounds_that_cover_it_and_weighs_each_step_by_its_own_round():
    rounds = []
    for i in range(5):
        rounds = window_rounds(rounds, 800, [float(i), 10.0 * i], 2000)
    assert [s for s, _ in rounds] == [800, 800, 800]  # 1600 < 2000 <= 2400: the newest three
    np.testing.assert_array_equal(np.array([c for _, c in rounds]), [[2, 20], [3, 30], [4, 40]])
    assert [s for s, _ in window_rounds([], 5000, [1.0], 2000)] == [5000]  # one round longer than the window
    # The error is measured over the window, the step weighs the new round's steps only.
    assert update_offset(np.zeros(1), [40.0], 400, [10.0], 100, 0.1, 0.1, weight_steps=100)[0] == pytest.approx(0.1)


def test_over_a_window_the_offset_integrates_the_mean_excess_that_per_round_errors_lose_to_their_bound():
    # Limit 25 (target 22.5, errors bounded by 25), T = 100, rounds of one episode alternating between 0 and 70
    # cost: 35 on average, 12.5 over the target. Per round the errors are -22.5 and +25 (47.5 bounded), so the
    # offset gains 1.25 per round on average, a tenth of the excess; over a window of two rounds it gains 12.5 (the
    # first round alone, 22.5 under, finds the offset at 0 in both).
    plain, windowed, rounds = np.zeros(1), np.zeros(1), []
    for i in range(40):
        cost = [0.0 if i % 2 == 0 else 70.0]
        plain = update_offset(plain, cost, 100, [25.0], 100, 0.1, 0.1)
        rounds = window_rounds(rounds, 100, cost, 200)
        steps, costs = sum(s for s, _ in rounds), np.sum([c for _, c in rounds], axis=0)
        windowed = update_offset(windowed, costs, steps, [25.0], 100, 0.1, 0.1, weight_steps=100)
    assert plain[0] == pytest.approx(0.1 * (20 * 25.0 - 19 * 22.5))  # 7.25
    assert windowed[0] == pytest.approx(0.1 * 39 * 12.5)  # 48.75


def test_a_wider_error_clip_lets_a_swinging_cost_whose_mean_is_at_the_target_hold_the_offset():
    # Limit 25, margin 0.1: target 22.5, T = 500. Three rounds of an episode at cost 0 for each at 90: the mean is
    # 22.5, on target. At the default clip (c = 1: +-25) the high round counts as +25 and the low ones as -22.5 in
    # full, so the integral falls (-42.5 per four rounds) and the cost would have to settle above the target to hold
    # it; at c = 4 (+-100) the high round's +67.5 is counted whole and the offset holds.
    def run(clip):
        offset = np.array([20.0])
        for _ in range(2):
            for cost in (0.0, 0.0, 0.0, 90.0):
                offset = update_offset(offset, [cost], 500, [25.0], 500, 0.1, 0.1, error_clip=clip)
        return offset[0]

    assert run(1.0) == pytest.approx(20.0 - 2 * 0.1 * 42.5)
    assert run(4.0) == pytest.approx(20.0)
    # The clip bounds a single round's step: c x max(d, 1) x gain per episode.
    assert update_offset(np.zeros(1), [400.0], 500, [25.0], 500, 0.1, 0.1, error_clip=2.0)[0] == pytest.approx(5.0)


def test_the_source_chooses_the_measured_cost_and_both_takes_the_larger_error():
    # T = 100, limit 10, margin 0.1: target 9. Training: 400 steps costing 40 (10 per episode, error +1); the
    # last evaluation: 15 per episode (error +6). Weighted by the 4 episodes just sampled, gain 0.1.
    args = (np.zeros(1), [40.0], 400, [10.0], 100, 0.1, 0.1)
    assert update_offset(*args, source="training", evaluation_costs=[15.0])[0] == pytest.approx(0.4)
    assert update_offset(*args, source="evaluation", evaluation_costs=[15.0])[0] == pytest.approx(2.4)
    assert update_offset(*args, source="both", evaluation_costs=[15.0])[0] == pytest.approx(2.4)
    # "both" with the evaluation under the target and training over it: the training error (+1) decides.
    assert update_offset(*args, source="both", evaluation_costs=[3.0])[0] == pytest.approx(0.4)
    # Per constraint: the larger error of each.
    two = update_offset(np.zeros(2), [40.0, 0.0], 400, [10.0, 10.0], 100, 0.1, 0.1, "both", [0.0, 12.0])
    np.testing.assert_allclose(two, [0.4, 1.2])
    # Before the first evaluation: "evaluation" makes no step, "both" uses the training error alone.
    assert update_offset(np.array([0.7]), [40.0], 400, [10.0], 100, 0.1, 0.1, "evaluation", None)[0] == 0.7
    assert update_offset(*args, source="both", evaluation_costs=None)[0] == pytest.approx(0.4)
    with pytest.raises(ValueError, match="source must be one of .*got 'deployed'"):
        update_offset(*args, source="deployed")


def test_validate_rejects_a_negative_gain_a_margin_outside_0_1_and_a_bad_source():
    with pytest.raises(ValueError, match="cost_feedback_gain must be >= 0, got -0.1"):
        small_config(cost_feedback_gain=-0.1).validate()
    with pytest.raises(ValueError, match="cost_feedback_margin must be <= 1, got 1.5"):
        small_config(cost_feedback_margin=1.5).validate()
    with pytest.raises(ValueError, match="cost_feedback_source must be one of 'training', 'evaluation', 'both', "
                                         "got 'eval'"):
        small_config(cost_feedback_source="eval").validate()
    with pytest.raises(ValueError, match="cost_feedback_error_clip must be > 0, got 0"):
        small_config(cost_feedback_error_clip=0).validate()
    with pytest.raises(ValueError, match="cost_feedback_antiwindup must be True or False, got 'yes'"):
        small_config(cost_feedback_antiwindup="yes").validate()
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match=f"cost_feedback_window must be None .* got {bad!r}"):
            small_config(cost_feedback_window=bad).validate()
    with pytest.raises(ValueError, match="cost_feedback_source='both' measures the evaluation's cost, but "
                                         "evaluation is off"):
        small_config(cost_feedback_gain=0.1, cost_feedback_source="both").evaluation(
            evaluation_interval=None).validate()


@pytest.mark.parametrize("window", [None, 500])
def test_feedback_offsets_the_learners_thresholds_exactly_and_survives_a_checkpoint(ray_local, tmp_path, window):
    # SpeedLimit-v0 with limit 5: the early policy costs far more (a uniformly random one about 75 per episode), so
    # the offset must grow, and the E-step must use eps_c(d) - eps_c(1) * o (= eps_c(d - o), below 0 if o > d).
    # With a window the error is measured over the newest rounds covering 500 env steps.
    config = small_config(cost_limit=5.0, cost_feedback_gain=0.5, cost_feedback_window=window)
    algo = config.build_algo()

    def stored(added, costs):
        assert algo.replay.last_added_costs[0] == costs[0]  # what the replay stored
        return added, float(costs[0])

    replayed = record_stored_rounds(algo, stored)
    try:
        for _ in range(3):
            result = algo.train()
        # Replay the control law on the recorded (steps, cost) of every post-warm-up sampling round.
        expected, seen, rounds = np.zeros(1), 0, []
        for added, cost in replayed:
            seen += added
            if seen >= config.num_steps_sampled_before_learning_starts:
                if window is None:
                    expected = update_offset(expected, [cost], added, [5.0], 200, 0.5, 0.1)
                else:
                    rounds = window_rounds(rounds, added, [cost], window)
                    expected = update_offset(expected, np.sum([c for _, c in rounds], axis=0),
                                             sum(s for s, _ in rounds), [5.0], 200, 0.5, 0.1, weight_steps=added)
        if window is not None:
            assert len(rounds) > 1 and sum(s for s, _ in rounds[1:]) < window <= sum(s for s, _ in rounds)
        offset = float(algo._cost_offset[0])
        assert offset == pytest.approx(float(expected[0]), rel=1e-12) and offset > 0
        assert result[COST_FEEDBACK]["cost"] == pytest.approx(offset)
        learner = algo.learner_group._learner
        assert learner.last_estep["default_policy"]["thresholds"] == [
            pytest.approx(qc_threshold(5.0, config.gamma, 200) - qc_threshold(1.0, config.gamma, 200) * offset,
                          rel=1e-9)]
        path = algo.save_to_path(str(tmp_path / "ckpt"))
    finally:
        algo.stop()
    restored = CVPO.from_checkpoint(path)
    try:
        assert float(restored._cost_offset[0]) == offset
        assert [(s, list(c)) for s, c in restored._feedback_rounds] == [(s, list(c)) for s, c in rounds]
        restored.train()
        assert float(restored._cost_offset[0]) != offset  # it keeps adapting
    finally:
        restored.stop()


def test_evaluation_feedback_follows_the_deployed_policys_measured_cost_and_survives_a_checkpoint(ray_local,
                                                                                                   tmp_path):
    # SpeedLimit-v0 at limit 5 with the feedback on the deterministic evaluation's cost: nothing moves before the
    # first evaluation (iteration 1 runs its evaluation after training), then every sampling round integrates the
    # held evaluation cost, whatever the training episodes cost.
    config = small_config(cost_limit=5.0, cost_feedback_gain=0.5, cost_feedback_source="evaluation")
    algo = config.build_algo()
    rounds = record_stored_rounds(algo, lambda added, costs: (added, algo._evaluation_costs))
    try:
        first = algo.train()
        assert float(algo._cost_offset[0]) == 0.0
        assert algo._evaluation_costs == [pytest.approx(first["cvpo"]["eval_cost"])]
        second = algo.train()
        expected = np.zeros(1)
        for added, held in rounds:
            expected = update_offset(expected, [0.0], added, [5.0], 200, 0.5, 0.1, "evaluation", held)
        assert float(algo._cost_offset[0]) == pytest.approx(float(expected[0]), rel=1e-12)
        assert first["cvpo"]["eval_cost"] > 5.0 and float(algo._cost_offset[0]) > 0.0  # (the law made a move)
        assert algo._evaluation_costs == [pytest.approx(second["cvpo"]["eval_cost"])]
        path = algo.save_to_path(str(tmp_path / "ckpt"))
        saved = (float(algo._cost_offset[0]), list(algo._evaluation_costs))
    finally:
        algo.stop()
    restored = CVPO.from_checkpoint(path)
    try:
        assert (float(restored._cost_offset[0]), restored._evaluation_costs) == saved
    finally:
        restored.stop()


def test_anti_windup_holds_the_offset_while_lambda_sits_at_its_bound(ray_local, tmp_path):
    # SpeedLimit-v0 with limit 5: the early policy costs far more than the limit, the E-step's lambda reaches its
    # bound, and from then on the offset may not grow while it stays there. Replay the control law with the hold
    # the algorithm saw before each round's step (lambda at its bound in at least half of the last round's updates).
    config = small_config(cost_limit=5.0, cost_feedback_gain=0.5, cost_feedback_antiwindup=True)
    algo = config.build_algo()

    def stored(added, costs):
        at_bound = algo._lambda_at_bound
        return added, float(costs[0]), None if at_bound is None else float(at_bound[0])

    replayed = record_stored_rounds(algo, stored)
    try:
        for _ in range(3):
            algo.train()
        learner = algo.learner_group._learner
        assert algo._lambda_at_bound[0] == learner.lambda_at_bound_fraction()[0]
        expected, unheld, seen, holds = np.zeros(1), np.zeros(1), 0, 0
        for added, cost, at_bound in replayed:
            seen += added
            if seen >= config.num_steps_sampled_before_learning_starts:
                hold = None if at_bound is None else [at_bound >= ANTIWINDUP_AT_BOUND]
                holds += bool(hold and hold[0])
                expected = update_offset(expected, [cost], added, [5.0], 200, 0.5, 0.1, hold=hold)
                unheld = update_offset(unheld, [cost], added, [5.0], 200, 0.5, 0.1)
        assert float(algo._cost_offset[0]) == pytest.approx(float(expected[0]), rel=1e-12)
        assert holds > 0 and float(expected[0]) < float(unheld[0])  # the hold acted and kept the offset lower
        path = algo.save_to_path(str(tmp_path / "ckpt"))
        reading = algo._lambda_at_bound.copy()
    finally:
        algo.stop()
    restored = CVPO.from_checkpoint(path)
    try:  # a resumed run holds (or not) the next round's step as the run it continues would
        np.testing.assert_array_equal(restored._lambda_at_bound, reading)
    finally:
        restored.stop()


def test_without_feedback_the_thresholds_are_the_limits(ray_local):
    config = small_config(cost_limit=5.0, cost_feedback_gain=0.0)  # (the feedback is on by default)
    algo = config.build_algo()
    try:
        result = algo.train()
        assert COST_FEEDBACK not in result
        assert algo.learner_group._learner.last_estep["default_policy"]["thresholds"] == [
            pytest.approx(config.qc_thresholds()[0])]
    finally:
        algo.stop()
