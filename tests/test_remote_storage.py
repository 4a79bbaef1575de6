"""Results on remote storage: a sweep written to s3:// (moto's S3 server on this machine, spoken to over HTTP by
pyarrow, as Tune does with real S3), then `report` and `evaluate` on that URI."""

import json
import os
import subprocess
import sys
import time

import pytest

from helpers import free_port, run_cli, sweep_yaml

BUCKET = "cvpo-runs"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """(storage URI, env with credentials) of a bucket on a local moto S3 server."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-p", str(port)], stdout=log,
                              stderr=subprocess.STDOUT)
    env = dict(os.environ, AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1")
    try:
        import boto3

        deadline = time.time() + 60
        while True:
            try:
                boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", aws_access_key_id="test",
                             aws_secret_access_key="test", region_name="us-east-1").create_bucket(Bucket=BUCKET)
                break
            except Exception:  # noqa: BLE001 - the server is still starting
                assert server.poll() is None and time.time() < deadline, "moto's S3 server did not start"
                time.sleep(0.5)
        yield f"s3://{BUCKET}/sweeps?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1", env
    finally:
        server.kill()
        server.wait(timeout=30)


@pytest.mark.slow
def test_report_and_evaluate_read_a_sweep_on_s3(s3, tmp_path):
    storage, env = s3
    path = tmp_path / "sweep.yaml"
    path.write_text(sweep_yaml("remote", 1000, tail="resources: {env_runners: 0}\nmax_concurrent_trials: 1\n"))
    # Its own Ray (no --address): the trials upload their results and checkpoints to S3 with these credentials.
    sweep = run_cli("sweep", path, "--storage", storage, env=env, timeout=600, cwd=tmp_path)
    assert sweep.returncode == 0, sweep.stdout[-3000:] + sweep.stderr[-3000:]
    uri = f"s3://{BUCKET}/sweeps/remote?" + storage.split("?", 1)[1]
    assert f"report: rllib-cvpo report '{uri}'" in sweep.stdout
    assert not (tmp_path / "remote").exists()  # nothing was written locally

    rp = run_cli("report", uri, env=env, cwd=tmp_path)
    assert rp.returncode == 0, rp.stdout[-3000:] + rp.stderr[-3000:]
    best = next(line for line in rp.stdout.splitlines() if line.startswith("checkpoint: "))[len("checkpoint: "):]
    assert best.startswith(f"s3://{BUCKET}/sweeps/remote/CVPO_") and "/checkpoint_" in best
    assert (tmp_path / "remote_report" / "report.csv").is_file()

    ev = run_cli("evaluate", uri, "--episodes", 1, "--json", env=env, cwd=tmp_path)
    assert ev.returncode == 0, ev.stdout[-3000:] + ev.stderr[-3000:]
    out = json.loads(ev.stdout.strip().splitlines()[-1])
    assert out["checkpoint"] == best and out["env"] == "SpeedLimit-v0" and len(out["returns"]) == 1

    missing = run_cli("report", uri.replace("/remote?", "/nothing?"), env=env, cwd=tmp_path)
    assert missing.returncode == 2 and "no directory at" in missing.stderr
