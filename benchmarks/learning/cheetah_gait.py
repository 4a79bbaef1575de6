"""How a trained SafetyHalfCheetahVelocity-v1 policy runs: upright or on its back.

HalfCheetah has a well-known local optimum: the body flips over and the policy learns to run on its back, at a
speed that an upright gait beats by far. For each run (or checkpoint) this plays deterministic episodes with its
latest policy (``rllib_cvpo.cvpo.evaluate.run_episodes``, as ``rllib-cvpo evaluate`` does) and prints the return,
the cost, the mean forward velocity of the torso (observation 8) and its pitch (observation 1, in radians; about 0
upright, about pi on its back) with the share of steps spent beyond pi/2.

    .venv/bin/python benchmarks/learning/cheetah_gait.py RUN_DIR [RUN_DIR ...] [--episodes 3] [--which latest]
"""

from __future__ import annotations

import argparse

import numpy as np

from rllib_cvpo.cvpo.evaluate import run_episodes
from rllib_cvpo.policy import load_policy

PITCH, FORWARD_VELOCITY = 1, 8  # qpos[2] (rooty) and qvel[0] (rootx) in HalfCheetah's observation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories, trial directories or checkpoints")
    parser.add_argument("--episodes", type=int, default=3)
    parser.add_argument("--which", default="latest", choices=("latest", "best"))
    parser.add_argument("--env", default="SafetyHalfCheetahVelocity-v1")
    args = parser.parse_args()
    print("| run | return | cost | forward velocity | torso pitch (rad) | steps pitched beyond pi/2 |")
    print("|---|---|---|---|---|---|")
    for run in args.runs:
        policy = load_policy(run, which=args.which)
        seen = []

        def act(obs, policy=policy, seen=seen):
            seen.append(obs[[PITCH, FORWARD_VELOCITY]])
            return policy.act(obs)

        returns, costs, _ = run_episodes(act, args.env, args.episodes, seed=0)
        pitch, velocity = np.asarray(seen).T
        print(f"| {run} | {returns.mean():.1f} | {costs.mean():.1f} | {velocity.mean():.2f} | "
              f"{pitch.mean():+.2f} | {np.mean(np.abs(pitch) > np.pi / 2):.0%} |")


if __name__ == "__main__":
    main()
