"""Latency of the served policy under a burst of concurrent HTTP requests (Ray Serve, one replica), with concurrent
requests batched into one forward pass (``@serve.batch``, the default) and, in the same run, without (one forward
pass per request), and the ratio of their request rates.

    .venv/bin/python benchmarks/serve_latency.py [CHECKPOINT_OR_RUN_DIR] [--requests 2000] [--concurrency 1 8 32 500]

Without a checkpoint it trains a small one on the built-in task first (two iterations). Each request POSTs one
observation and waits for the action and Q_c; latencies are wall-clock per request as the client sees them; requests
refused with 503 (the queue bound) are counted, not timed.
"""

from __future__ import annotations

import argparse
import json
import socket
import tempfile
import time
import urllib.error
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


def _measure(url, bodies, args, policy, label) -> dict:
    def one(i: int):
        t0 = time.perf_counter()
        req = urllib.request.Request(url, data=bodies[i % len(bodies)], method="POST")
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                resp.read()
                return time.perf_counter() - t0
        except urllib.error.HTTPError as err:
            if err.code == 503:
                return None
            raise

    for _ in range(50):
        one(0)  # warm-up
    print(f"{label}: serving {policy.env_id} policy, obs {list(policy.observation_shape)}, one replica, "
          f"{args.requests} requests per row")
    print(f"{'concurrency':>11s} {'req/s':>8s} {'p50 ms':>8s} {'p90 ms':>8s} {'p99 ms':>8s} {'max ms':>8s} {'503':>6s}")
    rates = {}
    for c in args.concurrency:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=c) as pool:
            results = list(pool.map(one, range(args.requests)))
        elapsed = time.perf_counter() - t0
        lat = np.array([r for r in results if r is not None]) * 1e3
        refused = sum(r is None for r in results)
        rates[c] = len(lat) / elapsed
        p50, p90, p99 = np.percentile(lat, [50, 90, 99])
        print(f"{c:11d} {rates[c]:8.0f} {p50:8.1f} {p90:8.1f} {p99:8.1f} {lat.max():8.1f} {refused:6d}", flush=True)
    return rates


def main() -> None:
    import ray
    from ray import serve

    from rllib_cvpo import load_policy
    from rllib_cvpo.serve import start

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 500])
    args = parser.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    checkpoint = args.checkpoint or _small_checkpoint()
    policy = load_policy(checkpoint)
    rng = np.random.default_rng(0)
    low = np.full(policy.observation_shape, -1.0)
    bodies = [json.dumps({"obs": rng.uniform(low, -low).tolist()}).encode() for _ in range(256)]
    rates = {}
    for label, batch in (("batched", None), ("unbatched", 1)):
        port = _free_port()
        start(checkpoint, port=port, **({} if batch is None else {"max_batch_size": batch}))
        url = f"http://127.0.0.1:{port}/"
        rates[label] = _measure(url, bodies, args, policy, label)
        serve.shutdown()
    for c in args.concurrency:
        print(f"{c} concurrent clients: batched / unbatched requests/s = {rates['batched'][c] / rates['unbatched'][c]:.2f}")
    ray.shutdown()


if __name__ == "__main__":
    main()
