"""CVPO learner updates per second (CPU, or a GPU with --device cuda) against the time of its own dense matmuls.

    .venv/bin/python benchmarks/learner_throughput.py                       # FSRL's Circle settings, 256x256, N 32
    .venv/bin/python benchmarks/learner_throughput.py --before ../old-tree  # and an older checkout, side by side
    .venv/bin/python benchmarks/learner_throughput.py --profile             # plus torch's op profile of one call
    python benchmarks/learner_throughput.py --device cuda --settings fsrl-circle b-4096 n-64 b-4096-n-64  # a GPU

For each setting (default: B 256, N 16, hidden 128x128, obs 28, act 2 = FSRL's SafetyPointCircle1 settings; then
hidden 256x256; then N 32), with one torch thread unless --threads says otherwise, it prints:
- training path: updates/s through what training runs: the learner's replay.sample -> Learner.update (a checkout
  from before the replay moved into the learners: replay.sample -> MultiAgentBatch -> learner_group.update)
  (RLlib's batch conversion and minibatch iteration) -> CVPOTorchLearner._update, 50 updates per call;
- update alone: updates/s of ``_update`` on a minibatch already in tensors;
- matmuls alone: the time of every dense matmul one update runs (forward and backward, captured from a real update
  with a TorchDispatchMode and replayed on the same shapes), and the ratio update / matmuls: how close the update
  runs to the arithmetic it cannot avoid. The two are timed in 5 alternating rounds and each is its best round, so
  the ratio is a property of the code, nearly independent of how fast or busy the machine is;
- the update's phases (critic step, E-step critics, dual, M-step) from the learner's own timers.

Each (checkout, setting) runs in a fresh process, so allocator settings and warm caches do not leak between them.
``--before DIR`` measures the rllib_cvpo package in DIR (e.g. ``git worktree add ../old-tree HEAD~5``) in the same
run, interleaved with this one, and prints the ratio of their training-path rates; ``--repeat K`` alternates the two
K times and compares each one's best, so that a slow stretch of the machine does not fall on one side only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

UPDATES_PER_CALL = 50  # learner updates per training_step at 0.25 updates/step and 200-step fragments
SETTINGS = {  # name: (B, N, hidden, obs dim)
    "fsrl-circle": (256, 16, 128, 28),
    "hidden-256": (256, 16, 256, 28),
    "n-32": (256, 32, 128, 28),
    # Larger batches and more action samples, for a GPU learner (--device cuda --settings fsrl-circle b-4096 ...).
    "n-64": (256, 64, 128, 28),
    "b-4096": (4096, 16, 128, 28),
    "b-4096-n-64": (4096, 64, 128, 28),
}
MATMUL_OPS = ("mm", "addmm", "bmm", "baddbmm", "mv", "addmv", "dot")


def _build(batch: int, n: int, hidden: int, obs_dim: int, twin_q: bool, gpu: bool = False, **training):
    import gymnasium as gym
    import numpy as np
    import ray
    from ray.rllib.core import DEFAULT_MODULE_ID

    from rllib_cvpo import CVPOConfig
    from rllib_cvpo.cvpo.replay import CostReplayBuffer

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    obs_space = gym.spaces.Box(-np.inf, np.inf, (obs_dim,), np.float32)
    act_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    config = (
        CVPOConfig()
        .environment(observation_space=obs_space, action_space=act_space)
        .training(num_action_samples=n, train_batch_size_per_learner=batch, episode_len=1000, twin_q=twin_q,
                  **training)
        .learners(num_learners=0, num_gpus_per_learner=1 if gpu else 0)
        .rl_module(model_config={"fcnet_hiddens": [hidden, hidden]})
    )
    group = config.build_learner_group(env=None, spaces={DEFAULT_MODULE_ID: (obs_space, act_space)})
    rng = np.random.default_rng(0)
    # A full buffer of 50k transitions (_next wraps to 0), so the newest rows the E-step draws from
    # (estep_recent_steps) lie inside the arrays.
    size = 50_000
    replay = CostReplayBuffer(size, ["cost"], seed=0)
    replay._data = {
        "obs": rng.normal(size=(size, obs_dim)).astype(np.float32),
        "actions": rng.uniform(-1, 1, (size, 2)).astype(np.float32),
        "rewards": rng.normal(size=size).astype(np.float32),
        "costs": rng.uniform(0, 1, (size, 1)).astype(np.float32),
        "new_obs": rng.normal(size=(size, obs_dim)).astype(np.float32),
        "terminateds": np.zeros(size, np.float32),
    }
    replay._size, replay._next = size, 0
    if hasattr(group._learner, "replay"):  # the replay lives in the learner (a checkout from before: in the driver)
        group._learner.replay = replay
    return group, replay


def _capture_matmuls(fn):
    """Run ``fn`` once and return the dense matmul calls it made (aten op, cloned arguments), forward and backward."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    calls = []

    def clone(x):
        return x.detach().clone() if isinstance(x, torch.Tensor) else x

    class Capture(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func.overloadpacket.__name__ in MATMUL_OPS:
                calls.append((func, [clone(a) for a in args], {k: clone(v) for k, v in kwargs.items()}))
            return func(*args, **kwargs)

    with Capture():
        fn()
    return calls


def measure(batch: int, n: int, hidden: int, obs_dim: int, threads: int, calls: int, twin_q: bool,
            profile: bool, training: dict | None = None, gpu: bool = False) -> dict:
    import torch
    from ray.rllib.core import DEFAULT_MODULE_ID
    from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch

    group, replay = _build(batch, n, hidden, obs_dim, twin_q, gpu, **(training or {}))
    torch.set_num_threads(threads)  # after the build: the learner sets its own (learner_num_threads) when built
    learner = group._learner
    device = getattr(learner, "_device", torch.device("cpu"))
    # A GPU runs the queued kernels after the host returns: each timed stretch ends when they have finished.
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    phases: dict = {}
    # Each update's metrics pass through one method (an older checkout: MetricsLogger.log_dict); the phase timers
    # are summed from there.
    owner, name = (learner, "_log_update_metrics") if hasattr(learner, "_log_update_metrics") else \
        (learner.metrics, "log_dict")
    original = getattr(owner, name)

    def recording(*args, **kwargs):
        d = args[-1] if name == "_log_update_metrics" else args[0]
        for key in ("time_critic_s", "time_estep_s", "time_dual_s", "time_mstep_s"):
            if key in d:
                phases[key] = phases.get(key, 0.0) + d[key]
        return original(*args, **kwargs)

    setattr(owner, name, recording)

    def training_call():
        if hasattr(learner, "update_from_replay"):
            learner.update_from_replay(UPDATES_PER_CALL, {"num_env_steps_sampled_lifetime": 10_000})
            return
        columns = replay.sample(UPDATES_PER_CALL * batch)
        mab = MultiAgentBatch({DEFAULT_MODULE_ID: SampleBatch(columns)}, env_steps=len(columns["obs"]))
        group.update(batch=mab, minibatch_size=batch, num_epochs=1, shuffle_batch_per_epoch=False,
                     timesteps={"num_env_steps_sampled_lifetime": 10_000})

    training_call()  # warm-up: allocations, first optimizer steps
    phases.clear()
    sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        training_call()
    sync()
    training_s = time.perf_counter() - t0
    updates = calls * UPDATES_PER_CALL
    split = {k: 1e3 * v / updates for k, v in phases.items()}

    columns = replay.sample(batch)
    tensors = learner._convert_batch_type(
        MultiAgentBatch({DEFAULT_MODULE_ID: SampleBatch(columns)}, env_steps=batch)).policy_batches

    def one_update():
        learner._update(tensors)

    ops = _capture_matmuls(one_update)

    def matmuls():
        for func, args, kwargs in ops:
            func(*args, **kwargs)

    for _ in range(5):
        one_update()
    host_syncs = None
    if device.type == "cuda":  # the update's host synchronisations, counted by torch's sync debug mode
        import warnings

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            one_update()
            torch.cuda.set_sync_debug_mode("default")
        host_syncs = sorted({str(w.message).splitlines()[0][:120] for w in caught}), len(caught)
    # The update alone and its matmuls alone, alternating in rounds; each figure is its best round, so a stretch in
    # which the machine runs slowly does not land on one side of the ratio only.
    rounds = 5
    per_round = max(updates // rounds, 10)
    update_s = matmul_s = float("inf")
    with torch.no_grad():
        matmuls()
    for _ in range(rounds):
        sync()
        t0 = time.perf_counter()
        for _ in range(per_round):
            one_update()
        sync()
        update_s = min(update_s, (time.perf_counter() - t0) / per_round)
        with torch.no_grad():
            t0 = time.perf_counter()
            for _ in range(per_round):
                matmuls()
            sync()
            matmul_s = min(matmul_s, (time.perf_counter() - t0) / per_round)
    flops = 0
    for func, args, _ in ops:
        name = func.overloadpacket.__name__
        a, b = (args[1], args[2]) if name.startswith("add") or name == "baddbmm" else (args[0], args[1])
        flops += 2 * a.numel() * (b.shape[-1] if b.dim() > 1 else 1)
    report = None
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            training_call()
        report = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=40)
    group.shutdown()
    return {
        "training_updates_per_s": updates / training_s,
        "update_ms": 1e3 * update_s,
        "matmul_ms": 1e3 * matmul_s,
        "matmul_ops": len(ops),
        "matmul_gflops": flops / matmul_s / 1e9,
        "phases_ms": split,
        "profile": report,
        "device": str(device),
        "host_syncs": host_syncs,
    }


def _child(args) -> None:
    source = args.child_source
    if source:
        sys.path.insert(0, source)
    batch, n, hidden, obs_dim = SETTINGS[args.child_setting]
    training = {} if source or not args.estep_first_critic else {"estep_twin_min": False}
    result = measure(batch, n, hidden, obs_dim, args.threads, args.calls, not args.single_q, args.profile, training,
                     gpu=args.device == "cuda")
    import rllib_cvpo

    result["package"] = str(Path(rllib_cvpo.__file__).parent)
    print("RESULT " + json.dumps(result))


def _run_child(setting: str, source: str | None, args) -> dict:
    cmd = [sys.executable, __file__, "--child-setting", setting, "--threads", str(args.threads),
           "--calls", str(args.calls)]
    if source:
        cmd += ["--child-source", source]
    if args.single_q:
        cmd.append("--single-q")
    if args.estep_first_critic:
        cmd.append("--estep-first-critic")
    if args.profile:
        cmd.append("--profile")
    if args.device != "cpu":
        cmd += ["--device", args.device]
    env = dict(os.environ)
    if source:  # the other checkout's package first on the path, in the child only
        env["PYTHONPATH"] = source + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=source or None)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"benchmark child failed ({setting}, {source or 'this checkout'}):\n{out.stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=6, help="training-path calls of 50 updates each")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--before", metavar="DIR", help="a checkout whose rllib_cvpo to measure side by side")
    parser.add_argument("--repeat", type=int, default=1,
                        help="measure each checkout this many times, alternating (this, before, this, ...); the "
                             "ratios compare each one's best")
    parser.add_argument("--single-q", action="store_true", help="one reward critic (twin_q=False), as FSRL's default")
    parser.add_argument("--estep-first-critic", action="store_true",
                        help="this checkout only: the E-step evaluates the first twin reward critic alone "
                             "(estep_twin_min=False)")
    parser.add_argument("--profile", action="store_true", help="print torch's op profile of one training call")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="the learner's device (cuda: num_gpus_per_learner=1, the local learner on GPU 0)")
    parser.add_argument("--child-setting", help=argparse.SUPPRESS)
    parser.add_argument("--child-source", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_setting:
        _child(args)
        return
    if args.device == "cuda":
        import torch

        print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    print(f"CVPO learner on {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads "
          f"{args.threads}, twin_q={not args.single_q}, {UPDATES_PER_CALL} updates per training call"
          + (", this checkout with estep_twin_min=False" if args.estep_first_critic else ""))
    sources = [("this", None)] + ([("before", str(Path(args.before).resolve()))] if args.before else [])
    for setting in args.settings:
        batch, n, hidden, obs_dim = SETTINGS[setting]
        print(f"\n{setting}: B {batch}, N {n}, hidden {hidden}x{hidden}, obs {obs_dim}")
        runs: dict = {label: [] for label, _ in sources}
        for _ in range(args.repeat):
            for label, source in sources:
                r = _run_child(setting, source, args)
                runs[label].append(r)
                phases = ", ".join(f"{k[5:-2]} {v:.2f}" for k, v in r["phases_ms"].items())
                print(f"  {label:6s} training path {r['training_updates_per_s']:6.1f} updates/s | update alone "
                      f"{1e3 / r['update_ms']:6.1f}/s ({r['update_ms']:.2f} ms) | matmuls alone {r['matmul_ms']:.2f} "
                      f"ms ({r['matmul_ops']} ops, {r['matmul_gflops']:.0f} GFLOP/s) | update/matmuls "
                      f"{r['update_ms'] / r['matmul_ms']:.2f}")
                print(f"         phases (ms per update): {phases} | on {r['device']}")
                if r.get("host_syncs"):
                    kinds, count = r["host_syncs"]
                    print(f"         host synchronisations in one update: {count}: {kinds}")
                if r.get("profile"):
                    print(r["profile"])
        best = {label: {"training_updates_per_s": max(r["training_updates_per_s"] for r in rs),
                        "update_ms": min(r["update_ms"] for r in rs)} for label, rs in runs.items()}
        if args.repeat > 1:
            for label, b in best.items():
                print(f"  {label:6s} best of {args.repeat}: training path {b['training_updates_per_s']:.1f} updates/s, "
                      f"update alone {b['update_ms']:.2f} ms")
        if "before" in best:
            this, before = best["this"], best["before"]
            print(f"  this / before: training path {this['training_updates_per_s'] / before['training_updates_per_s']:.2f}x,"
                  f" update alone {before['update_ms'] / this['update_ms']:.2f}x")


if __name__ == "__main__":
    main()
