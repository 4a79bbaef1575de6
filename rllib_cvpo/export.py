"""Export a trained policy as a file that runs without Ray or RLlib: the deterministic policy, observation -> action in
the env's units (tanh of the Gaussian mean, mapped to the action box), as TorchScript or ONNX.

    rllib-cvpo export runs/MyRun --out policy.pt                    # TorchScript: needs torch only
    >>> policy = torch.jit.load("policy.pt")
    >>> action = policy(torch.as_tensor(obs)[None])[0]

    rllib-cvpo export runs/MyRun --format onnx --out policy.onnx    # ONNX: any ONNX runtime
    >>> session = onnxruntime.InferenceSession("policy.onnx")
    >>> action = session.run(None, {"obs": obs[None].astype(np.float32)})[0][0]

Both take a float32 batch ``[B, *observation_shape]`` and return ``[B, *action_shape]``. The TorchScript module's
``observation_shape``, ``action_low``, ``action_high`` and ``env`` attributes describe it; the ONNX model carries
the same as metadata properties (JSON values). The numbers are those of ``load_policy(...).act()`` (same weights,
the same float32 arithmetic).
"""


import copy
from pathlib import Path
from typing import List

import torch
from torch import nn

FORMATS = ("torchscript", "onnx")


class DeterministicPolicy(nn.Module):
    """obs [B, *obs_shape] -> low + (tanh(mean) + 1) / 2 * (high - low), [B, *act_shape]."""

    observation_shape: List[int]
    action_shape: List[int]
    env: str

    def __init__(self, pi: nn.Module, low, high, observation_shape, action_shape, env: str) -> None:
        super().__init__()
        self.pi = copy.deepcopy(pi).float().eval()
        self.register_buffer("action_low", torch.as_tensor(low, dtype=torch.float32).reshape(-1))
        self.register_buffer("action_high", torch.as_tensor(high, dtype=torch.float32).reshape(-1))
        self.observation_shape = [int(x) for x in observation_shape]
        self.action_shape = [int(x) for x in action_shape]
        self.act_dim = int(self.action_low.numel())
        self.env = env

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        out = self.pi(obs.reshape(obs.shape[0], -1).float())
        squashed = torch.tanh(out[:, : self.act_dim])
        actions = self.action_low + (squashed + 1.0) * 0.5 * (self.action_high - self.action_low)
        return actions.reshape([obs.shape[0]] + self.action_shape)


def export_policy(checkpoint: str | Path, out: str | Path, fmt: str = "torchscript", which: str = "best") -> Path:
    """Write the deterministic policy of a checkpoint (or a run directory's best feasible one) to ``out``."""
    from rllib_cvpo.policy import load_policy

    if fmt not in FORMATS:
        raise ValueError(f"export format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    policy = load_policy(checkpoint, which=which)
    low, high = policy._box()
    act_shape = tuple(policy.module.action_space.shape)
    model = DeterministicPolicy(policy.module.pi, low, high, policy.observation_shape, act_shape,
                                policy.env_id or "")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "torchscript":
        torch.jit.script(model).save(str(out))
    else:
        _export_onnx(model, out, {"env": model.env, "observation_shape": model.observation_shape,
                                  "action_low": model.action_low.tolist(),
                                  "action_high": model.action_high.tolist()})
    return out


def _export_onnx(model: DeterministicPolicy, out: Path, metadata: dict) -> None:
    import json
    import logging

    try:
        import onnx
    except ImportError:
        raise ValueError("ONNX export needs the onnx extra: pip install 'rllib-cvpo[onnx]'") from None
    example = torch.zeros((2, *model.observation_shape))
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    program = torch.onnx.export(model, (example,), input_names=["obs"], output_names=["action"],
                                dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True, verbose=False)
    program.save(str(out))
    proto = onnx.load(str(out))
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    onnx.save(proto, str(out))
