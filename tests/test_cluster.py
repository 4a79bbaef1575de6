"""cluster/: launcher YAMLs against Ray's own schema, the KubeRay RayJob's required fields, and a real two-node Ray
cluster on this machine that runs a sweep submitted with `ray job submit`, its EnvRunners on the worker node."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from helpers import free_port, result_rows, sweep_yaml

REPO = Path(__file__).resolve().parents[1]
LAUNCHER_YAMLS = sorted(p.name for p in (REPO / "cluster").glob("*.yaml") if "kuberay" not in p.name)


def test_there_are_cpu_gpu_and_onprem_launcher_configs():
    assert {"aws-cpu.yaml", "aws-gpu-learner.yaml", "onprem.yaml"} <= set(LAUNCHER_YAMLS)


@pytest.mark.parametrize("name", LAUNCHER_YAMLS)
def test_launcher_yaml_validates_against_rays_schema(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "cluster" / name).read_text())
    validate_config(prepare_config(config))
    # ... and the schema does reject what is wrong (a misspelt key), so passing means something.
    broken = dict(config, setup_comands=["true"])
    with pytest.raises(Exception, match="setup_comands"):
        validate_config(prepare_config(broken))
    # Every node installs the package.
    commands = " ".join(config.get("setup_commands", []) + config.get("head_setup_commands", [])
                        + config.get("worker_setup_commands", []))
    assert "pip install -q -e ~/rllib-cvpo" in commands and config["file_mounts"]["~/rllib-cvpo"] == "."


def test_gpu_variant_puts_a_gpu_on_the_head_and_cpu_workers():
    config = yaml.safe_load((REPO / "cluster" / "aws-gpu-learner.yaml").read_text())
    head = config["available_node_types"][config["head_node_type"]]["node_config"]["InstanceType"]
    workers = [t["node_config"]["InstanceType"] for n, t in config["available_node_types"].items()
               if n != config["head_node_type"]]
    assert head.startswith(("g", "p")) and all(w.startswith("c") for w in workers)


def test_kuberay_rayjob_carries_the_required_fields():
    job = yaml.safe_load((REPO / "cluster" / "kuberay-rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob" and job["metadata"]["name"]
    spec = job["spec"]
    assert spec["entrypoint"].startswith("rllib-cvpo sweep tune_configs/")
    entry_file = spec["entrypoint"].split()[2]
    assert (REPO / entry_file).is_file()
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    containers = head["template"]["spec"]["containers"]
    assert containers and containers[0]["image"] and containers[0]["name"]
    for group in cluster["workerGroupSpecs"]:
        assert group["groupName"] and isinstance(group["rayStartParams"], dict)
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert group["template"]["spec"]["containers"][0]["image"] == containers[0]["image"]
    yaml.safe_load(spec["runtimeEnvYAML"])


# -- a real two-node cluster ---------------------------------------------------------------------------------------
def _stop_nodes(temp_dir: str) -> None:
    """Stop only this test's Ray processes (``ray stop`` would stop every Ray on the machine): those whose command
    line names this cluster's temp dir, and all their descendants (agents and workers rename themselves)."""
    import signal

    parents, commands = {}, {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            commands[int(proc.name)] = (proc / "cmdline").read_bytes().decode(errors="ignore")
            stat = (proc / "stat").read_text()
            parents[int(proc.name)] = int(stat[stat.rindex(")") + 2 :].split()[1])
        except (OSError, ValueError):
            continue
    doomed = {pid for pid, cmd in commands.items() if temp_dir in cmd}
    grown = True
    while grown:
        children = {pid for pid, ppid in parents.items() if ppid in doomed} - doomed
        grown = bool(children)
        doomed |= children
    for pid in doomed:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


SWEEP = sweep_yaml("two_node", 1000, extra_base="custom_resources_per_env_runner: {cvpo_worker_node: 1}\n",
                   tail="resources: {env_runners: 1}\n")


@pytest.mark.slow
def test_job_submitted_to_a_two_node_cluster_runs_a_sweep_with_env_runners_on_the_worker(tmp_path):
    bin_dir = Path(sys.executable).parent
    ray_cli = str(bin_dir / "ray")
    temp_dir = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: Ray's socket paths must stay short
    port, dash = free_port(), free_port()
    # A token of this cluster's own, given to every process of it: token authentication on, whatever other Ray
    # instances on this machine (and ~/.ray/auth_token) do, so the test does not depend on the order of tests.
    token = Path(temp_dir, "auth_token")
    token.write_text(os.urandom(32).hex())
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN_PATH=str(token))
    env.pop("RAY_ADDRESS", None)
    sweep_file = tmp_path / "two_node.yaml"
    sweep_file.write_text(SWEEP)
    storage = tmp_path / "storage"
    try:
        def node_ports():  # two nodes on one machine (and maybe another Ray): no default agent ports
            return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                    f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]

        subprocess.run([ray_cli, "start", "--head", f"--port={port}", f"--dashboard-port={dash}",
                        "--include-dashboard=true", "--num-cpus=2", f"--temp-dir={temp_dir}", "--disable-usage-stats",
                        *node_ports()], check=True, env=env, capture_output=True, timeout=180)
        subprocess.run([ray_cli, "start", f"--address=127.0.0.1:{port}", "--num-cpus=2",
                        '--resources={"cvpo_worker_node": 2}', f"--temp-dir={temp_dir}", "--disable-usage-stats",
                        *node_ports()], check=True, env=env, capture_output=True, timeout=180)
        deadline = time.time() + 120
        while True:  # the job agent comes up a few seconds after the head
            job = subprocess.run(
                [ray_cli, "job", "submit", f"--address=http://127.0.0.1:{dash}", "--",
                 sys.executable, "-m", "rllib_cvpo.cli", "sweep", str(sweep_file), "--storage", str(storage),
                 "--address", "auto"],
                env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path,
            )
            if "No available agent" not in job.stdout + job.stderr or time.time() > deadline:
                break
            time.sleep(2)
        assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-4000:]
        assert "succeeded" in job.stdout

        # Results landed on disk: both trials reached their env steps, with checkpoints.
        trials = sorted((storage / "two_node").glob("CVPO_*"))
        assert len(trials) == 2
        for trial in trials:
            rows = result_rows(trial)
            assert rows[-1]["cvpo"]["env_steps"] >= 1000
            assert any(p.is_dir() for p in trial.glob("checkpoint_*"))

        # The EnvRunner actors ran on the worker node (the only node with the custom resource they asked for).
        script = (
            "import json, ray\n"
            "from ray.util.state import list_actors, list_nodes\n"
            "ray.init(address='auto')\n"
            "nodes = {n.node_id: n.resources_total for n in list_nodes()}\n"
            "runners = list_actors(filters=[('class_name', '=', 'SingleAgentEnvRunner')], limit=1000)\n"
            "print(json.dumps({'nodes': {k: v for k, v in nodes.items()}, "
            "'runners': [a.node_id for a in runners]}))\n"
        )
        probe = subprocess.run([sys.executable, "-c", script], env=dict(env, RAY_ADDRESS=f"127.0.0.1:{port}"),
                               capture_output=True, text=True, timeout=120)
        assert probe.returncode == 0, probe.stderr[-3000:]
        info = json.loads(probe.stdout.strip().splitlines()[-1])
        assert len(info["nodes"]) == 2
        worker = [n for n, res in info["nodes"].items() if "cvpo_worker_node" in res]
        assert len(worker) == 1
        assert len(info["runners"]) >= 2  # one sampling EnvRunner per trial
        assert set(info["runners"]) == set(worker)
    finally:
        _stop_nodes(temp_dir)
        time.sleep(1)
        shutil.rmtree(temp_dir, ignore_errors=True)
