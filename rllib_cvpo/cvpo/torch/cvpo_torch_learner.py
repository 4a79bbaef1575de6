"""CVPO's learner: per minibatch, one critic step, the E-step (exact dual) and M weighted-MLE steps of the M-step."""

from __future__ import annotations

import ctypes
import os
import sys
import time
from typing import Any, Dict, Optional, Tuple

import numpy as np
import ray
import torch
import torch.distributed as dist
from ray.rllib.core.columns import Columns
from ray.rllib.core.learner.torch.torch_learner import TorchLearner
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch
from ray.rllib.utils.annotations import override
from ray.rllib.utils.metrics import NUM_ENV_STEPS_SAMPLED_LIFETIME

from rllib_cvpo.cvpo import estep
from rllib_cvpo.cvpo.estep import qc_threshold
from rllib_cvpo.cvpo.feedback import THRESHOLD_OFFSET
from rllib_cvpo.cvpo.mstep import WeightedMoments, mstep_terms
from rllib_cvpo.cvpo.replay import BOOTSTRAP_DISCOUNT, COSTS, POLICY_OBS, CostReplayBuffer

CVPO_STATE = "cvpo_state"
# Replayed transitions read per sampling round for the cost critic's calibration (qc_replay, qc_replay_cost_to_go).
CALIBRATION_ROWS = 4096


def keep_freed_memory_in_process() -> None:
    """Tell glibc's allocator to keep freed blocks of up to 256 MiB in the process heap.

    By default glibc returns blocks above a (dynamic) threshold to the OS with munmap and maps fresh pages for the
    next allocation, so every multi-megabyte temporary of an update (the E-step's [E, B*N, H] activations, autograd
    buffers) page-faults its memory in again, each update. Measured with benchmarks/learner_throughput.py, that was
    about 40% of an update's time on CPU. PyTorch's CPU allocator does not cache, so the setting belongs to the
    process. Nothing is done off glibc (the call is unavailable there)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 256 * 1024 * 1024)
    libc.mallopt(m_trim_threshold, 512 * 1024 * 1024)


class CVPOTorchLearner(TorchLearner):
    """Runs CVPO's update in :meth:`_update` (RLlib's forward/loss/gradient split cannot express an E-step between a
    critic step and M policy steps).

    State beyond RLlib's (weights and optimizers): per module the E-step duals (eta, lambda), the M-step KL
    multipliers (alpha_mu, alpha_sigma) and the update counter; :meth:`get_state` / :meth:`set_state` checkpoint it.

    With several learners, RLlib's DDP wrapper only all-reduces gradients of ``forward_train`` calls, and CVPO calls
    its sub-networks directly. So modules are not wrapped: initial weights are broadcast from rank 0, gradients are
    all-reduced explicitly, and the E-step dual is solved on all-reduced per-state sums, which makes every learner
    solve the dual of the global batch. The KL values that drive alpha are all-reduced too, so duals stay identical.
    """

    @override(TorchLearner)
    def build(self) -> None:
        keep_freed_memory_in_process()
        from rllib_cvpo.cvpo.cvpo import learner_threads

        # Torch's default (a thread per core) oversubscribes the machine while an EnvRunner samples beside the
        # update; a remote learner gets what it was allocated (RLlib sets no thread count of its own).
        node_cpus = os.cpu_count() or 1
        if ray.is_initialized():
            node_cpus = min(node_cpus, int(ray.cluster_resources().get("CPU", node_cpus))) if len(ray.nodes()) == 1 \
                else node_cpus
        torch.set_num_threads(learner_threads(self.config, node_cpus))
        super().build()
        self._world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self._rank = dist.get_rank() if self._world > 1 else 0
        # The replay lives here, with the learner: the algorithm ships each new transition once, to one learner (see
        # CVPO._store), and each learner samples its minibatches from its own shard (update_from_replay).
        cfg = self.config
        self.replay = CostReplayBuffer(-(-cfg.replay_capacity // self._world), cfg.cost_keys,
                                       seed=None if cfg.seed is None else cfg.seed + self._rank)
        for module in self.module._rl_modules.values():
            if self._world > 1:
                with torch.no_grad():
                    for t in list(module.parameters()) + list(module.buffers()):
                        dist.broadcast(t.data, src=0)
            module.make_target_networks()
        self._cvpo: Dict[str, Dict[str, Any]] = {}
        for mid in self.module.keys():
            cfg = self.config.get_config_for_module(mid)
            self._cvpo[mid] = {
                "eta": float(cfg.eta_init),
                "lam": np.full(len(cfg.cost_keys), float(cfg.lambda_init)),
                "alpha_mu": 0.0,
                "alpha_sigma": 0.0,
                "num_updates": 0,
            }
        self._env_steps = 0
        self.last_estep: Dict[str, Dict[str, Any]] = {}
        self._threshold_cache: Dict[str, Tuple[Any, list]] = {}
        self._threshold_offset: Optional[list] = None
        # Per module, over the last update_from_replay call: (updates with each lambda_i at its bound, updates).
        self._lambda_at_bound: Dict[str, Tuple[np.ndarray, int]] = {}

    # -- the replay shard -----------------------------------------------------------------------------------------
    def add_to_replay(self, chunks) -> int:
        """Store episode chunks (``rllib_cvpo.cvpo.replay.episode_chunks``) in this learner's replay shard."""
        return self.replay.add_chunks(chunks)

    def update_from_replay(self, num_updates: int, timesteps: Dict[str, Any]):
        """``num_updates`` CVPO updates, each on B = ``train_batch_size_per_learner`` n-step transitions drawn here
        from this learner's shard; with several learners each draws its own B rows and the E-step solves the dual of
        all of them (k B states). Returns :meth:`update`'s results."""
        cfg = self.config
        per_learner = cfg.train_batch_size_per_learner
        # With estep_recent_steps, each learner's E- and M-step states come from its shard's share of the newest
        # steps (new episodes go to the emptiest shard, so each holds about 1/k of them).
        recent = None if cfg.estep_recent_steps is None else max(1, -(-cfg.estep_recent_steps // self._world))
        # With critic_updates_per_update = c, each update's minibatch holds c B rows: the critics step on each B
        # in turn, the E- and M-step use the last B's states.
        rows = per_learner * cfg.critic_updates_per_update
        columns = self.replay.sample(num_updates * rows, n_step=cfg.n_step, gamma=cfg.gamma, recent=recent)
        batch = MultiAgentBatch({DEFAULT_MODULE_ID: SampleBatch(columns)}, env_steps=len(columns[Columns.OBS]))
        self._lambda_at_bound = {}
        return self.update(batch=batch, minibatch_size=rows, num_epochs=1, shuffle_batch_per_epoch=False,
                           timesteps=timesteps)

    def lambda_at_bound_fraction(self, module_id: str = DEFAULT_MODULE_ID) -> Optional[np.ndarray]:
        """Per constraint, the fraction of the last :meth:`update_from_replay` call's updates whose E-step put
        lambda_i at its bound (every learner solves the same global dual, so every learner returns the same); None
        before the first call."""
        if module_id not in self._lambda_at_bound:
            return None
        at_bound, updates = self._lambda_at_bound[module_id]
        return at_bound / updates

    @override(TorchLearner)
    def _make_modules_ddp_if_necessary(self) -> None:
        """No DDP wrapper: gradients are all-reduced explicitly in :meth:`_step` (see the class docstring)."""

    @override(TorchLearner)
    def configure_optimizers_for_module(self, module_id: str, config=None) -> None:
        module = self.module[module_id]
        for name, net, lr in (("critic", module.critics, config.critic_lr), ("policy", module.pi, config.actor_lr)):
            params = list(net.parameters())
            # The fused kernel (CPU and CUDA) updates all of a network's parameters in one op: ~7x faster than
            # Adam's default per-tensor loop at these sizes.
            self.register_optimizer(
                module_id=module_id, optimizer_name=name, optimizer=torch.optim.Adam(params, fused=True),
                params=params, lr_or_lr_schedule=lr,
            )

    def compute_loss_for_module(self, **kwargs): raise NotImplementedError("CVPO computes its losses in _update()")

    @override(TorchLearner)
    def before_gradient_based_update(self, *, timesteps: Dict[str, Any]) -> None:
        super().before_gradient_based_update(timesteps=timesteps)
        self._env_steps = int(timesteps.get(NUM_ENV_STEPS_SAMPLED_LIFETIME, self._env_steps) or 0)
        self._threshold_offset = timesteps.get(THRESHOLD_OFFSET)  # the cost feedback's offsets (None: 0)
        if len(self.replay):
            self._log_critic_calibration()

    def _log_critic_calibration(self) -> None:
        """Per constraint, once per round (before its updates): the cost critic's mean Q_c over up to
        ``CALIBRATION_ROWS`` replayed (s, a) spread through this learner's shard (``qc_replay``), beside the mean
        cost of those rows over 1 - gamma (``qc_replay_cost_to_go``), the discounted cost-to-go the pairs would have
        if the replayed state distribution were stationary. Each iteration's results carry the mean of its rounds,
        so the calibration can be read over a run's second half instead of from one checkpoint's critic, which
        swings by 2-3x between checkpoints (docs/benchmarks.md section 5)."""
        rows = self.replay.spread(CALIBRATION_ROWS)
        for mid in self.module.keys():
            cfg = self.config.get_config_for_module(mid)
            module = self.module[mid].unwrapped()
            with torch.no_grad():
                obs = torch.as_tensor(rows[Columns.OBS], dtype=torch.float32, device=self._device)
                actions = torch.as_tensor(rows[Columns.ACTIONS], dtype=torch.float32, device=self._device)
                _, qc = module.q_values(obs, actions)
            qc = qc.mean(1).cpu().numpy()
            to_go = rows[COSTS].mean(0) / (1.0 - cfg.gamma)
            for i, key in enumerate(cfg.cost_keys):
                suffix = "" if len(cfg.cost_keys) == 1 else f"_{key}"
                self.metrics.log_value((mid, f"qc_replay{suffix}"), float(qc[i]), reduce="mean")
                self.metrics.log_value((mid, f"qc_replay_cost_to_go{suffix}"), float(to_go[i]), reduce="mean")

    @override(TorchLearner)
    def after_gradient_based_update(self, *, timesteps: Dict[str, Any]) -> None:
        """With ``pi_old_sync="round"`` (FSRL's scheme): after the round's updates pi_old becomes a copy of pi and
        the M-step's KL multipliers restart at 0, so each round is one step of approximate policy iteration."""
        super().after_gradient_based_update(timesteps=timesteps)
        for mid in self.module.keys():
            cfg = self.config.get_config_for_module(mid)
            if cfg.pi_old_sync != "round":
                continue
            module = self.module[mid].unwrapped()
            with torch.no_grad():
                torch._foreach_copy_(list(module.pi_old.parameters()), list(module.pi.parameters()))
            self._cvpo[mid]["alpha_mu"] = self._cvpo[mid]["alpha_sigma"] = 0.0

    # -- helpers ---------------------------------------------------------------------------------------------------
    def _clock(self) -> float:
        """Wall time for the phase timers; on a GPU after the queued kernels finished, so phases are not misattributed."""
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
        return time.perf_counter()

    def _standard_normal_like(self, x: torch.Tensor) -> torch.Tensor:
        """The update's random draws (next actions for the TD targets, the E-step's N actions per state): N(0, 1) of
        x's shape. One place, so a test can give learners the same draws per state."""
        return torch.randn_like(x, memory_format=torch.contiguous_format)

    def _allreduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        if self._world > 1:
            x = x.clone()
            dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x

    def _thresholds(self, mid: str, cfg) -> list:
        """eps_c per constraint. They depend on env steps only while the cost limit anneals; otherwise they are
        computed once (the horizon lookup goes through the env registry) instead of on every update."""
        annealing = cfg.cost_limit_start is not None and self._env_steps < cfg.cost_limit_anneal_steps
        key = self._env_steps if annealing else "final"
        cached = self._threshold_cache.get(mid)
        if cached is None or cached[0] != key:
            # The offset o of the cost feedback moves eps_c by the factor that turns a limit d into eps_c (linear).
            factor = qc_threshold(1.0, cfg.gamma, cfg.horizon)
            cached = self._threshold_cache[mid] = (key, cfg.qc_thresholds(self._env_steps), factor)
        if self._threshold_offset is None:
            return cached[1]
        return [t - cached[2] * o for t, o in zip(cached[1], self._threshold_offset)]

    def _allreduce_numpy(self, x: np.ndarray) -> np.ndarray:
        """The E-step dual's per-state sums (a small float64 vector), summed over learners. The all-reduce runs on
        the learner's device (NCCL takes only GPU tensors)."""
        if self._world == 1:
            return x
        return self._allreduce_sum(torch.from_numpy(x).to(self._device)).cpu().numpy()

    def _global_means(self, *xs: torch.Tensor) -> list[torch.Tensor]:
        """The mean of each tensor over every learner's shard, in one all-reduce of (sums..., count): float64
        scalars on the learner's device (read on the host only when the iteration's metrics are reduced)."""
        if self._world == 1:
            return [x.mean().double() for x in xs]
        count = torch.full((1,), float(xs[0].numel()), dtype=torch.float64, device=xs[0].device)
        s = self._allreduce_sum(torch.cat([torch.stack([x.sum().double() for x in xs]), count]))
        return list((s[:-1] / s[-1]).unbind())

    @staticmethod
    def _dual_ascent(state: Dict[str, Any], key: str, kl: torch.Tensor, step: float, bound: float,
                     cap: float) -> torch.Tensor:
        """One projected dual-ascent step of an M-step KL multiplier, alpha <- clip(alpha + step (KL - bound), 0,
        cap), computed on the learner's device: reading KL on the host would synchronise with the GPU on every
        M-step iteration. alpha is a float64 scalar tensor (a float after a restore or a round's reset)."""
        alpha = (state[key] + step * (kl - bound)).clamp(0.0, cap)
        state[key] = alpha
        return alpha

    def _step(self, module_id: str, name: str, loss: torch.Tensor, grad_clip: float | None = None) -> None:
        optim = self.get_optimizer(module_id, name)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for group in optim.param_groups for p in group["params"] if p.grad is not None]
        if self._world > 1:
            flat = torch.cat([p.grad.reshape(-1) for p in params])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat /= self._world
            offset = 0
            for p in params:
                n = p.grad.numel()
                p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
                offset += n
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optim.step()

    # -- the update ------------------------------------------------------------------------------------------------
    @override(TorchLearner)
    def _update(self, batch: Dict[str, Any], **kwargs) -> Tuple[Any, Any, Any]:
        losses = {}
        for module_id, module_batch in batch.items():
            cfg = self.config.get_config_for_module(module_id)
            losses[module_id] = self._update_module(module_id, self.module[module_id].unwrapped(), cfg, module_batch)
        return {}, losses, {}

    def _critic_step(self, mid: str, module, cfg, b) -> Tuple[torch.Tensor, ...]:
        """One TD step of every critic on the rows of ``b``; returns (reward loss, cost loss, Q_r, Q_c)."""
        loss_qr, loss_qc, qr, qc = self._critic_losses(module, cfg, b)
        self._step(mid, "critic", loss_qr + loss_qc)
        return loss_qr, loss_qc, qr, qc

    def _critic_losses(self, module, cfg, b) -> Tuple[torch.Tensor, ...]:
        """The critics' TD losses on the rows of ``b`` (and Q_r, Q_c), before the optimizer step."""
        obs, actions = b[Columns.OBS], b[Columns.ACTIONS]
        rewards, costs = b[Columns.REWARDS].float(), b[COSTS].float().reshape(obs.shape[0], -1)
        next_obs, discount = b[Columns.NEXT_OBS], b[BOOTSTRAP_DISCOUNT].float()
        m = costs.shape[1]
        # n-step targets (the replay's discounted sums of rewards and costs, and gamma^k, or 0 where the episode
        # terminated; a truncation still bootstraps), the next action drawn from the current policy. Twin cost heads
        # share the maximum's target; ensemble heads bootstrap from their own target heads (CAL). With
        # qc_nonnegative the cost bootstrap is clamped at 0: costs are >= 0, so Q_c is.
        with torch.no_grad():
            mean_n, std_n = module.policy(next_obs)
            a_next = torch.tanh(mean_n + std_n * self._standard_normal_like(mean_n))
            tqr, tqc = module.q_values(next_obs, a_next, target=True, combine=module.twin_qc)
            if cfg.qc_nonnegative:
                tqc = tqc.clamp_min(0.0)
            y_r = rewards + discount * tqr.min(0).values
            y_c = costs.t().repeat(tqc.shape[0] // m, 1) + discount * tqc  # [m or E_c * m, B], copy-major
        qr, qc = module.q_values(obs, actions, combine=False)
        loss_qr = ((qr - y_r) ** 2).mean(1).sum()
        loss_qc = ((qc - y_c.repeat(qc.shape[0] // y_c.shape[0], 1)) ** 2).mean(1).sum()
        return loss_qr, loss_qc, qr, qc

    def _update_module(self, mid: str, module, cfg, b) -> torch.Tensor:
        state = self._cvpo[mid]
        clock = self._clock
        t0 = clock()

        # Critics: critic_updates_per_update TD steps, each on its own B rows, the target critics' Polyak step after
        # each but the last (that one follows the policy's update below, as with a single step).
        steps = cfg.critic_updates_per_update
        if steps > 1:
            rows = b[Columns.OBS].shape[0] // steps
            chunks = [{k: v[i * rows : (i + 1) * rows] for k, v in b.items()} for i in range(steps)]
        else:
            chunks = [b]
        critic_losses = []
        for i, chunk in enumerate(chunks):
            critic_losses.append(self._critic_step(mid, module, cfg, chunk))
            if i < steps - 1:
                with torch.no_grad():
                    torch._foreach_lerp_(list(module.target_critics.parameters()),
                                         list(module.critics.parameters()), cfg.tau)
        loss_qr, loss_qc, qr, qc = critic_losses[-1]
        if steps > 1:  # the metrics: the mean over this update's critic steps
            loss_qr = torch.stack([c[0] for c in critic_losses]).mean()
            loss_qc = torch.stack([c[1] for c in critic_losses]).mean()
        b = chunks[-1]
        obs = b[Columns.OBS]
        batch_size, n = obs.shape[0], cfg.num_action_samples
        m = b[COSTS].reshape(batch_size, -1).shape[1]
        t1 = clock()

        # E-step: N actions per state from pi_old, all critics on all B*N of them in one forward, exact dual. Its
        # states are the critics' replay states, or with estep_recent_steps as many states from the newest steps
        # (the constraint then averages over states the current policy visits, not over old ones).
        pobs = b[POLICY_OBS] if POLICY_OBS in b else obs
        with torch.no_grad():
            mean_o, std_o = module.policy(pobs, module.pi_old)
            u = mean_o + std_o * self._standard_normal_like(mean_o.expand(n, *mean_o.shape))
            eqr, eqc = module.q_values_sampled(pobs, torch.tanh(u), target=True,
                                               reward_critics=None if cfg.estep_twin_min else 1)
            qr_s = eqr.min(0).values.reshape(n, batch_size).t()
            qc_s = eqc.reshape(m, n, batch_size).permute(2, 1, 0)
            thresholds = self._thresholds(mid, cfg)
            if cfg.estep_constraint_rate < 1.0 or cfg.estep_qc_smoothing is not None:
                batch_mean = estep.batch_mean_qc(qc_s, self._allreduce_numpy)  # the global batch's
                baseline = None
                if cfg.estep_qc_smoothing is not None:
                    baseline = estep.smoothed_qc_baseline(state.get("qc_baseline"), batch_mean,
                                                          cfg.estep_qc_smoothing)
                    state["qc_baseline"] = baseline
                thresholds = estep.rate_thresholds(batch_mean, thresholds, cfg.estep_constraint_rate, baseline)
            t_dual = time.perf_counter()
            try:
                problem = estep.DualProblem(qr_s, qc_s, cfg.estep_kl, thresholds, reduce=self._allreduce_numpy)
            except estep.NonFiniteError as err:  # the critics diverged: stop before the policy is touched
                raise estep.NonFiniteError(f"{err}, at CVPO update {state['num_updates'] + 1} after "
                                           f"{self._env_steps} env steps: the critics diverged") from None
            bounds = dict(eta_min=cfg.eta_min, eta_max=cfg.eta_max, lam_max=cfg.lambda_max)
            if cfg.estep_solver == "cvxpy" and self._world == 1:
                sol = estep.solve_dual_cvxpy(problem, **bounds)
            else:
                sol = estep.solve_dual_newton(problem, state["eta"], state["lam"], **bounds)
            t_dual = time.perf_counter() - t_dual
            state["eta"], state["lam"] = sol.eta, sol.lam
            # This learner's shard of the last E-step (kept by reference, no copy) for diagnostics and tests.
            self.last_estep[mid] = {"qr": qr_s, "qc": qc_s, "thresholds": thresholds, "solution": sol}
            weights = estep.variational_weights(qr_s, qc_s, sol.eta, sol.lam).to(mean_o.dtype)
        t2 = clock()

        # M-step: weighted MLE inside decoupled KL trust regions; alpha by projected dual ascent before each step.
        # The likelihood terms are quadratic in the samples: their weighted moments per state stand in for the N
        # samples, and the loss and KL terms are one autograd node (mstep.py).
        moments = WeightedMoments(u, weights, mean_o, std_o, cfg.mstep_std_fit)
        for _ in range(cfg.mstep_iterations):
            mean, std = module.policy(pobs)
            loss_mle, kl_mu, kl_sigma = mstep_terms(moments, mean, std)
            c_mu, c_sigma = kl_mu.mean(), kl_sigma.mean()
            g_mu, g_sigma = self._global_means(kl_mu.detach(), kl_sigma.detach())
            a_mu = self._dual_ascent(state, "alpha_mu", g_mu, cfg.alpha_mean_step, cfg.kl_mean, cfg.alpha_mean_max)
            a_sigma = self._dual_ascent(state, "alpha_sigma", g_sigma, cfg.alpha_std_step, cfg.kl_std,
                                        cfg.alpha_std_max)
            loss_pi = loss_mle + a_mu.to(c_mu.dtype) * c_mu + a_sigma.to(c_sigma.dtype) * c_sigma
            self._step(mid, "policy", loss_pi, cfg.actor_grad_clip)
        t3 = clock()

        with torch.no_grad():  # Polyak averaging, each pair in one foreach op (target <- target + tau (main - target))
            pairs = [(module.critics, module.target_critics, cfg.tau)]
            if cfg.pi_old_sync == "polyak":  # else pi_old is copied once per sampling round (after_gradient_...)
                pairs.append((module.pi, module.pi_old, cfg.tau_policy))
            for main, target, tau in pairs:
                torch._foreach_lerp_(list(target.parameters()), list(main.parameters()), tau)
        state["num_updates"] += 1
        at_bound, updates = self._lambda_at_bound.get(mid, (0.0, 0))
        self._lambda_at_bound[mid] = (at_bound + np.asarray(sol.lam_at_bound, np.float64), updates + 1)

        # Each metric is the mean over the iteration's updates ("dual_at_bound": the fraction of updates with a dual
        # variable at its bound); the update counter is the latest. Tensors stay on the learner's device until
        # the metrics are reduced (no host sync per update for them).
        metrics = {
            "critic_loss_reward": loss_qr.detach(),
            "critic_loss_cost": loss_qc.detach(),
            "q_reward": qr.detach().mean(),
            "mstep_loss": loss_mle.detach(),
            "eta": sol.eta,
            "alpha_mu": state["alpha_mu"],
            "alpha_sigma": state["alpha_sigma"],
            "kl_mu": g_mu,
            "kl_sigma": g_sigma,
            "estep_kl": sol.kl,
            "estep_iterations": sol.iterations,
            "dual_at_bound": float(sol.eta_at_bound or bool(sol.lam_at_bound.any())),
            "policy_std": std.detach().mean(),
            "time_critic_s": t1 - t0,
            "time_estep_s": t2 - t1,
            "time_dual_s": t_dual,
            "time_mstep_s": t3 - t2,
        }
        for i, key in enumerate(cfg.cost_keys):
            suffix = "" if m == 1 else f"_{key}"
            metrics[f"lambda{suffix}"] = float(sol.lam[i])
            metrics[f"estep_qc{suffix}"] = float(sol.expected_qc[i])
            metrics[f"qc_threshold{suffix}"] = float(thresholds[i])
            if "qc_baseline" in state:
                metrics[f"qc_baseline{suffix}"] = float(state["qc_baseline"][i])
            metrics[f"q_cost{suffix}"] = qc[i].detach().mean()
        self._log_update_metrics(mid, metrics)
        self.metrics.log_value((mid, "num_cvpo_updates"), state["num_updates"], reduce="max")
        return (loss_qr + loss_qc + loss_pi).detach()

    def _log_update_metrics(self, mid: str, metrics: Dict[str, Any]) -> None:
        """One update's metrics, each into the iteration's mean. Key by key: ``MetricsLogger.log_dict`` maps the
        dict as a tree first, which took 3x as long per update."""
        log = self.metrics.log_value
        for key, value in metrics.items():
            log((mid, key), value, reduce="mean")

    @override(TorchLearner)
    def _log_steps_trained_metrics(self, batch) -> None:
        """As RLlib's, but env steps trained count this minibatch's rows: RLlib's minibatch iterator hands every
        minibatch the env-step count of the whole batch, which counted each trained row once per minibatch."""
        rows = sum(len(b) for b in batch.policy_batches.values())  # single-agent: one row per env step
        super()._log_steps_trained_metrics(MultiAgentBatch(batch.policy_batches, env_steps=rows))

    # -- checkpointing ---------------------------------------------------------------------------------------------
    @override(TorchLearner)
    def get_state(self, components=None, *, not_components=None, **kwargs) -> Dict[str, Any]:
        state = super().get_state(components, not_components=not_components, **kwargs)
        state[CVPO_STATE] = {
            mid: {k: (v.copy() if isinstance(v, np.ndarray) else float(v) if isinstance(v, torch.Tensor) else v)
                  for k, v in s.items()}
            for mid, s in self._cvpo.items()
        }
        state[CVPO_STATE]["__env_steps__"] = self._env_steps
        return state

    @override(TorchLearner)
    def set_state(self, state: Dict[str, Any]) -> None:
        super().set_state(state)
        if CVPO_STATE in state:
            saved = dict(state[CVPO_STATE])
            self._env_steps = int(saved.pop("__env_steps__", 0))
            for mid, s in saved.items():
                self._cvpo[mid] = {k: (np.array(v) if k in ("lam", "qc_baseline") and v is not None else v)
                                   for k, v in s.items()}
