"""CVPO's networks: a tanh-squashed diagonal Gaussian policy, and all critics (reward and cost) in one ensemble."""

from __future__ import annotations

import math
from typing import Any, Dict, List, Sequence, Tuple

import gymnasium as gym
import numpy as np
import torch
from ray.rllib.core.columns import Columns
from ray.rllib.core.distribution.torch.torch_distribution import TorchDeterministic, TorchSquashedGaussian
from ray.rllib.core.learner.utils import make_target_network
from ray.rllib.core.rl_module.apis import InferenceOnlyAPI, TargetNetworkAPI
from ray.rllib.core.rl_module.rl_module import RLModule
from ray.rllib.core.rl_module.torch.torch_rl_module import TorchRLModule
from ray.rllib.utils.annotations import override
from ray.rllib.utils.numpy import MAX_LOG_NN_OUTPUT, MIN_LOG_NN_OUTPUT
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "leaky_relu": nn.LeakyReLU, "tanh": nn.Tanh, "elu": nn.ELU, "silu": nn.SiLU}
# The same activations applied in place, for the critics' no-grad evaluation.
INPLACE_ACTIVATIONS = {"relu": torch.relu_, "leaky_relu": nn.functional.leaky_relu_, "tanh": torch.tanh_,
                       "elu": nn.functional.elu_,
                       "silu": lambda x: nn.functional.silu(x, inplace=True)}
# Rows (state-action pairs) in one chunk of CriticEnsemble.forward_sampled on CPU. Measured on this project's 2-core
# VM (Xeon, AVX-512) at B 256 and E 3: 1024 rows were fastest at hidden 128 (N 16 and 32) and 256 (N 16), against
# 512, 2048 and all rows at once.
CPU_CHUNK_ROWS = 1024


class SquashedGaussian(TorchSquashedGaussian):
    """RLlib's squashed Gaussian whose deterministic action is tanh(mean), not the raw mean (ray#51544)."""

    def to_deterministic(self) -> TorchDeterministic:
        return TorchDeterministic(loc=self._squash(self.loc))


def mlp(sizes: Sequence[int], activation: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


class EnsembleLinear(nn.Module):
    """E independent linear layers applied in one batched matmul: [E, M, in] -> [E, M, out]."""

    def __init__(self, members: int, fan_in: int, fan_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(members, fan_in, fan_out))
        self.bias = nn.Parameter(torch.empty(members, 1, fan_out))
        bound = 1.0 / math.sqrt(fan_in)  # nn.Linear's default initialisation, per member
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


class CriticEnsemble(nn.Module):
    """Q(s, a) for E critics at once. Input [M, obs + act] -> output [E, M].

    Two paths with the same values: :meth:`forward` (autograd; batched matmuls over the members) for the critic step,
    and :meth:`forward_sampled` (no grad) for every target evaluation, where the E-step's B*N rows make the hidden
    layers most of an update's arithmetic. That path runs each member's hidden layer as one ``addmm`` into a reused
    workspace (faster than ``baddbmm`` with a broadcast bias on CPU, and no fresh multi-megabyte tensor per update),
    applies the activations in place, computes the output layer as matrix-vector products and, on CPU, takes the
    rows in cache-sized chunks."""

    def __init__(self, members: int, fan_in: int, hiddens: Sequence[int], activation: str) -> None:
        super().__init__()
        sizes = [fan_in, *hiddens, 1]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(EnsembleLinear(members, a, b))
            if i < len(sizes) - 2:
                # In place is safe for ReLU under autograd: its backward reads its output, and baddbmm's its inputs.
                layers.append(nn.ReLU(inplace=True) if activation == "relu" else ACTIVATIONS[activation]())
        self.net = nn.Sequential(*layers)
        # The linear layers (a plain list: the modules are registered through `net`; deepcopy keeps them shared).
        self._linears = [layer for layer in layers if isinstance(layer, EnsembleLinear)]
        self.members = members
        self.activation = activation
        self._plans: Dict[tuple, Dict[str, Any]] = {}

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        x = torch.cat([obs, actions], dim=-1)
        return self.net(x.unsqueeze(0).expand(self.members, *x.shape)).squeeze(-1)

    def _plan(self, obs: torch.Tensor, n: int, da: int, members: Tuple[int, ...]) -> Dict[str, Any]:
        """Buffers and views for :meth:`forward_sampled` at one shape, made once and reused: the hidden activations,
        the actions and observation terms per chunk, and every member's weight views for every chunk. An E-step then
        runs its dozens of (member, chunk) steps without slicing or allocating anything per step (about a fifth of
        its time was Python's per-step view and lookup work). Keyed by the parameters' storage too: views of a
        replaced parameter (``.to()``, a new ``nn.Parameter``) would be stale; in-place updates (Polyak, loading a
        state dict) keep them valid."""
        params = list(self.parameters())
        b, do = obs.shape
        key = (n, b, da, members, obs.device, obs.dtype, tuple(p.data_ptr() for p in params))
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        if len(self._plans) >= 8:  # a few shapes occur per run (TD targets, E-step); never grow without bound
            self._plans.clear()
        linears, e = self._linears, len(members)
        first, last = linears[0], linears[-1]
        # On CPU, states go through in chunks of about CPU_CHUNK_ROWS rows (N actions each), whose activations stay in
        # the core's cache: the bias adds and activations then run from cache, not memory, which took about a fifth
        # of the E-step's critic time at B*N = 4096. Each row's arithmetic is the same in any chunking, so the values
        # are identical. A GPU takes all rows at once.
        states = b if obs.device.type != "cpu" else max(1, min(b, CPU_CHUNK_ROWS // n))
        like = dict(device=obs.device, dtype=obs.dtype)
        widths = [layer.weight.shape[-1] for layer in linears[:-1]]
        rows_max = n * states
        hidden = [torch.empty(rows_max * w, **like) for w in widths]  # one storage per hidden layer, all chunks
        h_obs = torch.empty(e, b, widths[0], **like)  # the first layer's observation term, once per state and member
        q = torch.empty(e, n, b, **like)
        q_rows = torch.empty(rows_max, **like)
        chunks = []
        for s in range(0, b, states):
            cb = min(b, s + states) - s
            rows = n * cb
            acts = torch.empty(n, cb, da, **like)
            hs = [buf[: rows * w].view(rows, w) for buf, w in zip(hidden, widths)]
            steps = []
            for row, i in enumerate(members):
                middle = [(layer.bias[i], layer.weight[i], hs[j + 1]) for j, layer in enumerate(linears[1:-1])]
                steps.append((first.weight[i, do:], hs[0], hs[0].view(n, cb, -1), h_obs[row, s : s + cb], middle,
                              last.bias[i, 0], last.weight[i, :, 0], q[row, :, s : s + cb]))
            chunks.append((s, cb, acts, acts.view(rows, da), q_rows[:rows], steps))
        index = list(members)
        all_members = index == list(range(self.members))
        plan = self._plans[key] = dict(h_obs=h_obs, q=q, chunks=chunks, index=None if all_members else index,
                                       w_obs=first.weight[:, :do, :], b_obs=first.bias)
        return plan

    @torch.no_grad()
    def forward_sampled(self, obs: torch.Tensor, actions: torch.Tensor,
                        members: Sequence[int] | None = None) -> torch.Tensor:
        """Q for N actions per state, without gradients: obs [B, do], actions [N, B, da] -> [E, N * B] (row
        n * B + b), or with ``members`` only those critics, in that order. Same values as ``forward`` on the
        repeated observations, but the first layer's observation part is computed once per state (not N times) and
        broadcast. The result is a new tensor; the hidden activations live in buffers reused by the next call
        (:meth:`_plan`)."""
        activate = INPLACE_ACTIVATIONS[self.activation]
        n, b, da = actions.shape
        members = tuple(range(self.members)) if members is None else tuple(int(i) for i in members)
        e = len(members)
        plan = self._plan(obs, n, da, members)
        w_obs, b_obs = plan["w_obs"], plan["b_obs"]
        if plan["index"] is not None:
            w_obs, b_obs = w_obs[plan["index"]], b_obs[plan["index"]]
        torch.baddbmm(b_obs, obs.unsqueeze(0).expand(e, *obs.shape), w_obs, out=plan["h_obs"])
        for s, cb, acts, acts_rows, q_rows, steps in plan["chunks"]:
            acts.copy_(actions[:, s : s + cb])
            for w_act, h, h3, h_obs, middle, b_out, w_out, q_out in steps:
                torch.mm(acts_rows, w_act, out=h)
                activate(h3.add_(h_obs))
                for bias, weight, out in middle:
                    h = activate(torch.addmm(bias, h, weight, out=out))
                torch.addmv(b_out, h, w_out, out=q_rows)
                q_out.copy_(q_rows.view(n, cb))
        return plan["q"].view(e, n * b).clone()


class CVPOTorchRLModule(TorchRLModule, InferenceOnlyAPI, TargetNetworkAPI):
    """Policy ``pi`` (obs -> mean and log-std of a Gaussian squashed by tanh into [-1, 1]^d), and, on learners only,
    ``critics`` = [reward Q (1, or 2 with twin_q), cost Q (one per constraint)], their Polyak targets
    ``target_critics`` and the Polyak-averaged old policy ``pi_old`` that the E-step samples from.

    model_config keys: ``fcnet_hiddens`` (default [256, 256]), ``fcnet_activation`` ("relu"), ``critic_activation``
    (None: the critics' hidden activation, fcnet_activation's by default), ``twin_q`` (True),
    ``num_cost_critics`` (m, 1), ``qc_ensemble`` (E_c, 1: cost heads per constraint), ``qc_pessimism`` (k, 0: the
    combined Q_c is mean + k std over the E_c heads, CAL's upper confidence bound) and ``twin_qc`` (False: with
    True, two heads per constraint and their maximum, the pessimistic mirror of the twin reward critics' minimum).
    The cost heads are laid out copy-major: head ``e * m + i`` is copy e of constraint i.
    """

    framework: str = "torch"

    @override(RLModule)
    def setup(self) -> None:
        cfg = dict(self.model_config or {})
        if not isinstance(self.action_space, gym.spaces.Box):
            raise ValueError(f"CVPO needs a continuous (Box) action space, got {self.action_space}")
        self.obs_dim = int(np.prod(self.observation_space.shape))
        self.act_dim = int(np.prod(self.action_space.shape))
        hiddens = list(cfg.get("fcnet_hiddens", [256, 256]))
        activation = cfg.get("fcnet_activation", "relu")
        self.num_reward_critics = 2 if cfg.get("twin_q", True) else 1
        self.num_cost_critics = int(cfg.get("num_cost_critics", 1))
        self.twin_qc = bool(cfg.get("twin_qc", False))
        self.qc_copies = 2 if self.twin_qc else int(cfg.get("qc_ensemble", 1))
        self.qc_pessimism = float(cfg.get("qc_pessimism", 0.0))
        self.num_cost_heads = self.num_cost_critics * self.qc_copies
        self.pi = mlp([self.obs_dim, *hiddens, 2 * self.act_dim], activation)
        init_std = cfg.get("init_std")
        if init_std is not None:  # the log-std half of the output layer starts at log(init_std) for every state
            with torch.no_grad():
                self.pi[-1].weight[self.act_dim:].zero_()
                self.pi[-1].bias[self.act_dim:].fill_(math.log(float(init_std)))
        if not self.inference_only:
            self.critics = CriticEnsemble(
                self.num_reward_critics + self.num_cost_heads, self.obs_dim + self.act_dim, hiddens,
                cfg.get("critic_activation") or activation,
            )

    def policy(self, obs: torch.Tensor, net: nn.Module | None = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Pre-squash mean and std of the Gaussian for ``obs`` (by ``pi``, or ``net`` such as ``pi_old``)."""
        mean, log_std = (net or self.pi)(obs.reshape(obs.shape[0], -1)).chunk(2, dim=-1)
        return mean, log_std.clamp(MIN_LOG_NN_OUTPUT, MAX_LOG_NN_OUTPUT).exp()

    def combine_cost_heads(self, qc: torch.Tensor) -> torch.Tensor:
        """[E_c * m, M] cost heads -> [m, M]: the maximum of twin heads, or mean + k std over an ensemble."""
        if self.qc_copies == 1:
            return qc
        heads = qc.view(self.qc_copies, self.num_cost_critics, -1)
        if self.twin_qc:
            return heads.max(0).values
        if self.qc_pessimism == 0.0:
            return heads.mean(0)
        std, mean = torch.std_mean(heads, dim=0)
        return mean + self.qc_pessimism * std

    def _split(self, q: torch.Tensor, combine: bool, reward_rows: int | None = None):
        """(Q_r, Q_c) from the ensemble's rows: the first ``reward_rows`` (default: all reward critics) are Q_r."""
        k = self.num_reward_critics if reward_rows is None else reward_rows
        qr, qc = q[:k], q[k:]
        return qr, (self.combine_cost_heads(qc) if combine else qc)

    def q_values(self, obs: torch.Tensor, actions: torch.Tensor, target: bool = False, combine: bool = True):
        """(Q_r [n_r, M], Q_c [m, M]) for squashed actions in [-1, 1]; Q_c combines each constraint's heads (see
        :meth:`combine_cost_heads`; ``combine=False``: all E_c * m cost heads, as trained)."""
        obs = obs.reshape(obs.shape[0], -1)
        if target:  # never differentiated: the no-grad path
            q = self.target_critics.forward_sampled(obs, actions.unsqueeze(0))
        else:
            q = self.critics(obs, actions)
        return self._split(q, combine)

    def q_values_sampled(self, obs: torch.Tensor, actions: torch.Tensor, target: bool = False,
                         reward_critics: int | None = None):
        """(Q_r [n_r, N * B], Q_c [m, N * B]) for N squashed actions per state, ``actions`` [N, B, act]. With
        ``reward_critics`` = k < n_r, only the first k reward critics are evaluated (Q_r [k, N * B])."""
        critics = self.target_critics if target else self.critics
        obs = obs.reshape(obs.shape[0], -1)
        n_r = self.num_reward_critics
        if reward_critics is None or reward_critics >= n_r:
            return self._split(critics.forward_sampled(obs, actions), combine=True)
        members = tuple(range(reward_critics)) + tuple(range(n_r, critics.members))
        return self._split(critics.forward_sampled(obs, actions, members), combine=True, reward_rows=reward_critics)

    @override(RLModule)
    def _forward(self, batch: Dict[str, Any], **kwargs) -> Dict[str, Any]:
        mean, std = self.policy(batch[Columns.OBS])
        return {Columns.ACTION_DIST_INPUTS: torch.cat([mean, std.log()], dim=-1)}

    @override(TargetNetworkAPI)
    def make_target_networks(self) -> None:
        self.target_critics = make_target_network(self.critics)
        self.pi_old = make_target_network(self.pi)

    @override(TargetNetworkAPI)
    def get_target_network_pairs(self) -> List[Tuple[nn.Module, nn.Module]]:
        return [(self.critics, self.target_critics), (self.pi, self.pi_old)]

    @override(TargetNetworkAPI)
    def forward_target(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        mean, std = self.policy(batch[Columns.OBS], self.pi_old)
        return {Columns.ACTION_DIST_INPUTS: torch.cat([mean, std.log()], dim=-1)}

    @override(InferenceOnlyAPI)
    def get_non_inference_attributes(self) -> List[str]:
        return ["critics", "target_critics", "pi_old"]

    def get_inference_action_dist_cls(self):
        return SquashedGaussian

    def get_exploration_action_dist_cls(self):
        return SquashedGaussian

    def get_train_action_dist_cls(self):
        return SquashedGaussian
