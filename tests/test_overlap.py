"""Sampling overlapped with learning: with a remote EnvRunner, each round's episodes were collected with weights
exactly one round behind the learner's (the documented lag), every sampled step reaches the replay, and the
synchronous loop (overlap_sampling=False) has no lag."""

import numpy as np
import pytest
from helpers import small_config
from ray.rllib.utils.metrics import WEIGHTS_SEQ_NO


@pytest.mark.parametrize("overlap, lag", [(True, 1), (False, 0)])
def test_policy_lag_is_one_round_with_overlap_and_none_without(ray_local, overlap, lag):
    import torch

    # The learner in this process takes the cores no EnvRunner samples on while it updates (Ray has 2 CPUs here).
    threads, before = (1 if overlap else 2), torch.get_num_threads()
    torch.set_num_threads(3 - threads)
    algo = small_config(overlap_sampling=overlap, num_steps_sampled_before_learning_starts=200) \
        .env_runners(num_env_runners=1).build_algo()
    assert torch.get_num_threads() == threads
    torch.set_num_threads(before)
    learner = algo.learner_group._learner
    lags = []
    original = algo._store

    def recording(rounds):
        for episodes, _ in rounds:
            for ep in episodes:
                seq = ep.get_extra_model_outputs(WEIGHTS_SEQ_NO) if WEIGHTS_SEQ_NO in ep.extra_model_outputs else None
                if seq is not None and len(seq):  # policy steps (warm-up steps have no model outputs)
                    lags.append(learner._weights_seq_no - int(np.max(seq)))
        return original(rounds)

    algo._store = recording
    try:
        for _ in range(3):
            result = algo.train()
        assert len(lags) > 10
        # Ignore the first policy rounds, sampled with the weights of the first sync.
        assert set(lags[5:]) == {lag}
        assert algo.replay.num_added == result["env_runners"]["num_env_steps_sampled_lifetime"]
    finally:
        algo.stop()


def test_evaluation_runs_parallel_to_training_on_its_own_runner_with_as_many_envs_as_episodes(ray_local):
    # RLlib's evaluation_parallel_to_training: the evaluation runner plays its episodes while the training step
    # samples and updates. Each iteration then reports exactly the evaluation's 4 episodes, one per env of its 4
    # (not the training runners' 8, which would play 8 to count 4), and the iteration summary judges the policy by
    # them.
    algo = (small_config(num_steps_sampled_before_learning_starts=200)
            .env_runners(num_env_runners=1, num_envs_per_env_runner=8)
            .evaluation(evaluation_interval=1, evaluation_duration=4, evaluation_num_env_runners=1,
                        evaluation_parallel_to_training=True)
            .build_algo())
    try:
        assert algo.eval_env_runner_group.foreach_env_runner(lambda r: r.num_envs, local_env_runner=False) == [4]
        for _ in range(2):
            result = algo.train()
            evaluation = result["evaluation"]["env_runners"]
            assert evaluation["num_episodes"] == 4
            assert result["cvpo"]["eval_cost"] == evaluation["episode_cost"]
            assert result["cvpo"]["feasible"] == float(evaluation["episode_cost"] <= 25.0)
        assert result["learners"]["default_policy"]["num_cvpo_updates"] > 0
    finally:
        algo.stop()


def test_the_learner_takes_the_cores_no_env_runner_samples_on():
    from rllib_cvpo.cvpo.cvpo import learner_threads

    config = small_config().env_runners(num_env_runners=1)
    assert learner_threads(config, 2) == 1  # one core samples the next round while the learner updates
    assert learner_threads(config.copy(copy_frozen=False).training(overlap_sampling=False), 2) == 2  # runners idle
    assert learner_threads(small_config().env_runners(num_env_runners=0), 2) == 2  # sampling in this process
    assert learner_threads(config.copy(copy_frozen=False).env_runners(num_env_runners=3), 16) == 13
    assert learner_threads(config.copy(copy_frozen=False).env_runners(num_env_runners=4), 2) == 1
    parallel_evaluation = config.copy(copy_frozen=False).evaluation(evaluation_num_env_runners=1,
                                                                    evaluation_parallel_to_training=True)
    assert learner_threads(parallel_evaluation, 4) == 2
    remote = config.copy(copy_frozen=False).learners(num_learners=2, num_cpus_per_learner=3)
    assert learner_threads(remote, 2) == 3
    assert learner_threads(config.copy(copy_frozen=False).training(learner_num_threads=4), 2) == 4
    with pytest.raises(ValueError, match=r"learner_num_threads must be None \(automatic\) or an integer >= 1, got 0"):
        small_config(learner_num_threads=0).validate()

