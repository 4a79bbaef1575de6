"""The replay: n-step transitions across chunk boundaries and episode ends, links through wrap-around and checkpoints,
warm-up actions stored in the policy's units."""

import gymnasium as gym
import numpy as np
import pytest
from ray.rllib.env.single_agent_episode import SingleAgentEpisode

from rllib_cvpo.cvpo.replay import BOOTSTRAP_DISCOUNT, COSTS, POLICY_OBS, CostReplayBuffer

GAMMA = 0.5


def reward(ep: int, t: int) -> float:
    return 10.0 * ep + t


def cost(ep: int, t: int) -> float:
    return 0.5 + ep + 0.25 * t


def chunk(ep: int, start: int, stop: int, terminated=False, truncated=False) -> SingleAgentEpisode:
    """Steps start..stop-1 of episode ``ep``: obs_t = (ep, t), reward and cost known functions of (ep, t)."""
    return SingleAgentEpisode(
        id_=f"episode-{ep}",
        observations=[np.array([ep, t], np.float32) for t in range(start, stop + 1)],
        actions=[np.array([0.1 * t, -0.1 * t], np.float32) for t in range(start, stop)],
        rewards=[reward(ep, t) for t in range(start, stop)],
        infos=[{}] + [{"cost": cost(ep, t)} for t in range(start, stop)],
        terminated=terminated, truncated=truncated, len_lookback_buffer=0,
    )


def expected(ep: int, t: int, n: int, last_step: int, terminated: bool, stored_until: int):
    """Hand-computed n-step row for start step t of an episode whose last step is ``last_step`` (steps stored up to
    ``stored_until``): (reward sum, cost sum, bootstrap obs, bootstrap discount)."""
    k_max = min(n, last_step - t + 1, stored_until - t + 1)
    r = sum(GAMMA**i * reward(ep, t + i) for i in range(k_max))
    c = sum(GAMMA**i * cost(ep, t + i) for i in range(k_max))
    ends_here = t + k_max - 1 == last_step
    discount = 0.0 if (ends_here and terminated) else GAMMA**k_max
    return r, c, (ep, t + k_max), discount


def rows_by_start(batch):
    out = {}
    for i, (ep, t) in enumerate(batch["obs"].astype(int)):
        out[(int(ep), int(t))] = (batch["rewards"][i], batch[COSTS][i, 0], tuple(batch["new_obs"][i].astype(int)),
                                  batch[BOOTSTRAP_DISCOUNT][i])
    return out


def check(rows, ep, t, n, last_step, terminated, stored_until):
    r, c, nxt, disc = rows[(ep, t)]
    er, ec, enxt, edisc = expected(ep, t, n, last_step, terminated, stored_until)
    assert (r, c, nxt, disc) == (pytest.approx(er), pytest.approx(ec), enxt, pytest.approx(edisc)), (ep, t)


def test_n_step_rows_follow_the_episode_across_chunks_and_stop_at_its_end():
    replay = CostReplayBuffer(100, ["cost"], seed=0)
    replay.add([chunk(1, 0, 3)])  # episode 1, steps 0-2, still running
    replay.add([chunk(2, 0, 4, terminated=True)])  # episode 2 terminates at step 3, between episode 1's chunks
    rows = rows_by_start(replay.sample(2000, n_step=3, gamma=GAMMA))
    # Episode 1's next chunk has not arrived: its rows stop at step 2 and bootstrap from s_3.
    for t in range(3):
        check(rows, 1, t, 3, last_step=10**6, terminated=False, stored_until=2)
    replay.add([chunk(1, 3, 6, truncated=True)])  # episode 1, steps 3-5, truncated at step 5
    rows = rows_by_start(replay.sample(4000, n_step=3, gamma=GAMMA))
    assert len(rows) == 10
    for t in range(6):
        check(rows, 1, t, 3, last_step=5, terminated=False, stored_until=5)  # a truncation still bootstraps
    for t in range(4):
        check(rows, 2, t, 3, last_step=3, terminated=True, stored_until=3)  # a termination does not
    # n = 1 is the plain transition: r_t, c_t, s_{t+1}, gamma (0 at a termination).
    rows = rows_by_start(replay.sample(4000, n_step=1, gamma=GAMMA))
    assert rows[(1, 2)] == (reward(1, 2), pytest.approx(cost(1, 2)), (1, 3), GAMMA)
    assert rows[(2, 3)][3] == 0.0


def test_links_survive_wrap_around_and_checkpoints_and_a_smaller_capacity():
    replay = CostReplayBuffer(8, ["cost"], seed=1)
    replay.add([chunk(1, 0, 4)])  # slots 0-3
    replay.add([chunk(2, 0, 6)])  # slots 4-7, then 0-1: episode 1's steps 0 and 1 are overwritten
    replay.add([chunk(1, 4, 6, truncated=True)])  # slots 2-3 overwrite episode 1's steps 2-3: nothing to link
    rows = rows_by_start(replay.sample(3000, n_step=2, gamma=GAMMA))
    assert set(rows) == {(2, t) for t in range(6)} | {(1, 4), (1, 5)}
    check(rows, 2, 5, 2, last_step=10**6, terminated=False, stored_until=5)
    replay.add([chunk(2, 6, 8, truncated=True)])  # links episode 2's step 5 (slot 1) to its step 6 (slot 4)
    rows = rows_by_start(replay.sample(3000, n_step=2, gamma=GAMMA))
    check(rows, 2, 5, 2, last_step=7, terminated=False, stored_until=7)

    state = replay.get_state()
    same = CostReplayBuffer(8, ["cost"])
    same.set_state(state)
    a, b = replay.sample(500, n_step=3, gamma=GAMMA), same.sample(500, n_step=3, gamma=GAMMA)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    smaller = CostReplayBuffer(4, ["cost"], seed=2)
    smaller.set_state(state)  # keeps the newest 4: episode 1's steps 4-5, episode 2's steps 6-7
    rows = rows_by_start(smaller.sample(1000, n_step=3, gamma=GAMMA))
    assert set(rows) == {(1, 4), (1, 5), (2, 6), (2, 7)}
    check(rows, 2, 6, 3, last_step=7, terminated=False, stored_until=7)
    check(rows, 1, 4, 3, last_step=5, terminated=False, stored_until=5)



def test_recent_policy_states_come_from_the_newest_steps_through_wrap_around():
    replay = CostReplayBuffer(8, ["cost"], seed=3)
    replay.add([chunk(1, 0, 3)])  # 3 steps stored: a window of 5 covers all of them
    states = {tuple(s) for s in replay.sample(500, recent=5)[POLICY_OBS].astype(int)}
    assert states == {(1, 0), (1, 1), (1, 2)}
    replay.add([chunk(2, 0, 7)])  # slots 3-7 then 0-1: the newest 4 steps are episode 2's steps 3-6
    batch = replay.sample(1000, recent=4)
    assert {tuple(s) for s in batch[POLICY_OBS].astype(int)} == {(2, 3), (2, 4), (2, 5), (2, 6)}
    assert len(batch[POLICY_OBS]) == len(batch["obs"]) == 1000
    assert {tuple(s) for s in batch["obs"].astype(int)} == {(1, 2)} | {(2, t) for t in range(7)}  # the critics' rows
    assert POLICY_OBS not in replay.sample(10)  # off by default (and the default draws stay as before)

def test_warm_up_actions_in_env_units_are_stored_in_the_policys_units():
    box = gym.spaces.Box(np.array([0.0, -2.0], np.float32), np.array([10.0, 2.0], np.float32))
    ep = chunk(1, 0, 3)
    ep.actions.data[:] = [np.array([0.0, -2.0], np.float32), np.array([10.0, 2.0], np.float32),
                          np.array([5.0, 1.0], np.float32)]
    replay = CostReplayBuffer(10, ["cost"])
    replay.add([ep], action_space=box)
    np.testing.assert_allclose(replay._data["actions"][:3], [[-1, -1], [1, 1], [0, 0.5]])


def test_spread_reads_evenly_spaced_rows_without_touching_the_sampling_rng():
    replay = CostReplayBuffer(16, ["cost"], seed=5)
    with pytest.raises(ValueError, match="empty"):
        replay.spread(4)
    replay.add([chunk(1, 0, 10)])
    state = replay.rng.bit_generator.state
    rows = replay.spread(4)
    assert [tuple(s) for s in rows["obs"].astype(int)] == [(1, 0), (1, 3), (1, 6), (1, 9)]
    assert rows[COSTS][:, 0].tolist() == [cost(1, t) for t in (0, 3, 6, 9)]
    assert set(rows) == {"obs", "actions", COSTS}
    assert len(replay.spread(100)["obs"]) == 10  # all of them while fewer are stored
    assert replay.rng.bit_generator.state == state  # a later minibatch is the one it would have been
