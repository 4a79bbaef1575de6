"""The ``rllib-cvpo`` command."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict

DEFAULT_ENV = "SafetyPointCircle1-v0"


class UsageError(Exception):
    """Bad input: reported as one line, exit code 2."""


def _nonneg_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rllib-cvpo", description="CVPO safe RL on Ray RLlib")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train CVPO on a task (embedded local Ray by default)")
    train.add_argument("--env", default=DEFAULT_ENV, help=f"task id (default {DEFAULT_ENV})")
    train.add_argument("--cost-limit", type=_nonneg_float, default=25.0, help="episodic cost limit d (default 25)")
    train.add_argument("--total-env-steps", type=_positive_int, default=60_000, help="env steps to train (default 60k)")
    train.add_argument("--env-runners", type=int, default=1, help="remote EnvRunners (default 1; 0 samples in-process)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--output", default="runs", help="directory for run folders (default ./runs)")
    train.add_argument("--address", default=None, help="join an existing Ray cluster instead of a local one")

    sub.add_parser("envs", help="list the supported tasks")
    return parser


def _config(args) -> Any:
    from rllib_cvpo import CVPOConfig

    return (
        CVPOConfig()
        .environment(args.env)
        .env_runners(num_env_runners=args.env_runners, create_local_env_runner=args.env_runners == 0,
                     rollout_fragment_length=100)
        .learners(num_learners=0)
        .training(cost_limit=args.cost_limit, gamma=0.99, num_steps_sampled_before_learning_starts=5_000,
                  updates_per_env_step=0.25)
        .reporting(min_sample_timesteps_per_iteration=5_000)
        .evaluation(evaluation_interval=1, evaluation_duration=2, evaluation_num_env_runners=0)
        .debugging(seed=args.seed)
    )


def _line(result: Dict[str, Any], limit: float, total: int, started: float) -> str:
    runners = result.get("env_runners", {})
    evaluation = result.get("evaluation", {}).get("env_runners", {})
    learner = result.get("learners", {}).get("default_policy", {})
    steps = int(result.get("num_env_steps_sampled_lifetime", 0))
    elapsed = time.time() - started
    left = elapsed / max(steps, 1) * max(total - steps, 0)

    def f(x):
        return "   -  " if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:7.2f}"

    return (f"[{steps:>8d}/{total}] return {f(runners.get('episode_return_mean'))}  cost {f(runners.get('episode_cost'))}"
            f" (limit {limit:g})  eval return {f(evaluation.get('episode_return_mean'))} cost "
            f"{f(evaluation.get('episode_cost'))}  lambda {f(learner.get('lambda'))}  "
            f"{elapsed / 60:5.1f} min, ~{left / 60:4.1f} min left")


def cmd_train(args) -> int:
    import ray

    from rllib_cvpo.envs import UnknownEnvError, episode_length

    try:
        episode_length(args.env)
    except UnknownEnvError as err:
        raise UsageError(str(err)) from None
    run_dir = Path(args.output) / f"{args.env}_seed{args.seed}_{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    ray.init(address=args.address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    algo = _config(args).build_algo()
    started = time.time()
    print(f"training CVPO on {args.env}, cost limit {args.cost_limit:g}, {args.total_env_steps} env steps -> {run_dir}")
    history = []
    try:
        while True:
            result = algo.train()
            row = {
                "env_steps": int(result["num_env_steps_sampled_lifetime"]),
                "episode_return": result["env_runners"].get("episode_return_mean"),
                "episode_cost": result["env_runners"].get("episode_cost"),
                "eval_return": result.get("evaluation", {}).get("env_runners", {}).get("episode_return_mean"),
                "eval_cost": result.get("evaluation", {}).get("env_runners", {}).get("episode_cost"),
            }
            history.append(row)
            with open(run_dir / "progress.jsonl", "a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(_line(result, args.cost_limit, args.total_env_steps, started), flush=True)
            if row["env_steps"] >= args.total_env_steps:
                break
    except KeyboardInterrupt:
        print("interrupted: saving a checkpoint")
    checkpoint = algo.save_to_path(str((run_dir / "checkpoint").resolve()))
    algo.stop()
    print(f"done in {(time.time() - started) / 60:.1f} min; checkpoint: {checkpoint}")
    return 0


def cmd_envs(args) -> int:
    from rllib_cvpo.envs import episode_length, supported_env_ids

    for env_id in supported_env_ids():
        print(f"{env_id:40s} T={episode_length(env_id)}")
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return {"train": cmd_train, "envs": cmd_envs}[args.command](args)
    except UsageError as err:
        print(f"rllib-cvpo: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
