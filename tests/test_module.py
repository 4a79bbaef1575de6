"""The RLModule's batched critics: the E-step's shared-observation evaluation equals the plain one."""

import torch

from rllib_cvpo.cvpo.torch.cvpo_torch_rl_module import CriticEnsemble


def test_sampled_action_evaluation_equals_evaluation_on_repeated_observations():
    torch.manual_seed(0)
    critics = CriticEnsemble(4, 12 + 3, [32, 32], "relu")
    obs, actions = torch.randn(64, 12), torch.rand(8, 64, 3) * 2 - 1
    repeated = obs.unsqueeze(0).expand(8, -1, -1).reshape(8 * 64, 12)
    expected = critics(repeated, actions.reshape(8 * 64, 3))
    got = critics.forward_sampled(obs, actions)
    assert got.shape == (4, 8 * 64)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # Row n * B + b is action n of state b.
    torch.testing.assert_close(got[:, 3 * 64 + 5], critics(obs[5:6], actions[3, 5:6])[:, 0], rtol=1e-5, atol=1e-5)
