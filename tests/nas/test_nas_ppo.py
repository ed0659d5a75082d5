"""Auxi-NAS PPO: the clipped surrogate by hand, the baseline and ring buffer, masking of the unfilled buffer,
determinism, an orbax round trip of the state, and a real learning run on a toy reward."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from auxmtl_jax import nas
from auxmtl_jax.nas import ppo

SPACE = nas.CellSpace(("segmentation", "depth", "normal"), ("stage2", "stage3", "stage4", "stage5"), 4)
CONTROLLER = nas.Controller(SPACE, hidden_size=32, num_layers=2, embedding_size=32)
# One small configuration for the bookkeeping tests (each configuration compiles its own update).
SMALL = ppo.PPOConfig(buffer_size=8, minibatch_size=2, epochs=2, learning_rate=1e-3)
SKIP = nas.OPERATIONS.index("skip")
OP_A_OF_FIRST_CELL = nas.TOKENS.index("op_a")  # position of task 0, cell 0's op_a in the token sequence
# (ratio, advantage, expected min(r·A, clip(r, 0.9, 1.1)·A)) with epsilon 0.1: inside / above / below the clip range,
# for a positive and a negative advantage.
SURROGATE_CASES = [
    (1.05, 2.0, 2.1),  # inside: r·A
    (1.5, 2.0, 2.2),  # A > 0, ratio above the range: clipped to 1.1·A
    (0.5, 2.0, 1.0),  # A > 0, ratio below: the unclipped r·A is the smaller
    (1.05, -1.0, -1.05),  # inside
    (0.5, -1.0, -0.9),  # A < 0, ratio below the range: clipped to 0.9·A
    (1.5, -1.0, -1.5),  # A < 0, ratio above: the unclipped r·A is the smaller
]


@pytest.fixture(scope="module")
def params():
    return CONTROLLER.init(jax.random.key(0))


def sample_batch(params, key, count):
    return jax.jit(CONTROLLER.sample_batch, static_argnums=2)(params, key, count)


def test_defaults_follow_nekrasov():
    config = ppo.PPOConfig()
    assert (config.learning_rate, config.clip_epsilon, config.baseline_decay, config.max_grad_norm) == (
        1e-4, 0.1, 0.95, 2.0)
    assert (config.buffer_size, config.minibatch_size, config.epochs, config.minibatches_per_epoch) == (100, 1, 1, 100)
    assert config.entropy_weight == 1e-4
    with pytest.raises(ValueError):
        ppo.PPOConfig(minibatch_size=0)


def test_clipped_surrogate_by_hand():
    ratios, advantages, expected = (np.asarray(column, np.float32) for column in zip(*SURROGATE_CASES))
    old = np.asarray([-3.0, -10.0, -0.5, -7.0, -2.0, -40.0], np.float32)
    objective = ppo.clipped_surrogate(jnp.asarray(old + np.log(ratios)), jnp.asarray(old), jnp.asarray(advantages),
                                      0.1)
    np.testing.assert_allclose(objective, expected, rtol=1e-5)


def test_ppo_loss_by_hand(params):
    samples = sample_batch(params, jax.random.key(1), len(SURROGATE_CASES))
    new_log_probs, entropies = jax.vmap(CONTROLLER.score, in_axes=(None, 0))(params, samples.tokens)
    ratios, advantages, expected = (np.asarray(column, np.float32) for column in zip(*SURROGATE_CASES))
    old_log_probs = np.asarray(new_log_probs) - np.log(ratios)
    loss, aux = ppo.ppo_loss(params, samples.tokens, old_log_probs, advantages, controller=CONTROLLER,
                             clip_epsilon=0.1, entropy_weight=0.01)
    by_hand = -np.mean(expected) - 0.01 * np.mean(entropies)
    np.testing.assert_allclose(loss, by_hand, rtol=1e-5)
    np.testing.assert_allclose(aux["surrogate"], np.mean(expected), rtol=1e-5)
    np.testing.assert_allclose(aux["clip_fraction"], 4 / 6, rtol=1e-6)
    # A mask drops entries from every mean: the same as the loss over the kept rows alone.
    keep = np.asarray([True, False, True, True, False, False])
    masked, _ = ppo.ppo_loss(params, samples.tokens, old_log_probs, advantages, controller=CONTROLLER,
                             clip_epsilon=0.1, entropy_weight=0.01, mask=jnp.asarray(keep))
    subset, _ = ppo.ppo_loss(params, samples.tokens[keep], old_log_probs[keep], advantages[keep],
                             controller=CONTROLLER, clip_epsilon=0.1, entropy_weight=0.01)
    np.testing.assert_allclose(masked, subset, rtol=1e-5)


def test_baseline_is_a_moving_average_started_by_the_first_reward():
    baseline = ppo.update_baseline(jnp.asarray(jnp.nan), jnp.asarray([1.0, 0.0, 2.0]), 0.5)
    np.testing.assert_allclose(baseline, 0.5 * (0.5 * 1.0 + 0.5 * 0.0) + 0.5 * 2.0)
    np.testing.assert_allclose(ppo.update_baseline(jnp.asarray(4.0), jnp.asarray([2.0]), 0.95), 0.95 * 4 + 0.05 * 2)


def test_buffer_is_a_ring_of_the_latest_architectures(params):
    state = ppo.init_ppo_state(params, SMALL, CONTROLLER)
    assert math.isnan(float(state.baseline)) and int(state.buffer_count) == 0
    samples = sample_batch(params, jax.random.key(2), 10)
    rewards = jnp.arange(1.0, 11.0)
    state, _ = ppo.update(state, samples.tokens[:5], samples.log_prob[:5], rewards[:5], jax.random.key(3), SMALL,
                          CONTROLLER)
    assert (int(state.buffer_count), int(state.buffer_position)) == (5, 5)
    state, metrics = ppo.update(state, samples.tokens[5:], samples.log_prob[5:], rewards[5:], jax.random.key(4),
                                SMALL, CONTROLLER)
    assert (int(state.buffer_count), int(state.buffer_position), int(state.updates)) == (8, 2, 2)
    order = [8, 9, 2, 3, 4, 5, 6, 7]  # the two newest overwrote the two oldest
    np.testing.assert_array_equal(state.buffer_rewards, np.asarray(rewards)[order])
    np.testing.assert_array_equal(state.buffer_tokens, np.asarray(samples.tokens)[order])
    np.testing.assert_array_equal(state.buffer_log_probs, np.asarray(samples.log_prob)[order])
    expected_baseline = float(ppo.update_baseline(jnp.asarray(jnp.nan), rewards, 0.95))
    np.testing.assert_allclose(state.baseline, expected_baseline, rtol=1e-6)
    np.testing.assert_allclose(metrics["advantage_mean"], np.mean(np.asarray(rewards)[order]) - expected_baseline,
                               rtol=1e-5)
    assert int(metrics["optimizer_steps"]) == 2 * 4
    with pytest.raises(ValueError, match="do not fit"):
        ppo.update(state, samples.tokens, samples.log_prob, rewards, jax.random.key(5), SMALL, CONTROLLER)


def test_unfilled_buffer_entries_take_no_steps(params):
    """Minibatches over the empty part of the buffer are skipped: ceil(filled / minibatch) steps per epoch."""
    state = ppo.init_ppo_state(params, SMALL, CONTROLLER)
    samples = sample_batch(params, jax.random.key(6), 3)
    state, metrics = ppo.update(state, samples.tokens, samples.log_prob, jnp.asarray([0.0, 1.0, 0.5]),
                                jax.random.key(7), SMALL, CONTROLLER)
    assert int(metrics["optimizer_steps"]) == 2 * 2  # 2 epochs of ceil(3 / 2) minibatches, not of 8 / 2
    # Adam counts only the steps taken (the optimiser state of a skipped minibatch is kept too).
    assert int(state.opt_state[1][0].count) == 4
    assert all(bool(jnp.isfinite(leaf).all()) for leaf in jax.tree.leaves(state.params))


def test_update_is_deterministic(params):
    state = ppo.init_ppo_state(params, SMALL, CONTROLLER)
    samples = sample_batch(params, jax.random.key(8), 8)
    rewards = jnp.linspace(0.0, 1.0, 8)

    def run(key):
        return ppo.update(state, samples.tokens, samples.log_prob, rewards, key, SMALL, CONTROLLER)[0].params

    first, second, other = run(jax.random.key(9)), run(jax.random.key(9)), run(jax.random.key(10))
    assert all(bool((a == b).all()) for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)))
    # The key shuffles the minibatches, and with Adam the order matters.
    assert any(bool((a != b).any()) for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(other)))
    assert any(bool((a != b).any()) for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(params)))


def test_state_round_trips_through_orbax(params, tmp_path):
    state = ppo.init_ppo_state(params, SMALL, CONTROLLER)
    samples = sample_batch(params, jax.random.key(11), 3)
    state, _ = ppo.update(state, samples.tokens, samples.log_prob, jnp.asarray([0.1, 0.2, 0.3]), jax.random.key(12),
                          SMALL, CONTROLLER)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "ppo", state)
        checkpointer.wait_until_finished()
        restored = checkpointer.restore(tmp_path / "ppo", jax.tree.map(ocp.utils.to_shape_dtype_struct, state))
    assert isinstance(restored, ppo.PPOState)
    for original, loaded in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(original, loaded)


def test_ppo_learns_a_toy_reward(params):
    """Reward 1 when the first cell's op_a is skip: P(skip) there rises from ~1/6 to > 0.9 within 150 updates."""
    config = ppo.PPOConfig(learning_rate=3e-3, buffer_size=64, minibatch_size=16)
    state = ppo.init_ppo_state(params, config, CONTROLLER)
    sample = jax.jit(CONTROLLER.sample_batch, static_argnums=2)

    def skip_fraction(controller_params):
        tokens = sample(controller_params, jax.random.key(1234), 2000).tokens
        return float((tokens[:, OP_A_OF_FIRST_CELL] == SKIP).mean())

    assert abs(skip_fraction(state.params) - 1 / 6) < 0.03
    key = jax.random.key(13)
    fractions = []
    for _ in range(15):
        for _ in range(10):
            key, sample_key, update_key = jax.random.split(key, 3)
            samples = sample(state.params, sample_key, 16)
            rewards = (samples.tokens[:, OP_A_OF_FIRST_CELL] == SKIP).astype(jnp.float32)
            state, metrics = ppo.update(state, samples.tokens, samples.log_prob, rewards, update_key, config,
                                        CONTROLLER)
        fractions.append(skip_fraction(state.params))
        if fractions[-1] > 0.9:
            break
    print("P(skip) every 10 updates:", fractions)
    assert fractions[-1] > 0.9, fractions
    assert float(metrics["baseline"]) > 0.5
    # Tokens the reward ignores stay near uniform: learning moved the rewarded token, not the whole policy.
    assert float(metrics["entropy"]) > 0.9 * float(np.log(nas.token_layout(SPACE).num_choices).sum())
