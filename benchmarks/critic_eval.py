"""The E-step's no-grad critic evaluation (``CriticEnsemble.forward_sampled``) alone, against an older checkout's.

    .venv/bin/python benchmarks/critic_eval.py --before ../before    # e.g. git worktree add ../before 1ff405e

Both versions of the critic module are loaded in one process (the older one from its file by path), built with the
same seed, checked to give exactly the same values, and timed alternately: best and median of 7 rounds of 40 calls,
one torch thread, B 256, observation 28, action 2, at FSRL's SafetyPointCircle1 settings (3 members = twin reward
critics + one cost critic, 128x128, N 16 for the E-step and N 1 for the TD targets), with 2 members, with 256x256
and with the learning test's 64x64.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

SHAPES = [(3, 128, 16), (3, 128, 1), (2, 128, 16), (3, 256, 16), (3, 64, 16), (3, 64, 1)]  # members, hidden, N


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, metavar="DIR", help="an older checkout of this repository")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=40)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import torch

    from rllib_cvpo.cvpo.torch.cvpo_torch_rl_module import CriticEnsemble as This

    Before = _load(Path(args.before) / "rllib_cvpo/cvpo/torch/cvpo_torch_rl_module.py", "before_module").CriticEnsemble
    torch.set_num_threads(1)
    print(f"forward_sampled, ms per call (best / median of {args.rounds} rounds of {args.calls}), B 256, one thread")
    for members, hidden, n in SHAPES:
        torch.manual_seed(0)
        this = This(members, 30, [hidden, hidden], "relu")
        torch.manual_seed(0)
        before = Before(members, 30, [hidden, hidden], "relu")
        obs, actions = torch.randn(256, 28), torch.rand(n, 256, 2) * 2 - 1
        if not torch.equal(this.forward_sampled(obs, actions), before.forward_sampled(obs, actions)):
            raise SystemExit(f"different values at members {members}, hidden {hidden}, N {n}")
        times = {"this": [], "before": []}
        for _ in range(args.rounds):
            for label, critics in (("this", this), ("before", before)):
                for _ in range(5):
                    critics.forward_sampled(obs, actions)
                t0 = time.perf_counter()
                for _ in range(args.calls):
                    critics.forward_sampled(obs, actions)
                times[label].append(1e3 * (time.perf_counter() - t0) / args.calls)
        a, b = min(times["this"]), min(times["before"])
        print(f"  members {members}, {hidden}x{hidden}, N {n:2d}: this {a:7.3f} / {statistics.median(times['this']):7.3f}"
              f" | before {b:7.3f} / {statistics.median(times['before']):7.3f} | before / this {b / a:.2f}x (best)")


if __name__ == "__main__":
    main()
