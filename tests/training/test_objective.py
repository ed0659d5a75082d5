"""The training objective against hand-computed values: equal and Kendall weightings (totals and gradients), the
poly, constant and step schedules, Adam against torch's update, the weight-decay mask, and the aux weight in
`training.loss_terms`."""

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


def test_step_schedule_values_at_its_boundaries():
    """lr·factor^⌊t/every⌋ (torch's StepLR stepped per epoch, counted in steps), jitted and not."""
    optimizer = common.base_config().optimizer
    optimizer.learning_rate, optimizer.schedule = 1e-4, "step"
    optimizer.step_every_steps, optimizer.step_factor = 9900, 0.5
    schedule = training.create_learning_rate_fn(optimizer, 19_800)
    steps = (0, 1, 9899, 9900, 9901, 19_799, 19_800)
    expected = [1e-4, 1e-4, 1e-4, 5e-5, 5e-5, 5e-5, 2.5e-5]
    assert [float(schedule(step)) for step in steps] == pytest.approx(expected, rel=1e-7)
    jitted = jax.jit(schedule)
    assert [float(jitted(jnp.int32(step))) for step in steps] == pytest.approx(expected, rel=1e-6)
    optimizer.warmup_steps = 100  # the boundaries count from the first step, warm-up included
    warm = training.create_learning_rate_fn(optimizer, 19_800, scale=0.1)
    assert [float(warm(step)) for step in (50, 100, 9899, 9900)] == pytest.approx([5e-6, 1e-5, 1e-5, 5e-6])


def torch_adam_with_l2(params, grads, learning_rates, *, weight_decay, decayed, betas=(0.9, 0.999), eps=1e-8):
    """torch.optim.Adam's update (weight_decay adds wd·p to the gradient), written out in float64 numpy."""
    params = {name: np.asarray(value, np.float64) for name, value in params.items()}
    first = {name: np.zeros_like(value) for name, value in params.items()}
    second = {name: np.zeros_like(value) for name, value in params.items()}
    for step, (grad, lr) in enumerate(zip(grads, learning_rates), start=1):
        for name in params:
            g = np.asarray(grad[name], np.float64) + (weight_decay * params[name] if decayed[name] else 0.0)
            first[name] = betas[0] * first[name] + (1 - betas[0]) * g
            second[name] = betas[1] * second[name] + (1 - betas[1]) * g * g
            step_size = lr / (1 - betas[0] ** step)
            denominator = np.sqrt(second[name]) / math.sqrt(1 - betas[1] ** step) + eps
            params[name] = params[name] - step_size * first[name] / denominator
    return params


def test_adam_is_torch_adam_with_coupled_l2_and_keeps_sgds_masks():
    """Two steps of optimizer.name='adam' (step schedule, init_from.lr_scale on a loaded module, no decay on the
    loss-weighting parameters) against torch.optim.Adam's update by hand."""
    config = common.base_config()
    config.optimizer.name, config.optimizer.weight_decay = "adam", 0.1
    config.optimizer.learning_rate, config.optimizer.schedule = 0.01, "step"
    config.optimizer.step_every_steps, config.optimizer.step_factor = 1, 0.5
    config.init_from.lr_scale = 0.5
    rng = np.random.default_rng(0)
    params = {"main": {"encoder": {"w": jnp.asarray(rng.normal(size=(3,)), jnp.float32)},
                       "depth_decoder": {"w": jnp.asarray(rng.normal(size=(2, 2)), jnp.float32)}},
              "loss_weighting": {"log_var": {"depth": jnp.asarray(0.3, jnp.float32)}}}
    loaded = {"main": {"encoder": {}}}
    schedule = training.create_learning_rate_fn(config.optimizer, 10)
    tx = training.create_optimizer(config, schedule, params, loaded)
    grads = [jax.tree.map(lambda leaf: jnp.asarray(rng.normal(size=leaf.shape), jnp.float32), params)
             for _ in range(2)]
    state, current = tx.init(params), params
    for grad in grads:
        updates, state = tx.update(grad, state, current)
        current = optax.apply_updates(current, updates)

    names = {"encoder": ("main", "encoder", "w"), "decoder": ("main", "depth_decoder", "w"),
             "log_var": ("loss_weighting", "log_var", "depth")}
    pick = lambda tree, name: tree[names[name][0]][names[name][1]][names[name][2]]  # noqa: E731
    flat = lambda tree: {name: np.asarray(pick(tree, name)) for name in names}  # noqa: E731
    decayed = {"encoder": True, "decoder": True, "log_var": False}
    expected = torch_adam_with_l2(flat(params), [flat(grad) for grad in grads], [0.01, 0.005], weight_decay=0.1,
                                  decayed=decayed)
    # init_from.lr_scale scales the loaded module's updates: torch's param group with lr·0.5
    expected_loaded = torch_adam_with_l2(flat(params), [flat(grad) for grad in grads], [0.005, 0.0025],
                                         weight_decay=0.1, decayed=decayed)
    got = flat(current)
    np.testing.assert_allclose(got["encoder"], expected_loaded["encoder"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got["decoder"], expected["decoder"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got["log_var"], expected["log_var"], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("key, value, message", [
    ("name", "rmsprop", "config.optimizer.name='rmsprop'; expected one of sgd, adam."),
    ("schedule", "cosine", "config.optimizer.schedule='cosine'; expected one of poly, constant, step."),
    ("step_every_steps", 0, "config.optimizer.step_every_steps=0; expected a positive integer."),
    ("step_every_steps", 2.5, "config.optimizer.step_every_steps=2.5; expected a positive integer."),
    ("step_factor", 0.0, "config.optimizer.step_factor=0.0; expected a number in (0, 1]."),
    ("step_factor", 1.5, "config.optimizer.step_factor=1.5; expected a number in (0, 1]."),
])
def test_bad_optimizer_values_are_one_error_naming_key_and_value(key, value, message):
    from auxmtl_jax.errors import UserError

    config = common.base_config()
    config.optimizer.schedule = "step"
    with config.unlocked(), config.ignore_type():
        config.optimizer[key] = value
    with pytest.raises(UserError) as raised:
        training.validate_config(config)
    assert str(raised.value) == message
    config = common.base_config()
    config.optimizer.schedule, config.optimizer.step_factor = "step", 1.0  # the edge of (0, 1]: no decay
    training.validate_config(config)


def test_sgd_stays_what_it_was():
    """optimizer.name='sgd' (the default) is the chain it always was, bit for bit."""
    config = common.base_config()
    assert config.optimizer.name == "sgd"
    params = {"main": {"w": jnp.asarray([1.0, -2.0, 0.5])}, "loss_weighting": {"log_var": {"a": jnp.asarray(0.2)}}}
    schedule = training.create_learning_rate_fn(config.optimizer, 100)
    ours = training.create_optimizer(config, schedule, params)
    mask = {"main": {"w": True}, "loss_weighting": {"log_var": {"a": False}}}
    before = optax.chain(optax.add_decayed_weights(1e-4, mask=mask), optax.sgd(schedule, momentum=0.9))
    grads = [{"main": {"w": jnp.asarray([0.3, 0.1, -0.2])}, "loss_weighting": {"log_var": {"a": jnp.asarray(0.5)}}}] * 2
    results = []
    for tx in (ours, before):
        state, current = tx.init(params), params
        for grad in grads:
            updates, state = tx.update(grad, state, current)
            current = optax.apply_updates(current, updates)
        results.append(current)
    jax.tree.map(np.testing.assert_array_equal, *results)


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
