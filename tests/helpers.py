"""Helpers shared by tests (the tests directory is on sys.path under pytest)."""

import json
import os
import pickle
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from rllib_cvpo import CVPOConfig


def small_config(env="SpeedLimit-v0", **training):
    base = dict(cost_limit=25.0, gamma=0.97, num_steps_sampled_before_learning_starts=400,
                updates_per_env_step=0.25, train_batch_size_per_learner=64, num_action_samples=8)
    base.update(training)
    return (
        CVPOConfig()
        .environment(env)
        .env_runners(num_env_runners=0, rollout_fragment_length=50, num_envs_per_env_runner=1)
        .learners(num_learners=0)
        .training(**base)
        .reporting(min_sample_timesteps_per_iteration=400, min_time_s_per_iteration=0)
        .evaluation(evaluation_interval=1, evaluation_duration=1)
        .rl_module(model_config={"fcnet_hiddens": [32, 32]})
        .debugging(seed=0)
    )


# Small and quick settings on the built-in task for command-line runs (a `--config` file, or a sweep's `base`):
# 1000 env steps per iteration (4 envs x 50 steps per sample, 5 samples), 100 updates per iteration, one evaluation
# episode per iteration. (Four envs per EnvRunner: RLlib's per-step connector work is paid once per vector step.)
SMALL_SETTINGS = """\
gamma: 0.97
num_steps_sampled_before_learning_starts: 500
updates_per_env_step: 0.1
train_batch_size_per_learner: 64
num_action_samples: 8
min_sample_timesteps_per_iteration: 1000
rollout_fragment_length: 50
evaluation_duration: 1
num_envs_per_env_runner: 4
model_config: {fcnet_hiddens: [32, 32]}
"""


def sweep_yaml(name: str, total_env_steps: int, extra_base: str = "", tail: str = "") -> str:
    """A sweep file over cost limits 15 and 30 (seed 0) with SMALL_SETTINGS as its base."""
    base = textwrap.indent(SMALL_SETTINGS + extra_base, "  ")
    return (f"name: {name}\nenv: SpeedLimit-v0\ntotal_env_steps: {total_env_steps}\nbase:\n{base}"
            f"search:\n  cost_limit: {{grid: [15, 30]}}\nseeds: [0]\n{tail}")


# Ports for servers that tests start. A port the OS hands out (bind to 0) is free when checked but may be taken as
# an ephemeral port by any connection before the server binds it; these come from a range that neither the OS's
# ephemeral range nor Ray's worker ports (10002-19999) use, each handed out once per test process, the process id
# spreading concurrent test processes apart, and each checked to be bindable.
_PORT_RANGE = range(20000, 32000)
_ports_handed_out: set = set()


def _ephemeral_ports() -> range:
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return range(low, high + 1)
    except (OSError, ValueError):
        return range(32768, 61000)  # Linux's default


def free_port() -> int:
    span, ephemeral = len(_PORT_RANGE), _ephemeral_ports()
    start = (os.getpid() * 97) % span
    for i in range(span):
        port = _PORT_RANGE[(start + i) % span]
        if port in _ports_handed_out or port in ephemeral:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _ports_handed_out.add(port)
        return port
    raise RuntimeError(f"no free port in {_PORT_RANGE.start}-{_PORT_RANGE.stop - 1}")


# -- the command, as a user runs it (a subprocess), and what it writes -------------------------------------------
CLI = [sys.executable, "-m", "rllib_cvpo.cli"]


def run_cli(*args, timeout=600, env=None, **kw):
    env = dict(os.environ if env is None else env, PYTHONWARNINGS="ignore")
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env, **kw)


def start_cli(log_path, *args, **popen_kw) -> subprocess.Popen:
    """Start the command in the background with stdout and stderr written to ``log_path``. The log file is closed in
    this process at once (the command keeps its own descriptor), so no test leaves it open."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen([*CLI, *map(str, args)], stdout=log, stderr=subprocess.STDOUT, **popen_kw)
    proc.log_path = Path(log_path)  # what wait_for shows if the command ends early
    return proc


def gcs_address(ray):
    """The shared test Ray's address, for a command's --address."""
    return ray.get_runtime_context().gcs_address


def result_rows(trial: Path) -> list:
    """Every row of a trial's result.json, repeats included; [] before the file exists. A last line that Tune is
    still writing (no newline yet) is left out, so polling a live run never reads half a JSON object."""
    f = Path(trial) / "result.json"
    if not f.is_file():
        return []
    return [json.loads(line) for line in f.read_text().split("\n")[:-1] if line.strip()]


def trial_results(run_dir: Path):
    """(the trial directory, every result.json row, repeats included) of a single-trial run directory."""
    trial = next(p for p in Path(run_dir).iterdir() if (p / "result.json").is_file())
    return trial, result_rows(trial)


def iterations_logged(run_dir: Path) -> int:
    """How many result rows a (possibly still starting) single-trial run has written so far."""
    try:
        return len(trial_results(run_dir)[1])
    except (StopIteration, FileNotFoundError, ValueError):
        return 0


def wait_for(predicate, timeout, what, proc=None):
    """Poll ``predicate`` every 0.5 s; fail if ``proc`` ends first (with the end of its output, for a command
    started by :func:`start_cli`) or ``timeout`` seconds pass."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            log = getattr(proc, "log_path", None)
            tail = log.read_text(errors="replace")[-3000:] if log is not None and log.exists() else ""
            raise AssertionError(f"process ended ({proc.returncode}) while waiting for {what}"
                                 + (f"; the end of its output:\n{tail}" if tail else ""))
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def learner_state(checkpoint: Path):
    """CVPO's learner state (duals, update counter, env steps) in a checkpoint."""
    with open(Path(checkpoint) / "learner_group" / "learner" / "state.pkl", "rb") as fh:
        return pickle.load(fh)["cvpo_state"]


def ray_worker_pids(ray, title: bytes):
    """The worker processes of the tests' Ray whose process title (set by Ray) starts with ``title``, e.g.
    b"ray::SingleAgentEnvRunner" or b"ray::CVPO": children of its raylet, read from /proc."""
    (raylet,) = ray._private.worker._global_node.all_processes["raylet"]
    pids = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmdline = fh.read()
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        if ppid == raylet.process.pid and cmdline.startswith(title):
            pids.append(int(entry))
    return pids


def interrupt(proc, timeout=120) -> None:
    """Ctrl-C a command started with Popen and wait for it to end (killed if it does not within ``timeout``)."""
    import signal

    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)


def run_without_ray(script: str) -> dict:
    """Run ``script`` in a fresh Python where ``ray`` and ``rllib_cvpo`` cannot be imported; return the JSON object
    its last line of output prints."""
    guard = "import sys\nsys.modules['ray'] = None; sys.modules['rllib_cvpo'] = None  # importing either fails\n"
    ran = subprocess.run([sys.executable, "-c", guard + script], capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr[-2000:]
    return json.loads(ran.stdout.strip().splitlines()[-1])


def same_draws_per_state(x):
    """In place of a learner's N(0, 1) draws (``CVPOTorchLearner._standard_normal_like``): a function of the row's
    own values (the policy's mean of that state) and, for the E-step's [N, B, a] draws, of the sample index, so a
    state gets the same draws on whichever learner, at whichever row, on whichever device it is updated."""
    import torch

    k = torch.arange(1, x.shape[0] + 1, dtype=x.dtype, device=x.device).view(-1, *[1] * (x.dim() - 1)) \
        if x.dim() == 3 else 1.0
    return torch.sin(5.0 * x + 1.3 * k)
