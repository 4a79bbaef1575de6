"""Serving a trained CVPO policy over HTTP with Ray Serve (a FastAPI ingress; the OpenAPI schema is at ``/docs``).

    POST /  {"obs": [..]}            -> {"action": [..], "cost_value": [..]}          one observation
    POST /  {"obs": [[..], [..]]}    -> {"actions": [[..], ..], "cost_values": [[..], ..]}   a batch
    GET  /                           -> metadata: env, observation shape, action box, cost limit, env steps trained

``cost_value`` is the cost critic's Q_c(s, a) of the returned action (one per constraint): the expected discounted
cost from here on, a safety signal to watch or gate on.

Concurrent single-observation requests share one forward pass (``@serve.batch``: up to ``MAX_BATCH`` observations,
waiting at most ``BATCH_WAIT_S`` for more). Bad requests get a 4xx answer with a message and the deployment keeps
serving: malformed JSON, nesting deeper than ``MAX_DEPTH`` or a wrong shape or NaN (400), a schema violation (422),
a body over ``MAX_BODY_BYTES`` (413). Load is bounded: past ``MAX_QUEUED`` requests waiting per replica, Serve answers
503 at once instead of letting latency grow without bound.
"""


import json
from typing import Any, Dict, List, Union

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError
from ray import serve
from typing_extensions import TypeAliasType

MAX_BODY_BYTES = 8 * 1024 * 1024  # a batch of ~100k numbers
MAX_DEPTH = 32  # nesting of the JSON body
MAX_BATCH = 64
BATCH_WAIT_S = 0.002
MAX_ONGOING = 256  # in progress per replica: the batch handler forms passes of MAX_BATCH from them; with 64 the
# replica bounced requests back to Serve's router, which retried them with growing back-off (docs/benchmarks.md s. 6)
MAX_QUEUED = 256

Nested = TypeAliasType("Nested", Union[float, List["Nested"]])


class ObsRequest(BaseModel):
    """One observation (a nested list of the observation shape) or a batch of them (one more leading axis)."""

    obs: Nested = Field(..., description="one observation of the policy's observation shape, or a batch [B, ...]")


class ActionResponse(BaseModel):
    action: List[float] = Field(..., description="the deterministic action in the env's units")
    cost_value: List[float] = Field(..., description="Q_c(s, action) per constraint")


class BatchResponse(BaseModel):
    actions: List[List[float]]
    cost_values: List[List[float]]


app = FastAPI(title="rllib-cvpo policy", description=__doc__.split("\n\n")[0])


def _depth(raw: bytes) -> int:
    """The deepest nesting of [ and { in a JSON body, without recursion and vectorised (this runs on every request):
    brackets inside strings count too, which only matters for bodies no observation request has."""
    data = np.frombuffer(raw, np.uint8)
    step = np.isin(data, (0x5B, 0x7B)).astype(np.int32) - np.isin(data, (0x5D, 0x7D)).astype(np.int32)
    return int(np.cumsum(step).max(initial=0))


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=MAX_ONGOING,
                  max_queued_requests=MAX_QUEUED, graceful_shutdown_timeout_s=2.0, graceful_shutdown_wait_loop_s=0.5)
@serve.ingress(app)
class CVPOPolicyServer:
    def __init__(self, checkpoint: str, max_batch_size: int = MAX_BATCH) -> None:
        import torch

        from rllib_cvpo.policy import load_policy

        torch.set_num_threads(1)
        self.policy = load_policy(checkpoint)
        self._act_together.set_max_batch_size(max_batch_size)  # 1: one forward pass per request

    @app.get("/")
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

    @serve.batch(max_batch_size=MAX_BATCH, batch_wait_timeout_s=BATCH_WAIT_S)
    async def _act_together(self, observations: List[np.ndarray]) -> List[Dict[str, Any]]:
        """Single observations of concurrent requests, in one forward pass."""
        obs = np.stack(observations)
        actions = self.policy.act(obs)
        values = self.policy.cost_value(obs, actions)
        return [{"action": a.tolist(), "cost_value": v.tolist()} for a, v in zip(actions, values)]

    @app.post("/", response_model=Union[ActionResponse, BatchResponse], openapi_extra={
        "requestBody": {"required": True, "content": {"application/json": {"schema": ObsRequest.model_json_schema()}}}})
    async def act(self, request: Request):
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            return _error(413, f"request body of {len(raw)} bytes is over the limit of {MAX_BODY_BYTES}")
        depth = _depth(raw)
        if depth > MAX_DEPTH:
            return _error(400, f"JSON nested deeper than {MAX_DEPTH} levels")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as err:
            return _error(400, f"malformed JSON: {err}")
        if not isinstance(body, dict) or "obs" not in body:
            return _error(400, 'expected a JSON object {"obs": [...]} holding one observation or a batch')
        try:
            ObsRequest.model_validate(body)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(x) for x in first.get("loc", ()))
            return _error(422, f"obs must be numeric (nested lists of numbers): {first.get('msg')} at {where}")
        try:
            obs, single = self.policy._check_obs(body["obs"])
        except ValueError as err:
            return _error(400, str(err))
        if single:
            return await self._act_together(obs[0])
        actions = self.policy.act(obs)
        return {"actions": actions.tolist(), "cost_values": self.policy.cost_value(obs, actions).tolist()}


def build_app(checkpoint: str, num_replicas: int = 1, max_batch_size: int = MAX_BATCH):
    """The Serve application for a checkpoint (or a run directory's best feasible checkpoint)."""
    from rllib_cvpo.policy import resolve_checkpoint

    path = str(resolve_checkpoint(checkpoint).resolve())
    return CVPOPolicyServer.options(num_replicas=num_replicas).bind(path, max_batch_size)


def port_problem(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be served on (in use, or not an address of this machine), or None."""
    import socket

    if not 1 <= int(port) <= 65535:
        return f"port {port} is out of range (1-65535)"
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.bind((host, int(port)))
    except OSError as err:
        return f"cannot listen on {host}:{port}: {err.strerror or err}"
    return None


def start(checkpoint: str, port: int = 8000, host: str = "127.0.0.1", name: str = "cvpo", route_prefix: str = "/",
          num_replicas: int = 1, max_batch_size: int = MAX_BATCH):
    """Deploy on the connected Ray cluster and return the app's handle; HTTP on ``host:port``. ``max_batch_size``
    bounds how many concurrent single-observation requests share a forward pass (1: none do)."""
    serve.start(http_options={"host": host, "port": port})
    return serve.run(build_app(checkpoint, num_replicas, max_batch_size), name=name, route_prefix=route_prefix,
                     blocking=False)
