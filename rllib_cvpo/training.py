"""Training through Ray Tune as a single trial: configuration from defaults, a YAML file and options; a live
progress bar; the latest and the best feasible checkpoint kept; Ctrl-C saves a checkpoint; ``--resume`` continues."""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

from ray.tune import Callback

from rllib_cvpo import DEFAULT_ENV, DEFAULT_TOTAL_ENV_STEPS  # noqa: F401 - re-exported
from rllib_cvpo.checkpoints import run_dir_lock
from rllib_cvpo.runs import RUN_FILE, find_checkpoints, plot_runs, read_results, summary_table, trial_dirs


class ConfigFileError(ValueError):
    """A YAML config file that cannot be used; the message names the file, the line and the key."""


def config_keys() -> set:
    """Every setting a YAML config may set: CVPOConfig's attributes (RLlib's and CVPO's, including those behind a
    property such as ``train_batch_size_per_learner``), ``model_config``, and ``total_env_steps`` (the run's
    length for ``rllib-cvpo train``)."""
    from rllib_cvpo import CVPOConfig

    config = CVPOConfig()
    public = {k for k in vars(config) if not k.startswith("_")}
    behind_property = {k[1:] for k in vars(config)
                       if k.startswith("_") and not k.startswith("__") and isinstance(getattr(CVPOConfig, k[1:], None), property)}
    return public | behind_property | {"model_config", "total_env_steps"}


def read_yaml(path: str | Path, what: str):
    """(node, data) of a YAML file: ``node`` (yaml's composed tree) carries line numbers for error messages. An
    unreadable or malformed file raises :class:`ConfigFileError` naming the file and line."""
    import yaml

    try:
        text = Path(path).read_text()
    except OSError as err:
        raise ConfigFileError(f"cannot read {what} {str(path)!r}: {err.strerror or err}") from None
    try:
        return yaml.compose(text), yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigFileError(f"{where}: malformed YAML: {getattr(err, 'problem', None) or err}") from None


def load_config_file(path: str | Path) -> Dict[str, Any]:
    """Read a flat ``setting: value`` YAML mapping of CVPOConfig settings; an unknown key or malformed YAML raises
    :class:`ConfigFileError` with the file and line."""
    node, data = read_yaml(path, "config file")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigFileError(f"{path}:1: expected a mapping of CVPOConfig settings (setting: value), "
                              f"got a {type(data).__name__}")
    known = config_keys()
    for key_node, _ in node.value:
        key = key_node.value
        if key not in known:
            import difflib

            close = difflib.get_close_matches(str(key), sorted(known), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else "; see `CVPOConfig.training()` for the settings"
            raise ConfigFileError(f"{path}:{key_node.start_mark.line + 1}: unknown config key {key!r}{hint}")
    return data


def build_config(env: Optional[str] = None, cost_limit=None, seed: Optional[int] = None,
                 env_runners: Optional[int] = None, overrides: Optional[Mapping[str, Any]] = None):
    """CVPOConfig from (in increasing precedence) CVPO's defaults, a config file's settings and the explicit
    options. The command adds only what belongs to a run: the env (default SafetyPointCircle1-v0), seed 0 and one
    EnvRunner."""
    from rllib_cvpo import CVPOConfig

    settings: Dict[str, Any] = dict(overrides or {})
    model_config = settings.pop("model_config", None)
    env = env or settings.pop("env", None) or DEFAULT_ENV
    settings.pop("env", None)
    if cost_limit is not None:
        settings["cost_limit"] = cost_limit
    if seed is not None:
        settings["seed"] = seed
    settings.setdefault("seed", 0)
    if env_runners is not None:
        settings["num_env_runners"] = env_runners
    settings.setdefault("num_env_runners", 1)
    settings.setdefault("create_local_env_runner", settings["num_env_runners"] == 0)
    config = CVPOConfig().environment(env)
    config.update_from_dict(settings)
    if model_config is not None:
        config.rl_module(model_config=model_config)
    config.validate()
    return config


# -- Tune callbacks -----------------------------------------------------------------------------------------------
def _fmt(x, spec="7.1f") -> str:
    return "    -  " if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


class ProgressBar(Callback):
    """One live line per trial: env steps against the total, training return, cost against the limit, the
    last deterministic evaluation, elapsed and estimated time left. Redrawn in place on a terminal (and every
    second, so the clock moves between iterations); one line per iteration otherwise (logs, CI)."""

    def __init__(self, total_env_steps: int, cost_limit: float, stream=None) -> None:
        self.total = int(total_env_steps)
        self.limit = float(cost_limit)
        self.stream = stream

    def __getstate__(self):  # Tune pickles callbacks into the experiment state; the stream and thread stay here
        return {"total": self.total, "limit": self.limit, "stream": None}

    def setup(self, **info) -> None:
        self.stream = self.stream or sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.started = time.time()
        self.first_steps: Optional[int] = None
        self.line = "starting: warming up with random actions" if self.tty else ""
        self._stop = threading.Event()
        if self.tty:
            threading.Thread(target=self._tick, daemon=True).start()
        else:
            print("starting: the first line appears after the first iteration", file=self.stream, flush=True)

    def _tick(self) -> None:
        while not self._stop.wait(1.0):
            self._draw()

    def _draw(self, final: bool = False) -> None:
        if self.tty:
            elapsed = _clock(time.time() - self.started)
            # Cut to the terminal's width (less one column, so the line never wraps and \r redraws it in place).
            width = max(shutil.get_terminal_size((120, 24)).columns - 1, 20)
            line = self.line.replace("{elapsed}", elapsed)[:width]
            self.stream.write("\r" + line.ljust(width) + ("\n" if final else ""))
            self.stream.flush()

    def render(self, result: Dict[str, Any]) -> str:
        summary = result.get("cvpo", {})
        steps = int(summary.get("env_steps", result.get("num_env_steps_sampled_lifetime", 0)) or 0)
        if self.first_steps is None:
            self.first_steps = steps
            self.first_time = time.time()
        frac = min(steps / max(self.total, 1), 1.0)
        width = 20
        filled = int(round(frac * width))
        bar = "#" * filled + "." * (width - filled)
        done_here = steps - self.first_steps
        rate = done_here / max(time.time() - self.first_time, 1e-9) if done_here > 0 else None
        left = f"~{_clock((self.total - steps) / rate)} left" if rate else "time left: -"
        cost = summary.get("episode_cost", math.nan)
        mark = "" if not isinstance(cost, float) or not math.isfinite(cost) else ("ok" if cost <= self.limit else "OVER")
        return (f"[{bar}] {frac:4.0%} {steps:>7d}/{self.total} steps | return {_fmt(summary.get('episode_return'))}"
                f" | cost {_fmt(summary.get('episode_cost'))} / {self.limit:g} {mark:4s} | eval "
                f"{_fmt(summary.get('eval_return'))} cost {_fmt(summary.get('eval_cost'), '5.1f')} | "
                "{elapsed} elapsed, " + left)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self.line = self.render(result)
        if self.tty:
            self._draw()
        else:
            print(self.line.replace("{elapsed}", _clock(time.time() - self.started)), file=self.stream, flush=True)

    def on_experiment_end(self, trials, **info) -> None:
        if getattr(self, "_stop", None) is not None:
            self._stop.set()
            self._draw(final=True)


class GracefulInterrupt(Callback):
    """The first Ctrl-C (SIGINT) lets the running iteration finish, waits for its checkpoint and then ends the run
    through Tune's own interrupt path, so the trial stays resumable from that checkpoint; a second Ctrl-C stops at
    once (Tune's behaviour: the last checkpoint, at most one iteration old, stays resumable)."""

    def __init__(self) -> None:
        self.requested = False

    def __getstate__(self):
        return {"requested": False}

    def setup(self, **info) -> None:
        self.requested = False
        self._tune_handler = None
        if threading.current_thread() is threading.main_thread():
            self._tune_handler = signal.getsignal(signal.SIGINT)  # installed by Tune before callbacks' setup
            signal.signal(signal.SIGINT, self._on_sigint)

    def _end_run(self) -> None:
        handler, self._tune_handler = self._tune_handler, None
        if callable(handler):
            handler(signal.SIGINT, None)
        else:
            raise KeyboardInterrupt

    def _on_sigint(self, signum, frame) -> None:
        if self.requested:
            self._end_run()
            return
        self.requested = True
        print("\ninterrupt: finishing this iteration and saving a checkpoint (Ctrl-C again to stop now)",
              file=sys.stderr, flush=True)

    def on_trial_save(self, iteration, trials, trial, **info) -> None:
        if self.requested and self._tune_handler is not None:
            self._end_run()


# -- the run ------------------------------------------------------------------------------------------------------
def user_modules(env_id: Any) -> list:
    """The user's own module behind a ``module:EnvId`` env id (imported here), to ship to the Ray workers with Ray's
    ``py_modules``; none for plain ids and for modules installed in site-packages (present wherever the package is)."""
    if not isinstance(env_id, str) or ":" not in env_id:
        return []
    from rllib_cvpo.envs.factory import import_env_module, is_users_module

    import_env_module(env_id)
    top = sys.modules[env_id.split(":")[0].split(".")[0]]
    return [top] if is_users_module(top) else []


STARTUP_ATTEMPTS = 3  # starts of a local Ray whose node timed out during startup, before the error is raised


def _init_ray(address: Optional[str], env_id: Any = None) -> None:
    """Start a local Ray (or join ``address``) for this process. For a ``module:EnvId`` env whose module is the
    user's own, the module travels to every worker (Ray's runtime env ``py_modules``): the trial, the EnvRunners
    and the learners import it there, on this machine or on a cluster."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's legacy reporter, silent at verbose=0: our bar instead
    modules = user_modules(env_id)
    # A local Ray gives its raylet a fixed 30 s to register (ray/_private/node.py); on a machine busy with other
    # runs it can miss that and ray.init fails before anything ran. Starting it again then costs seconds, and a
    # run that would have started on a quieter machine does start.
    for attempt in range(1, STARTUP_ATTEMPTS + 1):
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=True,
                     logging_level="ERROR", runtime_env={"py_modules": modules} if modules else None)
            return
        except Exception as err:  # Ray raises a bare Exception for it
            if address is not None or "timed out during startup" not in str(err) or attempt == STARTUP_ATTEMPTS:
                raise
            ray.shutdown()
            print(f"rllib-cvpo: the local Ray did not start in time ({err}); starting it again "
                  f"(attempt {attempt + 1} of {STARTUP_ATTEMPTS})", file=sys.stderr, flush=True)


def _check_resources(config, address: Optional[str]) -> None:
    """Fail at once when the local Ray cannot place the run (Tune would otherwise wait for resources forever): the
    request is RLlib's own (``CVPO.default_resource_request``: main process, EnvRunners, evaluation EnvRunners,
    learners), compared with what the cluster has, naming each part."""
    import ray

    from rllib_cvpo.cvpo.cvpo import CVPO

    if address is not None:
        return  # a cluster may scale up
    need = CVPO.default_resource_request(config).required_resources
    have = ray.cluster_resources()
    missing = {k: v for k, v in need.items() if v > have.get(k, 0)}
    if missing:
        parts = [f"main process {config.num_cpus_for_main_process:g} CPU",
                 f"{config.num_env_runners} env runner(s) x {config.num_cpus_per_env_runner:g} CPU"]
        if config.evaluation_num_env_runners:
            parts.append(f"{config.evaluation_num_env_runners} evaluation env runner(s)")
        if config.num_learners:
            cpus = 1 if config.num_cpus_per_learner == "auto" else config.num_cpus_per_learner
            parts.append(f"{config.num_learners} learner(s) x {cpus:g} CPU, {config.num_gpus_per_learner:g} GPU")
        wanted = ", ".join(f"{v:g} {k}" for k, v in missing.items())
        has = ", ".join(f"{have.get(k, 0):g} {k}" for k in missing)
        raise ValueError(
            f"this run needs {wanted} ({'; '.join(parts)}) but the local Ray has {has}: use fewer env runners "
            f"(--env-runners {max(int(have.get('CPU', 1)) - 1, 0)} or fewer) or learners, or --address to join a "
            "cluster"
        )


LOGGERS = ("tensorboard", "mlflow", "wandb")


def logger_callbacks(loggers, experiment: str) -> list:
    """Tune callbacks for experiment tracking. "tensorboard": Tune already writes TensorBoard event files into each
    trial directory (``tensorboard --logdir RUN_DIR``), so nothing is added; "mlflow": every iteration's metrics (the
    return and cost, the duals, ...) and the trial's settings go to MLflow (the store ``MLFLOW_TRACKING_URI`` names,
    else ./mlruns), in an experiment named ``experiment``; "wandb": the same to Weights & Biases, in a project named
    ``experiment`` (``WANDB_API_KEY`` or ``wandb login`` first; ``WANDB_MODE=offline`` writes ./wandb to sync later)."""
    callbacks = []
    for name in loggers or ():
        if name == "tensorboard":
            continue
        if name == "wandb":
            try:
                import wandb  # noqa: F401
                from ray.air.integrations.wandb import WandbLoggerCallback
            except ImportError:
                raise ValueError("the wandb logger needs wandb: pip install 'rllib-cvpo[tracking]'") from None
            # The per-trial logging actors run in Ray's workers, which do not see this process's environment:
            # W&B's mode and directory travel as wandb.init arguments.
            init = {k: os.environ[v] for k, v in (("mode", "WANDB_MODE"), ("dir", "WANDB_DIR")) if os.environ.get(v)}
            callbacks.append(WandbLoggerCallback(project=os.environ.get("WANDB_PROJECT") or experiment,
                                                 log_config=True, **init))
            continue
        if name != "mlflow":
            raise ValueError(f"unknown logger {name!r}: choose from {', '.join(LOGGERS)}")
        try:
            import mlflow  # noqa: F401
            from ray.air.integrations.mlflow import MLflowLoggerCallback
        except ImportError:
            raise ValueError("the mlflow logger needs MLflow: pip install 'rllib-cvpo[tracking]'") from None
        uri = os.environ.get("MLFLOW_TRACKING_URI") or Path("mlruns").resolve().as_uri()
        if uri.startswith("file:"):
            # MLflow 3 keeps its file store in maintenance and asks for this opt-in; a server or a database URI
            # (sqlite:///mlflow.db with the full mlflow package) needs none.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        callbacks.append(MLflowLoggerCallback(tracking_uri=uri, experiment_name=experiment))
    return callbacks


def run_training(config, total_env_steps: int, run_dir: Path, address: Optional[str] = None,
                 run_info: Optional[Dict[str, Any]] = None, stream=None, loggers=()) -> Dict[str, Any]:
    """Train ``config`` for ``total_env_steps`` env steps as one Tune trial whose experiment directory is
    ``run_dir``. Returns a dict with ``status`` ("finished", "interrupted" or "error"), ``checkpoints`` and
    ``results`` (a DataFrame). Raises :class:`~rllib_cvpo.checkpoints.RunDirInUse` if another process trains
    in ``run_dir``."""
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    info = dict(run_info or {})
    info.update(env=config.env, cost_limit=config.cost_limit, total_env_steps=int(total_env_steps),
                seed=config.seed, num_env_runners=config.num_env_runners)
    info["loggers"] = list(loggers or ())
    tracking = logger_callbacks(loggers, run_dir.name)
    with run_dir_lock(run_dir):
        (run_dir / RUN_FILE).write_text(json.dumps(info, indent=1, default=str))
        return _run_new(config, total_env_steps, run_dir, address, stream, tracking)


def _run_new(config, total_env_steps: int, run_dir: Path, address: Optional[str], stream,
             tracking: list) -> Dict[str, Any]:
    from ray import tune

    from rllib_cvpo.cvpo.cvpo import CVPO

    _init_ray(address, config.env)
    _check_resources(config, address)
    limit = float(sum(config.cost_limits.values()))
    interrupt = GracefulInterrupt()
    tuner = tune.Tuner(
        CVPO,
        param_space=config,
        run_config=tune.RunConfig(
            name=run_dir.name,
            storage_path=str(run_dir.parent),
            stop={"num_env_steps_sampled_lifetime": int(total_env_steps)},
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=1,  # plus the latest, which Tune always keeps: the best feasible and the latest
                checkpoint_score_attribute="cvpo_score",
                checkpoint_score_order="max",
                checkpoint_frequency=1,
                checkpoint_at_end=True,
            ),
            failure_config=tune.FailureConfig(max_failures=0),
            callbacks=[ProgressBar(total_env_steps, limit, stream), interrupt, *tracking],
            verbose=0,
        ),
    )
    return _fit_and_report(tuner, run_dir, limit, interrupt, stream)


def train(config, total_env_steps: int = DEFAULT_TOTAL_ENV_STEPS, run_dir: Optional[str | Path] = None,
          address: Optional[str] = None, loggers=()) -> Dict[str, Any]:
    """The command's run from Python: ``config`` (a ``CVPOConfig``) trained for ``total_env_steps`` env steps as one Tune
    trial in ``run_dir`` (default ``runs/<env>_seed<seed>_<time>``), with the progress line, a checkpoint every
    iteration (the latest and the best feasible kept), ``summary.txt`` and ``curves.png`` at the end. Returns
    ``{"status": "finished" | "interrupted" | "error", "checkpoints": {"best": path, "latest": path}, "results":
    DataFrame, "errors": [...], "run_dir": path}``; an interrupted run continues with :func:`resume`."""
    if isinstance(total_env_steps, bool) or not isinstance(total_env_steps, int) or total_env_steps < 1:
        raise ValueError(f"total_env_steps must be a positive whole number of env steps, got {total_env_steps!r}")
    config.validate()
    if run_dir is None:
        name = str(config.env).split(":")[-1]
        run_dir = Path("runs") / f"{name}_seed{config.seed}_{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(run_dir).resolve()
    if (run_dir / "tuner.pkl").exists():
        raise FileExistsError(f"run directory {str(run_dir)!r} exists: resume it with rllib_cvpo.resume(run_dir)")
    outcome = run_training(config, total_env_steps, run_dir, address=address, loggers=loggers)
    outcome["run_dir"] = run_dir
    return outcome


def resume(run_dir: str | Path, address: Optional[str] = None) -> Dict[str, Any]:
    """Continue an interrupted run of :func:`train` (or of ``rllib-cvpo train``) to its end; returns as :func:`train`."""
    outcome = resume_training(Path(run_dir), address=address)
    outcome["run_dir"] = Path(run_dir).resolve()
    return outcome


def resume_training(run_dir: Path, address: Optional[str] = None, stream=None) -> Dict[str, Any]:
    """Continue an interrupted (or crashed) run from its last checkpoint: env steps, duals, optimizers and the
    replay buffer carry on where they were."""
    from ray import tune

    from rllib_cvpo.cvpo.cvpo import CVPO

    run_dir = Path(run_dir).resolve()
    if not (run_dir / "tuner.pkl").is_file():
        raise FileNotFoundError(f"cannot resume {str(run_dir)!r}: not a run directory of `rllib-cvpo train` "
                                "(no tuner.pkl)")
    if (run_dir / "tuner.pkl").stat().st_size == 0:
        raise ValueError(f"cannot resume {str(run_dir)!r}: its tuner.pkl is unreadable (an empty file); the "
                         "checkpoints under it can still be evaluated or served")
    info = json.loads((run_dir / RUN_FILE).read_text()) if (run_dir / RUN_FILE).is_file() else {}
    with run_dir_lock(run_dir):  # one writer per run directory: a second --resume of a live run is refused
        _init_ray(address, info.get("env"))
        try:
            tuner = tune.Tuner.restore(str(run_dir), trainable=CVPO, resume_unfinished=True, resume_errored=True)
        except (EOFError, pickle.UnpicklingError, AttributeError, ImportError) as err:
            raise ValueError(f"cannot resume {str(run_dir)!r}: its tuner.pkl is unreadable ({type(err).__name__}: "
                             f"{err or 'empty file'}); the checkpoints under it can still be evaluated or served"
                             ) from None
        return _resume(tuner, run_dir, info, stream)


def _resume(tuner, run_dir: Path, info: Dict[str, Any], stream) -> Dict[str, Any]:
    limit = info.get("cost_limit", 25.0)
    limit = float(sum(limit.values())) if isinstance(limit, dict) else float(limit)
    # The restored experiment brings its own callbacks (progress bar, graceful interrupt); an unfinished step count
    # tells an interrupted run from a finished one.
    return _fit_and_report(tuner, run_dir, limit, None, stream)


def _fit_and_report(tuner, run_dir: Path, limit: float, interrupt: Optional[GracefulInterrupt], stream) -> Dict:
    out = stream or sys.stdout
    grid = tuner.fit()
    trials = trial_dirs(run_dir)
    results = read_results(trials[0]) if trials else None
    checkpoints = find_checkpoints(run_dir)
    errors = [r.error for r in grid if r.error is not None]
    info = json.loads((run_dir / RUN_FILE).read_text()) if (run_dir / RUN_FILE).is_file() else {}
    total = int(info.get("total_env_steps", 0))
    reached = int(results["env_steps"].iloc[-1]) if results is not None and len(results) else 0
    if errors:
        status = "error"
    elif (interrupt is not None and interrupt.requested) or (total and reached < total):
        status = "interrupted"
    else:
        status = "finished"
    if results is not None and len(results):
        (run_dir / "summary.txt").write_text(summary_table(results, limit) + "\n")
        plot_runs([run_dir], run_dir / "curves.png", title=f"{info.get('env', '')} (CVPO, seed {info.get('seed')})",
                  cost_limit=limit)
        print("\n" + summary_table(results, limit), file=out)
        print(f"curves: {run_dir / 'curves.png'}", file=out)
    for name in ("best", "latest"):
        if checkpoints.get(name) is not None:
            label = "best feasible checkpoint" if name == "best" else "latest checkpoint"
            print(f"{label}: {checkpoints[name]}", file=out)
    if status == "interrupted":
        print(f"interrupted at {reached} env steps; resume with: rllib-cvpo train --resume {run_dir}", file=out)
    if status == "error":
        print(f"the run failed: {errors[0]}", file=out)
    return {"status": status, "checkpoints": checkpoints, "results": results, "errors": errors}
