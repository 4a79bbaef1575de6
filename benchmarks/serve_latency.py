"""Latency of the served policy under a burst of concurrent HTTP requests (Ray Serve, one replica).

    .venv/bin/python benchmarks/serve_latency.py [CHECKPOINT_OR_RUN_DIR] [--requests 2000] [--concurrency 1 8 32]

Without a checkpoint it trains a small one on the built-in task first (two iterations). Each request POSTs one
observation and waits for the action and Q_c; latencies are wall-clock per request as the client sees them.
"""

from __future__ import annotations

import argparse
import json
import socket
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _small_checkpoint() -> str:
    from rllib_cvpo import CVPOConfig

    algo = (CVPOConfig().environment("SpeedLimit-v0").env_runners(num_env_runners=0)
            .training(num_steps_sampled_before_learning_starts=400, train_batch_size_per_learner=64)
            .reporting(min_sample_timesteps_per_iteration=400).build_algo())
    for _ in range(2):
        algo.train()
    path = algo.save_to_path(tempfile.mkdtemp(prefix="cvpo_serve_"))
    algo.stop()
    return path


def main() -> None:
    import ray

    from rllib_cvpo import load_policy
    from rllib_cvpo.serve import start

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    args = parser.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    checkpoint = args.checkpoint or _small_checkpoint()
    policy = load_policy(checkpoint)
    port = _free_port()
    start(checkpoint, port=port)
    url = f"http://127.0.0.1:{port}/"
    rng = np.random.default_rng(0)
    low = np.full(policy.observation_shape, -1.0)
    bodies = [json.dumps({"obs": rng.uniform(low, -low).tolist()}).encode() for _ in range(256)]

    def one(i: int) -> float:
        t0 = time.perf_counter()
        req = urllib.request.Request(url, data=bodies[i % len(bodies)], method="POST")
        with urllib.request.urlopen(req, timeout=60) as resp:
            resp.read()
            assert resp.status == 200
        return time.perf_counter() - t0

    for _ in range(50):
        one(0)  # warm-up
    print(f"serving {policy.env_id} policy, obs {list(policy.observation_shape)}, one replica, {args.requests} "
          "requests per row")
    print(f"{'concurrency':>11s} {'req/s':>8s} {'p50 ms':>8s} {'p90 ms':>8s} {'p99 ms':>8s} {'max ms':>8s}")
    for c in args.concurrency:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=c) as pool:
            lat = np.array(list(pool.map(one, range(args.requests)))) * 1e3
        rate = args.requests / (time.perf_counter() - t0)
        p50, p90, p99 = np.percentile(lat, [50, 90, 99])
        print(f"{c:11d} {rate:8.0f} {p50:8.1f} {p90:8.1f} {p99:8.1f} {lat.max():8.1f}", flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
