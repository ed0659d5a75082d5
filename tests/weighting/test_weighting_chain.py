"""Methods as optax-style (init, update) pairs with typed states, and `chain`: a loss weighting then a gradient
treatment, checked against the two applied by hand on tiny constructed gradients; the registry's chain syntax,
its refusals, the options each constructor checks, and what the trainer asks the weighting instead of its name."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from auxmtl_jax import weighting as weighting_lib
from auxmtl_jax.errors import UserError
from auxmtl_jax.weighting import base, chaining as chain_lib, gradient_treatments as gt, loss_weightings as lw
from test_weighting import TOY_PARAMS, TOY_SPLIT, representation_loss_terms, toy_loss_terms

LOG_VAR = {"a": jnp.asarray(0.4), "b": jnp.asarray(-0.3)}


def kendall_weights():
    return np.array([0.5 * math.exp(-0.4), 0.5 * math.exp(0.3)])


def toy_terms(params):
    """The toy's terms without its string aux (a jitted step returns arrays only)."""
    return toy_loss_terms(params)[0], None


def pcgrad_by_hand(gradients):
    """PCGrad on two gradients (the random order cannot matter with two)."""
    projected = []
    for i, g in enumerate(gradients):
        other = gradients[1 - i]
        dot = g @ other
        projected.append(g - dot / (other @ other) * other if dot < 0 else g)
    return np.sum(projected, axis=0)


def test_kendall_then_pcgrad_matches_the_two_applied_by_hand():
    weighting = weighting_lib.get_weighting("kendall+pcgrad")
    assert weighting.per_task_gradients and weighting.init(("a", "b")) == {"log_var": {"a": 0.0, "b": 0.0}}
    params = {**TOY_PARAMS, "loss_weighting": {"log_var": LOG_VAR}}
    result = jax.jit(weighting.value_and_grad(toy_terms))(params, weighting.init_state(("a", "b")),
                                                          jax.random.key(0))
    w = kendall_weights()
    losses = np.array([0.3, 0.4])  # e = (0.3, 0.7): e·(1,0) and e·(−1,1)
    # the encoder's task gradients (1,0) and (−1,1), weighted by Kendall, then projected by PCGrad; aux adds 2·(0,1)
    weighted = [w[0] * np.array([1.0, 0.0]), w[1] * np.array([-1.0, 1.0])]
    np.testing.assert_allclose(result.grads["main"]["encoder"], pcgrad_by_hand(weighted) + [0.0, 2.0], rtol=1e-6)
    # decoders keep their own weighted gradients; the aux head its plain one
    np.testing.assert_allclose([result.grads["main"]["a_decoder"], result.grads["main"]["b_decoder"]], w * losses,
                               rtol=1e-6)
    assert float(result.grads["aux"]["a"]) == pytest.approx(0.7)
    # Kendall's log σ² descend its own objective: ½ − ½·exp(−s)·L
    for task, s, loss in (("a", 0.4, 0.3), ("b", -0.3, 0.4)):
        assert float(result.grads["loss_weighting"]["log_var"][task]) == pytest.approx(
            0.5 - 0.5 * math.exp(-s) * loss, rel=1e-6)
    assert float(result.total) == pytest.approx(w @ losses + 0.5 * (0.4 - 0.3) + 2.0 * 0.7, rel=1e-6)
    # the logged weights are the coefficients of the raw task gradients in the shared update
    logged = np.array([result.weights["a"], result.weights["b"]])
    np.testing.assert_allclose(logged @ np.array([[1.0, 0.0], [-1.0, 1.0]]), pcgrad_by_hand(weighted), rtol=1e-6)


def test_chain_update_feeds_the_weighted_gram_and_losses_to_the_treatment():
    gradients = np.array([[3.0, 0.5, 0.0], [-1.0, 1.0, 0.2], [0.3, -0.4, 2.0]], np.float32)
    gram, losses, names = jnp.asarray(gradients @ gradients.T), jnp.asarray([1.0, 2.0, 0.5]), ("a", "b", "c")
    params = {"log_var": {"a": jnp.asarray(0.2), "b": jnp.asarray(-0.5), "c": jnp.asarray(1.0)}}
    w = 0.5 * np.exp(-np.array([0.2, -0.5, 1.0]))
    weighted_gram = jnp.asarray((w[:, None] * gradients) @ (w[:, None] * gradients).T)
    for treatment, scales_losses in ((gt.mgda(normalization="loss"), False), (gt.gradnorm(), True)):
        chained = chain_lib.chain(lw.kendall(), treatment)
        coefficients, state = chained.update(losses, gram, chained.init(names), jax.random.key(0), params, names)
        c, expected_state = treatment.update(jnp.asarray(w, jnp.float32) * losses, weighted_gram,
                                             treatment.init(names), jax.random.key(0), {}, names)
        np.testing.assert_allclose(coefficients.shared, w * np.asarray(c), rtol=1e-5)
        np.testing.assert_allclose(coefficients.loss, w * np.asarray(c) if scales_losses else w, rtol=1e-5)
        assert float(coefficients.regulariser) == pytest.approx(0.5 * (0.2 - 0.5 + 1.0), rel=1e-6)
        assert isinstance(state.treatment, type(expected_state)) and state.weighting == base.EmptyState()


def test_kendall_then_mgda_ub_solves_on_the_weighted_representation_gradients():
    params = {"main": {"encoder": jnp.eye(2), "a_decoder": jnp.asarray(1.0), "b_decoder": jnp.asarray(1.0)},
              "aux": {"a": jnp.asarray(2.0)}, "loss_weighting": {"log_var": LOG_VAR}}
    weighting = weighting_lib.get_weighting("kendall+mgda_ub")
    result = weighting.value_and_grad(representation_loss_terms, TOY_SPLIT)(
        params, weighting.init_state(("a", "b")), jax.random.key(0))
    w = kendall_weights()
    # ∂L/∂z = (2,0) and (0,1), weighted: (2w_a, 0) and (0, w_b); the min-norm point puts γ = w_b²/(4w_a² + w_b²)
    # on the first
    gamma = w[1] ** 2 / (4 * w[0] ** 2 + w[1] ** 2)
    shared = w * np.array([gamma, 1 - gamma])
    np.testing.assert_allclose([result.weights["a"], result.weights["b"]], shared, rtol=1e-5)
    expected = np.outer([2 * shared[0], shared[1] + 2.0], [1.0, 3.0])  # z = E·(1, 3); aux adds 2·(0,1)·xᵀ
    np.testing.assert_allclose(result.grads["main"]["encoder"], expected, rtol=1e-5)
    np.testing.assert_allclose([result.grads["main"]["a_decoder"], result.grads["main"]["b_decoder"]],
                               shared * [2.0, 3.0], rtol=1e-5)
    # the coefficients weight the losses, so Kendall's parameters see c_t·w_t·L_t: ½ − c_t·½·exp(−s_t)·L_t
    for index, (task, s, loss) in enumerate((("a", 0.4, 2.0), ("b", -0.3, 3.0))):
        c = (gamma, 1 - gamma)[index]
        assert float(result.grads["loss_weighting"]["log_var"][task]) == pytest.approx(
            0.5 - c * 0.5 * math.exp(-s) * loss, rel=1e-5)


def test_equal_then_a_treatment_is_the_treatment():
    alone = weighting_lib.get_weighting("pcgrad").value_and_grad(toy_loss_terms)(TOY_PARAMS, {}, jax.random.key(0))
    chained = weighting_lib.get_weighting("equal+pcgrad").value_and_grad(toy_loss_terms)(
        TOY_PARAMS, {}, jax.random.key(0))
    for got, want in zip(jax.tree.leaves((chained.total, chained.grads, chained.weights)),
                         jax.tree.leaves((alone.total, alone.grads, alone.weights))):
        np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("name, message", [
    ("pcgrad+kendall", r"config\.loss_weighting='pcgrad\+kendall': cannot chain pcgrad \+ kendall; expected one "
                       r"loss weighting, one gradient treatment, or a loss weighting then a gradient treatment"),
    ("kendall+dwa", r"cannot chain kendall \+ dwa"),
    ("pcgrad+cagrad", r"cannot chain pcgrad \+ cagrad"),
    ("kendall+pcgrad+cagrad", r"cannot chain kendall \+ pcgrad \+ cagrad"),
    ("kendall+pcgrd", r"config\.loss_weighting='kendall\+pcgrd' names 'pcgrd', which is unknown; expected "
                      r"'\+'-joined names from: equal, kendall"),
    ("pcgrd", r"config\.loss_weighting='pcgrd' is unknown; expected one of: equal, kendall"),
])
def test_the_registry_refuses_what_does_not_chain(name, message):
    with pytest.raises(UserError, match=message):
        weighting_lib.get_weighting(name, steps_per_epoch=1)


def test_chain_itself_refuses_nothing_and_two_treatments():
    with pytest.raises(chain_lib.ChainError, match="cannot chain nothing"):
        chain_lib.chain()
    with pytest.raises(chain_lib.ChainError, match="cannot chain mgda \\+ nash_mtl"):
        chain_lib.chain(gt.mgda(), gt.nash_mtl())


def test_a_chain_with_mgda_ub_refuses_aux_losses_as_tasks():
    with pytest.raises(UserError, match=r"'kendall\+mgda_ub'.*expected weighting\.aux_as_tasks=False"):
        weighting_lib.get_weighting("kendall+mgda_ub", {"aux_as_tasks": True})


def test_a_chains_state_keeps_each_stateful_methods_fields_under_its_name():
    names = ("a", "b")
    assert weighting_lib.get_weighting("kendall+pcgrad").init_state(names) == {}
    lone = {name: set(weighting_lib.get_weighting(name, steps_per_epoch=2).init_state(names))
            for name in ("dwa", "gradnorm", "famo")}
    state = weighting_lib.get_weighting("dwa+gradnorm", steps_per_epoch=2).init_state(names)
    assert {key: set(value) for key, value in state.items()} == {"dwa": lone["dwa"], "gradnorm": lone["gradnorm"]}
    state = weighting_lib.get_weighting("famo+pcgrad").init_state(names)
    assert {key: set(value) for key, value in state.items()} == {"famo": lone["famo"]}


def test_a_stateful_chain_steps_and_updates_after_the_step():
    options = weighting_lib.default_options()
    options.dwa.period_steps = 1
    options.aux_as_tasks = True
    names = ("a", "b", "aux_a")
    for name in ("dwa+gradnorm", "famo+pcgrad"):
        weighting = weighting_lib.get_weighting(name, options)
        state = weighting.init_state(names)
        step = jax.jit(weighting.value_and_grad(toy_terms))
        for _ in range(3):
            result = step(TOY_PARAMS, state, jax.random.key(0))
            state = result.state
            if weighting.after_update is not None:
                state = weighting.after_update(state, toy_loss_terms(TOY_PARAMS)[0] | {"loss/a": jnp.asarray(0.1)})
        assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves((result.grads, state))), name
        assert set(result.weights) == set(names)
        if name == "dwa+gradnorm":
            assert int(state["dwa"]["periods"]) == 3 and bool(state["gradnorm"]["started"])
        else:  # a's loss fell after each step: FAMO lowers its logit
            assert weighting.after_update is not None and float(state["famo"]["logits"][1]) < 0.0  # (aux_a, a, b)


@pytest.mark.parametrize("name", ["kendall+cagrad", "rlw+nash_mtl", "famo+mgda_ub", "kendall+gradnorm"])
def test_chains_give_finite_gradients(name):
    weighting = weighting_lib.get_weighting(name)
    names = ("a", "b")
    params = {"main": {"encoder": jnp.eye(2), "a_decoder": jnp.asarray(1.0), "b_decoder": jnp.asarray(1.0)},
              "aux": {"a": jnp.asarray(2.0)}}
    if weighting.init(names):
        params["loss_weighting"] = weighting.init(names)
    result = jax.jit(weighting.value_and_grad(representation_loss_terms, TOY_SPLIT))(
        params, weighting.init_state(names), jax.random.key(0))
    assert jax.tree.structure(result.grads) == jax.tree.structure(params)
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(result.grads)), name


def test_methods_are_init_update_pairs_with_typed_states():
    names = ("a", "b")
    dwa = lw.dwa(period_steps=2)
    assert isinstance(dwa.init(names), lw.DWAState) and dwa.kind == base.LOSS
    weights, state = dwa.update(jnp.asarray([2.0, 1.0]), None, dwa.init(names), jax.random.key(0), {}, names)
    np.testing.assert_array_equal(weights, [1.0, 1.0])
    np.testing.assert_array_equal(state.period_sum, [2.0, 1.0])
    assert int(state.period_count) == 1
    pcgrad = gt.pcgrad()
    assert pcgrad.init(names) == base.EmptyState() and pcgrad.kind == base.GRADIENT
    assert isinstance(gt.gradnorm().init(names), gt.GradNormState) and gt.gradnorm().scope == "all"
    assert gt.mgda_ub().kind == base.REPRESENTATION
    # the trainer's state is the typed state's fields (the layout of checkpoints written before the types)
    chained = chain_lib.chain(lw.famo())
    tree = chain_lib.state_tree(chained, chained.init(names))
    assert set(tree) == {"logits", "opt_state", "losses"}
    assert chain_lib.typed_state(chained, names, tree).weighting._fields == lw.FAMOState._fields


@pytest.mark.parametrize("build, message", [
    (lambda: lw.dwa(temperature=0.0), r"config\.weighting\.dwa\.temperature=0\.0; expected a number > 0\."),
    (lambda: lw.dwa(period_steps=1.5), r"config\.weighting\.dwa\.period_steps=1\.5; expected an integer >= 0\."),
    (lambda: lw.famo(learning_rate=0), r"config\.weighting\.famo\.learning_rate=0; expected a number > 0\."),
    (lambda: gt.gradnorm(alpha=-1.0), r"config\.weighting\.gradnorm\.alpha=-1\.0; expected a number >= 0\."),
    (lambda: gt.mgda_ub(normalization="l1"), r"config\.weighting\.mgda\.normalization='l1'; expected one of none"),
    (lambda: gt.cagrad(c=True), r"config\.weighting\.cagrad\.c=True; expected a number >= 0\."),
    (lambda: gt.nash_mtl(max_norm="1"), r"config\.weighting\.nash_mtl\.max_norm='1'; expected a number >= 0\."),
])
def test_each_constructor_checks_its_own_options(build, message):
    with pytest.raises(UserError, match=message):
        build()


def test_default_options_are_the_constructors_defaults():
    assert weighting_lib.DEFAULT_OPTIONS == {
        "aux_as_tasks": False,
        "space": "parameters",
        "dwa": {"temperature": 2.0, "period_steps": 0},
        "famo": {"learning_rate": 0.025, "weight_decay": 0.01},
        "gradnorm": {"alpha": 1.5, "learning_rate": 0.025},
        "mgda": {"normalization": "none"},
        "cagrad": {"c": 0.4, "rescale": 1},
        "nash_mtl": {"max_norm": 1.0, "iterations": 20},
    }


def test_steps_per_epoch_is_asked_for_only_when_a_method_needs_it():
    calls = []

    def steps_per_epoch():
        calls.append(1)
        return 7

    class Config(dict):
        __getattr__ = dict.__getitem__

    for name, period, wanted in (("pcgrad", 0, 0), ("dwa", 5, 0), ("dwa", 0, 1), ("dwa+pcgrad", 0, 1)):
        options = weighting_lib.default_options()
        options.dwa.period_steps = period
        calls.clear()
        weighting_lib.from_config(Config(loss_weighting=name, weighting=options), steps_per_epoch=steps_per_epoch)
        assert len(calls) == wanted, name
    with pytest.raises(ValueError, match="needs steps_per_epoch"):
        weighting_lib.get_weighting("dwa")


def test_main_objective_is_kendalls_weighted_sum_or_the_plain_sum():
    losses = {"a": jnp.asarray(2.0), "b": jnp.asarray(3.0)}
    params = {"log_var": LOG_VAR}
    kendall = 0.5 * math.exp(-0.4) * 2.0 + 0.2 + 0.5 * math.exp(0.3) * 3.0 - 0.15
    for name, expected in (("kendall", kendall), ("kendall+pcgrad", kendall), ("dwa", 5.0), ("famo+nash_mtl", 5.0),
                           ("gradnorm", 5.0)):
        weighting = weighting_lib.get_weighting(name, steps_per_epoch=1)
        assert float(weighting.main_objective(params, losses)) == pytest.approx(expected, rel=1e-6), name
    terms = {"loss/a": losses["a"], "loss/b": losses["b"], "aux_loss/a": jnp.asarray(9.0)}
    kendall_weighting = weighting_lib.get_weighting("kendall", steps_per_epoch=1)
    main = kendall_weighting.main_objective(params, weighting_lib.main_terms(terms))  # the aux term is left out
    assert float(main) == pytest.approx(kendall, rel=1e-6)
