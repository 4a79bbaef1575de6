"""Serving a trained CVPO policy over HTTP with Ray Serve.

    POST /  {"obs": [..]}            -> {"action": [..], "cost_value": [..]}          one observation
    POST /  {"obs": [[..], [..]]}    -> {"actions": [[..], ..], "cost_values": [[..], ..]}   a batch
    GET  /                           -> metadata: env, observation shape, action box, cost limit, env steps trained

``cost_value`` is the cost critic's Q_c(s, a) of the returned action (one per constraint): the expected discounted
cost from here on, a safety signal to watch or gate on. Bad requests (malformed JSON, a wrong shape, NaN) get a 400
answer with a message; the deployment keeps serving.
"""

from __future__ import annotations

import json
from typing import Any, Dict

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=64, graceful_shutdown_timeout_s=2.0,
                  graceful_shutdown_wait_loop_s=0.5)
class CVPOPolicyServer:
    def __init__(self, checkpoint: str) -> None:
        import torch

        from rllib_cvpo.policy import load_policy

        torch.set_num_threads(1)
        self.policy = load_policy(checkpoint)

    def metadata(self) -> Dict[str, Any]:
        p = self.policy
        return {
            "checkpoint": str(p.checkpoint),
            "env": p.env_id,
            "observation_shape": list(p.observation_shape),
            "action_low": p.action_low.tolist(),
            "action_high": p.action_high.tolist(),
            "cost_limit": p.cost_limit,
            "cost_keys": p.metadata.get("cost_keys", ["cost"]),
            "env_steps_trained": p.metadata.get("env_steps"),
            "request": {"obs": "one observation (nested list of shape observation_shape) or a batch [B, ...]"},
        }

    def answer(self, body: Any) -> Dict[str, Any]:
        if not isinstance(body, dict) or "obs" not in body:
            raise ValueError('expected a JSON object {"obs": [...]} holding one observation or a batch')
        obs = body["obs"]
        actions = self.policy.act(obs)
        values = self.policy.cost_value(obs, actions)
        if actions.ndim == len(self.policy.action_low.shape):
            return {"action": actions.tolist(), "cost_value": values.tolist()}
        return {"actions": actions.tolist(), "cost_values": values.tolist()}

    async def __call__(self, request: Request):
        if request.method == "GET":
            return JSONResponse(self.metadata())
        if request.method != "POST":
            return JSONResponse({"error": f"method {request.method} not allowed: use GET or POST"}, status_code=405)
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as err:
            return JSONResponse({"error": f"malformed JSON: {err}"}, status_code=400)
        try:
            return JSONResponse(self.answer(body))
        except ValueError as err:
            return JSONResponse({"error": str(err)}, status_code=400)


def build_app(checkpoint: str, num_replicas: int = 1):
    """The Serve application for a checkpoint (or a run directory's best feasible checkpoint)."""
    from rllib_cvpo.policy import resolve_checkpoint

    path = str(resolve_checkpoint(checkpoint).resolve())
    return CVPOPolicyServer.options(num_replicas=num_replicas).bind(path)


def start(checkpoint: str, port: int = 8000, host: str = "127.0.0.1", name: str = "cvpo", route_prefix: str = "/",
          num_replicas: int = 1):
    """Deploy on the connected Ray cluster and return the app's handle; HTTP on ``host:port``."""
    serve.start(http_options={"host": host, "port": port})
    return serve.run(build_app(checkpoint, num_replicas), name=name, route_prefix=route_prefix, blocking=False)
