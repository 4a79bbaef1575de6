"""How many of each critic's hidden units are alive on a checkpoint's newest replay rows, and how much its Q varies.

A unit is alive when its input is above 0 for at least one of the rows (with ReLU a unit at or below 0 on every
input gets no gradient, so it stays dead; leaky ReLU keeps a gradient there). Per critic member (reward critics first, then the cost heads): the share of
alive units per hidden layer, and the mean and standard deviation of Q over the rows.

    .venv/bin/python benchmarks/learning/critic_units.py RUN_DIR/checkpoint_000035 [more checkpoints] [--rows 5000]
"""

from __future__ import annotations

import argparse
import os
import pickle

import torch

from rllib_cvpo.cvpo.torch.cvpo_torch_rl_module import ACTIVATIONS


def critic_activation(checkpoint: str) -> str:
    settings = pickle.load(open(os.path.join(checkpoint, "class_and_ctor_args.pkl"), "rb"))["ctor_args_and_kwargs"][0][0]
    model_config = settings.get("_model_config") or settings.get("model_config") or {}
    return settings.get("critic_activation") or model_config.get("fcnet_activation", "relu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--rows", type=int, default=5000)
    args = parser.parse_args()
    for checkpoint in args.checkpoints:
        module_state = os.path.join(checkpoint, "learner_group", "learner", "rl_module", "default_policy",
                                    "module_state.pkl")
        weights = pickle.load(open(module_state, "rb"))
        shard = pickle.load(open(os.path.join(checkpoint, "algorithm_state.pkl"), "rb"))["cvpo_replay_buffer"]["shards"][0]
        size = shard["size"]
        x = torch.cat([torch.as_tensor(shard["data"][k][:size][-args.rows:], dtype=torch.float32)
                       for k in ("obs", "actions")], dim=-1)
        layers = sorted({int(k.split(".")[2]) for k in weights if k.startswith("critics.net.") and k.endswith("weight")})
        name = critic_activation(checkpoint)
        activate = ACTIVATIONS[name]()
        lines = []
        for member in range(weights[f"critics.net.{layers[0]}.weight"].shape[0]):
            h, alive = x, []
            for i, layer in enumerate(layers):
                h = h @ torch.as_tensor(weights[f"critics.net.{layer}.weight"][member]) + torch.as_tensor(
                    weights[f"critics.net.{layer}.bias"][member])
                if i < len(layers) - 1:
                    alive.append(float((h > 0).any(0).float().mean()))
                    h = activate(h)
            q = h.squeeze(-1)
            lines.append(f"member {member}: alive " + ", ".join(f"{a:.0%}" for a in alive)
                         + f"; Q mean {float(q.mean()):.3f} sd {float(q.std()):.3f}")
        print(f"{checkpoint} (critics' activation: {name})")
        for line in lines:
            print("  " + line)


if __name__ == "__main__":
    main()
