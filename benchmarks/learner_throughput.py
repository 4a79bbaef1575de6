"""Full CVPO updates per second on this CPU (critic step + E-step + M-step), with the time split by phase.

    .venv/bin/python benchmarks/learner_throughput.py            # B=256, N=16 and 32, hidden 256x256, threads 1 and 2
    .venv/bin/python benchmarks/learner_throughput.py --profile  # plus a cProfile of the update path

The path measured is the training path: replay.sample -> MultiAgentBatch -> learner_group.update (RLlib's learner
connector, batch conversion, minibatch iteration) -> CVPOTorchLearner._update. Phases: the critic step; the E-step
split into sampling N actions per state and evaluating every critic on all B*N of them (one batched forward per
ensemble) versus the dual solve; the M-step; and everything else (replay sampling, RLlib's connector and batching).
Observations are SafetyPointGoal1-v0's (60 floats), actions 2-D; the replay holds random transitions.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import io
import pstats
import time

import numpy as np
import torch

UPDATES_PER_CALL = 50  # learner updates per training_step at 0.25 updates/step and 200-step fragments


def build(n: int, threads: int, device: str = "cpu"):
    import gymnasium as gym
    import ray
    from ray.rllib.core import DEFAULT_MODULE_ID
    from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch

    from rllib_cvpo import CVPOConfig
    from rllib_cvpo.cvpo.replay import CostReplayBuffer

    torch.set_num_threads(threads)
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    obs_space = gym.spaces.Box(-np.inf, np.inf, (60,), np.float32)
    act_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    config = (
        CVPOConfig()
        .environment(observation_space=obs_space, action_space=act_space)
        .training(num_action_samples=n, train_batch_size_per_learner=256, episode_len=1000)
        .learners(num_learners=0, num_gpus_per_learner=1 if device == "cuda" else 0)
        .rl_module(model_config={"fcnet_hiddens": [256, 256]})
    )
    learner_group = config.build_learner_group(env=None, spaces={DEFAULT_MODULE_ID: (obs_space, act_space)})
    learner = learner_group._learner
    rng = np.random.default_rng(0)
    replay = CostReplayBuffer(100_000, ["cost"], seed=0)
    size = 50_000
    replay._data = {
        "obs": rng.normal(size=(size, 60)).astype(np.float32),
        "actions": rng.uniform(-1, 1, (size, 2)).astype(np.float32),
        "rewards": rng.normal(size=size).astype(np.float32),
        "costs": rng.uniform(0, 1, (size, 1)).astype(np.float32),
        "new_obs": rng.normal(size=(size, 60)).astype(np.float32),
        "terminateds": np.zeros(size, bool),
    }
    replay._size, replay._next = size, 0

    phases = collections.defaultdict(float)
    original = learner.metrics.log_dict

    def recording_log_dict(d, *args, **kwargs):
        for key in ("time_critic_s", "time_estep_s", "time_dual_s", "time_mstep_s"):
            if key in d:
                phases[key] += d[key]
        return original(d, *args, **kwargs)

    learner.metrics.log_dict = recording_log_dict

    def step(updates: int):
        columns = replay.sample(updates * 256)
        batch = MultiAgentBatch({DEFAULT_MODULE_ID: SampleBatch(columns)}, env_steps=len(columns["obs"]))
        learner_group.update(batch=batch, minibatch_size=256, num_epochs=1, shuffle_batch_per_epoch=False,
                             timesteps={"num_env_steps_sampled_lifetime": 10_000})

    return step, phases, learner_group


def measure(n: int, threads: int, calls: int, profile: bool):
    step, phases, group = build(n, threads)
    step(UPDATES_PER_CALL)  # warm-up (allocations, first Adam steps)
    phases.clear()
    prof = cProfile.Profile() if profile else None
    t0 = time.perf_counter()
    if prof:
        prof.enable()
    for _ in range(calls):
        step(UPDATES_PER_CALL)
    if prof:
        prof.disable()
    total = time.perf_counter() - t0
    group.shutdown()
    updates = calls * UPDATES_PER_CALL
    critic, estep_all, dual, mstep = (phases[k] for k in ("time_critic_s", "time_estep_s", "time_dual_s", "time_mstep_s"))
    split = {
        "critic step": critic,
        "E-step: sample + critics on B*N": estep_all - dual,
        "E-step: dual solve": dual,
        "M-step": mstep,
        "replay sample + RLlib batching/connector": total - critic - estep_all - mstep,
    }
    report = None
    if prof:
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(25)
        report = out.getvalue()
    return updates / total, {k: v / total for k, v in split.items()}, 1e3 * total / updates, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=6, help="update calls of 50 updates each")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    print(f"CVPO learner updates on CPU: B=256, hidden 256x256, obs 60, act 2, {UPDATES_PER_CALL} updates per call")
    for n in (16, 32):
        for threads in (1, 2):
            rate, split, ms, report = measure(n, threads, args.calls, args.profile and threads == 1 and n == 32)
            print(f"\nN={n}, torch threads={threads}: {rate:.1f} updates/s ({ms:.1f} ms per update)")
            for name, frac in split.items():
                print(f"  {name:42s} {frac:6.1%}")
            if report:
                print("\nprofile (N=32, 1 thread), by cumulative time:")
                print("\n".join(report.splitlines()[:45]))


if __name__ == "__main__":
    main()
