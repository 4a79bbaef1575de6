"""How a trained SafetyHalfCheetahVelocity-v1 policy runs: upright or on its back.

HalfCheetah has a well-known local optimum: the body flips over and the policy learns to run on its back, at a
speed that an upright gait beats by far. For each run (or checkpoint) this plays deterministic episodes with its
latest policy and prints the return, the cost, the mean forward velocity and the torso's pitch (observation 1, in
radians; about 0 upright, about pi on its back) with the share of steps spent beyond pi/2.

    .venv/bin/python benchmarks/learning/cheetah_gait.py RUN_DIR [RUN_DIR ...] [--episodes 3] [--which latest]
"""

from __future__ import annotations

import argparse

import numpy as np

from rllib_cvpo.envs import import_safety_gymnasium
from rllib_cvpo.policy import load_policy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories, trial directories or checkpoints")
    parser.add_argument("--episodes", type=int, default=3)
    parser.add_argument("--which", default="latest", choices=("latest", "best"))
    parser.add_argument("--env", default="SafetyHalfCheetahVelocity-v1")
    args = parser.parse_args()
    sg = import_safety_gymnasium()
    print("| run | return | cost | forward velocity | torso pitch (rad) | steps pitched beyond pi/2 |")
    print("|---|---|---|---|---|---|")
    for run in args.runs:
        policy = load_policy(run, which=args.which)
        env = sg.make(args.env)
        returns, costs, velocities, pitches = [], [], [], []
        for episode in range(args.episodes):
            obs, _ = env.reset(seed=episode)
            ret = cost = 0.0
            done = False
            while not done:
                obs, reward, step_cost, terminated, truncated, info = env.step(policy.act(obs))
                ret, cost = ret + reward, cost + step_cost
                velocities.append(info["x_velocity"])
                pitches.append(obs[1])
                done = terminated or truncated
            returns.append(ret)
            costs.append(cost)
        pitch = np.asarray(pitches)
        print(f"| {run} | {np.mean(returns):.1f} | {np.mean(costs):.1f} | {np.mean(velocities):.2f} | "
              f"{pitch.mean():+.2f} | {np.mean(np.abs(pitch) > np.pi / 2):.0%} |")
        env.close()


if __name__ == "__main__":
    main()
