"""Deterministic evaluation of a CVPO policy: tanh of the Gaussian mean, mapped to the env's action box."""

from __future__ import annotations

from typing import Tuple

import numpy as np
import torch
from ray.rllib.core.columns import Columns


def deterministic_actions(module, obs: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Greedy actions of a CVPO RLModule for a batch of observations ``[B, ...]``, in the env's units."""
    with torch.no_grad():
        out = module.forward_inference({Columns.OBS: torch.as_tensor(np.asarray(obs), dtype=torch.float32)})
    mean, _ = out[Columns.ACTION_DIST_INPUTS].chunk(2, dim=-1)
    squashed = torch.tanh(mean).numpy()
    return low + (squashed + 1.0) * 0.5 * (high - low)


def run_episodes(act, env_id: str, episodes: int = 10, seed: int = 10_000, video_dir=None,
                 video_episodes: int = 1) -> Tuple[np.ndarray, np.ndarray, list]:
    """Per-episode returns and costs of ``act`` (obs -> action in the env's units) over ``episodes`` episodes seeded
    ``seed, seed+1, ...``; with ``video_dir`` the first ``video_episodes`` are written there as MP4 (headless)."""
    from pathlib import Path

    from rllib_cvpo.envs import make_env

    env = make_env(env_id, render_mode="rgb_array" if video_dir is not None else None)
    returns, costs, videos = [], [], []
    try:
        for ep in range(episodes):
            obs, _ = env.reset(seed=seed + ep)
            record = video_dir is not None and ep < video_episodes
            frames = [env.render()] if record else []
            ret = cost = 0.0
            done = False
            while not done:
                obs, reward, terminated, truncated, info = env.step(act(obs))
                ret, cost, done = ret + float(reward), cost + float(info["cost"]), terminated or truncated
                if record:
                    frames.append(env.render())
            returns.append(ret)
            costs.append(cost)
            if record:
                videos.append(write_video(frames, Path(video_dir) / f"episode_{ep:03d}.mp4", env))
    finally:
        env.close()
    return np.array(returns), np.array(costs), videos


def write_video(frames, path, env):
    import imageio.v2 as imageio

    frames = [np.asarray(f) for f in frames if f is not None]
    if not frames:
        raise ValueError(f"{env.spec.id if env.spec else 'this env'} renders no frames, so no video can be written")
    path.parent.mkdir(parents=True, exist_ok=True)
    fps = int(env.metadata.get("render_fps", 30) or 30)
    imageio.mimsave(path, frames, format="FFMPEG", fps=fps, macro_block_size=1)
    return path


def evaluate_module(module, env_id: str, episodes: int = 10, seed: int = 10_000) -> Tuple[np.ndarray, np.ndarray]:
    """Per-episode returns and costs of the deterministic policy over ``episodes`` seeded episodes."""
    space = module.action_space
    returns, costs, _ = run_episodes(
        lambda obs: deterministic_actions(module, obs[None], space.low, space.high)[0], env_id, episodes, seed
    )
    return returns, costs
