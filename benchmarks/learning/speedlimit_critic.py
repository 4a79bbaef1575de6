"""Is the cost critic biased under constraint pressure on the built-in task? On-policy Q_c against its true value.

    .venv/bin/python benchmarks/learning/speedlimit_critic.py --n-step 1
    .venv/bin/python benchmarks/learning/speedlimit_critic.py --n-step 3 --qc-nonnegative

SpeedLimit-v0's segments are drawn independently of the past, so under a fixed policy every state has the same
future: the true Q_c(s, a) is c(s, a) + gamma / (1 - gamma) * cbar (episodes bootstrap at their time limit), and its
mean over the policy's own (s, a) pairs is cbar / (1 - gamma), with cbar the policy's mean cost per step. This trains
the learning test's configuration (limit 25, which the unconstrained policy exceeds ninefold) and, every 4
iterations, plays 10 episodes with the stochastic policy, averaging the learner's cost critic over the visited
(s, a) pairs against cbar / (1 - gamma).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))


def calibration(algo, gamma: float, episodes: int = 10, seed: int = 123) -> tuple[float, float, float]:
    """(mean Q_c over the stochastic policy's (s, a), its true mean cbar / (1 - gamma), mean episode cost)."""
    import torch

    from rllib_cvpo.envs import make_env

    module = algo.learner_group._learner.module["default_policy"].unwrapped()
    env = make_env("SpeedLimit-v0")
    rng = np.random.default_rng(seed)
    q_values, costs = [], []
    for episode in range(episodes):
        obs, _ = env.reset(seed=seed + episode)
        done = False
        while not done:
            with torch.no_grad():
                x = torch.as_tensor(obs[None], dtype=torch.float32)
                mean, std = module.policy(x)
                action = torch.tanh(mean + std * torch.as_tensor(rng.standard_normal(mean.shape), dtype=torch.float32))
                _, qc = module.q_values(x, action, combine=False)
            q_values.append(float(qc.mean()))
            obs, _, terminated, truncated, info = env.step(action.numpy()[0])
            costs.append(info["cost"])
            done = terminated or truncated
    cbar = float(np.mean(costs))
    return float(np.mean(q_values)), cbar / (1.0 - gamma), cbar * len(costs) / episodes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-step", type=int, default=1)
    parser.add_argument("--qc-nonnegative", action="store_true")
    parser.add_argument("--env-steps", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import ray
    from test_learning import learning_config

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    config = learning_config(args.seed).training(n_step=args.n_step, qc_nonnegative=args.qc_nonnegative)
    algo = config.build_algo()
    try:
        iteration = 0
        while True:
            result = algo.train()
            iteration += 1
            steps = result["num_env_steps_sampled_lifetime"]
            if iteration % 4 == 0 or steps >= args.env_steps:
                q, true, episode_cost = calibration(algo, config.gamma)
                lam = result["learners"]["default_policy"].get("lambda", float("nan"))
                print(f"n_step {args.n_step} seed {args.seed} env steps {int(steps)}: Q_c {q:.2f}, true {true:.2f}, "
                      f"ratio {q / max(true, 1e-9):.2f}; stochastic episode cost {episode_cost:.1f}; lambda {lam:.3f}",
                      flush=True)
            if steps >= args.env_steps:
                break
    finally:
        algo.stop()


if __name__ == "__main__":
    main()
