"""The learner on a GPU (num_gpus_per_learner=1). These tests need CUDA and are skipped on a machine without it (the
suite's CI machine has none); docs/benchmarks.md says where and when they last ran on a GPU.

- A CVPO run trains with its learner on the GPU, and one update there equals one on the CPU from the same state, on
  the same batch, with the same draws (to float32 rounding: the GPU sums in another order).
- Every tensor op of an update runs on the GPU, apart from moving the minibatch in and the E-step dual's host
  round trip (the dual is a small float64 Newton solve on the host, by design), and the update synchronises the host
  with the GPU only there."""

import linecache
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import same_draws_per_state, small_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _snapshot(learner):
    module = learner.module["default_policy"].unwrapped()
    state = learner._cvpo["default_policy"]
    return {
        "device": str(learner._device),
        "weights": {k: v.detach().cpu().double().numpy() for k, v in module.state_dict().items()},
        "duals": {k: np.atleast_1d(np.array(v.cpu() if isinstance(v, torch.Tensor) else v, dtype=float))
                  for k, v in state.items()},
    }


def _update(learner, columns, size):
    from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch
    from ray.rllib.utils.metrics import NUM_ENV_STEPS_SAMPLED_LIFETIME

    learner._standard_normal_like = same_draws_per_state
    learner.update(batch=MultiAgentBatch({"default_policy": SampleBatch(dict(columns))}, env_steps=size),
                   minibatch_size=size, timesteps={NUM_ENV_STEPS_SAMPLED_LIFETIME: 10_000})
    return _snapshot(learner)


def test_a_run_trains_on_the_gpu_and_an_update_there_equals_one_on_the_cpu(ray_local):
    base = dict(cost_limit=1.0, updates_per_env_step=0.5)  # a limit the early policy exceeds: lambda > 0
    gpu = small_config(**base).learners(num_learners=0, num_gpus_per_learner=1).build_algo()
    cpu = small_config(**base).build_algo()
    try:
        for _ in range(2):
            result = gpu.train()
        learner = gpu.learner_group._learner
        assert learner._device.type == "cuda"
        assert next(learner.module["default_policy"].parameters()).is_cuda
        assert np.isfinite(result["learners"]["default_policy"]["eta"])
        assert result["learners"]["default_policy"]["num_cvpo_updates"] > 0

        size = gpu.config.train_batch_size_per_learner
        columns = learner.replay.sample(size, n_step=gpu.config.n_step, gamma=gpu.config.gamma)
        cpu.learner_group.set_state(gpu.learner_group.get_state())
        before = _snapshot(cpu.learner_group._learner)
        on_gpu = _update(learner, columns, size)
        on_cpu = _update(cpu.learner_group._learner, columns, size)
    finally:
        gpu.stop()
        cpu.stop()
    assert on_gpu["device"].startswith("cuda") and on_cpu["device"] == "cpu"
    assert on_cpu["duals"]["lam"][0] > 0, on_cpu["duals"]  # the constraint is active: not just 0 = 0
    moved = 0
    for key, w in on_cpu["weights"].items():
        np.testing.assert_allclose(on_gpu["weights"][key], w, rtol=1e-4, atol=1e-6, err_msg=key)
        moved += not np.array_equal(w, before["weights"][key])
    assert moved > 0  # the update changed the weights: the comparison is not of two untouched copies
    for key in ("eta", "lam", "alpha_mu", "alpha_sigma", "num_updates"):
        np.testing.assert_allclose(on_gpu["duals"][key], on_cpu["duals"][key], rtol=1e-4, atol=1e-8, err_msg=key)


def test_an_update_on_the_gpu_keeps_its_tensors_there_and_syncs_only_for_the_dual(ray_local):
    from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch
    from torch.utils._python_dispatch import TorchDispatchMode

    algo = small_config().learners(num_learners=0, num_gpus_per_learner=1).build_algo()
    try:
        algo.train()
        learner = algo.learner_group._learner
        size = algo.config.train_batch_size_per_learner
        columns = learner.replay.sample(size, n_step=algo.config.n_step, gamma=algo.config.gamma)
        batch = learner._convert_batch_type(
            MultiAgentBatch({"default_policy": SampleBatch(dict(columns))}, env_steps=size)).policy_batches
        assert all(v.is_cuda for v in batch["default_policy"].values())
        learner._update(batch)  # warm: first-call allocations and caches

        on_host = set()

        class Devices(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                tensors = [a for a in list(args) + list((kwargs or {}).values()) if isinstance(a, torch.Tensor)]
                if any(t.device.type == "cpu" and t.dim() > 0 for t in tensors):
                    on_host.add(func.overloadpacket.__name__)
                return func(*args, **(kwargs or {}))

        with Devices():
            learner._update(batch)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                learner._update(batch)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    finally:
        algo.stop()
    # Host-side tensors appear only where the E-step's Q values go to the dual (a float64 copy) and its solution
    # comes back; no op of the networks, the losses or the optimizers runs on the host.
    assert on_host <= {"_to_copy", "copy_", "lift_fresh", "detach", "alias", "view", "_local_scalar_dense"}, on_host
    # Where the update waited for the GPU: the line that asked, for every synchronising call torch reported. Only
    # the dual's round trip (estep.py: Q values to the host, lambda back) may. (The phase timers synchronise on
    # purpose, so that each phase's time is its own; torch does not report an explicit torch.cuda.synchronize.)
    waits = {(Path(w.filename).name, w.lineno, linecache.getline(w.filename, w.lineno).strip())
             for w in caught if str(w.message).startswith("called a synchronizing")}
    assert waits, "torch's sync debug mode reported nothing: the check would pass whatever the update did"
    assert {name for name, _, _ in waits} == {"estep.py"}, waits
