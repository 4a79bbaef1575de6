"""FSRL's CVPO update rate on this CPU, for a side-by-side comparison with ``learner_throughput.py``.

FSRL (liuzuxin/FSRL) is not in the package registry and is not a dependency of this project. Run this script with a
Python of its own that has FSRL's dependencies (FSRL pins tianshou~=0.5.0, which needs numpy < 2), giving FSRL's
source tree with --fsrl:

    git clone https://github.com/liuzuxin/FSRL ../FSRL
    python3 -m venv ../fsrl_venv && ../fsrl_venv/bin/pip install torch==2.13.0 -e ../FSRL
    ../fsrl_venv/bin/python benchmarks/fsrl_updates.py --fsrl ../FSRL

or, where GitHub is out of reach, FSRL's release from the package registry (``fast-safe-rl`` 0.1.0; its wandb needs
numpy < 2, pkg_resources and sentry-sdk 1's Hub), giving the directory that holds the installed ``fsrl`` package:

    python3 -m venv ../fsrl_venv && ../fsrl_venv/bin/pip install torch==2.13.0 fast-safe-rl==0.1.0 "numpy<2" \
        "setuptools<81" "sentry-sdk<2"
    ../fsrl_venv/bin/python benchmarks/fsrl_updates.py --fsrl $(../fsrl_venv/bin/python -c "import fsrl, os; print(os.path.dirname(os.path.dirname(fsrl.__file__)))")
    .venv/bin/python benchmarks/learner_throughput.py --settings fsrl-circle --single-q     # ours, right after

Only ``fsrl.policy.CVPO`` and ``fsrl.utils.net.continuous.SingleCritic`` are imported (with what they import).

It builds FSRL's CVPO as ``fsrl.agent.CVPOAgent`` does (``fsrl_agent.py``: tianshou ``Net`` + ``ActorProb`` actor,
one ``SingleCritic`` for the reward and one for the cost, orthogonal init, a diagonal Gaussian), fills a ``VectorReplayBuffer`` of FSRL's
size (200k, 2 sub-buffers, 500-step episodes, random data with a cost in ``info``), and times what FSRL's off-policy
trainer runs per update: ``policy.update(batch_size, buffer)`` (sampling, n-step targets through the target critics,
critic step, E-step, M-step, Polyak update), with ``pre_update_fn`` once per round of updates and
``post_update_fn`` (pi_old copy) after it, as the trainer does. Settings: FSRL's SafetyPointCircle1 ones (B 256,
N 16 sampled actions, hidden 128x128, observation 28, action 2, n-step 3, gamma 0.995), one torch thread.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fsrl", required=True, help="FSRL's source tree (the directory holding the fsrl package)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--samples", type=int, default=16, help="N: actions sampled per state in the E-step")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--obs", type=int, default=28)
    parser.add_argument("--rounds", type=int, default=6, help="timed rounds of --updates updates")
    parser.add_argument("--updates", type=int, default=50, help="updates per round (pre/post_update_fn around them)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    sys.path.insert(0, args.fsrl)

    import gymnasium as gym
    import numpy as np
    import torch
    from tianshou.data import Batch, VectorReplayBuffer

    from fsrl_agent import build_cvpo

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    obs_space = gym.spaces.Box(-np.inf, np.inf, (args.obs,), np.float32)
    act_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    policy = build_cvpo(obs_space, act_space, hidden=args.hidden, samples=args.samples)

    size, envs, horizon = 200_000, 2, 500
    buffer = VectorReplayBuffer(size, envs)
    t0 = time.perf_counter()
    for t in range(size // envs):
        end = (t + 1) % horizon == 0
        buffer.add(Batch(obs=rng.standard_normal((envs, args.obs), np.float32),
                         act=rng.uniform(-1, 1, (envs, 2)).astype(np.float32),
                         rew=rng.standard_normal(envs).astype(np.float32),
                         terminated=np.zeros(envs, bool), truncated=np.full(envs, end),
                         obs_next=rng.standard_normal((envs, args.obs), np.float32),
                         info=Batch(cost=rng.integers(0, 2, envs).astype(np.float32))),
                   buffer_ids=list(range(envs)))
    fill = time.perf_counter() - t0
    policy.train()

    def round_of_updates():
        policy.pre_update_fn()
        for _ in range(args.updates):
            policy.update(args.batch, buffer)
        policy.post_update_fn()

    round_of_updates()  # warm
    rates = []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        round_of_updates()
        rates.append(args.updates / (time.perf_counter() - t0))
    print(f"FSRL CVPO, {platform.machine()} with {torch.get_num_threads()} torch thread(s): B {args.batch}, "
          f"N {args.samples}, hidden {args.hidden}x{args.hidden}, obs {args.obs}, buffer {len(buffer)} "
          f"(filled in {fill:.0f} s)")
    print(f"  policy.update: {np.median(rates):.1f} updates/s (median of {args.rounds} rounds of {args.updates}; "
          f"min {min(rates):.1f}, max {max(rates):.1f})")


if __name__ == "__main__":
    main()
