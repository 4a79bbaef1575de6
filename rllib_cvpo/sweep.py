"""Sweeps: a YAML file (schema below) -> Ray Tune with CVPO as the trainable; ``report`` turns a finished sweep into a
per-configuration table, the best feasible configuration and a return-versus-cost Pareto plot.

Sweep file schema (every key but ``env`` and ``search`` optional)::

    name: cost_limit_sweep            # directory name under the storage path (default: the file's stem)
    env: SafetyPointGoal1-v0          # task id
    total_env_steps: 200000           # stop each trial after this many env steps
    stop: {time_total_s: 3600}        # extra Tune stop criteria (flattened result keys), any of which stops a trial
    base:                             # CVPOConfig settings shared by every trial (as in `train --config` files)
      gamma: 0.99
    search:                           # setting -> one distribution
      cost_limit: {grid: [10, 25, 50]}          # every value (grids multiply)
      estep_kl: {choice: [0.05, 0.1]}           # sampled: one value per sample
      kl_mean: {uniform: [0.001, 0.01]}
      actor_lr: {loguniform: [1.0e-4, 1.0e-3]}
    seeds: [0, 1, 2]                  # a grid over seeds (default [0])
    num_samples: 1                    # samples of the sampled distributions per grid point (default 1)
    resources: {env_runners: 1, cpus_per_env_runner: 1, learners: 0, gpus_per_learner: 0}
    checkpoint: {frequency: 1, keep: 1}   # iterations between checkpoints; best checkpoints kept (+ the latest)
    max_failures: 2                   # retries of a failed trial, from its last checkpoint
    max_concurrent_trials: 0          # 0: as many as the cluster fits
    loggers: [mlflow]                 # experiment tracking besides Tune's TensorBoard files (tensorboard, mlflow, wandb)

The file is checked before Ray starts: the keys and their types and ranges by a pydantic schema (:class:`SweepFile`),
and ``base`` with every value of every search distribution (both bounds of a range) by ``CVPOConfig.validate()``, the
rules a trial would meet. Each error names the file, the line and the key.
"""

from __future__ import annotations

import difflib
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pandas as pd

from rllib_cvpo.checkpoints import run_dir_lock
from rllib_cvpo.runs import find_checkpoints, read_results, trial_dirs
from rllib_cvpo.training import ConfigFileError, config_keys, logger_callbacks, read_yaml

TOP_LEVEL = {"name", "env", "total_env_steps", "stop", "base", "search", "seeds", "num_samples", "resources",
             "checkpoint", "max_failures", "max_concurrent_trials", "loggers"}
DISTRIBUTIONS = {"grid", "choice", "uniform", "loguniform"}
RESOURCES = {"env_runners", "cpus_per_env_runner", "learners", "gpus_per_learner", "cpus_per_learner"}
CHECKPOINT = {"frequency", "keep"}


class SweepSpec(dict):
    """The parsed sweep file (a dict with the keys of the schema, defaults filled in)."""


def _schema():
    """The pydantic models of a sweep file's keys (built on first use: pydantic is imported only then)."""
    from typing import Dict as D
    from typing import List as L
    from typing import Literal

    from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt

    Number = StrictInt | StrictFloat

    class Strict(BaseModel):
        model_config = ConfigDict(extra="forbid")

    class Resources(Strict):
        env_runners: StrictInt = Field(1, ge=0)
        cpus_per_env_runner: Number = Field(1, gt=0)
        learners: StrictInt = Field(0, ge=0)
        gpus_per_learner: Number = Field(0, ge=0)
        cpus_per_learner: Number = Field(1, gt=0)

    class Checkpoint(Strict):
        frequency: StrictInt = Field(1, ge=1)
        keep: StrictInt = Field(1, ge=1)

    class SweepFile(Strict):
        name: str = Field(None, pattern=r"^[A-Za-z0-9_.-]+$")
        env: str = Field(..., min_length=1)
        total_env_steps: StrictInt = Field(100_000, ge=1)
        stop: D[str, Number] = {}
        base: D[str, object] = {}
        search: D[str, D[Literal["grid", "choice", "uniform", "loguniform"], L[object]]]
        seeds: L[StrictInt] = Field([0], min_length=1)
        num_samples: StrictInt = Field(1, ge=1)
        resources: Resources = Resources()
        checkpoint: Checkpoint = Checkpoint()
        max_failures: StrictInt = Field(2, ge=0)
        max_concurrent_trials: StrictInt = Field(0, ge=0)
        loggers: L[Literal["tensorboard", "mlflow", "wandb"]] = []

    return SweepFile


def _node_at(root, loc) -> Any:
    """The YAML node at a path of keys and list indices (as deep as it goes), for an error's line number."""
    import yaml

    node = root
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            match = next((v for k, v in node.value if k.value == str(key)), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            match = node.value[key]
        else:
            match = None
        if match is None:
            break
        node = match
    return node


def _err(path, node, message) -> ConfigFileError:
    return ConfigFileError(f"{path}:{node.start_mark.line + 1}: {message}")


def _hint(key, known) -> str:
    close = difflib.get_close_matches(str(key), sorted(known), n=3)
    return f"; did you mean {', '.join(close)}?" if close else ""


def _mapping_items(node) -> List[Tuple[Any, Any]]:
    import yaml

    return node.value if isinstance(node, yaml.MappingNode) else []


def load_sweep(path: str | Path) -> SweepSpec:
    """Parse and check a sweep file; any problem raises :class:`ConfigFileError` naming the file, line and key."""
    p = Path(path)
    root, data = read_yaml(p, "sweep file")
    if not isinstance(data, dict):
        raise ConfigFileError(f"{path}:1: a sweep file is a mapping with at least 'env' and 'search'")
    nodes = {k.value: (k, v) for k, v in _mapping_items(root)}
    for key, (knode, _) in nodes.items():
        if key not in TOP_LEVEL:
            raise _err(path, knode, f"unknown key {key!r}{_hint(key, TOP_LEVEL)} (allowed: {', '.join(sorted(TOP_LEVEL))})")
    for required in ("env", "search"):
        if required not in data:
            raise ConfigFileError(f"{path}:1: missing required key {required!r}")
    settings = config_keys()
    for section in ("base", "search"):
        if section in nodes and not isinstance(data.get(section), dict):
            raise _err(path, nodes[section][0], f"{section!r} must be a mapping of CVPOConfig settings")
    for knode, _ in _mapping_items(nodes["base"][1]) if "base" in nodes else []:
        if knode.value not in settings:
            raise _err(path, knode, f"unknown CVPOConfig setting {knode.value!r} in 'base'{_hint(knode.value, settings)}")
    for knode, vnode in _mapping_items(nodes["search"][1]):
        name = knode.value
        if name not in settings:
            raise _err(path, knode, f"unknown CVPOConfig setting {name!r} in 'search'{_hint(name, settings)}")
        spec = data["search"][name]
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
            raise _err(path, vnode, f"search.{name} must be one of {{grid: [...]}}, {{choice: [...]}}, "
                                    f"{{uniform: [lo, hi]}}, {{loguniform: [lo, hi]}}, got {spec!r}")
        kind, values = next(iter(spec.items()))
        if not isinstance(values, list) or not values:
            raise _err(path, vnode, f"search.{name}.{kind} must be a non-empty list, got {values!r}")
        if kind in ("uniform", "loguniform"):
            if len(values) != 2 or not all(isinstance(v, (int, float)) for v in values) or values[0] >= values[1]:
                raise _err(path, vnode, f"search.{name}.{kind} must be [low, high] with low < high, got {values!r}")
            if kind == "loguniform" and values[0] <= 0:
                raise _err(path, vnode, f"search.{name}.loguniform needs low > 0, got {values!r}")
    for section, allowed in (("resources", RESOURCES), ("checkpoint", CHECKPOINT)):
        if section in nodes:
            if not isinstance(data[section], dict):
                raise _err(path, nodes[section][0], f"{section!r} must be a mapping")
            for knode, _ in _mapping_items(nodes[section][1]):
                if knode.value not in allowed:
                    raise _err(path, knode, f"unknown key {knode.value!r} in {section!r} (allowed: "
                                            f"{', '.join(sorted(allowed))})")
    seeds = data.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                           for s in seeds):
        raise _err(path, nodes["seeds"][0], f"'seeds' must be a non-empty list of integers, got {seeds!r}")
    from pydantic import ValidationError

    try:
        _schema().model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        loc = [x for x in first["loc"] if not (isinstance(x, str) and x in ("int", "float", "literal_error"))]
        key = ".".join(str(x) for x in loc)
        got = first.get("input")
        raise _err(path, _node_at(root, loc), f"{key}: {first['msg']}, got {got!r}") from None
    _check_values(path, root, data)
    spec = SweepSpec(data)
    spec.setdefault("name", p.stem)
    spec.setdefault("seeds", [0])
    spec.setdefault("num_samples", 1)
    spec.setdefault("base", {})
    spec.setdefault("resources", {})
    spec.setdefault("checkpoint", {})
    spec.setdefault("max_failures", 2)
    spec.setdefault("max_concurrent_trials", 0)
    spec.setdefault("stop", {})
    spec["file"] = str(p)
    return spec


def _check_values(path, root, data) -> None:
    """``base``, then ``base`` with each value of each search distribution (both bounds of a range), through
    ``CVPOConfig.validate()``: a value a trial would reject is reported here, before Ray starts."""
    from rllib_cvpo.envs import UnknownEnvError
    from rllib_cvpo.training import build_config

    base = dict(data.get("base") or {})

    def check(settings, where):
        try:
            build_config(data["env"], None, None, None, settings)
        except UnknownEnvError as err:
            raise _err(path, _node_at(root, ["env"]), str(err)) from None
        except (ValueError, TypeError) as err:
            message = str(err).splitlines()[0].replace("Invalid CVPO configuration: ", "")
            if where == ["base"]:  # point at the base setting the message names
                named = [k for k in base if k in message]
                where = ["base", named[0]] if named else where
            raise _err(path, _node_at(root, where), message) from None

    check(base, ["base"])
    for name, dist in (data.get("search") or {}).items():
        (kind, values), = dist.items()
        for i, value in enumerate(values):
            check({**base, name: value}, ["search", name, kind, i])


def _distribution(kind: str, values: list):
    from ray import tune

    return {"grid": tune.grid_search, "choice": tune.choice}[kind](values) if kind in ("grid", "choice") else \
        {"uniform": tune.uniform, "loguniform": tune.loguniform}[kind](*values)


def build_param_space(spec: SweepSpec) -> Dict[str, Any]:
    """The trials' config: CVPO's defaults, ``base``, the resources, then the search space
    (including the seed grid) on top, as Tune search objects inside ``CVPOConfig.to_dict()``."""
    from rllib_cvpo.training import build_config

    res = spec["resources"]
    base = dict(spec["base"])
    base.setdefault("num_env_runners", res.get("env_runners", 1))
    if "cpus_per_env_runner" in res:
        base["num_cpus_per_env_runner"] = res["cpus_per_env_runner"]
    if "learners" in res:
        base["num_learners"] = res["learners"]
    if "gpus_per_learner" in res:
        base["num_gpus_per_learner"] = res["gpus_per_learner"]
    if "cpus_per_learner" in res:
        base["num_cpus_per_learner"] = res["cpus_per_learner"]
    config = build_config(spec["env"], None, None, None, base)
    space = config.to_dict()
    for name, dist in spec["search"].items():
        kind, values = next(iter(dist.items()))
        space[name] = _distribution(kind, values)
    from ray import tune

    space["seed"] = tune.grid_search(list(spec["seeds"]))
    return space


def run_sweep(spec: SweepSpec, storage: str, address: Optional[str] = None, resume: bool = False):
    """Run (or, with ``resume``, continue) a sweep as a Tune experiment at ``storage/name``; returns Tune's
    ResultGrid. Failed trials are retried from their last checkpoint up to ``max_failures`` times; a resumed sweep
    does not repeat finished trials."""
    import os

    from rllib_cvpo.training import _init_ray

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    _init_ray(address, spec.get("env"))
    storage = storage if "://" in storage else str(Path(storage).expanduser().resolve())
    path = f"{storage.rstrip('/')}/{spec['name']}"
    if "://" in storage:
        return _run_sweep(spec, storage, path, resume)
    with run_dir_lock(path):  # one process per sweep directory (a second --resume of a live sweep is refused)
        return _run_sweep(spec, storage, path, resume)


def original_param_keys(path: str) -> Optional[List[str]]:
    """The flattened keys of the param space a sweep started with (Tune stores them in its tuner.pkl)."""
    import pickle

    from ray.train._internal.storage import get_fs_and_path

    fs, fs_path = get_fs_and_path(path)
    with fs.open_input_file(f"{fs_path.rstrip('/')}/tuner.pkl") as fh:
        state = pickle.loads(fh.readall())
    return state.get("__flattened_param_space_keys")


def restrict_to_original(space: Dict[str, Any], original: Optional[List[str]]) -> Dict[str, Any]:
    """``space`` without the (flattened, "/"-joined) keys the original param space did not have; a key the original
    had and ``space`` lacks (a setting this version removed) cannot be restored and raises ValueError."""
    if original is None:
        return space
    keep = set(original)

    def prune(d: Dict[str, Any], prefix: str) -> Dict[str, Any]:
        out = {}
        for k, v in d.items():
            flat = f"{prefix}{k}"
            if isinstance(v, dict) and v and not any(o == flat for o in keep) and any(
                    o.startswith(flat + "/") for o in keep):
                out[k] = prune(v, flat + "/")
            elif flat in keep:
                out[k] = v
        return out

    from ray.tune.utils.util import flatten_dict

    pruned = prune(space, "")
    missing = sorted(keep - set(flatten_dict(pruned).keys()))
    if missing:
        raise ValueError(f"cannot resume: the sweep was started with settings this version no longer has: "
                         f"{', '.join(missing[:5])}")
    return pruned


def _run_sweep(spec: SweepSpec, storage: str, path: str, resume: bool):
    from ray import tune

    from rllib_cvpo.cvpo.cvpo import CVPO

    if resume:
        if not tune.Tuner.can_restore(path):
            raise FileNotFoundError(f"cannot resume: no sweep at {path!r}")
        # The param space is handed over again: Tune keeps large objects of it (the RLModule spec) as object
        # references of the first run's Ray session, which a trial not yet started would otherwise fail to resolve.
        # Tune accepts only the keys the sweep started with, so settings added to CVPOConfig since are left out
        # (trials not yet started then take their defaults).
        space = restrict_to_original(build_param_space(spec), original_param_keys(path))
        tuner = tune.Tuner.restore(path, trainable=CVPO, resume_unfinished=True, resume_errored=True,
                                   param_space=space)
        return tuner.fit()
    if "://" not in storage and Path(path, "tuner.pkl").exists():
        raise FileExistsError(f"a sweep already exists at {path!r}: add --resume to continue it, or change 'name'")
    ckpt = spec["checkpoint"]
    stop = {"num_env_steps_sampled_lifetime": int(spec.get("total_env_steps", 100_000))}
    stop.update(spec.get("stop") or {})
    tuner = tune.Tuner(
        CVPO,
        param_space=build_param_space(spec),
        tune_config=tune.TuneConfig(num_samples=int(spec["num_samples"]),
                                    max_concurrent_trials=int(spec["max_concurrent_trials"]) or None),
        run_config=tune.RunConfig(
            name=spec["name"],
            storage_path=storage,
            stop=stop,  # Tune stops a trial when any one of these is reached
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=int(ckpt.get("keep", 1)),
                checkpoint_score_attribute="cvpo_score",
                checkpoint_score_order="max",
                checkpoint_frequency=int(ckpt.get("frequency", 1)),
                checkpoint_at_end=True,
            ),
            failure_config=tune.FailureConfig(max_failures=int(spec["max_failures"])),
            callbacks=logger_callbacks(spec.get("loggers"), spec["name"]),
            verbose=1,
        ),
    )
    return tuner.fit()


# -- report --------------------------------------------------------------------------------------------------------
def _trial_config(trial: Path) -> Dict[str, Any]:
    params = trial / "params.json"
    return json.loads(params.read_text()) if params.is_file() else {}


def _search_keys(configs: List[Dict[str, Any]]) -> List[str]:
    """The settings that vary across trials (the searched ones), seed excluded."""
    keys = set().union(*(c.keys() for c in configs)) if configs else set()
    varying = []
    for k in sorted(keys):
        if k == "seed":
            continue
        values = {json.dumps(c.get(k), sort_keys=True, default=str) for c in configs}
        if len(values) > 1:
            varying.append(k)
    return varying


def collect_trials(sweep_dir: str | Path, last_k: int = 1) -> pd.DataFrame:
    """One row per trial: its searched settings, seed, final (mean of the last ``last_k`` iterations') evaluation
    return, cost and fraction of evaluation episodes over the limit, env steps, feasibility, and its best checkpoint."""
    root = Path(sweep_dir)
    trials = trial_dirs(root)
    if not trials:
        raise FileNotFoundError(f"no trials in {str(sweep_dir)!r}: expected a sweep directory (storage/name)")
    configs = [_trial_config(t) for t in trials]
    keys = _search_keys(configs)
    rows = []
    for trial, config in zip(trials, configs):
        df = read_results(trial)
        if not len(df):
            continue
        tail = df.tail(last_k)
        limit = config.get("cost_limit", tail["cost_limit"].iloc[-1])
        limit_total = float(sum(limit.values())) if isinstance(limit, dict) else float(limit)
        row = {k: json.dumps(config.get(k), default=str) if isinstance(config.get(k), (dict, list)) else config.get(k)
               for k in keys}
        row.update(
            trial=trial.name,
            seed=config.get("seed"),
            cost_limit=limit_total,
            env_steps=int(df["env_steps"].iloc[-1]),
            eval_return=float(tail["eval_return"].mean()),
            eval_cost=float(tail["eval_cost"].mean()),
            eval_over_limit=float(tail["eval_over_limit"].mean()),
            checkpoint=str(find_checkpoints(trial).get("best") or ""),
        )
        rows.append(row)
    out = pd.DataFrame(rows)
    out.attrs["search_keys"] = keys
    return out


def summarize(trials: pd.DataFrame) -> Tuple[pd.DataFrame, Optional[pd.Series]]:
    """Per configuration (the searched settings; seeds pooled): mean and std of final evaluation return and cost,
    the fraction over the limit, env steps, seeds; ``feasible`` when the mean cost is within the limit. The best
    configuration is the feasible one with the highest mean return (if none is feasible: the least violating one);
    its ``checkpoint`` is the best checkpoint of its best-returning feasible seed."""
    keys = list(trials.attrs.get("search_keys", []))
    group_keys = keys or ["cost_limit"]
    grouped = trials.groupby(group_keys, dropna=False, sort=True)
    aggregations = dict(
        return_mean=("eval_return", "mean"), return_std=("eval_return", "std"),
        cost_mean=("eval_cost", "mean"), cost_std=("eval_cost", "std"),
        over_limit=("eval_over_limit", "mean"), env_steps=("env_steps", "mean"), seeds=("seed", "count"),
    )
    if "cost_limit" not in group_keys:
        aggregations["cost_limit"] = ("cost_limit", "first")
    table = grouped.agg(**aggregations).reset_index()
    table["feasible"] = table["cost_mean"] <= table["cost_limit"]
    if not len(table):
        return table, None
    feasible = table[table["feasible"]]
    if len(feasible):
        best = feasible.sort_values("return_mean", ascending=False).iloc[0].copy()
    else:
        violation = table["cost_mean"] - table["cost_limit"]
        best = table.loc[violation.idxmin()].copy()
    members = trials
    for k in group_keys:
        members = members[members[k].astype(str) == str(best[k])]
    ok = members[members["eval_cost"] <= members["cost_limit"]]
    pick = (ok if len(ok) else members).sort_values("eval_return", ascending=False).iloc[0]
    best["checkpoint"] = pick["checkpoint"]
    best["trial"] = pick["trial"]
    return table, best


def pareto_plot(table: pd.DataFrame, best: Optional[pd.Series], out: Path, title: str = "") -> Path:
    """Final evaluation return against cost per configuration (std bars over seeds), the feasible ones filled, the
    Pareto front (no other configuration has both lower cost and higher return) joined, the best one ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [c for c in table.columns if c not in {"return_mean", "return_std", "cost_mean", "cost_std", "over_limit",
                                                  "env_steps", "seeds", "feasible"}]
    fig, ax = plt.subplots(figsize=(7, 5))
    for _, row in table.iterrows():
        ax.errorbar(row["cost_mean"], row["return_mean"], xerr=row["cost_std"] if row["seeds"] > 1 else None,
                    yerr=row["return_std"] if row["seeds"] > 1 else None, fmt="o",
                    mfc="C0" if row["feasible"] else "white", color="C0", capsize=3)
        ax.annotate(", ".join(f"{k}={row[k]}" for k in keys), (row["cost_mean"], row["return_mean"]), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    ordered = table.sort_values(["cost_mean", "return_mean"], ascending=[True, False])
    front, best_so_far = [], -math.inf
    for _, row in ordered.iterrows():
        if row["return_mean"] > best_so_far:
            front.append(row)
            best_so_far = row["return_mean"]
    if len(front) > 1:
        ax.plot([r["cost_mean"] for r in front], [r["return_mean"] for r in front], "--", color="grey", lw=1,
                label="Pareto front")
    for limit in sorted(set(table["cost_limit"])):
        ax.axvline(limit, color="red", linestyle=":", lw=1)
    if best is not None:
        ax.plot(best["cost_mean"], best["return_mean"], "o", ms=16, mfc="none", mec="green", mew=2,
                label="best feasible")
    ax.set_xlabel("final evaluation cost (mean over seeds; red: cost limits)")
    ax.set_ylabel("final evaluation return (mean over seeds)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def report(sweep_dir: str | Path, out_dir: Optional[str | Path] = None, last_k: int = 1) -> Dict[str, Any]:
    """Write ``report.csv`` (per configuration), ``trials.csv`` (per trial) and ``pareto.png`` into ``out_dir``
    (default: the sweep directory); return the table, the best configuration and the paths."""
    root = Path(sweep_dir)
    out = Path(out_dir) if out_dir else root
    out.mkdir(parents=True, exist_ok=True)
    trials = collect_trials(root, last_k=last_k)
    table, best = summarize(trials)
    table.to_csv(out / "report.csv", index=False)
    trials.to_csv(out / "trials.csv", index=False)
    png = pareto_plot(table, best, out / "pareto.png", title=root.name)
    return {"table": table, "best": best, "trials": trials, "csv": out / "report.csv", "png": png}
