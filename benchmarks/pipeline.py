"""Sampling, learning and the whole training loop, each measured alone, in one run, with the command's defaults.

    .venv/bin/python benchmarks/pipeline.py                         # SafetyPointCircle1-v0, both loops
    .venv/bin/python benchmarks/pipeline.py --iterations 6 --no-evaluation
    .venv/bin/python benchmarks/pipeline.py --no-evaluation --loops overlapped --rounds 5 --iterations 2 --seconds 15
    python benchmarks/pipeline.py --env-runners 14 --gpu --loops overlapped   # many EnvRunners, a GPU learner
    python benchmarks/pipeline.py --env-runners 6 --gpu --set train_batch_size_per_learner=4096 updates_per_env_step=0.015

Three rates in env steps per second, measured one after the other in this process on the same configuration
(``rllib-cvpo train``'s: one remote EnvRunner with 8 envs, the learner in the driver, 0.25 updates per env step):
- sampling only: the EnvRunner's ``sample()`` called back to back (the stochastic policy acting);
- learner only: ``LearnerGroup.update`` on replayed minibatches, in updates/s divided by the updates per env step
  (the env-step rate the learner could sustain);
- training: ``Algorithm.train()`` after the random warm-up, env steps sampled per second of wall time, with
  sampling overlapped with learning (``overlap_sampling``, the default) and without.
The learner runs on the torch threads ``learner_num_threads`` gives it by default (one beside an overlapped EnvRunner
on two cores, two in the synchronous loop); "learner only" is measured at each loop's own thread count.
Sampling and learning share the machine's two cores in the full loop, so the full loop cannot beat the slower stage
measured alone; the ratio full / slowest says how much of it the loop keeps. With ``--no-evaluation`` the
deterministic evaluation episodes after each iteration are left out (they are extra env steps, not training).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np


def build(overlap: bool, evaluation: bool, env: str, env_runners: int = 1, gpu: bool = False,
          settings: dict | None = None):
    from rllib_cvpo.training import build_config

    overrides = {**(settings or {}), "overlap_sampling": overlap}
    if not evaluation:
        overrides["evaluation_interval"] = None
    if gpu:
        overrides["num_gpus_per_learner"] = 1
    return build_config(env=env, env_runners=env_runners, overrides=overrides).build_algo()


def sampling_rate(algo, seconds: float) -> float:
    group = algo.env_runner_group
    group.foreach_env_runner(lambda r: r.sample(), local_env_runner=False)  # warm
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        steps += sum(group.foreach_env_runner(lambda r: sum(len(e) for e in r.sample()), local_env_runner=False))
    return steps / (time.perf_counter() - t0)


def learner_rate(algo, seconds: float) -> float:
    cfg = algo.config
    updates, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:  # each learner: 50 updates on minibatches from its own replay shard
        algo.learner_group.foreach_learner(
            lambda learner: learner.update_from_replay(50, {"num_env_steps_sampled_lifetime": 10**6}))
        updates += 50
    return updates / (time.perf_counter() - t0) / cfg.updates_per_env_step


def _steps(result) -> float:
    return result["env_runners"]["num_env_steps_sampled_lifetime"]


def warm_up(algo) -> None:
    """Train past the random warm-up, with the learner running."""
    while _steps(algo.train()) < algo.config.num_steps_sampled_before_learning_starts + 5000:
        pass


def training_rate(algo, iterations: int) -> float:
    start = _steps(algo.train())
    t0 = time.perf_counter()
    for _ in range(iterations):
        end = _steps(algo.train())
    return (end - start) / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="SafetyPointCircle1-v0")
    parser.add_argument("--seconds", type=float, default=30.0, help="per stage measured alone")
    parser.add_argument("--iterations", type=int, default=4, help="training iterations timed per loop")
    parser.add_argument("--no-evaluation", action="store_true")
    parser.add_argument("--env-runners", type=int, default=1, help="remote EnvRunners (default 1, the command's)")
    parser.add_argument("--gpu", action="store_true", help="the learner on GPU 0 (num_gpus_per_learner=1)")
    parser.add_argument("--loops", nargs="+", choices=["overlapped", "synchronous"],
                        default=["overlapped", "synchronous"])
    parser.add_argument("--rounds", type=int, default=1,
                        help="alternate the full loop and the learner alone this many times per loop and report the "
                             "median of the rounds' ratios: the machine's speed drifts from minute to minute, and a "
                             "ratio of two rates measured back to back cancels most of it")
    parser.add_argument("--set", nargs="+", default=[], metavar="SETTING=VALUE",
                        help="CVPOConfig settings over the command's defaults, e.g. train_batch_size_per_learner=4096 "
                             "updates_per_env_step=0.015")
    args = parser.parse_args()
    import yaml

    settings = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set takes SETTING=VALUE, got {item!r}")
        settings[key] = yaml.safe_load(value)
    import ray

    cpus = 2 if args.env_runners <= 1 else os.cpu_count()
    ray.init(num_cpus=cpus, num_gpus=1 if args.gpu else 0, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    print(f"{args.env}, the command's defaults, {platform.machine()} with {os.cpu_count()} CPUs (Ray: {cpus}), "
          f"{args.env_runners} EnvRunner(s), learner on {'GPU' if args.gpu else 'CPU'}"
          f"{', no evaluation' if args.no_evaluation else ', 10 evaluation episodes per iteration'}"
          + (f", {settings}" if settings else ""), flush=True)
    import torch

    rates, threads = {}, {}
    for overlap in (loop == "overlapped" for loop in args.loops):
        loop = "overlapped" if overlap else "synchronous"
        algo = build(overlap, not args.no_evaluation, args.env, args.env_runners, args.gpu, settings)
        try:
            threads[loop] = torch.get_num_threads()  # the learner's (learner_num_threads, automatic here)
            warm_up(algo)
            # Each rate is printed as soon as it is measured, so a run cut short still reports what it finished.
            for r in range(args.rounds):
                full = training_rate(algo, args.iterations)
                print(f"  measured: full loop, {loop}, round {r + 1}: {full:.1f} env steps/s", flush=True)
                if "sampling only" not in rates:
                    rates["sampling only"] = sampling_rate(algo, args.seconds)
                    print(f"  measured: sampling only: {rates['sampling only']:.1f} env steps/s", flush=True)
                alone = learner_rate(algo, args.seconds)
                print(f"  measured: learner only, {loop}, round {r + 1}: {alone:.1f} env steps/s", flush=True)
                rates.setdefault(loop, []).append((full, alone))
        finally:
            algo.stop()
    for loop in args.loops:
        rounds = np.array(rates[loop])
        ratios = rounds[:, 0] / np.minimum(rates["sampling only"], rounds[:, 1])
        print(f"  {loop} loop, learner on {threads[loop]} torch thread(s), {len(rounds)} round(s):")
        print(f"    learner only  {' '.join(f'{x:8.1f}' for x in rounds[:, 1])} env steps/s")
        print(f"    full loop     {' '.join(f'{x:8.1f}' for x in rounds[:, 0])} env steps/s")
        print(f"    full / slower stage  {' '.join(f'{x:8.0%}' for x in ratios)}  (median {np.median(ratios):.0%})")
    print(f"  sampling only   {rates['sampling only']:8.1f} env steps/s")

if __name__ == "__main__":
    main()
