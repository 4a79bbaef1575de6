"""What the navigation tasks' worlds cost: reset time, memory and raw env steps/s (resets included) of an env that
never renders (a plain skybox, ``rllib_cvpo/envs/compat.py`` fix 9) against one made with ``render_mode="rgb_array"``,
which builds the star skybox as safety-gymnasium does. Both kinds alternate in one process, side by side. Then the
objects' placement on reset (fix 10): the same plain env with the placement tests in Python floats against
safety-gymnasium's own numpy ones, alternating in one process.

    .venv/bin/python benchmarks/env_worlds.py
    .venv/bin/python benchmarks/env_worlds.py --env SafetyPointGoal1-v0 --resets 20 --steps 5000

Memory: the model's decoded textures (``MjModel.ntexdata``) and the process's anonymous memory (RssAnon) grown by
building ``--envs`` envs of the kind and resetting each once (each kind in a fresh subprocess, so one does not
reuse the other's freed pages).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sampling import env_rate  # noqa: E402

TASKS = ("SafetyPointGoal1-v0", "SafetyPointCircle1-v0", "SafetyCarButton1-v0")
KINDS = {"plain (never renders)": None, "star skybox (rgb_array)": "rgb_array"}


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon"):
                return int(line.split()[1]) / 1024
    return float("nan")


def memory(env_id: str, render_mode: str | None, envs: int) -> dict:
    from rllib_cvpo.envs import make_env

    import_only = make_env(env_id)  # imports and the first model: not counted
    import_only.close()
    before = _rss_mb()
    made = [make_env(env_id, render_mode=render_mode) for _ in range(envs)]
    for i, env in enumerate(made):
        env.reset(seed=i)
    return {"rss_mb": _rss_mb() - before, "textures_mb": made[0].unwrapped.task.model.ntexdata / 2**20}


def reset_ms(env, resets: int, seed: int) -> float:
    times = []
    for i in range(resets):
        t0 = time.perf_counter()
        env.reset(seed=seed + i)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def alternate(kinds: dict, args) -> tuple[dict, dict]:
    """Reset times and raw rates of each kind, {name: (env, context)}, the kinds alternating within each round."""
    resets = {name: [] for name in kinds}
    rates = {name: [] for name in kinds}
    for r in range(args.rounds):
        for name, (env, ctx) in kinds.items():
            with ctx():
                resets[name].append(reset_ms(env, args.resets, seed=100 * r))
                rates[name].append(env_rate(env, args.steps, seed=r))
    return resets, rates


@contextlib.contextmanager
def numpy_placement_tests():
    """safety-gymnasium's own layout sampling (numpy distance tests) instead of fix 10's, while the block runs."""
    from safety_gymnasium.utils.random_generator import RandomGenerator

    fixed = RandomGenerator.sample_layout, RandomGenerator.sample_goal_position
    RandomGenerator.sample_layout, RandomGenerator.sample_goal_position = RandomGenerator._rllib_cvpo_original
    try:
        yield
    finally:
        RandomGenerator.sample_layout, RandomGenerator.sample_goal_position = fixed


def placement(env_id: str, args) -> None:
    from rllib_cvpo.envs import make_env

    env = make_env(env_id)
    kinds = {"float tests (fix 10)": (env, contextlib.nullcontext),
             "numpy tests (safety-gymnasium's)": (env, numpy_placement_tests)}
    resets, rates = alternate(kinds, args)
    print("| placement tests | reset (ms, median) | raw env steps/s, resets included |")
    print("|---|---|---|")
    for name in kinds:
        print(f"| {name} | {' / '.join(f'{x:.1f}' for x in resets[name])} "
              f"| {' / '.join(f'{x:,.0f}' for x in rates[name])} |")
    floats, numpy_ = kinds
    print(f"reset: numpy / float {statistics.median(resets[numpy_]) / statistics.median(resets[floats]):.2f}x; "
          f"raw rate: float / numpy {statistics.median(rates[floats]) / statistics.median(rates[numpy_]):.2f}x")
    env.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", action="append", help="task id (repeatable); default: " + ", ".join(TASKS))
    parser.add_argument("--resets", type=int, default=10, help="resets timed per kind and round (the median)")
    parser.add_argument("--steps", type=int, default=3000, help="env steps per raw-rate measurement")
    parser.add_argument("--rounds", type=int, default=2, help="rounds alternating the two kinds")
    parser.add_argument("--envs", type=int, default=8, help="envs built for the memory figure (as one EnvRunner)")
    parser.add_argument("--memory-only", nargs=2, metavar=("ENV", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_only:  # the subprocess of one memory figure
        env_id, mode = args.memory_only
        print(json.dumps(memory(env_id, None if mode == "none" else mode, args.envs)))
        return

    import torch

    from rllib_cvpo.envs import make_env

    print(f"{platform.node()} {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    for env_id in args.env or TASKS:
        print(f"\n{env_id}")
        print("| env | reset (ms, median) | raw env steps/s, resets included | decoded textures (MB) "
              f"| memory of {args.envs} envs (MB) |")
        print("|---|---|---|---|---|")
        made = {name: make_env(env_id, render_mode=mode) for name, mode in KINDS.items()}
        resets, rates = alternate({name: (env, contextlib.nullcontext) for name, env in made.items()}, args)
        for name, mode in KINDS.items():
            out = subprocess.run([sys.executable, __file__, "--memory-only", env_id, mode or "none",
                                  "--envs", str(args.envs)], capture_output=True, text=True, check=True)
            mem = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {name} | {' / '.join(f'{x:.1f}' for x in resets[name])} "
                  f"| {' / '.join(f'{x:,.0f}' for x in rates[name])} | {mem['textures_mb']:.1f} | {mem['rss_mb']:,.0f} |")
        plain, star = KINDS
        print(f"reset: star / plain {statistics.median(resets[star]) / statistics.median(resets[plain]):.1f}x; "
              f"raw rate: plain / star {statistics.median(rates[plain]) / statistics.median(rates[star]):.2f}x")
        for env in made.values():
            env.close()
        placement(env_id, args)


if __name__ == "__main__":
    main()
