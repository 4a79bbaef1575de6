"""The RLModule: the E-step's shared-observation critic evaluation equals the plain one; the policy's initial std."""

import gymnasium as gym
import numpy as np
import pytest
import torch
from helpers import small_config

from rllib_cvpo.cvpo.torch.cvpo_torch_rl_module import CriticEnsemble, CVPOTorchRLModule


@pytest.mark.parametrize("hiddens, chunk_rows", [
    ([32, 32], None),  # one chunk
    ([32, 32], 8 * 24),  # chunks of 24 states: 24, 24, 16 (a shorter last one)
    ([16, 24, 16], 8 * 5),  # three hidden layers, chunks of 5 states, the last of 4
])
def test_sampled_action_evaluation_equals_evaluation_on_repeated_observations(monkeypatch, hiddens, chunk_rows):
    from rllib_cvpo.cvpo.torch import cvpo_torch_rl_module

    if chunk_rows is not None:  # cache-sized chunks of states on CPU: force several at these small sizes
        monkeypatch.setattr(cvpo_torch_rl_module, "CPU_CHUNK_ROWS", chunk_rows)
    torch.manual_seed(0)
    critics = CriticEnsemble(4, 12 + 3, hiddens, "relu")
    obs, actions = torch.randn(64, 12), torch.rand(8, 64, 3) * 2 - 1
    repeated = obs.unsqueeze(0).expand(8, -1, -1).reshape(8 * 64, 12)
    expected = critics(repeated, actions.reshape(8 * 64, 3))
    got = critics.forward_sampled(obs, actions)
    assert got.shape == (4, 8 * 64)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # Row n * B + b is action n of state b.
    torch.testing.assert_close(got[:, 3 * 64 + 5], critics(obs[5:6], actions[3, 5:6])[:, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[:, 7 * 64 + 63], critics(obs[63:], actions[7, 63:])[:, 0], rtol=1e-5, atol=1e-5)
    # A subset of the critics, in the order asked: their rows of the whole ensemble's values.
    torch.testing.assert_close(critics.forward_sampled(obs, actions, members=(3, 0)), got[[3, 0]], rtol=0, atol=0)


def _policy_module(model_config):
    box = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)
    return CVPOTorchRLModule(observation_space=box, action_space=gym.spaces.Box(-1.0, 1.0, (2,), np.float32),
                             model_config=model_config)


def test_init_std_sets_the_policys_starting_std_for_every_state_and_is_validated():
    torch.manual_seed(0)
    config = small_config(init_std=0.3)
    _, std = _policy_module(config.model_config).policy(torch.randn(16, 2) * 5)  # (the config's model_config)
    torch.testing.assert_close(std, torch.full((16, 2), 0.3))
    _, std = _policy_module(small_config().model_config).policy(torch.randn(16, 2) * 5)
    assert std.min() > 0.5 and std.std() > 0  # without it: the network's own output, state-dependent, about 1
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="init_std"):
            small_config(init_std=bad).validate()


def test_critic_activation_sets_every_critics_hidden_activation_and_leaves_the_policys():
    module = _policy_module(small_config(critic_activation="leaky_relu").model_config)
    critic_acts = {type(m) for m in module.critics.net if not hasattr(m, "weight")}
    policy_acts = {type(m) for m in module.pi if not hasattr(m, "weight")}
    assert critic_acts == {torch.nn.LeakyReLU} and policy_acts == {torch.nn.ReLU}
    assert module.critics.activation == "leaky_relu"
    default = _policy_module(small_config().model_config)  # the default: leaky critics
    assert {type(m) for m in default.critics.net if not hasattr(m, "weight")} == {torch.nn.LeakyReLU}
    relu = _policy_module(small_config(critic_activation=None).model_config)  # None: fcnet_activation, as the policy
    assert {type(m) for m in relu.critics.net if not hasattr(m, "weight")} == {torch.nn.ReLU}
    with pytest.raises(ValueError, match="critic_activation must be None .* got 'gelu'"):
        small_config(critic_activation="gelu").validate()
