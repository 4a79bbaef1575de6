"""Does torch.compile pay for the update on this CPU? The update's two largest pure-tensor pieces, eager against
``torch.compile`` (Inductor, static shapes), timed in alternating rounds in one process, one torch thread:

- the critic step: the TD targets (policy on the next states, target critics), every critic on (s, a), both losses,
  backward and the fused Adam step (forward and backward compiled, as AOTAutograd compiles them);
- the E-step's critic evaluation: the target critics on the B*N sampled actions (no gradient), as the
  defaults evaluate them.

    .venv/bin/python benchmarks/compile_probe.py                    # FSRL's Circle settings: B 256, N 16, 128x128
    .venv/bin/python benchmarks/compile_probe.py --hidden 256 --rounds 8

It prints each piece's best-round time per call, eager and compiled, their ratio, the compile time, and the largest
difference between the two pieces' outputs (the same random draws: Inductor's fallback_random).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--samples", type=int, default=16, help="N, actions per state in the E-step")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--calls", type=int, default=100, help="calls per round")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    import torch
    import torch._inductor.config as inductor_config
    from ray.rllib.core import DEFAULT_MODULE_ID, Columns
    from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch

    from learner_throughput import _build
    
    inductor_config.fallback_random = True  # the same random draws as eager
    group, replay = _build(args.batch, args.samples, args.hidden, 28, True)
    torch.set_num_threads(1)
    learner = group._learner
    mid = DEFAULT_MODULE_ID
    module = learner.module[mid].unwrapped()
    cfg = learner.config.get_config_for_module(mid)
    b = learner._convert_batch_type(MultiAgentBatch(
        {mid: SampleBatch(replay.sample(args.batch))}, env_steps=args.batch)).policy_batches[mid]
    obs = b[Columns.OBS]

    def critic_losses(rows):  # the learner's own TD losses (its next actions drawn inside)
        return learner._critic_losses(module, cfg, rows)[:2]

    def estep_critics(u):  # as the E-step evaluates them
        with torch.no_grad():
            return module.q_values_sampled(obs, torch.tanh(u), target=True,
                                           reward_critics=None if cfg.estep_twin_min else 1)

    u = torch.randn(args.samples, args.batch, 2)

    def critic_step(fn):
        def call():
            loss_qr, loss_qc = fn(b)
            learner._step(mid, "critic", loss_qr + loss_qc)
        return call

    pieces = {"critic step": (critic_losses, critic_step, b), "E-step critics": (estep_critics, None, u)}
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, 1 thread; B {args.batch}, "
          f"N {args.samples}, hidden {args.hidden}x{args.hidden}, {args.rounds} alternating rounds of {args.calls} calls")
    for name, (fn, wrap, x) in pieces.items():
        t0 = time.perf_counter()
        compiled = torch.compile(fn, dynamic=False)
        compiled(x)
        compile_s = time.perf_counter() - t0
        torch.manual_seed(0)
        eager_out = fn(x)
        torch.manual_seed(0)  # the same draws (Inductor's fallback_random)
        compiled_out = compiled(x)
        diff = max(float((e - c).abs().max()) for e, c in zip(eager_out, compiled_out))
        calls = {"eager": wrap(fn) if wrap else (lambda: fn(x)), "compiled": wrap(compiled) if wrap else
                 (lambda: compiled(x))}
        best = {k: float("inf") for k in calls}
        for call in calls.values():
            for _ in range(5):
                call()
        for _ in range(args.rounds):
            for key, call in calls.items():
                t0 = time.perf_counter()
                for _ in range(args.calls):
                    call()
                best[key] = min(best[key], (time.perf_counter() - t0) / args.calls)
        print(f"{name:15s} eager {1e3 * best['eager']:.3f} ms, compiled {1e3 * best['compiled']:.3f} ms, "
              f"eager/compiled {best['eager'] / best['compiled']:.2f}x; compile {compile_s:.1f} s; "
              f"max |eager - compiled| {diff:.2e}")
    group.shutdown()


if __name__ == "__main__":
    main()
