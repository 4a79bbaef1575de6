"""`rllib-cvpo serve`: real HTTP requests against a Ray Serve deployment of a trained checkpoint."""

import json
import subprocess
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from helpers import CLI, free_port, interrupt, run_cli, small_config, start_cli


def _request(url, body=None, raw=None, timeout=30):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        text = err.read()
        try:
            return err.code, json.loads(text)
        except ValueError:  # e.g. Serve's own 503 under backpressure is plain text
            return err.code, {"error": text.decode(errors="replace")}


@pytest.fixture(scope="module")
def checkpoint(ray_local, tmp_path_factory):
    algo = small_config().build_algo()
    try:
        for _ in range(2):
            algo.train()
        return algo.save_to_path(str(tmp_path_factory.mktemp("serve") / "ckpt"))
    finally:
        algo.stop()


def test_served_policy_answers_like_evaluate_and_survives_bad_requests(ray_local, checkpoint, tmp_path):
    from rllib_cvpo import load_policy

    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    proc = start_cli(tmp_path / "serve.log", "serve", checkpoint, "--port", port, "--address",
                     ray_local.get_runtime_context().gcs_address)
    try:
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                status, meta = _request(url)
                if status == 200 and "serving " in (tmp_path / "serve.log").read_text():
                    break
            except (urllib.error.URLError, ConnectionError, json.JSONDecodeError):
                pass
            assert time.time() < deadline, "the server did not come up"
            time.sleep(0.5)

        assert meta["env"] == "SpeedLimit-v0" and meta["observation_shape"] == [2]
        assert meta["action_low"] == [-1.0, -1.0] and meta["action_high"] == [1.0, 1.0]
        assert meta["cost_limit"] == 25.0 and meta["env_steps_trained"] == 800

        policy = load_policy(checkpoint)  # what `rllib-cvpo evaluate` acts with
        rng = np.random.default_rng(0)
        batch = np.column_stack([rng.uniform(0.25, 2, 8), rng.uniform(-1, 1, 8)]).astype(np.float32)
        status, one = _request(url, {"obs": batch[0].tolist()})
        assert status == 200
        np.testing.assert_allclose(one["action"], policy.act(batch[0]), rtol=1e-6, atol=1e-7)
        assert len(one["cost_value"]) == 1 and np.isfinite(one["cost_value"][0])
        np.testing.assert_allclose(one["cost_value"], policy.cost_value(batch[0], policy.act(batch[0])), rtol=1e-5)
        status, many = _request(url, {"obs": batch.tolist()})
        assert status == 200
        np.testing.assert_allclose(many["actions"], policy.act(batch), rtol=1e-6, atol=1e-7)
        assert np.asarray(many["cost_values"]).shape == (8, 1)

        bad = [
            (None, b"{not json", "malformed JSON"),
            ({"obs": [1.0, 2.0, 3.0]}, None, "observation shape [3] does not match the policy's [2]"),
            ({"obs": [[1.0], [2.0]]}, None, "does not match"),
            ({"obs": [float("nan"), 0.0]}, None, "NaN"),
            ({"obs": ["a", "b"]}, None, "numeric"),
            ({"observation": [1.0, 0.0]}, None, 'expected a JSON object {"obs": [...]}'),
        ]
        for body, raw, message in bad:
            status, answer = _request(url, body, raw)
            assert 400 <= status < 500, (body, status, answer)
            assert message in answer["error"], answer
            status, good = _request(url, {"obs": batch[1].tolist()})  # still serving
            assert status == 200 and len(good["action"]) == 2

        # Limits: nesting and size give 4xx, never a 500; the OpenAPI schema documents the request.
        deep = b'{"obs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        status, answer = _request(url, raw=deep)
        assert status == 400 and "nested deeper than 32 levels" in answer["error"]
        huge = json.dumps({"obs": [[0.5, 0.0]] * 700_000}).encode()
        status, answer = _request(url, raw=huge)
        assert status == 413 and "over the limit" in answer["error"], (status, answer)
        with urllib.request.urlopen(url + "openapi.json", timeout=30) as resp:
            schema = json.loads(resp.read())
        assert "obs" in json.dumps(schema["paths"]["/"]["post"]["requestBody"])

        # A second server on the same port is refused in one line before anything starts; the first keeps serving.
        second = run_cli("serve", checkpoint, "--port", port, "--address", ray_local.get_runtime_context().gcs_address,
                         timeout=120)
        assert second.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in second.stderr, second.stderr[-2000:]
        assert len(second.stderr.strip().splitlines()) == 1
        status, again = _request(url, {"obs": batch[0].tolist()})
        assert status == 200 and again["action"] == one["action"]

        # A burst of concurrent requests shares forward passes (@serve.batch): every one answered, correctly.
        with ThreadPoolExecutor(max_workers=32) as pool:
            answers = list(pool.map(lambda i: _request(url, {"obs": batch[i % 8].tolist()}, timeout=600), range(128)))
        assert all(status == 200 for status, _ in answers)
        for i, (_, answer) in enumerate(answers):
            np.testing.assert_allclose(answer["action"], many["actions"][i % 8], rtol=1e-5, atol=1e-6)  # batch vs single forward: float32 rounding
        # 500 at once: bounded by the queue limit, each request is answered correctly or refused with 503 at once.
        # The client timeout only guards against a hang: on a loaded 2-core machine the 500 connections alone keep the
        # proxy busy for tens of seconds, and how long this takes is for benchmarks/serve_latency.py, not this test.
        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=500) as pool:
            flood = list(pool.map(lambda i: _request(url, {"obs": batch[i % 8].tolist()}, timeout=600), range(500)))
        print(f"500 concurrent requests answered in {time.monotonic() - started:.1f} s")
        assert {status for status, _ in flood} <= {200, 503}, {status for status, _ in flood}
        assert sum(status == 200 for status, _ in flood) >= 64
        for i, (status, answer) in enumerate(flood):
            if status == 200:
                np.testing.assert_allclose(answer["action"], many["actions"][i % 8], rtol=1e-5, atol=1e-6)
    finally:
        interrupt(proc, timeout=120)
    assert proc.returncode == 0, (tmp_path / "serve.log").read_text()[-3000:]


def test_serve_rejects_a_port_out_of_range_in_one_line():
    proc = run_cli("serve", "anything", "--port", 70000, timeout=120)
    assert proc.returncode == 2 and "port number from 1 to 65535, got '70000'" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_serve_rejects_an_unreadable_checkpoint_with_exit_2(tmp_path):
    proc = subprocess.run([*CLI, "serve", str(tmp_path / "missing")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "checkpoint not found" in proc.stderr and "Traceback" not in proc.stderr
