"""What one E-step can do to the cost on a checkpoint's own data, against the noise of the batch it sees.

For each checkpoint: K batches of B replay states drawn as the learner draws them (uniformly from its replay), N
actions per state from pi_old, the target critics' Q_r (the twin minimum) and Q_c, the E-step thresholds of the run
at that point (its cost feedback's offset included). It prints
- the within-state spread of Q_r and Q_c over the N actions, and the spread of the batch's mean Q_c across batches;
- the reach of the KL ball: how far q can move the batch's mean Q_c at eps (reward-greedy, lambda 0, and
  cost-greedy, lambda at its bound);
- for each estep_constraint_rate kappa, the share of batches whose exact dual is slack (lambda 0), interior, or at
  lambda's bound (infeasible);
- with --hazard-lidar (a navigation task's hazard lidar, e.g. 28:44 for SafetyPointGoal1-v0, whose lidar reads
  1 - d / 3 of the nearest hazard in each bin), the same within-state spreads split by the nearest hazard's distance:
  where no hazard is near, an action changes the cost-to-go little, and a large Q_c spread there is the critic's.

    .venv/bin/python benchmarks/learning/estep_reach.py RUN_DIR/checkpoint_000053 [--batches 200] [--rates 1 0.1 0.05 0.02]
    .venv/bin/python benchmarks/learning/estep_reach.py RUN_DIR/checkpoint_000035 --hazard-lidar 28:44
"""

from __future__ import annotations

import argparse
import os
import pickle

import numpy as np
import torch

from rllib_cvpo.cvpo import estep
from rllib_cvpo.cvpo.cvpo import CVPOConfig
from rllib_cvpo.cvpo.torch.cvpo_torch_rl_module import CVPOTorchRLModule
from ray.rllib.core.rl_module.rl_module import RLModule


def load(checkpoint: str):
    checkpoint = os.path.abspath(checkpoint)
    ctor = pickle.load(open(os.path.join(checkpoint, "class_and_ctor_args.pkl"), "rb"))["ctor_args_and_kwargs"]
    settings = ctor[0][0]
    config = CVPOConfig().update_from_dict(settings)
    module_dir = os.path.join(checkpoint, "learner_group", "learner", "rl_module", "default_policy")
    module = RLModule.from_checkpoint(module_dir)
    assert isinstance(module, CVPOTorchRLModule)
    module.make_target_networks()
    module.set_state(pickle.load(open(os.path.join(module_dir, "module_state.pkl"), "rb")))
    algo_state = pickle.load(open(os.path.join(checkpoint, "algorithm_state.pkl"), "rb"))
    shard = algo_state["cvpo_replay_buffer"]["shards"][0]
    obs = shard["data"]["obs"][: shard["size"]]
    offset = np.asarray(algo_state.get("cost_feedback_offset", {}).get("offset", np.zeros(1)), np.float64)
    return config, module, obs, offset


def sampled_q(module, obs: torch.Tensor, n: int, gen: torch.Generator):
    """The E-step's view of a batch: N actions per state from pi_old, the target critics' Q_r (twin minimum)
    ``[B, N]`` and Q_c ``[B, N, m]``, in float64."""
    b = obs.shape[0]
    with torch.no_grad():
        mean, std = module.policy(obs, module.pi_old)
        u = mean + std * torch.randn(n, *mean.shape, generator=gen)
        qr, qc = module.q_values_sampled(obs, torch.tanh(u), target=True)
    return qr.min(0).values.reshape(n, b).t().double(), qc.reshape(-1, n, b).permute(2, 1, 0).double()


def kl_ball_eta(z: torch.Tensor, eps: float) -> float:
    """eta at which softmax(z / eta) over each state's N samples has mean KL eps to uniform (bisection)."""
    n = z.shape[1]
    lo, hi = -12.0, 12.0
    for _ in range(80):
        eta = float(np.exp((lo + hi) / 2))
        w = torch.softmax(z / eta, 1)
        kl = float((w * torch.log(w * n + 1e-300)).sum(1).mean())
        lo, hi = ((lo + hi) / 2, hi) if kl > eps else (lo, (lo + hi) / 2)
    return eta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--rates", type=float, nargs="+", default=[1.0, 0.1, 0.05, 0.02])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hazard-lidar", default=None, metavar="START:END",
                        help="observation columns of the hazard lidar (max_dist 3): spreads by the nearest hazard")
    args = parser.parse_args()
    for checkpoint in args.checkpoints:
        config, module, replay_obs, offset = load(checkpoint)
        rng, gen = np.random.default_rng(args.seed), torch.Generator().manual_seed(args.seed)
        b, n = config.train_batch_size_per_learner, config.num_action_samples
        factor = estep.qc_threshold(1.0, config.gamma, config.horizon)
        thresholds = [t - factor * o for t, o in zip(config.qc_thresholds(10**12), offset)]
        spreads, means, reach, counts = [], [], [], {r: np.zeros(3, int) for r in args.rates}
        for _ in range(args.batches):
            obs = torch.as_tensor(replay_obs[rng.integers(0, len(replay_obs), b)], dtype=torch.float32)
            qr, qc = sampled_q(module, obs, n, gen)
            spreads.append((float(qr.std(1).mean()), float(qc[..., 0].std(1).mean())))
            means.append(float(qc[..., 0].mean()))
            base = float(qc[..., 0].mean())
            up = torch.softmax(qr / kl_ball_eta(qr, config.estep_kl), 1)
            z_down = -qc[..., 0]
            down = torch.softmax(z_down / kl_ball_eta(z_down, config.estep_kl), 1)
            reach.append((float((down * qc[..., 0]).sum(1).mean()) - base, float((up * qc[..., 0]).sum(1).mean()) - base))
            for rate in args.rates:
                t = estep.rate_thresholds(estep.batch_mean_qc(qc), thresholds, rate) if rate < 1 else thresholds
                sol = estep.solve_dual_newton(estep.DualProblem(qr, qc, config.estep_kl, t), config.eta_init,
                                              [config.lambda_init] * qc.shape[-1], eta_min=config.eta_min,
                                              eta_max=config.eta_max, lam_max=config.lambda_max)
                lam = float(sol.lam[0])
                counts[rate][0 if lam <= 1e-6 else 2 if sol.lam_at_bound[0] else 1] += 1
        spreads, reach = np.array(spreads), np.array(reach)
        print(f"{checkpoint}\n  env {config.env}, threshold {thresholds[0]:.3f} (offset {offset[0]:.1f}), "
              f"eps {config.estep_kl}, B {b}, N {n}, {args.batches} batches")
        print(f"  within a state, over the N actions: Q_r sd {spreads[:, 0].mean():.4f}, Q_c sd {spreads[:, 1].mean():.4f}")
        print(f"  the batch's mean Q_c: {np.mean(means):.3f}, sd across batches {np.std(means):.4f}")
        print(f"  the KL ball's reach on the batch's mean Q_c: cost-greedy {reach[:, 0].mean():+.4f}, "
              f"reward-greedy {reach[:, 1].mean():+.4f}")
        for rate, c in counts.items():
            print(f"  kappa {rate:<5g}: slack {c[0] / args.batches:5.0%}  interior {c[1] / args.batches:5.0%}  "
                  f"at the bound {c[2] / args.batches:5.0%}")
        if args.hazard_lidar:
            spreads_by_hazard(module, config, replay_obs, args.hazard_lidar, args.batches * b, args.seed)


def spreads_by_hazard(module, config, replay_obs, columns: str, states: int, seed: int) -> None:
    """Within-state sd of Q_r (twin minimum) and Q_c over N actions from pi_old, by the nearest hazard's distance."""
    start, end = (int(x) for x in columns.split(":"))
    rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    obs = torch.as_tensor(replay_obs[rng.integers(0, len(replay_obs), states)], dtype=torch.float32)
    qr, qc = sampled_q(module, obs, config.num_action_samples, gen)
    qc = qc[..., 0]
    nearest = 3.0 * (1.0 - obs[:, start:end].max(1).values)  # lidar 1 - d / max_dist, max_dist 3
    print("  by the nearest hazard (distance from its centre; hazards have radius 0.2):")
    for name, m in (("within 0.5", nearest < 0.5), ("0.5 to 1.5", (nearest >= 0.5) & (nearest < 1.5)),
                    ("beyond 1.5", nearest >= 1.5)):
        if m.any():
            print(f"    {name:10s} {float(m.float().mean()):6.1%} of states: Q_r sd {float(qr.std(1)[m].mean()):.4f}, "
                  f"Q_c sd {float(qc.std(1)[m].mean()):.4f}, mean Q_c {float(qc[m].mean()):.3f}")


if __name__ == "__main__":
    main()
