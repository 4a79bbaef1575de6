"""The EnvRunners' callbacks (training and evaluation): episode cost metrics, and the seeding of the random
warm-up actions."""

from __future__ import annotations

from ray.rllib.callbacks.callbacks import RLlibCallback

EPISODE_COST = "episode_cost"
EPISODE_COST_MAX = "episode_cost_max"
EPISODE_OVER_LIMIT = "episode_over_limit"
CUMULATIVE_COST = "cumulative_cost"


class CostMetricsCallback(RLlibCallback):
    """Sums each episode's cost keys and logs, per iteration: ``episode_cost`` (mean of the main cost), its max,
    the fraction of episodes over the limit (every constraint checked), the per-key means, and the cumulative
    cost of all episodes finished so far (``cumulative_cost``). With a seed, it also seeds each new env's action
    space, so that a seeded run repeats."""

    def on_environment_created(self, *, env_runner=None, **kwargs) -> None:
        # RLlib seeds each env at its first reset, but not the vector env's action space, whose sample() gives the
        # warm-up's random actions (SingleAgentEnvRunner, random_actions=True): without this, two runs with the same
        # seed differ from their first action on. The EnvRunner's own seed (the config's, offset per worker, and for
        # evaluation runners) keeps runners apart.
        seed = getattr(env_runner, "_seed", None)
        if seed is not None:
            env_runner.env.action_space.seed(int(seed))

    def on_episode_step(self, *, episode, env_runner=None, **kwargs) -> None:
        info = episode.get_infos(-1)
        acc = episode.custom_data.setdefault("costs", {})
        for key in env_runner.config.cost_keys:
            acc[key] = acc.get(key, 0.0) + float(info.get(key, 0.0))

    def on_episode_end(self, *, episode, env_runner=None, metrics_logger=None, **kwargs) -> None:
        config = env_runner.config
        totals = episode.custom_data.get("costs", {})
        limits = config.cost_limits
        main = sum(totals.get(k, 0.0) for k in config.cost_keys)
        over = any(totals.get(k, 0.0) > limits[k] for k in config.cost_keys)
        window = config.metrics_num_episodes_for_smoothing
        metrics_logger.log_value(EPISODE_COST, main, reduce="mean", window=window)
        metrics_logger.log_value(EPISODE_COST_MAX, main, reduce="max", window=window)
        metrics_logger.log_value(EPISODE_OVER_LIMIT, float(over), reduce="mean", window=window)
        metrics_logger.log_value(CUMULATIVE_COST, main, reduce="lifetime_sum")
        if len(config.cost_keys) > 1:
            for key in config.cost_keys:
                metrics_logger.log_value(f"episode_{key}", totals.get(key, 0.0), reduce="mean", window=window)
