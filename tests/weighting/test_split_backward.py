"""Treatments at one backward pass (`split_backward`): the same update as per-task rows through every module
(`core.treated_step`), for every treatment, Joint and Auxi-all, Baseline / Context / U-shape; and the
representation-space mode for every treatment."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from auxmtl_jax import weighting as weighting_lib
from auxmtl_jax.models import build_model
from auxmtl_jax.training.steps import loss_terms, split_loss_terms
from auxmtl_jax.weighting.base import GRADIENT
from auxmtl_jax.weighting.core import treated_step
from auxmtl_jax.weighting.split_backward import split_treated_step
from test_models import TASKS, aux_config, model_config, random_batch, random_variables

TREATMENTS = tuple(name for name in weighting_lib.WEIGHTINGS
                   if weighting_lib.build_method(name, steps_per_epoch=1).kind == GRADIENT)
CHAINS = ("kendall+pcgrad", "dwa+mgda")
LOSS_CONFIG = SimpleNamespace(aux=SimpleNamespace(weight=0.7), deep_supervision=SimpleNamespace(weight=0.3))
CASES = {
    "joint_baseline": (dict(decoder="baseline", output_stride=8), None, None),
    "auxi_all_context": (dict(decoder="context", output_stride=8), aux_config(), None),
    "auxi_all_ushape_ds": (dict(decoder="ushape"), aux_config(tasks=("depth", "normal")),
                           SimpleNamespace(tasks=("segmentation",))),
}


def tree_norm(tree):
    return sum(float(jnp.sum(jnp.square(leaf))) for leaf in jax.tree.leaves(tree)) ** 0.5


def relative_error(actual, expected, scale=0.0):
    """‖actual − expected‖ / max(‖expected‖, scale) over all leaves together."""
    return tree_norm(jax.tree.map(jnp.subtract, actual, expected)) / max(tree_norm(expected), scale, 1e-30)


def both_paths(case, names, aux_as_tasks=False, space="parameters"):
    """{name: (split result, row result)} for the weightings `names` on the model `case`, all in one jit."""
    model_fields, aux, deep_supervision = CASES[case]
    model = build_model(model_config(**model_fields), TASKS, aux, deep_supervision)
    batch = random_batch(jax.random.key(3))
    variables = random_variables(model, batch["image"])
    tasks = tuple(TASKS)
    state_names = weighting_lib.weighted_names(tasks, model.aux_tasks, aux_as_tasks)
    weightings = {}
    for name in names:
        options = weighting_lib.default_options()
        options.aux_as_tasks, options.space = aux_as_tasks, space
        weightings[name] = weighting_lib.get_weighting(name, options, steps_per_epoch=1)

    def run(variables, batch):
        results = {}
        for name, weighting in weightings.items():
            params = dict(variables["params"])
            init = weighting.init(state_names)
            if init:
                params["loss_weighting"] = jax.tree.map(lambda leaf: leaf + 0.3, init)
            state = weighting.init_state(state_names)
            terms_fn = lambda p: loss_terms(model, LOSS_CONFIG, p, variables["batch_stats"], batch)
            split = split_loss_terms(model, LOSS_CONFIG, variables["batch_stats"], batch)
            rng = jax.random.key(7)
            split_result = split_treated_step(weighting.chain, split, aux_as_tasks, weighting.space)(
                params, state, rng)
            if space == "parameters":
                rows_result = treated_step(weighting.chain, terms_fn, aux_as_tasks)(params, state, rng)
            else:
                rows_result = None
            results[name] = (split_result, rows_result)
        return results

    return jax.jit(run)(variables, batch)


def assert_same_update(split_result, rows_result, name):
    """Float32 rounding: the Gram matrices agree to 1e-5 of the largest squared task gradient, and the updates to
    2e-4 of the larger of their norm and the largest task gradient's (a combination near the hull's min-norm point
    can be much shorter than the gradients it combines, MGDA's Pareto-stationary case)."""
    largest_square = float(jnp.max(jnp.diag(rows_result.gram)))
    assert float(jnp.max(jnp.abs(split_result.gram - rows_result.gram))) < 1e-5 * largest_square, name
    error = relative_error(split_result.grads, rows_result.grads, scale=largest_square ** 0.5)
    assert error < 2e-4, (name, error)
    np.testing.assert_allclose(split_result.total, rows_result.total, rtol=1e-6, err_msg=name)
    assert relative_error(split_result.aux, rows_result.aux) < 1e-6, name  # the same BatchNorm statistics
    assert jax.tree.structure(split_result.grads) == jax.tree.structure(rows_result.grads)


# CI: one projection chained after a loss weighting on the real network (the toy test below covers every
# treatment and chain); `-m exhaustive` runs all of them on all three networks.
CI_TREATMENTS = ("kendall+pcgrad",)


@pytest.mark.slow
@pytest.mark.parametrize("case, names", [
    pytest.param("auxi_all_context", CI_TREATMENTS, id="auxi_all_context-ci"),
    *[pytest.param(case, TREATMENTS + CHAINS, id=f"{case}-all", marks=pytest.mark.exhaustive) for case in CASES]])
def test_the_split_update_equals_the_per_task_rows_for_every_treatment(case, names):
    """CI runs Auxi-all / Context (aux modules and the shared ASPP) for CI_TREATMENTS; `-m exhaustive` every
    treatment on every case."""
    for name, (split_result, rows_result) in both_paths(case, names).items():
        assert_same_update(split_result, rows_result, f"{case}/{name}")


@pytest.mark.slow
@pytest.mark.exhaustive
def test_the_split_update_equals_the_rows_with_aux_terms_as_tasks():
    for name, (split_result, rows_result) in both_paths("auxi_all_context", ("pcgrad", "kendall+mgda"),
                                                        aux_as_tasks=True).items():
        assert set(split_result.weights) == {"segmentation", "depth", "normal", "aux_segmentation",
                                             "aux_depth", "aux_normal"}
        assert_same_update(split_result, rows_result, name)


@pytest.mark.slow
@pytest.mark.exhaustive
def test_every_treatment_runs_in_representation_space():
    results = both_paths("auxi_all_context", TREATMENTS, space="representation")
    for name, (split_result, _) in results.items():
        assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(split_result.grads)), name
        assert set(split_result.weights) == set(TASKS), name


@pytest.mark.parametrize("name", TREATMENTS + CHAINS)
@pytest.mark.parametrize("aux_as_tasks", [False, True])
def test_on_the_toy_the_split_update_equals_the_rows(name, aux_as_tasks):
    from test_weighting import TOY_SPLIT, representation_loss_terms
    options = weighting_lib.default_options()
    options.aux_as_tasks = aux_as_tasks
    weighting = weighting_lib.get_weighting(name, options, steps_per_epoch=1)
    names = weighting_lib.weighted_names(("a", "b"), ("a",), aux_as_tasks)
    params = {"main": {"encoder": jnp.asarray([[1.0, -0.5], [0.3, 2.0]]), "a_decoder": jnp.asarray(1.5),
                       "b_decoder": jnp.asarray(-0.7)}, "aux": {"a": jnp.asarray(2.0)}}
    if weighting.init(names):
        params["loss_weighting"] = jax.tree.map(lambda leaf: leaf + 0.2, weighting.init(names))
    state = weighting.init_state(names)
    split = split_treated_step(weighting.chain, TOY_SPLIT, aux_as_tasks)(params, state, jax.random.key(1))
    rows = treated_step(weighting.chain, representation_loss_terms, aux_as_tasks)(params, state, jax.random.key(1))
    assert_same_update(split, rows, name)
    for key in rows.weights:
        np.testing.assert_allclose(split.weights[key], rows.weights[key], rtol=1e-5, atol=1e-7)
    assert jax.tree.structure(split.grads) == jax.tree.structure(params)


def test_a_bad_space_and_representation_space_with_aux_terms_as_tasks_are_one_line_errors():
    from auxmtl_jax.errors import UserError
    options = weighting_lib.default_options()
    options.space = "params"
    with pytest.raises(UserError, match=r"config\.weighting\.space='params'; expected one of \('parameters', "
                                        r"'representation'\)"):
        weighting_lib.get_weighting("pcgrad", options)
    options.space, options.aux_as_tasks = "representation", True
    with pytest.raises(UserError, match=r"representation space .* expected weighting\.aux_as_tasks=False"):
        weighting_lib.get_weighting("pcgrad", options)


def test_unrolled_and_vmapped_shared_rows_agree(monkeypatch):
    from auxmtl_jax.weighting import split_backward
    from test_weighting import TOY_SPLIT
    weighting = weighting_lib.get_weighting("pcgrad")
    params = {"main": {"encoder": jnp.asarray([[1.0, -0.5], [0.3, 2.0]]), "a_decoder": jnp.asarray(1.5),
                       "b_decoder": jnp.asarray(-0.7)}, "aux": {"a": jnp.asarray(2.0)}}
    results = {}
    for mode in ("unrolled", "vmap"):
        monkeypatch.setattr(split_backward, "SHARED_ROWS", mode)
        results[mode] = split_treated_step(weighting.chain, TOY_SPLIT, False)(params, {}, jax.random.key(1))
    assert_same_update(results["unrolled"], results["vmap"], "pcgrad")


@pytest.mark.parametrize("name", TREATMENTS + CHAINS)
def test_on_the_toy_every_treatment_runs_in_representation_space(name):
    """Solved on the copies' gradients: MGDA's weights on ∂L/∂z = (2·a_dec, 0) and (0, b_dec) are those of MGDA
    on these two vectors, and the update is finite and shaped like the parameters for every treatment."""
    from test_weighting import TOY_SPLIT
    options = weighting_lib.default_options()
    options.space = "representation"
    weighting = weighting_lib.get_weighting(name, options, steps_per_epoch=1)
    names = ("a", "b")
    params = {"main": {"encoder": jnp.asarray([[1.0, -0.5], [0.3, 2.0]]), "a_decoder": jnp.asarray(1.5),
                       "b_decoder": jnp.asarray(-0.7)}, "aux": {"a": jnp.asarray(2.0)}}
    if weighting.init(names):
        params["loss_weighting"] = weighting.init(names)
    result = jax.jit(weighting.value_and_grad(None, TOY_SPLIT))(params, weighting.init_state(names),
                                                                 jax.random.key(1))
    assert jax.tree.structure(result.grads) == jax.tree.structure(params)
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(result.grads)), name
    np.testing.assert_allclose(result.gram, [[9.0, 0.0], [0.0, 0.49]], rtol=1e-6)
    if name == "mgda":
        # min-norm point of (3, 0) and (0, -0.7): weights ∝ (0.49, 9) / 9.49
        np.testing.assert_allclose([result.weights["a"], result.weights["b"]], [0.49 / 9.49, 9.0 / 9.49], rtol=1e-5)
