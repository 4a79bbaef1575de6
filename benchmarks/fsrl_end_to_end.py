"""Ours against FSRL end to end: env steps/s of training on SafetyPointCircle1 at 0.2 updates per env step, one run.

FSRL (liuzuxin/FSRL) is not in the package registry and is not a dependency of this project; its side runs in a Python
of its own (see ``fsrl_updates.py`` for that environment; this side also needs ``safety-gymnasium==1.0.0`` installed
there with ``--no-deps`` plus ``mujoco==2.3.3 xmltodict pyyaml imageio``). Run from this project's environment:

    .venv/bin/python benchmarks/fsrl_end_to_end.py --fsrl ../FSRL --fsrl-python ../fsrl_venv/bin/python

What runs, one after the other, nothing else on the machine:
- FSRL: its ``CVPOAgent`` configuration for SafetyPointCircle1 (``Mujoco2MCfg``: 10 training envs in a
  ``ShmemVectorEnv``, 10 episodes per collect, 0.2 updates per env step, B 256, N 16, 128x128, n-step 3, 2 test
  episodes per epoch), driven by FSRL's own ``FastCollector`` and ``OffpolicyTrainer`` with epochs of one collect
  (5,000 env steps). The rate is FSRL's ``train_speed`` over the epochs after the first: training env steps per
  second of wall time, test episodes left out. Once with FSRL's shipped ``thread=4`` and once per ``--fsrl-threads``.
- Ours: ``rllib-cvpo train``'s defaults for the task with ``updates_per_env_step: 0.2`` and evaluation off, timed by
  ``pipeline.py``'s ``training_rate`` after the random warm-up: env steps sampled per second of wall time.
The ratio is taken against FSRL's fastest configuration.

safety-gymnasium 1.0.0 needs two of this project's import fixes on Python 3.11 (the ndarray dataclass defaults and
the multi-agent import); FSRL's side takes them from ``rllib_cvpo/envs/compat.py``, loaded by path (it imports only
the standard library and numpy). gymnasium 0.28.1, which FSRL's tianshou needs, is what safety-gymnasium was written
for, so no other fix applies there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
UPDATES_PER_ENV_STEP = 0.2


def _import_safety_gymnasium():
    """FSRL side: safety-gymnasium with fixes 2 and 3 of rllib_cvpo/envs/compat.py (gymnasium 0.28.1 needs no other)."""
    import importlib
    import importlib.util
    import pkgutil

    if "safety_gymnasium" in sys.modules:
        return sys.modules["safety_gymnasium"]
    spec = importlib.util.spec_from_file_location("_cvpo_compat", os.path.join(HERE, "..", "rllib_cvpo", "envs",
                                                                               "compat.py"))
    compat = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compat)
    with compat._robotics_placeholder(), compat._ndarray_defaults_as_factories():
        sg = importlib.import_module("safety_gymnasium")
        assets = importlib.import_module("safety_gymnasium.assets")
        for info in pkgutil.walk_packages(assets.__path__, prefix="safety_gymnasium.assets."):
            importlib.import_module(info.name)
    return sg


def fsrl_side(args) -> dict:
    """Runs in FSRL's Python: FSRL's agent set-up, collector and trainer, as its train_cvpo_agent.py drives them."""
    sys.path.insert(0, args.fsrl)
    sys.path.insert(0, HERE)  # fsrl_agent.py
    _import_safety_gymnasium()
    import gymnasium as gym
    import numpy as np
    import torch
    from tianshou.data import VectorReplayBuffer
    from tianshou.env import DummyVectorEnv, ShmemVectorEnv

    from fsrl.data import FastCollector
    from fsrl.trainer import OffpolicyTrainer
    from fsrl.utils import BaseLogger
    from fsrl_agent import build_cvpo

    task = "SafetyPointCircle1Gymnasium-v0"
    # Mujoco2MCfg (fsrl/config/cvpo_cfg.py) for SafetyPointCircle1, as CVPOAgent builds it.
    seed = 10
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(args.threads)
    env = gym.make(task)
    logger = BaseLogger()
    policy = build_cvpo(env.observation_space, env.action_space, max_episode_steps=env.spec.max_episode_steps,
                        logger=logger, deterministic_eval=True, action_scaling=True, action_bound_method="clip")
    episode_per_collect, training_num, testing_num = 10, 20, 2
    worker = {"ShmemVectorEnv": ShmemVectorEnv, "DummyVectorEnv": DummyVectorEnv}[args.worker]

    def make():
        _import_safety_gymnasium()
        return gym.make(task)

    train_envs = worker([make for _ in range(min(training_num, episode_per_collect))])
    test_envs = worker([make for _ in range(testing_num)])
    policy.train()
    buffer = VectorReplayBuffer(200_000, len(train_envs))
    train_collector = FastCollector(policy, train_envs, buffer, exploration_noise=True)
    test_collector = FastCollector(policy, test_envs)
    steps_per_epoch = episode_per_collect * env.spec.max_episode_steps  # one collect per epoch
    trainer = OffpolicyTrainer(policy=policy, train_collector=train_collector, test_collector=test_collector,
                               max_epoch=1 + args.epochs, batch_size=256, cost_limit=25.0,
                               step_per_epoch=steps_per_epoch, update_per_step=UPDATES_PER_ENV_STEP,
                               episode_per_test=testing_num, episode_per_collect=episode_per_collect,
                               logger=logger, verbose=False, show_progress=False)
    marks = []
    for _ in trainer:  # after each epoch: (training env steps, wall time less test time)
        marks.append((train_collector.collect_step, time.time() - trainer.start_time - test_collector.collect_time))
    (s0, t0), (s1, t1) = marks[0], marks[-1]
    train_envs.close()
    test_envs.close()
    return {"rate": (s1 - s0) / (t1 - t0), "steps": s1 - s0, "updates": trainer.gradient_steps,
            "threads": torch.get_num_threads(), "worker": args.worker, "envs": min(training_num, episode_per_collect)}


def our_side(iterations: int) -> dict:
    sys.path.insert(0, HERE)
    import ray
    import torch
    from pipeline import training_rate

    from rllib_cvpo.training import build_config

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    config = build_config(env="SafetyPointCircle1-v0",
                          overrides={"updates_per_env_step": UPDATES_PER_ENV_STEP, "evaluation_interval": None})
    algo = config.build_algo()
    try:
        rate = training_rate(algo, iterations)
        return {"rate": rate, "threads": torch.get_num_threads(), "runners": config.num_env_runners,
                "envs": config.num_envs_per_env_runner}
    finally:
        algo.stop()
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fsrl", help="FSRL's source tree (the directory holding the fsrl package)")
    parser.add_argument("--fsrl-python", help="a Python with FSRL's dependencies and safety-gymnasium")
    parser.add_argument("--fsrl-threads", type=int, nargs="*", default=[1],
                        help="torch threads of further FSRL runs, beside its shipped thread=4")
    parser.add_argument("--epochs", type=int, default=3, help="FSRL epochs of 5,000 env steps timed after the first")
    parser.add_argument("--iterations", type=int, default=6, help="our training iterations timed after warm-up")
    parser.add_argument("--side", choices=["fsrl"], help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=4, help=argparse.SUPPRESS)
    parser.add_argument("--worker", default="ShmemVectorEnv", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.epochs < 1:
        parser.error(f"--epochs must be at least 1 (epochs timed after the first), got {args.epochs}")
    if args.side == "fsrl":
        print(json.dumps(fsrl_side(args)))
        return
    if not (args.fsrl and args.fsrl_python):
        parser.error("--fsrl and --fsrl-python are required")
    print(f"SafetyPointCircle1, {UPDATES_PER_ENV_STEP} updates per env step, {platform.machine()} with "
          f"{os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M')}")
    fsrl = []
    for threads in [4] + [t for t in args.fsrl_threads if t != 4]:
        out = subprocess.run([args.fsrl_python, os.path.abspath(__file__), "--side", "fsrl", "--fsrl", args.fsrl,
                              "--threads", str(threads), "--epochs", str(args.epochs)],
                             check=True, capture_output=True, text=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        fsrl.append(result)
        print(f"  FSRL, {result['envs']} envs in a {result['worker']}, {result['threads']} torch thread(s): "
              f"{result['rate']:7.1f} env steps/s ({result['steps']} steps timed)", flush=True)
    ours = our_side(args.iterations)
    print(f"  ours, {ours['runners']} EnvRunner x {ours['envs']} envs, learner on {ours['threads']} torch thread(s): "
          f"{ours['rate']:7.1f} env steps/s")
    best = max(r["rate"] for r in fsrl)
    print(f"  ours / FSRL's fastest: {ours['rate'] / best:.2f}x")


if __name__ == "__main__":
    main()
