"""Helpers shared by tests (the tests directory is on sys.path under pytest)."""

from rllib_cvpo import CVPOConfig


def small_config(env="SpeedLimit-v0", **training):
    base = dict(cost_limit=25.0, gamma=0.97, num_steps_sampled_before_learning_starts=400,
                updates_per_env_step=0.25, train_batch_size_per_learner=64, num_action_samples=8)
    base.update(training)
    return (
        CVPOConfig()
        .environment(env)
        .env_runners(num_env_runners=0, rollout_fragment_length=50)
        .learners(num_learners=0)
        .training(**base)
        .reporting(min_sample_timesteps_per_iteration=400, min_time_s_per_iteration=0)
        .evaluation(evaluation_interval=1, evaluation_duration=1)
        .rl_module(model_config={"fcnet_hiddens": [32, 32]})
        .debugging(seed=0)
    )
