"""Loss weightings and gradient treatments against hand-worked values on tiny vectors, and the shared machinery
(per-task gradients by a vmapped VJP, the shared/task-specific split, aux terms added after the treatment)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from auxmtl_jax import weighting as weighting_lib
from auxmtl_jax.errors import UserError
from auxmtl_jax.weighting import gradient_treatments as gt, loss_weightings as lw


def gram_of(*gradients):
    matrix = jnp.asarray(gradients, jnp.float32)
    return matrix @ matrix.T, matrix


def direction(coefficients, matrix):
    return np.asarray(coefficients @ matrix)


def test_pcgrad_projects_conflicting_gradients_onto_each_others_normal_plane():
    gram, matrix = gram_of((1.0, 0.0), (-1.0, 1.0))
    # g1 loses its part along g2: (1,0) + ½(−1,1) = (½,½); g2 loses its part along g1: (−1,1) + (1,0) = (0,1)
    np.testing.assert_allclose(direction(gt.pcgrad_coefficients(gram, jax.random.key(0)), matrix), [0.5, 1.5],
                               atol=1e-6)
    gram, matrix = gram_of((1.0, 0.0), (0.0, 2.0))  # no conflict: the plain sum
    np.testing.assert_allclose(direction(gt.pcgrad_coefficients(gram, jax.random.key(0)), matrix), [1.0, 2.0])


def test_pcgrad_with_three_tasks_follows_the_random_order():
    gradients = np.array([[1.0, 0.0, 0.0], [-1.0, 1.0, 0.0], [-0.5, -1.0, 1.0]])
    gram, matrix = gram_of(*gradients)
    rng = jax.random.key(3)
    expected = []
    for i in range(3):
        projected = gradients[i].copy()
        for j in np.asarray(jax.random.permutation(jax.random.fold_in(rng, i), 3)):
            if j != i and projected @ gradients[j] < 0:
                projected -= projected @ gradients[j] / (gradients[j] @ gradients[j]) * gradients[j]
        expected.append(projected)
    np.testing.assert_allclose(direction(gt.pcgrad_coefficients(gram, rng), matrix), np.sum(expected, 0), atol=1e-6)


def test_mgda_finds_the_min_norm_point_of_the_hull():
    gram, matrix = gram_of((2.0, 0.0), (0.0, 1.0))
    # ‖γ(2,0) + (1−γ)(0,1)‖² = 4γ² + (1−γ)² is least at γ = 1/5
    coefficients = gt.mgda_coefficients(gram, jnp.ones(2))
    np.testing.assert_allclose(coefficients, [0.2, 0.8], atol=1e-6)
    np.testing.assert_allclose(direction(coefficients, matrix), [0.4, 0.8], atol=1e-6)
    gram, _ = gram_of((1.0, 0.0), (2.0, 0.5))  # g1 is the min-norm point itself
    np.testing.assert_allclose(gt.mgda_coefficients(gram, jnp.ones(2)), [1.0, 0.0], atol=1e-6)
    gram, matrix = gram_of((1.0, 0.0), (0.0, 1.0), (1.0, 1.0))  # three tasks: (½, ½) is the closest hull point
    np.testing.assert_allclose(direction(gt.mgda_coefficients(gram, jnp.ones(3)), matrix), [0.5, 0.5], atol=1e-3)


def test_mgda_l2_normalization_uses_unit_gradients():
    gram, matrix = gram_of((2.0, 0.0), (0.0, 1.0))
    # unit gradients (1,0), (0,1): min-norm point (½,½) = ½·g1/2 + ½·g2
    np.testing.assert_allclose(gt.mgda_coefficients(gram, jnp.ones(2), "l2"), [0.25, 0.5], atol=1e-6)


def test_cagrad_on_orthogonal_gradients_scales_the_mean():
    gram, matrix = gram_of((1.0, 0.0), (0.0, 1.0))
    # w = (½,½) by symmetry, so g_w = g0 and d = g0·(1 + c), then divided by 1 + c²
    expected = np.array([0.5, 0.5]) * 1.4 / 1.16
    np.testing.assert_allclose(direction(gt.cagrad_coefficients(gram, 0.4, 1), matrix), expected, atol=1e-5)
    np.testing.assert_allclose(direction(gt.cagrad_coefficients(gram, 0.4, 0), matrix), [0.7, 0.7], atol=1e-5)


def test_cagrad_matches_a_general_solver_on_conflicting_gradients():
    gradients = np.array([[3.0, 0.5, 0.0], [-1.0, 1.0, 0.2], [0.3, -0.4, 2.0]])
    gram, matrix = gram_of(*gradients)
    g = np.asarray(gram, np.float64)
    c = 0.4
    radius = c * math.sqrt(g.mean())
    mean = np.full(3, 1 / 3)
    solution = scipy.optimize.minimize(lambda w: w @ g @ mean + radius * math.sqrt(w @ g @ w), mean,
                                       bounds=[(0, 1)] * 3, constraints={"type": "eq", "fun": lambda w: w.sum() - 1},
                                       method="SLSQP", options={"ftol": 1e-12})
    w = solution.x
    expected = (mean + radius / math.sqrt(w @ g @ w) * w) @ gradients / (1 + c ** 2)
    np.testing.assert_allclose(direction(gt.cagrad_coefficients(gram, c, 1), matrix), expected, atol=2e-3)


def test_imtl_g_makes_the_projections_on_every_unit_gradient_equal():
    gram, matrix = gram_of((1.0, 0.0), (0.0, 2.0))
    # g = α1(1,0) + α2(0,2) with α1 = 2α2 (equal projections on (1,0), (0,1)) and α1 + α2 = 1
    np.testing.assert_allclose(gt.imtl_g_coefficients(gram), [2 / 3, 1 / 3], atol=1e-6)
    gradients = np.array([[3.0, 0.5, 0.0], [-1.0, 1.0, 0.2], [0.3, -0.4, 2.0]])
    gram, matrix = gram_of(*gradients)
    coefficients = gt.imtl_g_coefficients(gram)
    update = direction(coefficients, matrix)
    projections = [update @ g / np.linalg.norm(g) for g in gradients]
    np.testing.assert_allclose(projections, [projections[0]] * 3, rtol=1e-4)
    assert float(jnp.sum(coefficients)) == pytest.approx(1.0)


def test_aligned_mtl_equalises_singular_values_at_the_smallest():
    gram, matrix = gram_of((2.0, 0.0), (0.0, 1.0))
    # singular values 2 and 1 become 1 and 1: the aligned rows are (1,0) and (0,1)
    np.testing.assert_allclose(gt.aligned_mtl_coefficients(gram), [0.5, 1.0], atol=1e-5)
    gram, matrix = gram_of((1.0, 0.0), (2.0, 0.0))  # rank 1: only the non-zero singular value counts
    np.testing.assert_allclose(direction(gt.aligned_mtl_coefficients(gram), matrix), [3.0, 0.0], atol=1e-4)


def test_nash_mtl_solves_the_bargaining_condition():
    gram, matrix = gram_of((2.0, 0.0), (0.0, 1.0))
    # orthogonal: α_i²‖g_i‖² = 1, so α = (½, 1) and the update is (1, 1)
    np.testing.assert_allclose(gt.nash_mtl_coefficients(gram, max_norm=0.0), [0.5, 1.0], rtol=1e-4)
    np.testing.assert_allclose(direction(gt.nash_mtl_coefficients(gram, max_norm=1.0), matrix),
                               [1 / math.sqrt(2)] * 2, rtol=1e-4)
    gram, _ = gram_of((3.0, 0.5, 0.0), (-1.0, 1.0, 0.2), (0.3, -0.4, 2.0))
    alpha = gt.nash_mtl_coefficients(gram, max_norm=0.0)
    np.testing.assert_allclose(np.asarray(alpha) * np.asarray(gram @ alpha), [1.0, 1.0, 1.0], rtol=1e-4)


def test_dwa_weights_from_the_loss_history():
    weights = lw.dwa_weights(jnp.asarray([1.0, 0.5]), jnp.asarray([2.0, 0.5]), temperature=2.0)
    # ratios (½, 1) / 2 -> softmax, times T = 2
    expected = 2 * np.exp([0.25, 0.5]) / np.exp([0.25, 0.5]).sum()
    np.testing.assert_allclose(weights, expected, rtol=1e-6)


def test_dwa_keeps_equal_weights_until_two_periods_are_complete():
    options = weighting_lib.default_options()
    options.dwa.period_steps = 2
    weighting = weighting_lib.get_weighting("dwa", options)
    state = weighting.init_state(("a", "b"))
    history = [(4.0, 1.0), (4.0, 1.0), (2.0, 1.0), (2.0, 1.0), (1.0, 1.0)]
    seen = []
    for a, b in history:
        step = weighting.value_and_grad(lambda p, a=a, b=b: ({"loss/a": a * p["w"], "loss/b": b * p["w"]}, None))
        result = step({"w": jnp.asarray(1.0)}, state, jax.random.key(0))
        seen.append([float(result.weights["a"]), float(result.weights["b"])])
        state = result.state
    assert seen[:4] == [[1.0, 1.0]] * 4
    # period means: (4, 1) then (2, 1): ratios (½, 1)
    np.testing.assert_allclose(seen[4], lw.dwa_weights(jnp.asarray([2.0, 1.0]), jnp.asarray([4.0, 1.0]), 2.0),
                               rtol=1e-6)


def test_gradnorm_gradient_and_renormalisation_by_hand():
    # norms (2,1), loss ratios (½, 1) -> r = (⅔, 4⁄3); α = 1: targets 1.5·r = (1, 2); G − target = (1, −1)
    # so the gradient sign·norm is (2, −1)
    gradient = gt.gradnorm_gradient(jnp.ones(2), jnp.asarray([2.0, 1.0]), jnp.ones(2), jnp.asarray([2.0, 1.0]),
                                    alpha=1.0)
    np.testing.assert_allclose(gradient, [2.0, -1.0])
    np.testing.assert_allclose(gt.renormalised(jnp.asarray([0.8, 1.1])), [1.6 / 1.9, 2.2 / 1.9], rtol=1e-6)
    np.testing.assert_allclose(gt.renormalised(jnp.asarray([-0.2, 1.0])), [0.0, 2.0])
    zero = gt.gradnorm_gradient(jnp.ones(2), jnp.asarray([2.0, 1.0]), jnp.zeros(2), jnp.zeros(2), alpha=1.5)
    assert bool(jnp.all(jnp.isfinite(zero)))  # all losses 0: no NaN


def test_gradnorm_steps_do_not_depend_on_the_gradients_scale():
    """Adam moves the weights by about its learning rate whatever the norms (plain SGD at lr 0.025 swung norms of
    50 and 60 from weights (1, 1) to (2, 0) in one step)."""
    weighting = weighting_lib.get_weighting("gradnorm")
    moved = []
    for scale in (1.0, 50.0):
        def terms(params, scale=scale):
            e = params["main"]["encoder"]
            return {"loss/a": scale * (e @ jnp.asarray([1.0, 0.0])), "loss/b": scale * (e @ jnp.asarray([0.0, 1.2]))}, None

        state = weighting.init_state(("a", "b"))
        params = {"main": {"encoder": jnp.asarray([1.0, 1.0])}}
        for _ in range(2):  # the first step records L(0); the ratios are 1 at both steps
            state = weighting.value_and_grad(terms)(params, state, jax.random.key(0)).state
        moved.append(np.asarray(state["weights"]))
    np.testing.assert_allclose(moved[0], moved[1], rtol=1e-5)
    assert np.all(np.abs(moved[0] - 1.0) < 0.06) and moved[0][0] > 1.0 > moved[0][1]


def test_famo_weights_and_logit_update_by_hand():
    weights = lw.famo_weights(jnp.zeros(2), jnp.asarray([1.0, 2.0]))
    # z = (½,½); c = ½/1 + ½/2 = ¾; w = z/(c·L) = (⅔, ⅓)
    np.testing.assert_allclose(weights, [2 / 3, 1 / 3], rtol=1e-6)
    gradient = lw.famo_logits_gradient(jnp.zeros(2), jnp.asarray([1.0, 2.0]), jnp.asarray([0.5, 2.0]))
    # δ = (log 2, 0); Jᵀδ = z ⊙ (δ − z·δ) = (¼ log 2, −¼ log 2)
    np.testing.assert_allclose(gradient, [0.25 * math.log(2), -0.25 * math.log(2)], rtol=1e-5)


def test_rlw_draws_softmax_weights_per_step():
    weighting = weighting_lib.get_weighting("rlw")
    step = weighting.value_and_grad(lambda p: ({"loss/a": p["w"], "loss/b": 2 * p["w"]}, None))
    first = step({"w": jnp.asarray(1.0)}, {}, jax.random.key(1)).weights
    again = step({"w": jnp.asarray(1.0)}, {}, jax.random.key(1)).weights
    other = step({"w": jnp.asarray(1.0)}, {}, jax.random.key(2)).weights
    assert float(first["a"] + first["b"]) == pytest.approx(1.0)
    assert first == again and float(first["a"]) != float(other["a"])


def toy_loss_terms(params):
    """Encoder e (2,), decoders a and b (scalars), an aux head: loss/a = d_a·(e·(1,0)), loss/b = d_b·(e·(−1,1)),
    aux_loss/a = h·e·(0,1)."""
    e = params["main"]["encoder"]
    terms = {"loss/a": params["main"]["a_decoder"] * (e @ jnp.asarray([1.0, 0.0])),
             "loss/b": params["main"]["b_decoder"] * (e @ jnp.asarray([-1.0, 1.0])),
             "aux_loss/a": params["aux"]["a"] * (e @ jnp.asarray([0.0, 1.0]))}
    return terms, "bn"


TOY_PARAMS = {"main": {"encoder": jnp.asarray([0.3, 0.7]), "a_decoder": jnp.asarray(1.0),
                       "b_decoder": jnp.asarray(1.0)}, "aux": {"a": jnp.asarray(2.0)}}


def test_a_treatment_changes_the_shared_gradient_only_and_adds_aux_after_it():
    step = weighting_lib.get_weighting("pcgrad").value_and_grad(toy_loss_terms)
    result = step(TOY_PARAMS, {}, jax.random.key(0))
    # task gradients on the encoder (1,0) and (−1,1) conflict: PCGrad gives (½, 3⁄2); aux adds 2·(0,1)
    np.testing.assert_allclose(result.grads["main"]["encoder"], [0.5, 3.5], atol=1e-6)
    # decoders keep their own plain gradients; the aux head gets the aux term's
    assert float(result.grads["main"]["a_decoder"]) == pytest.approx(0.3)
    assert float(result.grads["main"]["b_decoder"]) == pytest.approx(0.4)
    assert float(result.grads["aux"]["a"]) == pytest.approx(0.7)
    assert result.aux == "bn" and set(result.weights) == {"a", "b"}


def test_aux_as_tasks_treats_the_aux_term_as_one_more_task():
    options = weighting_lib.default_options()
    options.aux_as_tasks = True
    weighting = weighting_lib.get_weighting("mgda", options)
    result = weighting.value_and_grad(toy_loss_terms)(TOY_PARAMS, {}, jax.random.key(0))
    assert set(result.weights) == {"a", "b", "aux_a"}
    gradients = np.array([[1.0, 0.0], [-1.0, 1.0], [0.0, 2.0]])
    gram = jnp.asarray(gradients @ gradients.T, jnp.float32)
    expected = direction(gt.mgda_coefficients(gram, jnp.ones(3)), gradients)
    np.testing.assert_allclose(result.grads["main"]["encoder"], expected, atol=1e-5)
    assert float(result.weights["aux_a"]) < 0.5  # the aux gradient is the longest, MGDA leans on it least
    assert float(result.grads["aux"]["a"]) == pytest.approx(0.7)  # the aux head keeps its own plain gradient


def test_gradnorm_weights_every_parameter_and_updates_its_state():
    weighting = weighting_lib.get_weighting("gradnorm")
    state = weighting.init_state(("a", "b"))
    result = weighting.value_and_grad(toy_loss_terms)(TOY_PARAMS, state, jax.random.key(0))
    # step 0: weights 1, the plain gradients; the initial losses are recorded and the weights move
    np.testing.assert_allclose(result.grads["main"]["encoder"], [0.0, 3.0], atol=1e-6)
    np.testing.assert_allclose(result.state["initial_losses"], [0.3, 0.4], rtol=1e-6)
    assert bool(result.state["started"]) and float(jnp.sum(result.state["weights"])) == pytest.approx(2.0)
    assert not np.allclose(result.state["weights"], 1.0)


def test_every_method_gives_finite_gradients_on_the_toy():
    for name in weighting_lib.WEIGHTINGS:
        weighting = weighting_lib.get_weighting(name, steps_per_epoch=3)
        names = ("a", "b")
        params = {"main": {"encoder": jnp.eye(2), "a_decoder": jnp.asarray(1.0), "b_decoder": jnp.asarray(1.0)},
                  "aux": {"a": jnp.asarray(2.0)}, **({"loss_weighting": weighting.init(names)}
                                                     if weighting.init(names) else {})}
        result = jax.jit(weighting.value_and_grad(representation_loss_terms, TOY_SPLIT))(
            params, weighting.init_state(names), jax.random.key(0))
        assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(result.grads)), name


@pytest.mark.parametrize("options, message", [
    ({"dwa": {"temperature": 0.0}}, r"config\.weighting\.dwa\.temperature=0\.0; expected a number > 0"),
    ({"cagrad": {"rescale": 3}}, r"config\.weighting\.cagrad\.rescale=3; expected one of \(0, 1, 2\)"),
    ({"mgda": {"normalization": "l1"}}, r"config\.weighting\.mgda\.normalization='l1'; expected one of none"),
    ({"nash_mtl": {"iterations": 0}}, r"config\.weighting\.nash_mtl\.iterations=0; expected an integer >= 1"),
])
def test_bad_weighting_options_name_the_key(options, message):
    name = next(iter(options))
    with pytest.raises(UserError, match=message):
        weighting_lib.get_weighting(name, options)


def representation_loss_terms(params):
    """z = E·x: loss/a = z·(2,0), loss/b = z·(0,1) scaled by their decoders; aux_loss/a = z·(0,1) scaled by the aux
    head (as `TOY_SPLIT`, unsplit)."""
    z = params["main"]["encoder"] @ jnp.asarray([1.0, 3.0])
    return TOY_SPLIT.heads(params, {key: z for key in TOY_SPLIT.term_keys})


def toy_heads(params, copies):
    terms = {"loss/a": params["main"]["a_decoder"] * (copies["loss/a"] @ jnp.asarray([2.0, 0.0])),
             "loss/b": params["main"]["b_decoder"] * (copies["loss/b"] @ jnp.asarray([0.0, 1.0])),
             "aux_loss/a": params["aux"]["a"] * (copies["aux_loss/a"] @ jnp.asarray([0.0, 1.0]))}
    return terms, None


# The toy split: the shared part is z = E·x, x = (1, 3); each head reads its own copy of z.
TOY_SPLIT = weighting_lib.SplitLoss(shared=lambda params: (params["main"]["encoder"] @ jnp.asarray([1.0, 3.0]), None),
                                    heads=toy_heads, term_keys=("loss/a", "loss/b", "aux_loss/a"),
                                    merge_aux=lambda shared, heads: None)


def test_mgda_ub_solves_on_the_representation_gradients_and_weights_the_losses():
    params = {"main": {"encoder": jnp.eye(2), "a_decoder": jnp.asarray(1.0), "b_decoder": jnp.asarray(1.0)},
              "aux": {"a": jnp.asarray(2.0)}}
    step = weighting_lib.get_weighting("mgda_ub").value_and_grad(representation_loss_terms, TOY_SPLIT)
    result = step(params, {}, jax.random.key(0))
    # ∂L/∂z = (2,0) and (0,1): the min-norm weights are (⅕, ⅘), as for MGDA on those vectors
    np.testing.assert_allclose([result.weights["a"], result.weights["b"]], [0.2, 0.8], atol=1e-6)
    # the encoder gets (⅕·(2,0) + ⅘·(0,1))·xᵀ plus the aux term's 2·(0,1)·xᵀ; x = (1, 3)
    expected = np.outer([0.4, 0.8 + 2.0], [1.0, 3.0])
    np.testing.assert_allclose(result.grads["main"]["encoder"], expected, atol=1e-6)
    # the weights scale the decoders' gradients too (z = (1, 3): z·(2,0) = 2, z·(0,1) = 3)
    assert float(result.grads["main"]["a_decoder"]) == pytest.approx(0.2 * 2.0, abs=1e-6)
    assert float(result.grads["main"]["b_decoder"]) == pytest.approx(0.8 * 3.0, abs=1e-6)
    assert float(result.grads["aux"]["a"]) == pytest.approx(3.0)


def test_mgda_ub_refuses_aux_losses_as_tasks():
    with pytest.raises(UserError, match=r"mgda_ub.*aux losses never reach; expected weighting\.aux_as_tasks=False"):
        weighting_lib.get_weighting("mgda_ub", {"aux_as_tasks": True})


def test_famo_keeps_one_task_order_whatever_order_the_terms_come_in():
    """State vectors follow the sorted term keys: the terms inserted as (b, a) give the losses in the order (a, b),
    and the update after the step compares each task's loss with its own."""
    weighting = weighting_lib.get_weighting("famo")
    state = weighting.init_state(("b", "a"))
    result = weighting.value_and_grad(lambda p: ({"loss/b": 2.0 * p["w"], "loss/a": 1.0 * p["w"]}, None))(
        {"w": jnp.asarray(1.0)}, state, jax.random.key(0))
    np.testing.assert_allclose(result.state["losses"], [1.0, 2.0])
    np.testing.assert_allclose([result.weights["a"], result.weights["b"]], [2 / 3, 1 / 3], rtol=1e-6)
    after = weighting.after_update(result.state, {"loss/b": jnp.asarray(2.0), "loss/a": jnp.asarray(0.5)})
    # a's loss halved, b's stayed: the logit gradient is (¼ log 2, −¼ log 2), so Adam's first step lowers a's logit
    assert float(after["logits"][0]) < 0.0 < float(after["logits"][1])


def test_degenerate_gradients_stay_finite():
    collinear, _ = gram_of((1.0, 0.0), (2.0, 0.0))
    zero, _ = gram_of((1.0, 0.0), (0.0, 0.0))
    for gram in (collinear, zero):
        for coefficients in (gt.imtl_g_coefficients(gram), gt.nash_mtl_coefficients(gram),
                             gt.mgda_coefficients(gram, jnp.ones(2)), gt.cagrad_coefficients(gram),
                             gt.aligned_mtl_coefficients(gram), gt.pcgrad_coefficients(gram, jax.random.key(0))):
            assert bool(jnp.all(jnp.isfinite(coefficients))), coefficients


def test_nash_mtl_holds_for_gradients_of_very_different_sizes():
    gram, _ = gram_of((1e3, 0.0, 0.0), (1e-3, 1.4e-3, 0.0))
    alpha = gt.nash_mtl_coefficients(gram, max_norm=0.0)
    np.testing.assert_allclose(np.asarray(alpha) * np.asarray(gram @ alpha), [1.0, 1.0], rtol=1e-3)
