"""The learner's torch threads against the training loop: 1 and 2 threads, each loop, in one run.

    .venv/bin/python benchmarks/learner_threads.py

SafetyPointCircle1-v0 with the command's defaults (one remote EnvRunner with 8 envs, the learner in the driver),
evaluation left out. For the overlapped loop (the default) and the synchronous one, the full loop's env steps/s
(``benchmarks/pipeline.py``'s ``training_rate``, 3 iterations after the warm-up) with the driver's torch set to 1,
2, 1, 2 threads in turn (the repeat shows the noise), then the learner alone at 1 and 2 threads. This measurement
chose ``learner_num_threads``' automatic rule (docs/benchmarks.md section 2).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    import ray
    import torch
    from pipeline import build, learner_rate, training_rate

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    for overlap in (True, False):
        algo = build(overlap, False, "SafetyPointCircle1-v0")
        try:
            for threads in (1, 2, 1, 2):
                torch.set_num_threads(threads)
                print(f"{'overlapped' if overlap else 'synchronous'} loop, {threads} thread(s): full loop "
                      f"{training_rate(algo, 3):.1f} env steps/s", flush=True)
            if overlap:
                for threads in (1, 2):
                    torch.set_num_threads(threads)
                    print(f"learner only, {threads} thread(s): {learner_rate(algo, 20):.1f} env steps/s", flush=True)
        finally:
            algo.stop()


if __name__ == "__main__":
    main()
