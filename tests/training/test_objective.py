"""The training objective against hand-computed values: equal and Kendall weightings (totals and gradients), the
poly and constant schedules, the weight-decay mask, and the aux weight in `training.loss_terms`."""

import math
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from auxmtl_configs import common
from auxmtl_jax import tasks as tasks_lib
from auxmtl_jax import training
from auxmtl_jax import weighting as weighting_lib
from auxmtl_jax.models import build_model
from test_models import model_config, random_batch


def loss_terms_fn(params):
    """Terms of a scalar parameter w: loss/a = w², loss/b = 3w, aux_loss/a = 0.5w (aux already weighted)."""
    w = params["w"]
    return {"loss/a": w ** 2, "loss/b": 3.0 * w, "aux_loss/a": 0.5 * w}, None


def test_equal_weighting_total_and_gradient():
    weighting = weighting_lib.get_weighting("equal")
    params = {"w": jnp.asarray(2.0)}
    assert weighting.init(("a", "b")) == {}
    total, terms, _, grads, _, weights, _ = weighting.value_and_grad(loss_terms_fn)(params, {}, jax.random.key(0))
    assert {name: float(weight) for name, weight in weights.items()} == {"a": 1.0, "b": 1.0}
    assert float(total) == pytest.approx(4.0 + 6.0 + 1.0)
    assert float(grads["w"]) == pytest.approx(2 * 2.0 + 3.0 + 0.5)
    assert set(terms) == {"loss/a", "loss/b", "aux_loss/a"}


def test_kendall_weighting_total_and_gradients():
    weighting = weighting_lib.get_weighting("kendall")
    params = {"w": jnp.asarray(2.0), "loss_weighting": weighting.init(("a", "b"))}
    params["loss_weighting"]["log_var"] = {"a": jnp.asarray(0.1), "b": jnp.asarray(-0.2)}
    result = weighting.value_and_grad(loss_terms_fn)(params, {}, jax.random.key(0))
    total, grads = result.total, result.grads
    loss_a, loss_b, aux = 4.0, 6.0, 1.0
    expected = (0.5 * math.exp(-0.1) * loss_a + 0.05) + (0.5 * math.exp(0.2) * loss_b - 0.1) + aux
    assert float(total) == pytest.approx(expected, rel=1e-6)
    # d/ds_t [½ e^{-s_t} L_t + ½ s_t] = ½ − ½ e^{-s_t} L_t; aux terms are not reweighted
    assert float(grads["loss_weighting"]["log_var"]["a"]) == pytest.approx(0.5 - 0.5 * math.exp(-0.1) * loss_a)
    assert float(grads["loss_weighting"]["log_var"]["b"]) == pytest.approx(0.5 - 0.5 * math.exp(0.2) * loss_b)
    assert float(grads["w"]) == pytest.approx(0.5 * math.exp(-0.1) * 4.0 + 0.5 * math.exp(0.2) * 3.0 + 0.5)


def test_poly_schedule_values():
    optimizer = common.base_config().optimizer
    schedule = training.create_learning_rate_fn(optimizer, 1000)
    for step in (0, 250, 500, 999, 1000):
        assert float(schedule(step)) == pytest.approx(0.01 * (1 - step / 1000) ** 0.9, abs=1e-9)
    optimizer.warmup_steps = 100
    warm = training.create_learning_rate_fn(optimizer, 1000)
    assert float(warm(50)) == pytest.approx(0.005)
    assert float(warm(100 + 450)) == pytest.approx(0.01 * (1 - 450 / 900) ** 0.9)
    optimizer.warmup_steps, optimizer.schedule = 0, "constant"
    constant = training.create_learning_rate_fn(optimizer, 1000, scale=0.1)
    assert [float(constant(step)) for step in (0, 500, 1000, 5000)] == pytest.approx([1e-3] * 4)


def test_weight_decay_skips_loss_weighting_params():
    config = common.base_config()
    config.optimizer.momentum = 0.0
    params = {"main": {"w": jnp.full((3,), 2.0)}, "loss_weighting": {"log_var": {"a": jnp.asarray(1.5)}}}
    tx = training.create_optimizer(config, optax.constant_schedule(0.1), params)
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    np.testing.assert_allclose(updates["main"]["w"], -0.1 * 1e-4 * 2.0, rtol=1e-6)
    assert float(updates["loss_weighting"]["log_var"]["a"]) == 0.0


@pytest.mark.slow
def test_aux_weight_scales_the_aux_terms_of_loss_terms():
    tasks = {"segmentation": 5, "depth": 1}
    model = build_model(model_config(), tasks, SimpleNamespace(tasks=("depth",), features=(), adaptor="conv1x1",
                                                               aggregate="concat", channels=8))
    batch = random_batch(jax.random.key(2))
    variables = model.init(jax.random.key(0), batch["image"])
    config = common.base_config()
    config.aux.weight = 0.3
    terms, _ = training.loss_terms(model, config, variables["params"], variables["batch_stats"], batch)
    outputs, _ = model.apply(variables, batch["image"], train=True)
    assert set(terms) == {"loss/segmentation", "loss/depth", "aux_loss/depth"}
    assert float(terms["aux_loss/depth"]) == pytest.approx(
        0.3 * float(tasks_lib.task_loss("depth", outputs.aux["depth"], batch)), rel=1e-6)
    assert float(terms["loss/depth"]) == pytest.approx(
        float(tasks_lib.task_loss("depth", outputs.main["depth"], batch)), rel=1e-6)
