"""Auxi-NAS controller: every sample is a valid genotype, masks exclude exactly the invalid choices (the paper's
cross-task input rule by default, ours as an option), re-scoring reproduces the sampled log-probability and
entropy, and sampling is a pure function of the key."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from auxmtl_jax import nas
from auxmtl_jax.nas import controller as controller_lib

SPACE = nas.CellSpace(("segmentation", "depth", "normal"), ("stage2", "stage3", "stage4", "stage5"), 4)
# Small widths keep 10,000 samples at about a second on CPU; the defaults are covered separately.
CONTROLLER = nas.Controller(SPACE, hidden_size=32, num_layers=2, embedding_size=32)
NUM_SAMPLES = 10_000


def may_read(space, task, cell, location):
    """The cross-task input rule written out (independently of CellSpace.allowed_inputs): a stage, an own earlier
    cell, or a cell of an earlier task, which under the paper's rule must also be an earlier cell (index < cell)."""
    if location < len(space.stages):
        return True
    other_task, other_cell = divmod(location - len(space.stages), space.cells_per_task)
    if other_task == task:
        return other_cell < cell
    return other_task < task and (space.cross_task_inputs == "all_cells" or other_cell < cell)


def expected_valid(space):
    """bool [positions, vocabulary]: the values each position may take (independently of the controller)."""
    width = max(space.num_locations, len(nas.OPERATIONS), len(nas.AGGREGATORS))
    rows = []
    for task in range(len(space.tasks)):
        for cell in range(space.cells_per_task):
            location = [may_read(space, task, cell, value) for value in range(width)]
            operation = [value < len(nas.OPERATIONS) for value in range(width)]
            aggregator = [value < len(nas.AGGREGATORS) for value in range(width)]
            rows += [location, location, operation, operation, aggregator]
    return np.asarray(rows)


def expected_num_choices(space):
    """Valid values per position."""
    return expected_valid(space).sum(-1)


@pytest.fixture(scope="module")
def params():
    return CONTROLLER.init(jax.random.key(0))


@pytest.fixture(scope="module")
def skewed_params(params):
    """Parameters pushed far from the near-uniform start, so log-probs and entropies are not trivial."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    return jax.tree.unflatten(treedef, [leaf + jax.random.normal(key, leaf.shape) for leaf, key in zip(leaves, keys)])


@pytest.fixture(scope="module")
def samples(params):
    result = jax.jit(lambda p, key: CONTROLLER.sample_batch(p, key, NUM_SAMPLES))(params, jax.random.key(2))
    return jax.tree.map(np.asarray, result)


def test_layout_follows_the_space():
    layout = controller_lib.token_layout(SPACE)
    assert layout.kinds.shape == layout.num_choices.shape == (SPACE.sequence_length,) == (60,)
    np.testing.assert_array_equal(layout.valid, expected_valid(SPACE))
    np.testing.assert_array_equal(layout.num_choices, expected_num_choices(SPACE))
    assert SPACE.cross_task_inputs == "paper"  # the default
    assert layout.vocabulary_size == SPACE.num_locations == 16
    assert list(layout.kinds[:5]) == [controller_lib.LOCATION] * 2 + [controller_lib.OPERATION] * 2 + [
        controller_lib.AGGREGATOR]
    assert layout.previous_kinds[0] == controller_lib.START
    np.testing.assert_array_equal(layout.previous_kinds[1:], layout.kinds[:-1])


def test_every_sample_is_a_valid_genotype(samples):
    tokens = samples.tokens
    assert tokens.shape == (NUM_SAMPLES, SPACE.sequence_length) and tokens.dtype == np.int32
    assert (tokens >= 0).all() and (tokens < SPACE.num_locations).all()
    # no sample ever reads a location the paper's rule forbids (nor makes any other invalid choice)
    assert expected_valid(SPACE)[np.arange(SPACE.sequence_length), tokens].all()
    for row in tokens[:300]:
        genotype = nas.Genotype.from_sequence(SPACE, row.tolist())
        assert genotype.sequence() == tuple(row.tolist())
    assert CONTROLLER.genotype(tokens[0]) == controller_lib.genotype_from_tokens(SPACE, tokens[0])
    assert np.isfinite(samples.log_prob).all() and (samples.log_prob < 0).all()


def test_untrained_policy_is_close_to_uniform(params, samples):
    probabilities = np.exp(np.asarray(CONTROLLER.log_prob_tables(params, samples.tokens[0])))
    choices, valid = expected_num_choices(SPACE), expected_valid(SPACE)
    for position, count in enumerate(choices):
        np.testing.assert_allclose(probabilities[position, valid[position]], 1.0 / count, atol=0.03)
    np.testing.assert_allclose(samples.entropy.mean(), np.log(choices).sum(), rtol=1e-3)


def test_masks_give_invalid_choices_exactly_zero_probability(skewed_params, samples):
    tables = np.asarray(jax.vmap(CONTROLLER.log_prob_tables, in_axes=(None, 0))(skewed_params, samples.tokens[:64]))
    invalid = ~expected_valid(SPACE)
    assert np.isneginf(tables[:, invalid]).all()
    assert (np.exp(tables)[:, invalid] == 0.0).all()
    assert np.isfinite(tables[:, ~invalid]).all()
    np.testing.assert_allclose(np.exp(tables).sum(-1), 1.0, rtol=1e-5)


def test_every_choice_of_the_last_cell_occurs(samples):
    """Coverage: over 10,000 samples the last cell of the last task reads every location it may read."""
    tasks, cells = len(SPACE.tasks), SPACE.cells_per_task
    # stages, cells 0-2 of segmentation (4-6) and depth (8-10), its own cells 0-2 (12-14)
    assert [value for value in range(SPACE.num_locations) if may_read(SPACE, tasks - 1, cells - 1, value)] == [
        0, 1, 2, 3, 4, 5, 6, 8, 9, 10, 12, 13, 14]
    last_cell = samples.tokens.reshape(NUM_SAMPLES, tasks, cells, len(nas.TOKENS))[:, -1, -1]
    for column in (0, 1):
        assert set(last_cell[:, column].tolist()) == {0, 1, 2, 3, 4, 5, 6, 8, 9, 10, 12, 13, 14}
    assert set(last_cell[:, 2].tolist()) == set(last_cell[:, 3].tolist()) == set(range(len(nas.OPERATIONS)))
    assert set(last_cell[:, 4].tolist()) == set(range(len(nas.AGGREGATORS)))


def test_every_valid_genotype_has_finite_log_prob(skewed_params):
    """The masks admit every genotype of the space (checked on random ones)."""
    rng = np.random.default_rng(0)
    rows = np.asarray([nas.random_genotype(SPACE, rng).sequence() for _ in range(64)], np.int32)
    log_probs, entropies = jax.vmap(CONTROLLER.score, in_axes=(None, 0))(skewed_params, rows)
    assert np.isfinite(log_probs).all() and np.isfinite(entropies).all()


def test_score_reproduces_the_sampled_log_prob_and_entropy(skewed_params):
    keys = jax.random.split(jax.random.key(3), 64)
    sampled = jax.jit(jax.vmap(CONTROLLER.sample, in_axes=(None, 0)))(skewed_params, keys)
    log_probs, entropies = jax.jit(jax.vmap(CONTROLLER.score, in_axes=(None, 0)))(skewed_params, sampled.tokens)
    np.testing.assert_allclose(log_probs, sampled.log_prob, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(entropies, sampled.entropy, rtol=1e-5, atol=1e-5)
    tables = jax.vmap(CONTROLLER.log_prob_tables, in_axes=(None, 0))(skewed_params, sampled.tokens)
    gathered = jnp.take_along_axis(tables, sampled.tokens[..., None], axis=-1)[..., 0].sum(-1)
    np.testing.assert_allclose(gathered, sampled.log_prob, rtol=1e-5, atol=1e-5)
    # Skewed parameters really skew: well below the uniform policy's entropy.
    assert float(sampled.entropy.mean()) < 0.9 * np.log(expected_num_choices(SPACE)).sum()


def test_sampling_is_a_pure_function_of_the_key(skewed_params):
    sample = jax.jit(CONTROLLER.sample)
    first, again = sample(skewed_params, jax.random.key(7)), sample(skewed_params, jax.random.key(7))
    np.testing.assert_array_equal(first.tokens, again.tokens)
    assert float(first.log_prob) == float(again.log_prob)
    unbatched = CONTROLLER.sample(skewed_params, jax.random.key(7))
    np.testing.assert_array_equal(first.tokens, unbatched.tokens)
    many = np.asarray(jax.jit(lambda p, key: CONTROLLER.sample_batch(p, key, 64))(skewed_params, jax.random.key(8))
                      .tokens)
    assert len({tuple(row) for row in many.tolist()}) == 64


def test_gradients_are_finite_despite_the_masks(skewed_params, samples):
    def objective(p):
        log_prob, entropy = CONTROLLER.score(p, samples.tokens[0])
        return log_prob + entropy

    gradients = jax.grad(objective)(skewed_params)
    assert all(bool(jnp.isfinite(leaf).all()) for leaf in jax.tree.leaves(gradients))
    assert any(float(jnp.abs(leaf).max()) > 0 for leaf in jax.tree.leaves(gradients))


def test_default_controller_and_function_api():
    controller = nas.Controller(SPACE)
    assert (controller.hidden_size, controller.num_layers) == (100, 2)
    params = nas.init_controller_params(jax.random.key(0), controller)
    inner = params["params"]
    assert inner["layers_1"]["hi"]["kernel"].shape == (100, 100)
    assert inner["location_head"]["kernel"].shape == (100, SPACE.num_locations)
    assert inner["operation_head"]["kernel"].shape == (100, len(nas.OPERATIONS))
    assert inner["aggregator_head"]["kernel"].shape == (100, len(nas.AGGREGATORS))
    result = jax.jit(controller_lib.sample, static_argnames="controller")(params, jax.random.key(1),
                                                                        controller=controller)
    log_prob, entropy = jax.jit(controller_lib.score, static_argnames="controller")(params, result.tokens,
                                                                                  controller=controller)
    np.testing.assert_allclose([log_prob, entropy], [result.log_prob, result.entropy], rtol=1e-5)
    nas.genotype_from_tokens(SPACE, result.tokens)
    assert hash(controller) == hash(nas.Controller(SPACE))


def test_the_wide_rule_samples_what_the_paper_forbids():
    """``cross_task_inputs='all_cells'`` (ours): the masks open every cell of the earlier tasks; samples use them."""
    space = nas.CellSpace(SPACE.tasks, SPACE.stages, SPACE.cells_per_task, "all_cells")
    controller = nas.Controller(space, hidden_size=32, num_layers=2, embedding_size=32)
    np.testing.assert_array_equal(controller.layout.valid, expected_valid(space))
    tokens = np.asarray(jax.jit(lambda p, key: controller.sample_batch(p, key, 2000))(
        controller.init(jax.random.key(0)), jax.random.key(1)).tokens)
    assert expected_valid(space)[np.arange(space.sequence_length), tokens].all()
    # depth's first cell reads segmentation's last (location 7) in some samples: the paper forbids that
    assert (tokens.reshape(2000, 3, 4, 5)[:, 1, 0, :2] == 7).any()
