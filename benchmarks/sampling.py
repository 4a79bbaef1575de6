"""Env steps per second through RLlib EnvRunners (CVPO's policy acting, stochastic) against the raw single-process
simulator rate measured in the same run, resets included in both.

    .venv/bin/python benchmarks/sampling.py                      # both tasks, 1/4/8 envs per runner, 1 and 2 runners
    .venv/bin/python benchmarks/sampling.py --env SafetyPointGoal1-v0 --steps 20000

"per core" divides the EnvRunner rate by the number of runners (one CPU each) and compares it with the raw rate
of one process. The raw loop steps our env factory's env with uniformly random actions and resets when an episode
ends; the EnvRunner path adds the policy forward, RLlib's connectors and episode bookkeeping.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np

TASKS = ("SafetyPointGoal1-v0", "SafetyHalfCheetahVelocity-v1")


def env_rate(env, steps: int, seed: int = 0) -> float:
    """Env steps per second of ``env`` (an env factory's env) with uniformly random actions, resets included."""
    rng = np.random.default_rng(seed)
    low, high = env.action_space.low, env.action_space.high
    t0 = time.perf_counter()
    env.reset(seed=seed)
    for _ in range(steps):
        _, _, terminated, truncated, _ = env.step(rng.uniform(low, high))
        if terminated or truncated:
            env.reset()
    return steps / (time.perf_counter() - t0)


def raw_rate(env_id: str, steps: int, seed: int = 0) -> float:
    from rllib_cvpo.envs import make_env

    env = make_env(env_id)
    rate = env_rate(env, steps, seed)
    env.close()
    return rate


def runner_rate(env_id: str, runners: int, envs_per_runner: int, steps: int) -> float:
    from ray.rllib.execution.rollout_ops import synchronous_parallel_sample

    from rllib_cvpo import CVPOConfig

    config = (
        CVPOConfig()
        .environment(env_id)
        .env_runners(num_env_runners=runners, num_envs_per_env_runner=envs_per_runner,
                     create_local_env_runner=runners == 0, rollout_fragment_length=200,
                     num_cpus_per_env_runner=1)
        .learners(num_learners=0)
        .evaluation(evaluation_interval=None)
        .rl_module(model_config={"fcnet_hiddens": [256, 256]})
    )
    algo = config.build_algo()
    try:
        group = algo.env_runner_group
        synchronous_parallel_sample(worker_set=group, max_env_steps=2 * runners * envs_per_runner * 200,
                                    concat=True, _uses_new_env_runners=True)  # warm-up: env construction, first resets
        t0 = time.perf_counter()
        done = 0
        while done < steps:
            episodes = synchronous_parallel_sample(worker_set=group, max_env_steps=steps - done, concat=True,
                                                   _uses_new_env_runners=True)
            done += sum(len(e) for e in episodes)
        return done / (time.perf_counter() - t0)
    finally:
        algo.stop()


def main() -> None:
    import ray

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", action="append", help="task id (repeatable; default both tasks)")
    parser.add_argument("--steps", type=int, default=20_000, help="env steps per measurement")
    parser.add_argument("--runners", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--envs", type=int, nargs="+", default=[1, 4, 8])
    args = parser.parse_args()
    ray.init(num_cpus=max(args.runners) + 1, include_dashboard=False, log_to_driver=False, configure_logging=False)
    print(f"sampling rates, {platform.machine()}, {args.steps} env steps per measurement, resets included")
    for env_id in args.env or TASKS:
        raw = raw_rate(env_id, args.steps)
        print(f"\n{env_id}: raw simulator {raw:,.0f} steps/s (one process, random actions)")
        print(f"  {'runners':>7s} {'envs/runner':>11s} {'steps/s':>9s} {'per core':>9s} {'per core / raw':>14s}")
        for runners in args.runners:
            for envs in args.envs:
                rate = runner_rate(env_id, runners, envs, args.steps)
                print(f"  {runners:7d} {envs:11d} {rate:9,.0f} {rate / runners:9,.0f} {rate / runners / raw:14.0%}",
                      flush=True)


if __name__ == "__main__":
    main()
