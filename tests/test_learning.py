"""CVPO learns the built-in constrained task: near the constrained optimum, within the limit, on fixed seeds.

Deterministic: a local EnvRunner, the learner in-process, one torch thread, fixed seeds (the warm-up's random actions
included), min_time_s_per_iteration=0.
"""

import math

import pytest

from rllib_cvpo import CVPOConfig
from rllib_cvpo.cvpo.torch.cvpo_torch_rl_module import CVPOTorchRLModule
from rllib_cvpo.cvpo.evaluate import evaluate_module
from rllib_cvpo.envs import constrained_optimum
from rllib_cvpo.envs.speed_limit import constant_speed_return

LIMIT = 25.0
ENV_STEPS = 40_000  # the default constraint settings (round pi_old, E-step KL 0.02) learn more slowly than the earlier ones


def learning_config(seed, cost_limit=LIMIT):
    return (
        CVPOConfig()
        .environment("SpeedLimit-v0")
        .env_runners(num_env_runners=0, rollout_fragment_length=50)
        .learners(num_learners=0)
        .training(cost_limit=cost_limit, gamma=0.97, num_steps_sampled_before_learning_starts=1000,
                  updates_per_env_step=0.5, learner_num_threads=1)
        .reporting(min_sample_timesteps_per_iteration=1000, min_time_s_per_iteration=0)
        .evaluation(evaluation_interval=None)
        .rl_module(model_config={"fcnet_hiddens": [64, 64]})
        .debugging(seed=seed)
    )


def train_and_evaluate(config, env_steps, training_costs=None):
    """Deterministic return and cost over 20 episodes after ``env_steps``; each iteration's mean training episode
    cost is appended to ``training_costs`` (a list) where one is given and the iteration finished an episode."""
    algo = config.build_algo()
    try:
        while True:
            result = algo.train()
            cost = result["env_runners"].get("episode_cost", math.nan)
            if training_costs is not None and math.isfinite(cost):
                training_costs.append(cost)
            if result["num_env_steps_sampled_lifetime"] >= env_steps:
                break
        module = algo.env_runner.module
        returns, costs = evaluate_module(module, "SpeedLimit-v0", episodes=20)
    finally:
        algo.stop()
    return returns.mean(), costs.mean()


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cvpo_reaches_the_constrained_optimum_within_the_limit(ray_local, seed):
    ret, cost = train_and_evaluate(learning_config(seed), ENV_STEPS)
    optimum = constrained_optimum(LIMIT)
    constant = constant_speed_return(cost)
    print(f"seed {seed}: deterministic return {ret:.2f} (optimum {optimum:.2f}; the best constant speed at this cost "
          f"{constant:.2f}), cost {cost:.2f} (limit {LIMIT})")
    assert cost <= 1.1 * LIMIT
    # Better than any policy that ignores the observed roughness, at the cost it actually pays, by a margin: a
    # constant-speed policy (66.7 at cost 25, 69.9 at 27.5) fails this. Since the warm-up's random actions are
    # seeded (2026-12-03), a seed repeats bit for bit on one machine: seeds 0, 1, 2 give 61.6 at cost 17.9 (+5.2),
    # 65.8 at 19.7 (+6.7), 66.0 at 19.6 (+6.9) here; with the E-step on the newest 5000 steps (the default since
    # 2026-12-07) 62.9 at 18.9 (+5.0), 66.4 at 20.0 (+6.7), 65.0 at 19.4 (+6.3). Before, each run drew its own
    # warm-up: 62.6 at 18.3 (+5.6) to 64.9 at 19.1 (+6.6), once 60.2 at 17.7 (+4.1), and once seed 1 at 55.5 at 14.6
    # (+4.5, under 0.75 of the optimum). Another CPU may round its matmuls differently, so the margin is 3.
    assert ret >= constant + 3.0
    assert ret >= 0.75 * optimum


@pytest.mark.slow
def test_with_the_limit_lifted_the_same_configuration_exceeds_the_old_limit(ray_local):
    ret, cost = train_and_evaluate(learning_config(0, cost_limit=1000.0), 6_000)
    print(f"limit lifted: deterministic return {ret:.2f}, cost {cost:.2f}")
    assert cost > 2 * LIMIT
    assert ret > constrained_optimum(LIMIT)


UNDERESTIMATE = 0.5  # the cost critics' bias measured without the correction: 0.3-0.6 of the replay's cost-to-go


@pytest.mark.slow
def test_the_cost_feedback_holds_the_limit_where_the_cost_critic_underestimates(ray_local, monkeypatch):
    """The correction that only tightens, in minutes: the E-step sees every Q_c halved (a critic that underestimates
    the cost as docs/benchmarks.md section 5 measured, here made exact), so its constraint admits twice the limit.
    Without the feedback the policy runs at about twice the limit; with the default gain (0.1) the offset lowers
    the E-step's limit until the measured cost is back at it.

    Measured on 2026-12-03, seed 0, 16.8k env steps each: without, the last iterations' training episodes cost
    44.6-51.3 and the deterministic policy 46.2 and 47.5 in two runs (return 95.9, 97.5; after 10k steps it was still
    at 32.8, too close to call); with, 21.7-25.8 (after 33.4 at 12k) and 10.2 and 9.5 (return 42.1, 40.6). With the
    warm-up seeded (the same on every run): without, 50.0 and 48.1 (return 97.6); with, 23.6 and 12.5 (return 47.6)."""

    real = CVPOTorchRLModule.q_values_sampled

    def underestimating(self, *args, **kwargs):  # the E-step's critic values, and only the E-step's
        qr, qc = real(self, *args, **kwargs)
        return qr, qc * UNDERESTIMATE

    # The learner is in this process (num_learners=0). Every Q_c the E-step uses is halved: the dual's, and the batch
    # mean and baseline that a proportional E-step measures its thresholds from.
    monkeypatch.setattr(CVPOTorchRLModule, "q_values_sampled", underestimating)
    runs = {}
    for gain in (0.0, 0.1):
        training_costs = []
        ret, cost = train_and_evaluate(learning_config(0).training(cost_feedback_gain=gain), 16_000, training_costs)
        runs[gain] = (ret, cost, sum(training_costs[-3:]) / 3)
        print(f"feedback gain {gain}: deterministic return {ret:.2f}, cost {cost:.2f}; training episodes' cost over "
              f"the last 3 iterations {runs[gain][2]:.2f} (limit {LIMIT})")
    assert runs[0.0][1] > 1.4 * LIMIT and runs[0.0][2] > 1.4 * LIMIT  # the bias breaks the limit ...
    assert runs[0.1][1] <= 1.1 * LIMIT and runs[0.1][2] <= 1.2 * LIMIT  # ... and the feedback holds it
