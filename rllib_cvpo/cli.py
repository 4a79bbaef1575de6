"""The ``rllib-cvpo`` command: train, evaluate, plot, envs.

Bad input (unknown env, bad cost limit, missing or unreadable checkpoint, unknown config key, ...) is reported in
one line on stderr with exit code 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from rllib_cvpo import DEFAULT_ENV, DEFAULT_TOTAL_ENV_STEPS, __version__


class UsageError(Exception):
    """Bad input: reported as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: one line and exit 2, like ours
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def _cost_limit(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _int_at_least(low: int, words: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"expected {words}, got {text!r}")
        return value

    return parse


_positive_int = _int_at_least(1, "a positive integer")


def _port(text: str) -> int:
    value = _int_at_least(1, "a port number from 1 to 65535")(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"expected a port number from 1 to 65535, got {text!r}")
    return value
_nonneg_int = _int_at_least(0, "an integer >= 0")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rllib-cvpo", description="CVPO safe RL on Ray RLlib")
    parser.add_argument("--version", action="version", version=f"rllib-cvpo {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = sub.add_parser("train", help="train CVPO on a task (through Ray Tune, on an embedded local Ray by default)")
    train.add_argument("--env", default=None, help=f"task id (default {DEFAULT_ENV}; `rllib-cvpo envs` lists them), "
                       "or MODULE:ENV_ID for an env that importing MODULE registers with gymnasium")
    train.add_argument("--import", dest="import_module", default=None, metavar="MODULE",
                       help="import MODULE first, which registers --env (the same as --env MODULE:ENV_ID)")
    train.add_argument("--cost-limit", type=_cost_limit, default=None, help="episodic cost limit d (default 25)")
    train.add_argument("--total-env-steps", type=_positive_int, default=None,
                       help=f"env steps to train (default {DEFAULT_TOTAL_ENV_STEPS})")
    train.add_argument("--env-runners", type=_nonneg_int, default=None,
                       help="remote EnvRunners (default 1; 0 samples in the learner's process)")
    train.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    train.add_argument("--config", default=None, help="YAML file of CVPOConfig settings (setting: value)")
    train.add_argument("--output", default=None, help="directory for run directories (default ./runs)")
    train.add_argument("--name", default=None, help="run directory name (default <env>_seed<seed>_<time>)")
    train.add_argument("--logger", action="append", default=None, choices=["tensorboard", "mlflow", "wandb"],
                       help="experiment tracking, repeatable: tensorboard (event files in the run directory, always "
                            "written), mlflow (to MLFLOW_TRACKING_URI, else ./mlruns) or wandb (Weights & Biases)")
    train.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue an interrupted run")
    train.add_argument("--address", default=None, help="join an existing Ray cluster (default: a local Ray)")

    ev = sub.add_parser("evaluate", help="deterministic (or --stochastic) episodes of a trained policy")
    ev.add_argument("checkpoint", help="a checkpoint directory, a run directory (its best feasible checkpoint) or a "
                    "sweep directory (the checkpoint its report names best)")
    ev.add_argument("--episodes", type=_positive_int, default=10)
    ev.add_argument("--import", dest="import_module", default=None, metavar="MODULE",
                    help="import MODULE first, which registers the checkpoint's env with gymnasium")
    ev.add_argument("--stochastic", action="store_true",
                    help="act with the exploring (stochastic) policy, whose cost the E-step constrains, instead of "
                         "the deterministic one (tanh of the mean)")
    ev.add_argument("--latest", action="store_true",
                    help="for a run directory: its latest checkpoint instead of its best feasible one")
    ev.add_argument("--seed", type=int, default=0, help="seed of the first episode (then seed+1, ...)")
    ev.add_argument("--video", default=None, metavar="DIR", help="write MP4 videos of the episodes to DIR")
    ev.add_argument("--video-episodes", type=_positive_int, default=1, help="episodes to record (default 1)")
    ev.add_argument("--json", action="store_true", help="print the results as JSON")

    plot = sub.add_parser("plot", help="return and cost curves of one or more runs (seeds) on one figure")
    plot.add_argument("runs", nargs="+", metavar="RUN_DIR")
    plot.add_argument("--out", default="curves.png", help="PNG file to write (default curves.png)")
    plot.add_argument("--title", default=None)
    plot.add_argument("--baseline", nargs="+", default=None, metavar="RUN_DIR",
                      help="runs drawn beside them in grey, e.g. the same budget with the cost limit lifted")

    ex = sub.add_parser("export", help="write the deterministic policy as a file that runs without Ray "
                                       "(TorchScript or ONNX)")
    ex.add_argument("checkpoint", help="a checkpoint directory, or a run directory (its best feasible checkpoint)")
    ex.add_argument("--out", default="policy.pt", help="file to write (default policy.pt)")
    ex.add_argument("--format", default="torchscript", choices=["torchscript", "onnx"],
                    help="torchscript (torch.jit.load; needs torch only, default) or onnx (any ONNX runtime)")
    ex.add_argument("--latest", action="store_true",
                    help="for a run directory: its latest checkpoint instead of its best feasible one")

    sub.add_parser("envs", help="the supported tasks with observation and action sizes and episode length")

    sw = sub.add_parser("sweep", help="run a Ray Tune sweep from a YAML file (tune_configs/)")
    sw.add_argument("file", help="sweep file (schema: tune_configs/README.md)")
    sw.add_argument("--storage", default="sweeps", help="local path or URI (s3://, gs://, a shared filesystem) "
                                                         "for results and checkpoints (default ./sweeps)")
    sw.add_argument("--address", default=None, help="join an existing Ray cluster (default: a local Ray)")
    sw.add_argument("--resume", action="store_true", help="continue an interrupted sweep (finished trials are kept)")

    rp = sub.add_parser("report", help="table, best feasible configuration, CSV and Pareto plot of a sweep")
    rp.add_argument("sweep_dir")
    rp.add_argument("--out", default=None, help="directory for report.csv, trials.csv, pareto.png (default: sweep dir)")
    rp.add_argument("--last", type=_positive_int, default=1, help="average the last N iterations' evaluations (default 1)")

    sv = sub.add_parser("serve", help="serve a trained policy over HTTP with Ray Serve")
    sv.add_argument("checkpoint", help="a checkpoint directory, or a run directory (its best feasible checkpoint)")
    sv.add_argument("--port", type=_port, default=8000, help="HTTP port, 1-65535 (default 8000)")
    sv.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0 for all)")
    sv.add_argument("--replicas", type=_positive_int, default=1)
    sv.add_argument("--address", default=None, help="join an existing Ray cluster (default: a local Ray)")
    return parser


# -- train ---------------------------------------------------------------------------------------------------------
def cmd_train(args) -> int:
    from rllib_cvpo.checkpoints import RunDirInUse
    from rllib_cvpo.envs import UnknownEnvError
    from rllib_cvpo.training import ConfigFileError, build_config, load_config_file, resume_training, run_training

    if args.resume:
        given = [flag for flag, value in (("--env", args.env), ("--import", args.import_module),
                                           ("--cost-limit", args.cost_limit), ("--total-env-steps", args.total_env_steps),
                                           ("--env-runners", args.env_runners), ("--seed", args.seed),
                                           ("--config", args.config), ("--output", args.output),
                                           ("--name", args.name), ("--logger", args.logger)) if value is not None]
        if given:
            raise UsageError(f"--resume continues a run with its own settings and directory: drop {', '.join(given)}")
        try:
            outcome = resume_training(Path(args.resume), address=args.address)
        except (FileNotFoundError, ValueError, RunDirInUse) as err:
            raise UsageError(str(err).splitlines()[0]) from None
        return _exit_code(outcome)

    if args.import_module:
        if args.env is None or ":" in args.env:
            raise UsageError(f"--import {args.import_module} names the module that registers --env: give --env "
                             f"ENV_ID (got {args.env!r}), or drop --import and give --env MODULE:ENV_ID")
        args.env = f"{args.import_module}:{args.env}"  # gymnasium's form: every process imports the module
    try:
        overrides = load_config_file(args.config) if args.config else {}
    except ConfigFileError as err:
        raise UsageError(str(err)) from None
    total = overrides.pop("total_env_steps", DEFAULT_TOTAL_ENV_STEPS)
    if isinstance(total, str):  # YAML 1.1 reads 1.5e5 (no sign in the exponent) as a string
        try:
            total = float(total)
        except ValueError:
            pass
    if isinstance(total, float) and total.is_integer():
        total = int(total)
    if isinstance(total, bool) or not isinstance(total, int) or total < 1:
        raise UsageError(f"{args.config}: total_env_steps must be a positive whole number of env steps, "
                         f"got {total!r}")
    total = args.total_env_steps or total
    try:
        config = build_config(args.env, args.cost_limit, args.seed, args.env_runners, overrides)
    except UnknownEnvError as err:
        raise UsageError(str(err)) from None
    except (ValueError, TypeError) as err:
        raise UsageError(str(err).splitlines()[0]) from None
    name = args.name or f"{config.env.split(':')[-1]}_seed{config.seed}_{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(args.output or "runs").resolve() / name
    if (run_dir / "tuner.pkl").exists():
        raise UsageError(f"run directory {str(run_dir)!r} exists: use --resume {run_dir} or another --name")
    print(f"training CVPO on {config.env}, cost limit {config.cost_limit}, {total} env steps, seed {config.seed}"
          f"\nrun directory: {run_dir}", flush=True)
    try:
        outcome = run_training(config, total, run_dir, address=args.address,
                               run_info={"config_file": args.config, "overrides": overrides},
                               loggers=args.logger or ())
    except (ValueError, RunDirInUse) as err:
        raise UsageError(str(err)) from None
    return _exit_code(outcome)


def is_uri(path) -> bool:
    from rllib_cvpo.storage import is_uri as uri

    return uri(path)


def _import(module: str) -> None:
    import importlib

    try:
        importlib.import_module(module)
    except ImportError as err:
        raise UsageError(f"--import {module}: {err}") from None


def _exit_code(outcome) -> int:
    return {"finished": 0, "interrupted": 130, "error": 1}[outcome["status"]]


# -- evaluate ------------------------------------------------------------------------------------------------------
def cmd_evaluate(args) -> int:
    import numpy as np

    from rllib_cvpo.policy import CheckpointError, load_policy

    if args.import_module:
        _import(args.import_module)
    which = "latest" if args.latest else "best"
    shown = None
    try:
        if is_uri(args.checkpoint):  # remote storage: mirror it, then download the checkpoint used
            from rllib_cvpo.policy import resolve_checkpoint
            from rllib_cvpo.storage import fetch_checkpoint, mirror, remote_path

            local_root, _ = mirror(args.checkpoint)
            chosen = resolve_checkpoint(local_root, which)
            fetch_checkpoint(args.checkpoint, local_root, chosen)
            shown = remote_path(args.checkpoint, local_root, chosen)
            policy = load_policy(chosen)
        else:
            policy = load_policy(args.checkpoint, which=which)
    except (CheckpointError, FileNotFoundError) as err:
        raise UsageError(str(err)) from None
    from rllib_cvpo.cvpo.evaluate import run_episodes

    if not policy.env_id:
        raise UsageError(f"checkpoint {str(policy.checkpoint)!r} does not name its env")
    try:
        act = policy.act
        if args.stochastic:
            rng = np.random.default_rng(args.seed)
            act = lambda obs: policy.sample(obs, rng)  # noqa: E731
        returns, costs, videos = run_episodes(act, policy.env_id, args.episodes, args.seed, args.video,
                                              args.video_episodes)
    except ValueError as err:
        raise UsageError(str(err)) from None
    limit = policy.cost_limit
    limit_total = float(sum(limit.values())) if isinstance(limit, dict) else float(limit)
    over = float(np.mean(costs > limit_total))
    out = {
        "checkpoint": shown or str(policy.checkpoint), "env": policy.env_id, "episodes": int(args.episodes),
        "policy": "stochastic" if args.stochastic else "deterministic",
        "return_mean": float(returns.mean()), "return_std": float(returns.std()),
        "cost_mean": float(costs.mean()), "cost_std": float(costs.std()), "cost_limit": limit_total,
        "over_limit_fraction": over, "returns": returns.tolist(), "costs": costs.tolist(),
        "videos": [str(v) for v in videos],
    }
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{policy.env_id}: {args.episodes} {out['policy']} episodes from {out['checkpoint']}")
        print(f"return {out['return_mean']:.2f} +- {out['return_std']:.2f}")
        print(f"cost   {out['cost_mean']:.2f} +- {out['cost_std']:.2f} (limit {limit_total:g}); "
              f"over the limit in {over:.0%} of episodes")
        for v in videos:
            print(f"video: {v}")
    return 0


# -- plot, envs ----------------------------------------------------------------------------------------------------
def cmd_plot(args) -> int:
    from rllib_cvpo.runs import plot_runs

    for run in args.runs + (args.baseline or []):
        if not Path(run).is_dir():
            raise UsageError(f"run directory not found: {run!r}")
    try:
        path = plot_runs(args.runs, args.out, title=args.title, baseline=args.baseline)
    except FileNotFoundError as err:
        raise UsageError(str(err)) from None
    print(f"wrote {path}")
    return 0


def cmd_envs(args) -> int:
    import numpy as np

    from rllib_cvpo.envs import SafetyGymnasiumMissing, episode_length, make_env, supported_env_ids

    print(f"{'task':36s} {'obs':>5s} {'act':>4s} {'T':>6s}")
    for env_id in supported_env_ids():
        try:
            env = make_env(env_id)
        except SafetyGymnasiumMissing as err:
            raise UsageError(str(err).splitlines()[0]) from None
        obs, act = int(np.prod(env.observation_space.shape)), int(np.prod(env.action_space.shape))
        env.close()
        print(f"{env_id:36s} {obs:>5d} {act:>4d} {episode_length(env_id) or '-':>6}")
    print("any registered gymnasium env whose step info reports a numeric 'cost' works too (--env ID)")
    return 0


# -- sweep, report, serve -----------------------------------------------------------------------------------------
def cmd_sweep(args) -> int:
    from rllib_cvpo.checkpoints import RunDirInUse
    from rllib_cvpo.sweep import load_sweep, run_sweep
    from rllib_cvpo.training import ConfigFileError

    try:
        spec = load_sweep(args.file)
    except ConfigFileError as err:
        raise UsageError(str(err)) from None
    try:
        grid = run_sweep(spec, args.storage, address=args.address, resume=args.resume)
    except (FileNotFoundError, FileExistsError, RunDirInUse) as err:
        raise UsageError(str(err)) from None
    except ValueError as err:
        raise UsageError(str(err).splitlines()[0]) from None
    errors = [r.error for r in grid if r.error is not None]
    print(f"{len(grid)} trials, {len(errors)} failed; results: {grid.experiment_path}")  # noqa
    where = str(grid.experiment_path)
    if is_uri(args.storage):  # the URI as given (scheme and query included), the sweep's name inserted
        base, _, query = args.storage.partition("?")
        where = f"{base.rstrip('/')}/{spec['name']}" + (f"?{query}" if query else "")
        where = f"'{where}'" if query else where
    print(f"report: rllib-cvpo report {where}")
    return 1 if errors else 0


def cmd_report(args) -> int:
    import pandas as pd

    from rllib_cvpo.sweep import report

    local, out_dir = args.sweep_dir, args.out
    try:
        if is_uri(args.sweep_dir):  # remote storage: a local mirror of its results; the files written go here
            from rllib_cvpo.storage import mirror

            local, _ = mirror(args.sweep_dir)
            out_dir = out_dir or Path.cwd() / f"{local.name}_report"
        elif not Path(args.sweep_dir).is_dir():
            raise UsageError(f"sweep directory not found: {args.sweep_dir!r}")
        out = report(local, out_dir, last_k=args.last)
    except FileNotFoundError as err:
        raise UsageError(str(err)) from None
    with pd.option_context("display.max_columns", 30, "display.width", 200):
        print(out["table"].to_string(index=False, float_format=lambda x: f"{x:.2f}"))
    best = out["best"]
    if best is not None:
        kind = "best feasible configuration" if best["feasible"] else "no feasible configuration; least violating"
        keys = [k for k in out["trials"].attrs.get("search_keys", [])]
        desc = ", ".join(f"{k}={best[k]}" for k in keys) or f"cost_limit={best['cost_limit']}"
        print(f"{kind}: {desc}: return {best['return_mean']:.2f}, cost {best['cost_mean']:.2f} "
              f"(limit {best['cost_limit']:g})")
        checkpoint = best["checkpoint"]
        if is_uri(args.sweep_dir) and checkpoint:
            from rllib_cvpo.storage import remote_path

            checkpoint = remote_path(args.sweep_dir, local, Path(checkpoint))
        print(f"checkpoint: {checkpoint}")
    print(f"wrote {out['csv']}, {out['csv'].parent / 'trials.csv'}, {out['png']}")
    return 0


def cmd_export(args) -> int:
    from rllib_cvpo.export import export_policy
    from rllib_cvpo.policy import CheckpointError

    try:
        out = export_policy(args.checkpoint, args.out, args.format, which="latest" if args.latest else "best")
    except (CheckpointError, ValueError) as err:
        raise UsageError(str(err)) from None
    how = f"torch.jit.load({str(out)!r})" if args.format == "torchscript" else "onnxruntime.InferenceSession(...)"
    print(f"wrote {out} ({args.format}): observation [B, ...] -> action in the env's units; load with {how}")
    return 0


def cmd_serve(args) -> int:
    import signal

    import ray
    from ray import serve

    from rllib_cvpo.policy import CheckpointError, load_policy
    from rllib_cvpo.serve import port_problem, start
    from rllib_cvpo.training import _init_ray

    problem = port_problem(args.host, args.port)  # before anything starts: one server per port
    if problem:
        raise UsageError(f"{problem}: another server (perhaps another rllib-cvpo serve) listens there; choose "
                         "another --port")
    try:
        load_policy(args.checkpoint)  # fail here, in one line, rather than inside a replica
    except CheckpointError as err:
        raise UsageError(str(err)) from None
    _init_ray(args.address)
    if _serve_running():
        raise UsageError("Ray Serve already runs on this cluster (another rllib-cvpo serve?): stop it first, or "
                         "serve from another cluster; its HTTP port is fixed when it starts")
    stop = []
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    try:
        start(args.checkpoint, port=args.port, host=args.host, num_replicas=args.replicas)
        print(f"serving {args.checkpoint} at http://{args.host}:{args.port}/ (GET: metadata, POST {{\"obs\": [...]}}: "
              "actions); Ctrl-C stops", flush=True)
        while not stop:
            time.sleep(0.5)
    except KeyboardInterrupt:  # Ctrl-C, also while the deployment is still starting
        pass
    print("stopping", flush=True)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
    # This command started Serve, so it stops it: its HTTP proxy releases the port, on a shared cluster too.
    serve.shutdown()
    if args.address is None:
        ray.shutdown()
    return 0


def _serve_running() -> bool:
    """Whether Ray Serve's controller runs on the connected cluster."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    except ValueError:
        return False
    return True


def main(argv=None) -> int:
    import signal

    parser = build_parser()
    args = parser.parse_args(argv)
    # Ctrl-C must reach us even when the parent started this process with SIGINT ignored (a disposition that
    # children inherit, and Python then keeps).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
    try:
        commands = {"train": cmd_train, "evaluate": cmd_evaluate, "plot": cmd_plot, "envs": cmd_envs,
                    "sweep": cmd_sweep, "report": cmd_report, "serve": cmd_serve, "export": cmd_export}
        return commands[args.command](args)
    except UsageError as err:
        print(f"rllib-cvpo: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
