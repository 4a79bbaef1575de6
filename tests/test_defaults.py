"""One set of defaults: the command's configuration is CVPOConfig's, README's Python example builds it, and the
presets set what they say."""

import pytest
from helpers import small_config

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
    assert (paper.twin_q, paper.estep_twin_min) == (True, True)  # the original's E-step takes the twins' minimum
    # Neither published configuration has this project's constraint settings, whatever the defaults are.
    assert (fsrl.qc_nonnegative, fsrl.cost_feedback_gain) == (False, 0.0)
    assert (paper.n_step, paper.pi_old_sync, paper.qc_nonnegative, paper.cost_feedback_gain) == (1, "polyak", False, 0.0)
    assert CVPOConfig().critic_activation == "leaky_relu" and fsrl.critic_activation is paper.critic_activation is None
    assert CVPOConfig().estep_recent_steps == 5000 and fsrl.estep_recent_steps is paper.estep_recent_steps is None
    for preset in (fsrl, paper):
        preset.environment(DEFAULT_ENV).validate()


def test_a_run_the_local_ray_cannot_place_fails_at_once_naming_what_is_missing(ray_local):
    import pytest

    from rllib_cvpo.training import _check_resources

    _check_resources(build_config(), None)  # 1 main process + 1 env runner fit in 2 CPUs
    with pytest.raises(ValueError, match=r"needs 4 CPU \(main process 1 CPU; 1 env runner\(s\) x 1 CPU; "
                                         r"2 learner\(s\) x 1 CPU, 0 GPU\) but the local Ray has 2 CPU"):
        _check_resources(build_config(overrides={"num_learners": 2}), None)
    with pytest.raises(ValueError, match=r"needs 1 GPU .* but the local Ray has 0 GPU"):
        _check_resources(build_config(overrides={"num_learners": 1, "num_gpus_per_learner": 1}), None)


def test_evaluation_uses_as_many_envs_as_its_episodes_divide_into(ray_local):
    for duration, envs in ((10, 5), (2, 2), (7, 7), (16, 8), (1, 1)):
        config = CVPOConfig().environment("SpeedLimit-v0").evaluation(evaluation_duration=duration)
        assert config.get_evaluation_config_object().num_envs_per_env_runner == envs
    overridden = CVPOConfig().environment("SpeedLimit-v0").evaluation(
        evaluation_duration=10, evaluation_config={"num_envs_per_env_runner": 3})
    assert overridden.get_evaluation_config_object().num_envs_per_env_runner == 3
    from helpers import small_config

    algo = small_config().env_runners(num_envs_per_env_runner=8).evaluation(evaluation_duration=4).build_algo()
    try:
        result = algo.train()
        evaluation = result["evaluation"]["env_runners"]
        # 4 envs, one 200-step episode each: 800 steps (with the training runners' 8 envs: 1600 to count 4).
        assert evaluation["num_episodes"] == 4 and evaluation["num_env_steps_sampled"] == 4 * 200
    finally:
        algo.stop()


def test_version_is_written_once_and_the_command_reports_it():
    import importlib.metadata
    import subprocess
    import sys

    import rllib_cvpo

    assert importlib.metadata.version("rllib-cvpo") == rllib_cvpo.__version__
    for cmd in ([sys.executable, "-m", "rllib_cvpo", "--version"], [sys.executable, "-m", "rllib_cvpo.cli", "--version"]):
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and out.stdout.strip() == f"rllib-cvpo {rllib_cvpo.__version__}"
    # --help does not import Ray Tune (it used to take seconds).
    probe = "import sys, rllib_cvpo.cli; print('ray.tune' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip() == "False"




def test_a_users_callback_runs_beside_cvpos_cost_metrics(ray_local):
    from helpers import small_config
    from ray.rllib.callbacks.callbacks import RLlibCallback

    class Mine(RLlibCallback):
        def on_episode_end(self, *, metrics_logger=None, **kwargs):
            metrics_logger.log_value("my_episodes", 1, reduce="sum")

    algo = small_config().callbacks(Mine).build_algo()
    try:
        result = algo.train()
        runners = result["env_runners"]
        assert runners["my_episodes"] >= 1  # the user's callback ran
        assert runners["episode_cost"] >= 0  # and CVPO's cost metrics are still there
        assert result["cvpo"]["score"] == result["cvpo"]["score"]  # not NaN: checkpoints can be ranked
    finally:
        algo.stop()


def test_python_train_gives_the_commands_run(ray_local, tmp_path):
    # rllib_cvpo.train: the command's run from Python (checkpoints, summary, curves, results), then resume of a
    # finished run has nothing left to do and keeps every iteration.
    import rllib_cvpo

    config = small_config().reporting(min_sample_timesteps_per_iteration=1000)
    outcome = rllib_cvpo.train(config, total_env_steps=2000, run_dir=tmp_path / "py_run",
                               address=ray_local.get_runtime_context().gcs_address)
    assert outcome["status"] == "finished" and outcome["run_dir"] == (tmp_path / "py_run").resolve()
    assert outcome["results"]["env_steps"].tolist() == [1000, 2000]
    assert outcome["checkpoints"]["latest"].is_dir() and outcome["checkpoints"]["best"].is_dir()
    assert (tmp_path / "py_run" / "summary.txt").is_file() and (tmp_path / "py_run" / "curves.png").is_file()
    with pytest.raises(FileExistsError, match="resume it with rllib_cvpo.resume"):
        rllib_cvpo.train(config, total_env_steps=2000, run_dir=tmp_path / "py_run")
    with pytest.raises(ValueError, match="total_env_steps must be a positive whole number"):
        rllib_cvpo.train(config, total_env_steps=0, run_dir=tmp_path / "other")
    again = rllib_cvpo.resume(tmp_path / "py_run", address=ray_local.get_runtime_context().gcs_address)
    assert again["status"] == "finished" and again["results"]["env_steps"].tolist() == [1000, 2000]
