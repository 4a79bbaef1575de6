"""One set of defaults: the command's configuration is CVPOConfig's, README's Python example builds it, and the
presets set what they say."""

from rllib_cvpo import CVPOConfig
from rllib_cvpo.training import DEFAULT_ENV, build_config

# What a command-line run adds to CVPOConfig(): the run's env, seed and EnvRunner count (and what RLlib derives from
# them); nothing that changes the algorithm.
RUN_KEYS = {"env", "seed", "num_env_runners", "create_local_env_runner"}


def _settings(config) -> dict:
    d = config.to_dict()
    return {k: v for k, v in d.items() if k not in RUN_KEYS and not callable(v)}


def test_the_commands_configuration_is_cvpoconfigs_setting_by_setting():
    command = build_config()  # `rllib-cvpo train` / `make train` with no options
    readme = CVPOConfig().environment(DEFAULT_ENV).training(cost_limit=25.0)  # README's Python example
    readme.validate()  # as build_algo() does (it resolves RLlib's derived settings)
    a, b = _settings(command), _settings(readme)
    assert a.keys() == b.keys()
    differing = {k: (a[k], b[k]) for k in a if repr(a[k]) != repr(b[k])}
    assert differing == {}
    assert command.env == DEFAULT_ENV and command.seed == 0 and command.num_env_runners == 1


def test_presets_set_the_published_settings():
    fsrl = CVPOConfig().fsrl_preset()
    assert (fsrl.gamma, fsrl.estep_kl, fsrl.n_step, fsrl.pi_old_sync, fsrl.twin_q, fsrl.lambda_max,
            fsrl.replay_capacity, fsrl.updates_per_env_step) == (0.995, 0.02, 3, "round", False, 20.0, 200_000, 0.2)
    paper = CVPOConfig().paper_preset()
    assert (paper.gamma, paper.num_action_samples, paper.mstep_iterations, paper.estep_kl) == (0.99, 32, 6, 0.1)
    for preset in (fsrl, paper):
        preset.environment(DEFAULT_ENV).validate()
