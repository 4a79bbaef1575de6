"""CVPOConfig and CVPO: Constrained Variational Policy Optimization (Liu et al., ICML 2022) on RLlib's new API stack."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

import numpy as np

from ray.rllib.algorithms.algorithm import Algorithm
from ray.rllib.algorithms.algorithm_config import AlgorithmConfig, NotProvided
import ray
from ray.rllib.core import COMPONENT_LEARNER, COMPONENT_RL_MODULE, DEFAULT_MODULE_ID
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.execution.rollout_ops import synchronous_parallel_sample
from ray.rllib.utils.annotations import override
from ray.rllib.utils.metrics import (
    ENV_RUNNER_RESULTS,
    ENV_RUNNER_SAMPLING_TIMER,
    EPISODE_RETURN_MEAN,
    EVALUATION_RESULTS,
    LEARNER_RESULTS,
    LEARNER_UPDATE_TIMER,
    NUM_ENV_STEPS_SAMPLED_LIFETIME,
    REPLAY_BUFFER_ADD_DATA_TIMER,
    SYNCH_WORKER_WEIGHTS_TIMER,
    TIMERS,
    WEIGHTS_SEQ_NO,
)
from ray.util.debug import log_once

from rllib_cvpo.checkpoints import CheckpointError, complete_checkpoints, incomplete_reason, read_manifest, write_manifest
from rllib_cvpo.cvpo.callbacks import CostMetricsCallback
from rllib_cvpo.cvpo.estep import qc_threshold
from rllib_cvpo.cvpo.feedback import (ANTIWINDUP_AT_BOUND, SOURCES as FEEDBACK_SOURCES, THRESHOLD_OFFSET,
                                      update_offset, window_rounds)
from rllib_cvpo.cvpo.mstep import STD_FITS
from rllib_cvpo.cvpo.replay import COSTS, CostReplayBuffer, episode_chunks

# CVPO exists on RLlib's new API stack only, so RLlib's one-time "you are running on the new API stack" notice says
# nothing to our users: consume it.
log_once("CVPO_on_new_api_stack")

REPLAY_STATE = "cvpo_replay_buffer"
COST_FEEDBACK = "cost_feedback_offset"  # the feedback's offset on each cost limit: in results and checkpoints
SUMMARY = "cvpo"  # the per-iteration summary that reports, checkpoint ranking and the command line read
SCORE = "cvpo_score"  # = result[SUMMARY]["score"]: feasible first, then return (the checkpoint ranking)
INFEASIBLE_SCORE_OFFSET = -1e9


class CVPOConfig(AlgorithmConfig):
    """Configuration of CVPO. The defaults are the configuration measured here (docs/defaults.md gives each one's
    source and the runs behind it): the same for ``CVPOConfig()``, ``rllib-cvpo train`` and sweeps.
    :meth:`fsrl_preset` gives FSRL's published safety-gymnasium settings and :meth:`paper_preset` the original
    paper's. ``training()`` documents every setting.

    Example:
        >>> from rllib_cvpo import CVPOConfig
        >>> config = (CVPOConfig().environment("SafetyPointGoal1-v0").env_runners(num_env_runners=2)
        ...           .learners(num_learners=0).training(cost_limit=25.0))
        >>> algo = config.build_algo()
        >>> algo.train()
    """

    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class or CVPO)
        # Constraint.
        self.cost_limit: Union[float, Dict[str, float]] = 25.0
        self.cost_limit_start: Optional[Union[float, Dict[str, float]]] = None
        self.cost_limit_anneal_steps: int = 0
        self.cost_feedback_gain = 0.1
        self.cost_feedback_margin = 0.1
        self.cost_feedback_source = "training"
        self.cost_feedback_antiwindup = False
        self.cost_feedback_window: Optional[int] = None
        self.cost_feedback_error_clip = 1.0
        self.episode_len: Optional[int] = None
        # E-step.
        self.estep_kl = 0.02
        self.estep_constraint_rate = 1.0
        self.estep_qc_smoothing: Optional[float] = None
        self.num_action_samples = 16
        self.estep_solver = "newton"
        self.eta_init = 1.0
        self.lambda_init = 0.0
        self.eta_min = 1e-6
        self.eta_max = 1e4
        self.lambda_max = 40.0
        # M-step.
        self.kl_mean = 0.005
        self.kl_std = 0.0005
        self.mstep_std_fit = "old_mean"
        self.mstep_iterations = 1
        self.alpha_mean_step = 1.0
        self.alpha_std_step = 100.0
        self.alpha_mean_max = 10.0
        self.alpha_std_max = 100.0
        self.actor_lr = 5e-4
        self.actor_grad_clip: Optional[float] = None
        self.tau_policy = 0.005
        self.pi_old_sync = "round"
        self.init_std = None
        # Critics and replay.
        self.critic_lr = 1e-3
        self.critic_activation: Optional[str] = "leaky_relu"
        self.tau = 0.05
        self.twin_q = True
        self.estep_twin_min = True
        self.twin_qc = False
        self.qc_ensemble = 1
        self.qc_pessimism = 0.0
        self.qc_nonnegative = True
        self.n_step = 3
        self.estep_recent_steps = 5_000
        self.critic_updates_per_update = 1
        self.replay_capacity = 20_000
        self.num_steps_sampled_before_learning_starts = 5_000
        self.updates_per_env_step = 0.25
        self.store_buffer_in_checkpoints = True
        self.overlap_sampling = True
        self.learner_num_threads = None
        # RLlib settings with CVPO-specific defaults.
        self.gamma = 0.99
        self.lr = None
        self.train_batch_size_per_learner = 256
        self.rollout_fragment_length = 100
        self.num_envs_per_env_runner = 8
        self.min_sample_timesteps_per_iteration = 5_000
        self.min_time_s_per_iteration = 0
        self.metrics_num_episodes_for_smoothing = 20
        self._model_config = {"fcnet_hiddens": [128, 128], "fcnet_activation": "relu"}
        self.callbacks_class = CostMetricsCallback
        self.evaluation_interval = 1
        self.evaluation_duration = 10
        self.evaluation_num_env_runners = 0
        self.evaluation_duration_unit = "episodes"
        self.evaluation_config = {"explore": False}

    @override(AlgorithmConfig)
    def training(
        self,
        *,
        cost_limit=NotProvided,
        cost_limit_start=NotProvided,
        cost_limit_anneal_steps=NotProvided,
        cost_feedback_gain=NotProvided,
        cost_feedback_margin=NotProvided,
        cost_feedback_source=NotProvided,
        cost_feedback_antiwindup=NotProvided,
        cost_feedback_window=NotProvided,
        cost_feedback_error_clip=NotProvided,
        episode_len=NotProvided,
        estep_kl=NotProvided,
        estep_constraint_rate=NotProvided,
        estep_qc_smoothing=NotProvided,
        num_action_samples=NotProvided,
        estep_solver=NotProvided,
        eta_init=NotProvided,
        lambda_init=NotProvided,
        eta_min=NotProvided,
        eta_max=NotProvided,
        lambda_max=NotProvided,
        kl_mean=NotProvided,
        kl_std=NotProvided,
        mstep_std_fit=NotProvided,
        mstep_iterations=NotProvided,
        alpha_mean_step=NotProvided,
        alpha_std_step=NotProvided,
        alpha_mean_max=NotProvided,
        alpha_std_max=NotProvided,
        actor_lr=NotProvided,
        actor_grad_clip=NotProvided,
        tau_policy=NotProvided,
        pi_old_sync=NotProvided,
        init_std=NotProvided,
        critic_lr=NotProvided,
        critic_activation=NotProvided,
        tau=NotProvided,
        twin_q=NotProvided,
        estep_twin_min=NotProvided,
        twin_qc=NotProvided,
        qc_ensemble=NotProvided,
        qc_pessimism=NotProvided,
        qc_nonnegative=NotProvided,
        n_step=NotProvided,
        estep_recent_steps=NotProvided,
        critic_updates_per_update=NotProvided,
        replay_capacity=NotProvided,
        num_steps_sampled_before_learning_starts=NotProvided,
        updates_per_env_step=NotProvided,
        store_buffer_in_checkpoints=NotProvided,
        overlap_sampling=NotProvided,
        learner_num_threads=NotProvided,
        **kwargs,
    ) -> "CVPOConfig":
        """Sets CVPO's training settings. Symbols follow the paper; [FSRL] / [ORIG] / [ours] give each default's source.

        Args:
            cost_limit: d, the limit on the expected undiscounted episodic cost (default 25, [FSRL] safety-gymnasium).
                A float constrains ``info["cost"]``; a dict such as ``{"cost_hazards": 20, "cost_vases": 5}`` puts
                one constraint (and one cost critic) on each named info key.
            cost_limit_start: an optional looser limit to anneal from: d(t) = d + (d_start - d) exp(-5 t / t_anneal)
                over ``cost_limit_anneal_steps`` env steps, then d ([ORIG] ``use_cost_decay``; off by default).
            cost_limit_anneal_steps: t_anneal, env steps of the annealing (default 0: no annealing).
            cost_feedback_gain: the gain of the cost feedback, a correction of each E-step threshold from the cost
                the exploring policy incurs that only ever tightens it: integral control of an offset o >= 0 on the
                limit (the E-step uses d - o), per episode's worth of env steps (``rllib_cvpo.cvpo.feedback``;
                default 0.1 [ours], measured in docs/benchmarks.md section 5; 0 turns it off).
            cost_feedback_margin: m, the feedback drives the measured cost to (1 - m) d, below the limit
                (default 0.1 [ours]).
            cost_feedback_source: which measured cost the feedback drives to the target: "training" (the
                exploring policy's episodes, default), "evaluation" (the deployed deterministic policy's last
                evaluation; needs evaluation) or "both" (whichever is further over).
            cost_feedback_antiwindup: hold each offset (it may shrink, not grow) while the E-step's lambda sat at
                its bound in at least half of the last round's updates: the threshold is then already below what
                the E-step reaches inside its trust region (default False).
            cost_feedback_window: the training cost the feedback measures is the rate over the newest sampling
                rounds that cover at least this many env steps (each round still moves the offset by its own
                steps' weight); default None: the round just sampled. Where the exploring policy's cost swings
                from one round to the next, the high rounds' errors are cut at max(d, 1) and the integral sees a
                fraction of the excess, so the mean cost settles above the target; over a window that spans a
                swing the error is the swing's mean (``rllib_cvpo.cvpo.feedback``).
            cost_feedback_error_clip: c > 0, each measured excess over the target is clipped to
                [-c max(d, 1), c max(d, 1)] before it is integrated (default 1.0). Below the target the error is
                never under -d, so c only bounds the excess: at c = 1 a round at 4 d counts as one at 2 d, and where
                the exploring policy's cost swings across rounds the mean cost settles above the target by what the
                clip cut (docs/benchmarks.md section 5).
            episode_len: T, the episode length used to turn d into the per-step Q_c threshold
                eps_c = d (1 - gamma^T) / ((1 - gamma) T); default None: the env's time limit.
            estep_kl: eps, the E-step KL bound between q and pi_old, averaged over states (default 0.02 [FSRL],
                with pi_old copied per round; [ORIG] 0.1, which with a Polyak-averaged pi_old let the cost run at
                about twice the limit, docs/benchmarks.md section 5).
            estep_constraint_rate: kappa in (0, 1], the share of the gap between the batch's mean Q_c under pi_old
                and the threshold that one E-step asks q to close: E_q[Q_c] <= m + kappa (eps_c - m), m the mean
                Q_c of pi_old's samples over the batch's states (all learners'). 1 (default) is CVPO's constraint
                E_q[Q_c] <= eps_c. Below 1 the E-step's answer is proportional to the excess over a band kappa^-1
                times as wide, where at 1 it switches between reward-greedy and cost-greedy (``estep.py``'s
                ``rate_thresholds`` says why); the threshold the run converges to is still eps_c.
            estep_qc_smoothing: beta in (0, 1], or None (default). With beta, the gap kappa closes is measured from
                a baseline b, the exponential average (rate beta per update) of the batches' mean Q_c under pi_old,
                instead of from the batch's own mean m: E_q[Q_c] <= m + kappa (eps_c - b). Every batch of one moment
                is then asked the same change of its Q_c, whatever states it drew (``rate_thresholds`` says why);
                b is kept in checkpoints, and is the global batch's with several learners.
            num_action_samples: N (the paper's particle size K), actions sampled per state (default 16, [FSRL]).
            estep_solver: "newton" (default: projected damped Newton in float64 with the analytic gradient and
                Hessian, warm-started) or "cvxpy" (the exponential-cone program; slow, the reference).
            eta_init, lambda_init: initial eta and lambda (default 1 and 0, [FSRL]); warm starts after that.
            eta_min, eta_max: bounds on eta (default 1e-6 and 1e4; [ORIG] 1e-6 and 1e5).
            lambda_max: bound on each lambda (default 40 [ours]: FSRL's effective cap). lambda at this bound means
                the constraint looked infeasible inside the KL ball; the update then minimises cost
                (``dual_at_bound`` is logged).
            kl_mean, kl_std: eps_mu and eps_Sigma, M-step KL bounds of the mean and covariance (default 0.005 and
                0.0005, [FSRL]).
            mstep_std_fit: where the covariance's likelihood term centres the E-step samples: "old_mean" (default,
                pi_old's mean: MPO's decoupled update, as [ORIG] and [FSRL]; the fitted variance is the samples'
                weighted variance plus the square of their weighted mean's shift from pi_old's) or "weighted_mean"
                (their own weighted mean: the weighted variance alone, so a moving mean does not widen the policy).
            mstep_iterations: M, policy gradient steps per batch (default 1, [FSRL]; [ORIG] 6).
            alpha_mean_step, alpha_std_step: step sizes of the projected dual ascent on alpha_mu and alpha_Sigma
                (default 1 and 100, paper Table 1).
            alpha_mean_max, alpha_std_max: caps on alpha_mu and alpha_Sigma (default 10 and 100 [ours]).
            actor_lr: policy Adam learning rate (default 5e-4, [FSRL]).
            actor_grad_clip: policy gradient-norm clip (default None, [FSRL]; [ORIG] 0.01).
            tau_policy: Polyak rate of pi_old, the policy the E-step samples from and the M-step trust region is
                centred on (default 0.005 [ORIG] rho = 0.995).
            pi_old_sync: "polyak" (pi_old follows pi by tau_policy after every update, [ORIG]) or "round" (pi_old
                is a copy of pi made after each sampling round's updates, and the M-step's KL multipliers restart
                at 0 then, [FSRL]); default "round".
            init_std: the policy's initial std before the tanh squash, the same for every state (default None: the
                network's own output, about 1, as in [FSRL] and [ORIG]). The exploring policy's noise is a cost
                source of its own on navigation tasks; on SafetyPointGoal1 a start at 0.3 drove into hazards and
                raised the cost instead (docs/benchmarks.md section 5).
            critic_lr: critics' Adam learning rate (default 1e-3, [FSRL] and [ORIG]).
            tau: Polyak rate of the target critics (default 0.05, [FSRL]).
            twin_q: two reward critics, using their minimum (default True, [ORIG]).
            estep_twin_min: with twin_q, the E-step's Q_r on its B*N sampled actions is the minimum of both target
                reward critics (default True, [ORIG]); False: the first alone, one critic evaluation fewer on the
                update's largest matmuls, while the TD targets keep the minimum.
            critic_activation: the hidden activation of every critic (reward and cost), one of
                ``cvpo_torch_rl_module.ACTIVATIONS``, or None: ``model_config["fcnet_activation"]`` (ReLU), as the
                policy. Default "leaky_relu", which keeps a gradient below zero: a ReLU unit below zero on every
                input gets none back and stays dead, and on SafetyHalfCheetahVelocity-v1, whose first 50-70k env
                steps cost nothing, the ReLU cost critic kept 3-22% of its second layer's units, and on one run
                none, its Q_c then a constant and the constraint lost (docs/benchmarks.md section 5). Leaky critics
                held every cost bar on SafetyPointCircle1 and HalfCheetah-velocity over 3 seeds as ReLU ones did.
            twin_qc: two cost critics per constraint, using their maximum: a pessimistic cost estimate against the
                off-policy underestimation of cost (default False [ours]).
            qc_ensemble: E_c, cost critic heads per constraint, each trained on its own TD target (default 1;
                CAL uses 4 on Safety-Gym tasks).
            qc_pessimism: k, the E-step's Q_c is mean + k std over the E_c heads (default 0; CAL 0.5).
            qc_nonnegative: clamp the cost critics' bootstrap value at 0 (costs are >= 0, so Q_c is; default True
                [ours]).
            n_step: n, the critics' TD targets sum n real rewards and costs before bootstrapping, cut at episode
                ends (default 3 [FSRL] on safety-gymnasium; [ORIG] 1).
            estep_recent_steps: the E- and M-step's B states per update are drawn from the replay's this many most
                recent env steps (over all learners), so the cost constraint averages over states the current
                policy visits; the critics still train on the whole replay. None: the critics' replay states, as in
                [ORIG] and [FSRL]. Default 5000 [ours], about one iteration: averaged over the 20k replay (about 4
                iterations), the E-step kept holding states from which an earlier iteration's cost could not be
                avoided after the policy had left them. Over 3 seeds each it held every cost bar on
                SafetyPointCircle1 (return 37.4 against 33.7), matched HalfCheetah-velocity's return, and lowered
                SafetyPointGoal1's training cost from 37-49 to 27-32 (docs/benchmarks.md section 5).
            critic_updates_per_update: critic TD steps per CVPO update, each on its own B replay rows with the
                target critics' Polyak step after it; the E- and M-step then use the last of those batches' states
                (default 1, as in [ORIG] and [FSRL]; ``num_env_steps_trained`` counts every critic row). More steps
                let the critics keep up with a policy that the constraint moves (docs/benchmarks.md section 5).
            replay_capacity: transitions kept (default 20_000 [ours]: the E-step constraint averages over replay
                states, so they should be recent ones; [FSRL] 200_000).
            num_steps_sampled_before_learning_starts: env steps sampled with uniformly random actions before the
                first update (default 5000 [ours]; [ORIG] 4000 on its tasks, [FSRL] 0).
            updates_per_env_step: learner updates per sampled env step (default 0.25 [ours]; [FSRL] 0.2).
            store_buffer_in_checkpoints: keep the replay buffer in checkpoints (default True).
            overlap_sampling: with remote EnvRunners, each one samples the next round while the learners update on
                the last (RLlib's async EnvRunner requests, as APPO/IMPALA use them), so the episodes a step trains
                on were collected with the weights from before the previous update: a policy lag of exactly one
                round, where the synchronous loop (False) has none (default True [ours]).
            learner_num_threads: torch threads of each learner's update (default None [ours]: a learner in this
                process takes this machine's CPUs that no EnvRunner samples on while it updates, i.e. all of them
                without overlapped sampling and one fewer per overlapped local EnvRunner; a remote learner takes
                ``num_cpus_per_learner``, at least 1). Measured on 2 cores (docs/benchmarks.md section 2): one
                thread beside an overlapped EnvRunner, two in the synchronous loop; torch's own default (every
                core) oversubscribes the machine while an EnvRunner samples.
            kwargs: RLlib's own settings: ``gamma`` (default 0.99 [ORIG]; [FSRL] 0.995),
                ``train_batch_size_per_learner`` (B, default 256 [FSRL]), ...; set elsewhere: 8 envs per EnvRunner,
                100-step fragments, 5000 env steps per iteration, 10 deterministic evaluation episodes per iteration.
        """
        super().training(**kwargs)
        for name, value in list(locals().items()):
            if name not in ("self", "kwargs", "__class__") and value is not NotProvided:
                setattr(self, name, value)
        return self

    @override(AlgorithmConfig)
    def callbacks(self, callbacks_class=NotProvided, **kwargs) -> "CVPOConfig":
        """As RLlib's, but CVPO's cost metrics callback always stays: a user's callback class (or list) runs beside
        it, never instead (the episode cost, the score and the checkpoint ranking depend on it)."""
        if callbacks_class is not NotProvided and callbacks_class is not None:
            classes = list(callbacks_class) if isinstance(callbacks_class, (list, tuple)) else [callbacks_class]
            if not any(isinstance(c, type) and issubclass(c, CostMetricsCallback) for c in classes):
                classes.insert(0, CostMetricsCallback)
            callbacks_class = classes if len(classes) > 1 else classes[0]
        elif callbacks_class is None:
            callbacks_class = CostMetricsCallback
        return super().callbacks(callbacks_class, **kwargs)

    @override(AlgorithmConfig)
    def environment(self, env=NotProvided, **kwargs) -> "CVPOConfig":
        """As RLlib's, and a task id known to :func:`rllib_cvpo.envs.make_env` is registered with Ray right away,
        so remote EnvRunners build it through the env factory."""
        if isinstance(env, str):
            from rllib_cvpo.envs import register_with_ray

            register_with_ray(env)
        return super().environment(env, **kwargs)

    def fsrl_preset(self) -> "CVPOConfig":
        """FSRL's published CVPO settings for safety-gymnasium (``fsrl/config/cvpo_cfg.py``, MujocoBaseCfg): gamma
        0.995, B 256, N 16, eps 0.02, eps_mu 0.005, eps_Sigma 0.0005, actor lr 5e-4, critic lr 1e-3, tau 0.05, one
        reward critic, 3-step targets, pi_old copied after each collect round, lambda up to 20, replay 200 000, 0.2
        updates per env step, no random warm-up, 128x128 networks, 2 evaluation episodes, the E-step on the critics'
        replay states. (FSRL solves the dual with one Adam step per update; this keeps the exact dual.)"""
        self.training(
            gamma=0.995, train_batch_size_per_learner=256, num_action_samples=16, estep_kl=0.02, kl_mean=0.005,
            kl_std=0.0005, actor_lr=5e-4, critic_lr=1e-3, tau=0.05, twin_q=False, n_step=3, pi_old_sync="round",
            lambda_max=20.0, replay_capacity=200_000, updates_per_env_step=0.2,
            num_steps_sampled_before_learning_starts=0, qc_nonnegative=False, cost_feedback_gain=0.0,
            critic_activation=None, estep_recent_steps=None,
        )
        self.evaluation(evaluation_duration=2)
        return self.rl_module(model_config={"fcnet_hiddens": [128, 128], "fcnet_activation": "relu"})

    def paper_preset(self) -> "CVPOConfig":
        """The original paper's settings (Table 1 and the original code's config): gamma 0.99, B 300, N 32, M 6,
        eps 0.1, eps_mu = eps_Sigma = 0.001, alpha caps 0.1 / 10, actor lr 0.002 with gradient clip 0.01, critic lr
        1e-3, Polyak 0.995 for the critics and pi_old, eta = lambda = 0.1 initially, dual bounds 1e5, buffer
        80 000, 256x256 networks, twin reward critics whose minimum the E-step takes too, the E-step on the critics'
        replay states, 0.13 updates per env step (40 reruns of 8000 steps in batches of 300)."""
        self.training(
            gamma=0.99, train_batch_size_per_learner=300, num_action_samples=32, mstep_iterations=6, estep_kl=0.1,
            kl_mean=0.001, kl_std=0.001, alpha_mean_step=1.0, alpha_std_step=100.0, alpha_mean_max=0.1,
            alpha_std_max=10.0, actor_lr=0.002, actor_grad_clip=0.01, critic_lr=1e-3, tau=0.005, tau_policy=0.005,
            eta_init=0.1, lambda_init=0.1, eta_max=1e5, lambda_max=1e5, replay_capacity=80_000, twin_q=True,
            estep_twin_min=True, updates_per_env_step=0.133, num_steps_sampled_before_learning_starts=4000, n_step=1,
            pi_old_sync="polyak", qc_nonnegative=False, cost_feedback_gain=0.0, critic_activation=None,
            estep_recent_steps=None,
        )
        return self.rl_module(model_config={"fcnet_hiddens": [256, 256], "fcnet_activation": "relu"})

    # -- derived values --------------------------------------------------------------------------------------------
    @property
    def cost_limits(self) -> Dict[str, float]:
        """{cost info key: episodic limit}."""
        if isinstance(self.cost_limit, Mapping):
            return {str(k): float(v) for k, v in self.cost_limit.items()}
        return {"cost": float(self.cost_limit)}

    @property
    def cost_keys(self) -> List[str]:
        return list(self.cost_limits)

    @property
    def horizon(self) -> int:
        """T: ``episode_len``, or the env's time limit."""
        if self.episode_len is not None:
            return int(self.episode_len)
        from rllib_cvpo.envs import episode_length

        t = episode_length(self.env) if isinstance(self.env, str) else None
        if t is None:
            raise ValueError(f"env {self.env!r} has no time limit: set training(episode_len=T)")
        return int(t)

    def cost_limits_at(self, env_steps: int) -> Dict[str, float]:
        """The (possibly annealed) episodic limits after ``env_steps`` sampled env steps."""
        final = self.cost_limits
        if self.cost_limit_start is None or not self.cost_limit_anneal_steps or env_steps >= self.cost_limit_anneal_steps:
            return final
        start = self.cost_limit_start
        start = {k: float(start[k]) for k in final} if isinstance(start, Mapping) else {k: float(start) for k in final}
        decay = math.exp(-5.0 * env_steps / self.cost_limit_anneal_steps)
        return {k: final[k] + (start[k] - final[k]) * decay for k in final}

    def qc_thresholds(self, env_steps: int = 0) -> List[float]:
        """Per-step Q_c thresholds eps_c (one per cost key) after ``env_steps`` env steps."""
        return [qc_threshold(d, self.gamma, self.horizon) for d in self.cost_limits_at(env_steps).values()]

    # -- RLlib hooks -----------------------------------------------------------------------------------------------
    @property
    @override(AlgorithmConfig)
    def _model_config_auto_includes(self) -> Dict[str, Any]:
        return super()._model_config_auto_includes | {"twin_q": self.twin_q, "twin_qc": self.twin_qc,
                                                       "num_cost_critics": len(self.cost_keys),
                                                       "qc_ensemble": self.qc_ensemble,
                                                       "qc_pessimism": self.qc_pessimism,
                                                       "init_std": self.init_std,
                                                       "critic_activation": self.critic_activation}

    @override(AlgorithmConfig)
    def get_default_rl_module_spec(self) -> RLModuleSpec:
        from rllib_cvpo.cvpo.torch.cvpo_torch_rl_module import CVPOTorchRLModule

        return RLModuleSpec(module_class=CVPOTorchRLModule)

    @override(AlgorithmConfig)
    def get_default_learner_class(self):
        from rllib_cvpo.cvpo.torch.cvpo_torch_learner import CVPOTorchLearner

        return CVPOTorchLearner

    @override(AlgorithmConfig)
    def get_evaluation_config_object(self) -> Optional[AlgorithmConfig]:
        """As RLlib's; and evaluation metrics average the episodes of one evaluation round only (not a window over
        several iterations), so each iteration's evaluation return and cost describe the policy being checkpointed."""
        eval_config = super().get_evaluation_config_object()
        overrides = self.evaluation_config if isinstance(self.evaluation_config, Mapping) else {}
        if (eval_config is not None and self.evaluation_duration_unit == "episodes"
                and isinstance(self.evaluation_duration, int) and "metrics_num_episodes_for_smoothing" not in overrides):
            eval_config.metrics_num_episodes_for_smoothing = self.evaluation_duration
        if (eval_config is not None and self.evaluation_duration_unit == "episodes"
                and isinstance(self.evaluation_duration, int) and "num_envs_per_env_runner" not in overrides):
            # As many envs as the episodes divide into (10 episodes: 5 envs, twice), not the training runners' 8,
            # which would play 16 episodes to count 10.
            per_runner = -(-self.evaluation_duration // max(self.evaluation_num_env_runners, 1))
            envs = max(d for d in range(1, min(self.num_envs_per_env_runner, per_runner) + 1) if per_runner % d == 0)
            eval_config.num_envs_per_env_runner = envs
        return eval_config

    @override(AlgorithmConfig)
    def validate(self) -> None:
        super().validate()
        errors = []

        def number(name, lo=None, hi=None, lo_open=False, allow_none=False):
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                errors.append(f"{name} must be a finite number, got {v!r}")
            elif lo is not None and (v <= lo if lo_open else v < lo):
                errors.append(f"{name} must be {'>' if lo_open else '>='} {lo}, got {v!r}")
            elif hi is not None and v > hi:
                errors.append(f"{name} must be <= {hi}, got {v!r}")

        limits = self.cost_limit if isinstance(self.cost_limit, Mapping) else {"cost": self.cost_limit}
        if not limits:
            errors.append("cost_limit must be a number or a non-empty {cost key: limit} dict, got {}")
        for key, v in limits.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                errors.append(f"cost_limit for {key!r} must be a number >= 0, got {v!r}")
        if self.cost_limit_start is not None:
            starts = self.cost_limit_start if isinstance(self.cost_limit_start, Mapping) else {k: self.cost_limit_start for k in limits}
            for key in limits:
                v = starts.get(key)
                if isinstance(v, bool) or not isinstance(v, (int, float)) or v < limits[key]:
                    errors.append(f"cost_limit_start for {key!r} must be a number >= its cost_limit, got {v!r}")
        number("cost_limit_anneal_steps", 0)
        number("cost_feedback_gain", 0)
        number("cost_feedback_margin", 0, 1)
        number("cost_feedback_error_clip", 0, lo_open=True)
        if self.cost_feedback_window is not None and (isinstance(self.cost_feedback_window, bool)
                                                      or not isinstance(self.cost_feedback_window, int)
                                                      or self.cost_feedback_window < 1):
            errors.append(f"cost_feedback_window must be None (the round just sampled) or an integer number of env "
                          f"steps >= 1, got {self.cost_feedback_window!r}")
        if self.cost_feedback_source not in FEEDBACK_SOURCES:
            errors.append(f"cost_feedback_source must be one of {', '.join(map(repr, FEEDBACK_SOURCES))}, got "
                          f"{self.cost_feedback_source!r}")
        elif self.cost_feedback_source != "training" and self.cost_feedback_gain > 0 and not self.evaluation_interval:
            errors.append(f"cost_feedback_source={self.cost_feedback_source!r} measures the evaluation's cost, but "
                          f"evaluation is off (evaluation_interval={self.evaluation_interval!r})")
        for name, lo, optional in (("qc_ensemble", 1, False), ("n_step", 1, False), ("estep_recent_steps", 1, True),
                                  ("critic_updates_per_update", 1, False)):
            v = getattr(self, name)
            if v is None and optional:
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                errors.append(f"{name} must be an integer >= {lo}, got {v!r}")
        number("qc_pessimism", 0)
        number("init_std", 0, lo_open=True, allow_none=True)
        if self.learner_num_threads is not None and (not isinstance(self.learner_num_threads, int)
                                                     or isinstance(self.learner_num_threads, bool)
                                                     or self.learner_num_threads < 1):
            errors.append(f"learner_num_threads must be None (automatic) or an integer >= 1, got "
                          f"{self.learner_num_threads!r}")
        if self.pi_old_sync not in ("polyak", "round"):
            errors.append(f"pi_old_sync must be 'polyak' or 'round', got {self.pi_old_sync!r}")
        for name in ("estep_twin_min", "cost_feedback_antiwindup"):
            if not isinstance(getattr(self, name), bool):
                errors.append(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.twin_qc and self.qc_ensemble != 1:
            errors.append(f"twin_qc and qc_ensemble={self.qc_ensemble!r} both set the cost heads: use one")
        if self.qc_pessimism and self.qc_ensemble < 2:
            errors.append(f"qc_pessimism={self.qc_pessimism!r} needs qc_ensemble >= 2 (the std of one head is "
                          "undefined)")
        if not self.normalize_actions:
            errors.append("normalize_actions must be True: CVPO's policy acts in [-1, 1] and RLlib maps that to the "
                          "action box")
        if self.episode_len is not None and (not isinstance(self.episode_len, int) or self.episode_len < 1):
            errors.append(f"episode_len must be a positive integer or None, got {self.episode_len!r}")
        number("gamma", 0.0, 1.0)
        number("estep_kl", 0.0, lo_open=True)
        number("estep_constraint_rate", 0.0, 1.0, lo_open=True)
        number("estep_qc_smoothing", 0.0, 1.0, lo_open=True, allow_none=True)
        if not isinstance(self.num_action_samples, int) or self.num_action_samples < 2:
            errors.append(f"num_action_samples must be an integer >= 2, got {self.num_action_samples!r}")
        if self.estep_solver not in ("newton", "cvxpy"):
            errors.append(f"estep_solver must be 'newton' or 'cvxpy', got {self.estep_solver!r}")
        number("eta_min", 0.0, lo_open=True)
        number("eta_max", self.eta_min if isinstance(self.eta_min, (int, float)) else 0.0, lo_open=True)
        number("eta_init", 0.0, lo_open=True)
        number("lambda_max", 0.0, lo_open=True)
        number("lambda_init", 0.0)
        for name in ("kl_mean", "kl_std"):
            number(name, 0.0, lo_open=True)
        if self.mstep_std_fit not in STD_FITS:
            errors.append(f"mstep_std_fit must be one of {', '.join(map(repr, STD_FITS))}, got {self.mstep_std_fit!r}")
        if not isinstance(self.mstep_iterations, int) or self.mstep_iterations < 1:
            errors.append(f"mstep_iterations must be an integer >= 1, got {self.mstep_iterations!r}")
        for name in ("alpha_mean_step", "alpha_std_step", "alpha_mean_max", "alpha_std_max"):
            number(name, 0.0)
        for name in ("actor_lr", "critic_lr"):
            number(name, 0.0, lo_open=True)
        number("actor_grad_clip", 0.0, lo_open=True, allow_none=True)
        for name in ("tau", "tau_policy"):
            number(name, 0.0, 1.0, lo_open=True)
        number("updates_per_env_step", 0.0, lo_open=True)
        number("num_steps_sampled_before_learning_starts", 0)
        if not isinstance(self.replay_capacity, int) or self.replay_capacity < self.train_batch_size_per_learner:
            errors.append(f"replay_capacity must be an integer >= train_batch_size_per_learner "
                          f"({self.train_batch_size_per_learner}), got {self.replay_capacity!r}")
        hiddens = (self._model_config or {}).get("fcnet_hiddens", [])
        if (not isinstance(hiddens, (list, tuple)) or not hiddens
                or not all(isinstance(h, int) and not isinstance(h, bool) and h > 0 for h in hiddens)):
            errors.append(f"model_config.fcnet_hiddens must be a list of positive integers, got {hiddens!r}")
        from rllib_cvpo.cvpo.torch.cvpo_torch_rl_module import ACTIVATIONS

        activation = (self._model_config or {}).get("fcnet_activation", "relu")
        if activation not in ACTIVATIONS:
            errors.append(f"model_config.fcnet_activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
        if self.critic_activation is not None and self.critic_activation not in ACTIVATIONS:
            errors.append(f"critic_activation must be None (model_config's fcnet_activation) or one of "
                          f"{', '.join(ACTIVATIONS)}, got {self.critic_activation!r}")
        if self.lr is not None:
            errors.append(f"lr is not used by CVPO (set actor_lr and critic_lr), got {self.lr!r}")
        if errors:
            raise ValueError("Invalid CVPO configuration: " + "; ".join(errors))
        if self.is_multi_agent:
            raise ValueError("CVPO supports single-agent envs only")
        if self.env is not None:
            self.horizon  # noqa: B018 - fails early when T cannot be found


class CVPO(Algorithm):
    """CVPO: sample with EnvRunners -> store in a cost-aware replay -> per sampled env step, ``updates_per_env_step``
    learner updates (critics, E-step, M-step) on uniform minibatches -> sync the policy to the EnvRunners."""

    @classmethod
    @override(Algorithm)
    def get_default_config(cls) -> CVPOConfig:
        return CVPOConfig()

    @override(Algorithm)
    def setup(self, config: CVPOConfig) -> None:
        if isinstance(config.env, str):
            from rllib_cvpo.envs import register_with_ray

            register_with_ray(config.env)
        super().setup(config)
        # The replay lives in the learners (CVPOTorchLearner.replay; one shard per learner): these route chunks.
        self._shard_sizes = [0] * max(1, len(self.learner_group))  # transitions sent to each learner's shard
        self._episode_shard: Dict[Any, int] = {}  # a running episode's shard, so its next chunk joins it there
        self._update_credit = 0.0
        self._cost_offset = np.zeros(len(config.cost_keys))  # the cost feedback's offsets o (episodic cost units)
        self._lambda_at_bound: Optional[np.ndarray] = None  # per constraint, over the last round's updates
        self._feedback_rounds: List[tuple] = []  # (env steps, summed costs) of the rounds in the feedback's window
        self._evaluation_costs: Optional[list] = None  # each constraint's mean episodic cost in the last evaluation

    @override(Algorithm)
    def training_step(self) -> None:
        cfg: CVPOConfig = self.config
        lifetime = self.metrics.peek((ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME), default=0)
        warmup = lifetime < cfg.num_steps_sampled_before_learning_starts
        overlap = cfg.overlap_sampling and self.env_runner_group.num_healthy_remote_workers() > 0
        with self.metrics.log_time((TIMERS, ENV_RUNNER_SAMPLING_TIMER)):
            if overlap:
                rounds, runner_results = self._sample_overlapped(lifetime)
                if not runner_results:
                    return  # every EnvRunner failed; Algorithm.train() restores them before the next step
            else:
                episodes, runner_results = synchronous_parallel_sample(
                    worker_set=self.env_runner_group,
                    concat=True,
                    sample_timeout_s=cfg.sample_timeout_s,
                    random_actions=warmup,
                    _uses_new_env_runners=True,
                    _return_metrics=True,
                )
                rounds = [(episodes, warmup)]
        self.metrics.aggregate(runner_results, key=ENV_RUNNER_RESULTS)
        with self.metrics.log_time((TIMERS, REPLAY_BUFFER_ADD_DATA_TIMER)):
            sampled, sampled_costs = self._store(rounds)
        lifetime = self.metrics.peek((ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME), default=0)
        if lifetime < cfg.num_steps_sampled_before_learning_starts:
            return
        if cfg.cost_feedback_gain > 0:  # not during warm-up: those steps come from uniformly random actions
            limits = list(cfg.cost_limits_at(lifetime).values())
            hold = None
            if cfg.cost_feedback_antiwindup and self._lambda_at_bound is not None:
                hold = self._lambda_at_bound >= ANTIWINDUP_AT_BOUND
            measured_steps, measured_costs = sampled, sampled_costs
            if cfg.cost_feedback_window:
                self._feedback_rounds = window_rounds(self._feedback_rounds, sampled, sampled_costs,
                                                      cfg.cost_feedback_window)
                measured_steps = sum(steps for steps, _ in self._feedback_rounds)
                measured_costs = np.sum([costs for _, costs in self._feedback_rounds], axis=0)
            self._cost_offset = update_offset(self._cost_offset, measured_costs, measured_steps, limits,
                                              cfg.horizon, cfg.cost_feedback_gain, cfg.cost_feedback_margin,
                                              cfg.cost_feedback_source, self._evaluation_costs, hold,
                                              weight_steps=sampled, error_clip=cfg.cost_feedback_error_clip)
            for key, offset in zip(cfg.cost_keys, self._cost_offset):
                self.metrics.log_value((COST_FEEDBACK, key), float(offset), window=1)
        self._update_credit += sampled * cfg.updates_per_env_step
        num_updates = int(self._update_credit)
        if num_updates == 0 or min(self._shard_sizes) == 0:  # (the credit waits until every shard holds data)
            return
        self._update_credit -= num_updates
        timesteps = {NUM_ENV_STEPS_SAMPLED_LIFETIME: lifetime}
        if cfg.cost_feedback_gain > 0:
            timesteps[THRESHOLD_OFFSET] = self._cost_offset.tolist()
        # Each learner draws its minibatches from its own shard and runs `num_updates` updates; the E-step solves the
        # dual of all learners' states together (CVPOTorchLearner).
        with self.metrics.log_time((TIMERS, LEARNER_UPDATE_TIMER)):
            results = self._foreach_learner(_update_from_replay, num_updates=num_updates, timesteps=timesteps)
        results, at_bound = [r for r, _ in results], results[0][1]
        if at_bound is not None:
            self._lambda_at_bound = at_bound
        self.metrics.aggregate(results, key=LEARNER_RESULTS)
        if not overlap:  # (overlapped sampling hands the weights over with each sampling request)
            with self.metrics.log_time((TIMERS, SYNCH_WORKER_WEIGHTS_TIMER)):
                self.env_runner_group.sync_weights(from_worker_or_learner_group=self.learner_group,
                                                   inference_only=True)

    def _store(self, rounds) -> tuple:
        """Turn the rounds' episodes into chunks of arrays here (checked for costs and finite values) and send each
        chunk once, to one learner's replay shard: a running episode's chunks all go to the shard of its first one
        (so n-step targets can follow it), a new episode's to the shard that has received the fewest transitions.
        Random warm-up actions come in the env's units, the policy's in [-1, 1]: all are stored in the policy's.
        Returns (transitions, their summed costs per constraint)."""
        cfg: CVPOConfig = self.config
        chunks = []
        for episodes, random_actions in rounds:
            chunks += episode_chunks(episodes, cfg.cost_keys, self._action_space() if random_actions else None)
        sampled = sum(len(c[COSTS]) for c in chunks)
        costs = np.sum([c[COSTS].sum(0, dtype=np.float64) for c in chunks], axis=0) if chunks \
            else np.zeros(len(cfg.cost_keys))
        shards = [[] for _ in self._shard_sizes]
        for chunk in chunks:
            shard = self._episode_shard.pop(chunk["id"], None) if len(shards) > 1 else 0
            if shard is None:
                shard = int(np.argmin(self._shard_sizes))
            shards[shard].append(chunk)
            self._shard_sizes[shard] += len(chunk[COSTS])
            if len(shards) > 1 and not chunk["done"]:
                self._episode_shard[chunk["id"]] = shard
        if len(self._episode_shard) > 100_000:  # episodes that never ended (e.g. an EnvRunner restarted)
            self._episode_shard.clear()
        self._to_learners(_add_to_replay, shards)
        return sampled, costs

    def _to_learners(self, func, per_learner: list) -> list:
        """``func(learner, data)`` on each learner with its own item of ``per_learner`` (indexed by rank): passed
        directly to a local learner, else put in the object store once per item, each learner fetching only its
        own."""
        if self.learner_group.is_local:
            return self._foreach_learner(func, data=per_learner[0])
        return self._foreach_learner(func, refs=[ray.put(item) for item in per_learner])

    def _foreach_learner(self, func, **kwargs) -> list:
        """``func(learner, **kwargs)`` on every learner (the local one, or each remote one): one result per learner
        (in the learner group's actor order; a learner's rank is ``learner._rank``), the first error raised."""
        results = []
        for result in self.learner_group.foreach_learner(func, **kwargs):
            value = result.get()
            if not result.ok:
                raise value
            results.append(value)
        return results

    def replay_states(self) -> List[Dict[str, Any]]:
        """Each learner's replay shard state (``CostReplayBuffer.get_state``), in rank order."""
        return [state for _, state in sorted(self._foreach_learner(_replay_state), key=lambda x: x[0])]

    @property
    def replay(self) -> CostReplayBuffer:
        """The replay, where the learner runs in this process (``num_learners=0``). Remote learners each hold a
        shard of it (:meth:`replay_states`)."""
        if not self.learner_group.is_local:
            raise AttributeError("the replay is sharded over remote learners: use CVPO.replay_states()")
        return self.learner_group._learner.replay

    def _sample_overlapped(self, lifetime: int):
        """Collect the round each remote EnvRunner sampled since the last call (waiting for it if needed), then at
        once ask each for the next round, which it samples while the learners update. Each request carries the
        learners' weights as they are when it is made (before this step's update), so the episodes a step trains
        on were collected with the weights of one update before the learners' current ones: a policy lag of one
        round, always. (RLlib's ``sync_weights`` cannot be used here: it skips an EnvRunner that has a request in
        flight.) Returns ([(episodes, whether they came from random warm-up actions), ...] per EnvRunner, runner
        metrics)."""
        cfg: CVPOConfig = self.config
        group, tag = self.env_runner_group, "cvpo_sample"

        def sample(runner, state, random_actions: bool):
            runner.set_state(state)
            return runner.sample(random_actions=random_actions), runner.get_metrics(), random_actions

        def request(steps_so_far: int) -> None:
            state = self.learner_group.get_state(components=COMPONENT_LEARNER + "/" + COMPONENT_RL_MODULE,
                                                 inference_only=True)[COMPONENT_LEARNER]
            state = ray.put({k: v for k, v in state.items() if k in (COMPONENT_RL_MODULE, WEIGHTS_SEQ_NO)})
            group.foreach_env_runner_async(sample, tag=tag, kwargs={
                "state": state, "random_actions": steps_so_far < cfg.num_steps_sampled_before_learning_starts})

        if group.num_in_flight_async_reqs(tag=tag) == 0:
            request(lifetime)
        results = []
        while not results and group.num_in_flight_async_reqs(tag=tag) > 0:
            results = group.fetch_ready_async_reqs(tags=tag, timeout_seconds=cfg.sample_timeout_s)
        rounds = [(eps, random) for _, (eps, _, random) in results]
        request(lifetime + sum(len(ep) for eps, _ in rounds for ep in eps))
        return rounds, [metrics for _, (_, metrics, _) in results]

    def _action_space(self):
        spaces = getattr(self, "spaces", None) or {}
        return (spaces.get(DEFAULT_MODULE_ID) or spaces.get("__env__") or (None, None))[1]

    @override(Algorithm)
    def step(self) -> Dict[str, Any]:
        result = super().step()
        evaluation = (result.get(EVALUATION_RESULTS, {}) or {}).get(ENV_RUNNER_RESULTS, {}) or {}
        costs = self._constraint_costs(evaluation)
        if all(math.isfinite(c) for c in costs.values()):
            self._evaluation_costs = list(costs.values())  # held for the cost feedback until the next evaluation
        result[SUMMARY] = self.summarize(result)
        # Top level too: Tune's checkpoint ranking looks the score attribute up without flattening nested keys.
        result[SCORE] = result[SUMMARY]["score"]
        self._last_summary = result[SUMMARY]
        return result

    def summarize(self, result: Dict[str, Any]) -> Dict[str, Any]:
        """One iteration in a few numbers: env steps, training and evaluation return and cost, the final cost limit,
        whether the policy is feasible (evaluation cost within the limit of every constraint; the training episodes'
        cost when there is no evaluation) and ``score``, which ranks checkpoints: feasible ones by return, above all
        infeasible ones, which rank by lower cost."""
        cfg: CVPOConfig = self.config
        runners = result.get(ENV_RUNNER_RESULTS, {}) or {}
        evaluation = (result.get(EVALUATION_RESULTS, {}) or {}).get(ENV_RUNNER_RESULTS, {}) or {}
        nan = float("nan")

        def get(d, key):
            v = d.get(key, nan)
            return float(v) if isinstance(v, (int, float)) else nan

        limits = cfg.cost_limits
        judged = evaluation if math.isfinite(get(evaluation, EPISODE_RETURN_MEAN)) else runners
        costs = self._constraint_costs(judged)
        ret = get(judged, EPISODE_RETURN_MEAN)
        known = math.isfinite(ret) and all(math.isfinite(c) for c in costs.values())
        feasible = known and all(costs[k] <= limits[k] for k in limits)
        if not known:
            score = nan
        elif feasible:
            score = ret
        else:
            score = INFEASIBLE_SCORE_OFFSET - sum(max(costs[k] - limits[k], 0.0) for k in limits)
        return {
            "env_steps": int(result.get(NUM_ENV_STEPS_SAMPLED_LIFETIME, 0) or 0),
            "episode_return": get(runners, EPISODE_RETURN_MEAN),
            "episode_cost": get(runners, "episode_cost"),
            "episode_over_limit": get(runners, "episode_over_limit"),
            "eval_return": get(evaluation, EPISODE_RETURN_MEAN),
            "eval_cost": get(evaluation, "episode_cost"),
            "eval_over_limit": get(evaluation, "episode_over_limit"),
            "cost_limit": float(sum(limits.values())),
            "feasible": float(feasible),
            "score": score,
        }

    def _constraint_costs(self, runner_results: Dict[str, Any]) -> Dict[str, float]:
        """Each constraint's mean episodic cost in an EnvRunner result dict (NaN where it holds none)."""
        keys = self.config.cost_keys
        names = {keys[0]: "episode_cost"} if len(keys) == 1 else {k: f"episode_{k}" for k in keys}
        out = {}
        for key, name in names.items():
            v = runner_results.get(name, float("nan"))
            out[key] = float(v) if isinstance(v, (int, float)) else float("nan")
        return out

    @override(Algorithm)
    def save_to_path(self, path=None, *, state=None, filesystem=None, use_msgpack=False) -> str:
        """As RLlib's, plus ``cvpo_metadata.json`` (env, spaces, cost limits, env steps, the last iteration's summary)
        for loading, serving and reports without unpickling the algorithm, and, written last, the manifest that
        tells a complete checkpoint from one a kill cut short (``rllib_cvpo.checkpoints``)."""
        path = super().save_to_path(path, state=state, filesystem=filesystem, use_msgpack=use_msgpack)
        if filesystem is None:
            import json

            from rllib_cvpo.policy import METADATA_FILE

            cfg: CVPOConfig = self.config
            obs_space, act_space = (getattr(self, "spaces", None) or {}).get(DEFAULT_MODULE_ID, (None, None))
            meta = {
                "env": cfg.env if isinstance(cfg.env, str) else None,
                "cost_limit": cfg.cost_limit,
                "cost_keys": cfg.cost_keys,
                "env_steps": int(self.metrics.peek((ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME), default=0)),
                "training_iteration": int(self.iteration),
                "summary": getattr(self, "_last_summary", None),
            }
            if obs_space is not None and act_space is not None:
                meta["observation_shape"] = list(obs_space.shape)
                meta["action_low"] = act_space.low.astype(float).tolist()
                meta["action_high"] = act_space.high.astype(float).tolist()
            Path(path, METADATA_FILE).write_text(json.dumps(meta, indent=1, default=float))
            # Last: the list of what a complete copy of this checkpoint holds (rllib_cvpo.checkpoints).
            write_manifest(path, training_iteration=int(self.iteration), time_total_s=float(self._time_total or 0.0))
        return path

    @override(Algorithm)
    def restore(self, checkpoint_path, *args, **kwargs):
        """Tune's restore, from the newest complete checkpoint when the one asked for is not complete: a kill during
        a save or a rotation can leave Tune's experiment state naming a checkpoint that was never fully copied or
        was half deleted (``rllib_cvpo.checkpoints``). The iteration and time then come from the checkpoint used."""
        import logging

        import ray.tune
        from ray.train._internal.session import _TrainingResult

        result = checkpoint_path
        if isinstance(result, str):
            result = ray.tune.Checkpoint.from_directory(result)
        if isinstance(result, ray.tune.Checkpoint):
            result = _TrainingResult(checkpoint=result, metrics={})
        checkpoint = getattr(result, "checkpoint", None)
        if checkpoint is not None and checkpoint.filesystem.type_name == "local":
            asked = Path(checkpoint.path)
            reason = incomplete_reason(asked)
            if reason is not None:
                candidates = complete_checkpoints(asked.parent)
                if not candidates:
                    raise CheckpointError(f"cannot restore {str(asked)!r}: {reason}, and {str(asked.parent)!r} "
                                          "holds no complete checkpoint")
                chosen = candidates[-1]
                manifest = read_manifest(chosen)
                logging.getLogger(__name__).warning(
                    "checkpoint %s is incomplete (%s): restoring from %s instead", asked, reason, chosen)
                metrics = {"training_iteration": int(manifest.get("training_iteration", 0)),
                           "time_total_s": float(manifest.get("time_total_s", 0.0))}
                result = _TrainingResult(checkpoint=ray.tune.Checkpoint.from_directory(str(chosen)), metrics=metrics)
        return super().restore(result, *args, **kwargs)

    @override(Algorithm)
    def get_state(self, components=None, *, not_components=None, **kwargs) -> Dict[str, Any]:
        state = super().get_state(components, not_components=not_components, **kwargs)
        if self.config.store_buffer_in_checkpoints and self._check_component(REPLAY_STATE, components, not_components):
            state[REPLAY_STATE] = {"shards": self.replay_states(), "credit": self._update_credit,
                                   "shard_sizes": list(self._shard_sizes)}
        if self._check_component(COST_FEEDBACK, components, not_components):
            state[COST_FEEDBACK] = {"offset": self._cost_offset.copy(), "evaluation_costs": self._evaluation_costs,
                                    "lambda_at_bound": self._lambda_at_bound,
                                    "window": [(steps, np.array(costs)) for steps, costs in self._feedback_rounds]}
        return state

    @override(Algorithm)
    def set_state(self, state: Dict[str, Any]) -> None:
        super().set_state(state)
        if REPLAY_STATE in state:
            saved = state[REPLAY_STATE]
            shards = saved["shards"] if "shards" in saved else [saved["buffer"]]  # (one buffer: before sharding)
            if len(shards) != len(self._shard_sizes):
                raise CheckpointError(
                    f"the checkpoint's replay is split over {len(shards)} learner(s), this run has "
                    f"{len(self._shard_sizes)} (num_learners={self.config.num_learners}): restore it with "
                    f"num_learners={len(shards) if len(shards) > 1 else '0 or 1'}")
            self._to_learners(_set_replay_state, shards)
            self._shard_sizes = [int(x) for x in saved.get("shard_sizes", [shard["num_added"] for shard in shards])]
            self._episode_shard = {}
            self._update_credit = float(saved["credit"])
        if COST_FEEDBACK in state:
            self._cost_offset = np.array(state[COST_FEEDBACK]["offset"], np.float64)
            self._evaluation_costs = state[COST_FEEDBACK].get("evaluation_costs")
            self._lambda_at_bound = state[COST_FEEDBACK].get("lambda_at_bound")  # the anti-windup's last reading
            self._feedback_rounds = [(int(steps), np.array(costs, np.float64))
                                     for steps, costs in state[COST_FEEDBACK].get("window", [])]


# Functions the algorithm runs on its learners (module level: remote learners import them by name).
def _own(learner, data=None, refs=None):
    """A learner's item of CVPO._to_learners: given directly, or its own object among the refs."""
    return ray.get(refs[learner._rank]) if refs is not None else data


def _add_to_replay(learner, data=None, refs=None) -> int:
    return learner.add_to_replay(_own(learner, data, refs))


def _update_from_replay(learner, num_updates, timesteps):
    """The learner's updates' results, and per constraint the fraction of them with lambda at its bound (the cost
    feedback's anti-windup reads it; every learner solves the same global dual)."""
    return learner.update_from_replay(num_updates, timesteps), learner.lambda_at_bound_fraction()


def _replay_state(learner):
    return learner._rank, learner.replay.get_state()


def _set_replay_state(learner, data=None, refs=None) -> None:
    learner.replay.set_state(_own(learner, data, refs))


def learner_threads(config: "CVPOConfig", node_cpus: int) -> int:
    """Torch threads for a learner's update (``learner_num_threads``; see ``CVPOConfig.training``). ``node_cpus``:
    the CPUs of the machine a local learner runs on."""
    if config.learner_num_threads is not None:
        return int(config.learner_num_threads)
    if config.num_learners > 0:
        cpus = config.num_cpus_per_learner
        return max(1, int(cpus)) if isinstance(cpus, (int, float)) else 1
    busy = 0.0  # CPUs of EnvRunners that sample while the local learner updates
    if config.overlap_sampling and config.num_env_runners > 0:
        busy += config.num_env_runners * float(config.num_cpus_per_env_runner or 1)
    if config.evaluation_parallel_to_training and config.evaluation_num_env_runners > 0:
        busy += config.evaluation_num_env_runners * float(config.num_cpus_per_env_runner or 1)
    return max(1, int(node_cpus - busy))
