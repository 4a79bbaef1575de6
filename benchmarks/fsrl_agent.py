"""FSRL's CVPO agent, built as ``fsrl.agent.CVPOAgent`` builds it, for ``fsrl_updates.py`` and ``fsrl_end_to_end.py``.

Runs in FSRL's own Python (FSRL is not a dependency of this project): the caller puts FSRL's source tree on
``sys.path`` first. Settings are FSRL's ``Mujoco2MCfg`` for SafetyPointCircle1 (``fsrl/config/cvpo_cfg.py``): a
tianshou ``Net`` + ``ActorProb`` actor with unbounded mean, one ``SingleCritic`` for the reward and one for the cost,
orthogonal initialisation, a diagonal Gaussian, actor lr 5e-4, critic lr 1e-3, tau 0.05, gamma 0.995, n-step 3,
E-step KL 0.02, cost limit 25.
"""

from __future__ import annotations


def build_cvpo(observation_space, action_space, *, hidden: int = 128, samples: int = 16,
               max_episode_steps: int = 500, logger=None, **overrides):
    """FSRL's ``CVPO`` policy for the given spaces; ``overrides`` go to its constructor (e.g. evaluation settings)."""
    import torch
    from tianshou.utils.net.common import Net
    from tianshou.utils.net.continuous import ActorProb
    from torch.distributions import Independent, Normal

    from fsrl.policy import CVPO
    from fsrl.utils.net.continuous import SingleCritic

    sizes = (hidden, hidden)
    actor = ActorProb(Net(observation_space.shape, hidden_sizes=sizes), action_space.shape,
                      max_action=float(action_space.high[0]), conditioned_sigma=True, unbounded=True)
    critics = [SingleCritic(Net(observation_space.shape, action_space.shape, hidden_sizes=sizes, concat=True))
               for _ in range(2)]  # reward, cost
    for m in list(actor.modules()) + [m for c in critics for m in c.modules()]:
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.orthogonal_(m.weight)
            torch.nn.init.zeros_(m.bias)
    kwargs = dict(actor=actor, critics=critics, actor_optim=torch.optim.Adam(actor.parameters(), lr=5e-4),
                  critic_optim=torch.optim.Adam(torch.nn.ModuleList(critics).parameters(), lr=1e-3),
                  action_space=action_space, dist_fn=lambda *logits: Independent(Normal(*logits), 1),
                  max_episode_steps=max_episode_steps, cost_limit=25.0, tau=0.05, gamma=0.995, n_step=3,
                  estep_kl=0.02, sample_act_num=samples)
    if logger is not None:
        kwargs["logger"] = logger
    kwargs.update(overrides)
    return CVPO(**kwargs)
