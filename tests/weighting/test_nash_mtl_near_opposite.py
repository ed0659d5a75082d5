"""Nash-MTL's bargaining solution for nearly opposite task gradients (issue 27), jitted in float32, against the
exact solution of the same float32 Gram matrix computed here independently: a closed form (float64) for two
tasks, Newton's method in 50-digit decimals with its residual checked for three. Also the exactly singular
cases, where no solution exists and the documented ridge governs, and well-conditioned random Grams."""

import decimal
import math
from decimal import Decimal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from auxmtl_jax.weighting import gradient_treatments as gt
from auxmtl_jax.weighting import solvers

TOLERANCE = 1e-4


@jax.jit
def coefficients(gram):
    """(α unclipped, α clipped at norm 1), as the training step computes them."""
    return gt.nash_mtl_coefficients(gram, max_norm=0.0), gt.nash_mtl_coefficients(gram, max_norm=1.0)


def solve(gram):
    alpha, clipped = coefficients(jnp.asarray(gram, jnp.float32))
    return np.asarray(alpha, np.float64), np.asarray(clipped, np.float64)


def float32_gram(gradients):
    """The Gram matrix of float64 gradients, rounded to float32 as the method receives it, back in float64: the
    exact solution is that of these entries (rounding them moves a 1e-6 gap by several percent)."""
    gradients = np.asarray(gradients, np.float64)
    return (gradients @ gradients.T).astype(np.float32).astype(np.float64)


def relative_error(value, exact):
    return float(np.max(np.abs(np.asarray(value) / np.asarray(exact) - 1.0)))


def two_task_solution(gram):
    """With c the cosine, α_i·‖g_i‖ = β for both tasks and β²(1 + c) = 1."""
    norms = np.sqrt(np.diag(gram))
    cosine = gram[0, 1] / (norms[0] * norms[1])
    return 1.0 / (norms * math.sqrt(1.0 + cosine))


def newton_solution(gram, ridge=0.0, iterations=200):
    """Damped Newton on F(β) = ½βᵀ(M + ρI)β − Σ log β, M the unit-diagonal Gram and α_i = β_i/‖g_i‖, in 50-digit
    decimal arithmetic (float64 would lose ten digits to the cancellation in Mβ); the residual of
    α_i·((G + ρ·diag(G))α)_i = 1 is checked, so the answer is exact to far below float32's resolution."""
    with decimal.localcontext() as context:
        context.prec = 50
        size = len(gram)
        norms = [Decimal(float(gram[i][i])).sqrt() for i in range(size)]
        matrix = [[Decimal(float(gram[i][j])) / (norms[i] * norms[j]) + (Decimal(ridge) if i == j else 0)
                   for j in range(size)] for i in range(size)]
        beta = [Decimal(1)] * size
        for _ in range(iterations):
            gradient = [sum(matrix[i][j] * beta[j] for j in range(size)) - 1 / beta[i] for i in range(size)]
            hessian = [[matrix[i][j] + (beta[i] ** -2 if i == j else 0) for j in range(size)] for i in range(size)]
            step = _solve(hessian, gradient)
            decrement = max(sum(g * p for g, p in zip(gradient, step)), Decimal(0)).sqrt()
            damping = 1 / (1 + decrement) if decrement > Decimal("0.25") else Decimal(1)
            beta = [b - damping * p for b, p in zip(beta, step)]
        residual = max(abs(beta[i] * sum(matrix[i][j] * beta[j] for j in range(size)) - 1) for i in range(size))
        assert residual < Decimal("1e-30")
        return np.array([float(b / n) for b, n in zip(beta, norms)])


def _solve(matrix, rhs):
    """Gaussian elimination with partial pivoting, in whatever number type the entries have."""
    size = len(rhs)
    rows = [list(row) + [value] for row, value in zip(matrix, rhs)]
    for k in range(size):
        pivot = max(range(k, size), key=lambda i: abs(rows[i][k]))
        rows[k], rows[pivot] = rows[pivot], rows[k]
        for i in range(k + 1, size):
            factor = rows[i][k] / rows[k][k]
            rows[i] = [a - factor * b for a, b in zip(rows[i], rows[k])]
    solution = [Decimal(0)] * size
    for k in reversed(range(size)):
        solution[k] = (rows[k][size] - sum(rows[k][j] * solution[j] for j in range(k + 1, size))) / rows[k][k]
    return solution


def orthonormal(count, dimension=5, seed=0):
    basis, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(dimension, count)))
    return basis.T


def opposite_pair(cosine, norms=(1.0, 3.0)):
    u, w = orthonormal(2)
    return [norms[0] * u, norms[1] * (cosine * u + math.sqrt(1.0 - cosine ** 2) * w)]


def opposite_pair_and_third(cosine):
    u, w, z = orthonormal(3)
    third = 0.4 * u - 0.3 * w + z
    return [2.0 * u, 0.5 * (cosine * u + math.sqrt(1.0 - cosine ** 2) * w), 1.5 * third / np.linalg.norm(third)]


def nearly_cancelling_three(lift=1e-3):
    """Three gradients 120° apart in a plane, lifted by `lift` out of it: their sum nearly vanishes."""
    angles = 2.0 * np.pi * np.arange(3) / 3.0
    unit = np.stack([np.cos(angles), np.sin(angles), np.full(3, lift)], axis=1)
    return list(unit * np.array([[1.0], [2.0], [0.5]]))


CASES = {
    "two tasks, cos -0.9999": (lambda: opposite_pair(-0.9999), two_task_solution),
    "two tasks, cos -0.999999": (lambda: opposite_pair(-0.999999), two_task_solution),
    "two tasks, cos -0.999999, norms 1e-3 and 10": (lambda: opposite_pair(-0.999999, (1e-3, 10.0)),
                                                    two_task_solution),
    "three tasks, a pair at cos -0.9999": (lambda: opposite_pair_and_third(-0.9999), newton_solution),
    "three tasks, a pair at cos -0.999999": (lambda: opposite_pair_and_third(-0.999999), newton_solution),
    "three tasks nearly cancelling": (nearly_cancelling_three, newton_solution),
}


@pytest.mark.parametrize("name", list(CASES))
def test_nearly_opposite_gradients_reach_the_exact_bargaining_solution(name):
    make, exact_solution = CASES[name]
    gram = float32_gram(make())
    exact = exact_solution(gram)
    assert np.max(exact * np.sqrt(np.diag(gram))) > 50  # far from the orthogonal case's α_i·‖g_i‖ = 1
    alpha, clipped = solve(gram)
    assert relative_error(alpha, exact) < TOLERANCE
    # the exact update has norm √T, so the clip at 1 scales α by 1/√T
    assert relative_error(clipped, exact / math.sqrt(len(gram))) < TOLERANCE


def test_the_update_norm_is_evaluated_without_cancellation():
    gram = float32_gram(opposite_pair_and_third(-0.999999))
    alpha, _ = solve(gram)
    assert float(solvers.quadratic_form(jnp.asarray(gram, jnp.float32), jnp.asarray(alpha, jnp.float32))) == (
        pytest.approx(float(alpha @ gram @ alpha), rel=1e-5))
    assert alpha @ gram @ alpha == pytest.approx(3.0, rel=1e-3)


@pytest.mark.parametrize("tasks", [3, 5])
@pytest.mark.parametrize("conflicting", [False, True])
def test_well_conditioned_grams_match_the_float64_solution(tasks, conflicting):
    rng = np.random.default_rng(tasks)
    gradients = rng.normal(size=(tasks, 8)) * np.exp(rng.uniform(-2, 2, size=(tasks, 1)))
    if conflicting:
        gradients[1:] -= 0.5 * gradients[:1]
    gram = float32_gram(gradients)
    unit = gram / np.sqrt(np.outer(np.diag(gram), np.diag(gram)))
    assert np.linalg.eigvalsh(unit)[0] > 1e-3
    exact = newton_solution(gram)
    alpha, clipped = solve(gram)
    np.testing.assert_allclose(alpha, exact, rtol=1e-5)
    np.testing.assert_allclose(clipped, exact / math.sqrt(tasks), rtol=1e-5)


def test_exactly_opposite_gradients_cancel_and_the_ridge_caps_alpha():
    # g1 = (1, 0), g2 = (−2, 0): 2·g1 + g2 = 0, so F is unbounded and α grows along (2, 1) until the ridge stops it
    gram = np.array([[1.0, -2.0], [-2.0, 4.0]])
    alpha, clipped = solve(gram)
    exact = newton_solution(gram, ridge=solvers.NASH_RIDGE)  # (1, ½)/√ρ
    np.testing.assert_allclose(exact, np.array([1.0, 0.5]) / math.sqrt(solvers.NASH_RIDGE), rtol=1e-6)
    assert relative_error(alpha, exact) < TOLERANCE
    update = alpha @ np.array([[1.0, 0.0], [-2.0, 0.0]])
    assert np.max(np.abs(update)) <= 1e-6 * np.max(alpha)  # the update vanishes: nothing for the clip to do
    np.testing.assert_array_equal(clipped, alpha)


def test_a_cancelling_pair_leaves_the_third_task_its_bargaining_share():
    # g1 = (1, 0), g2 = (−1, 0), g3 = (½, √¾): the pair cancels; the update is α3·(0, √¾) with α3²·¾ = 1, norm 1
    gradients = np.array([[1.0, 0.0], [-1.0, 0.0], [0.5, math.sqrt(0.75)]])
    gram = np.array([[1.0, -1.0, 0.5], [-1.0, 1.0, -0.5], [0.5, -0.5, 1.0]])
    alpha, clipped = solve(gram)
    exact = newton_solution(gram, ridge=solvers.NASH_RIDGE)
    assert relative_error(alpha, exact) < TOLERANCE
    assert alpha[2] == pytest.approx(1.0 / math.sqrt(0.75), rel=1e-5)
    assert min(alpha[0], alpha[1]) > 1e5
    update = alpha @ gradients
    assert update[1] == pytest.approx(1.0, rel=1e-5)
    assert abs(update[0]) < 0.2  # α1 − α2 + ½α3 = 0, up to float32's spacing of α1 ≈ 10⁶ (1/16)
    # norm √(T − 2) = 1 (up to that spacing): the clip at 1 leaves α nearly as it is, a clip at ½ halves it
    assert math.sqrt(alpha @ gram @ alpha) == pytest.approx(1.0, rel=1e-2)
    np.testing.assert_allclose(clipped, alpha, rtol=1e-2)
    halved = np.asarray(gt.nash_mtl_coefficients(jnp.asarray(gram, jnp.float32), max_norm=0.5), np.float64)
    np.testing.assert_allclose(halved / alpha, halved[2] / alpha[2], rtol=1e-6)
    assert math.sqrt(halved @ gram @ halved) == pytest.approx(0.5, rel=1e-3)


def test_a_zero_gradient_leaves_the_other_task_alone():
    alpha, clipped = solve(np.array([[4.0, 0.0], [0.0, 0.0]]))
    assert np.all(np.isfinite(alpha)) and np.all(alpha > 0)
    assert alpha[0] == pytest.approx(0.5, rel=1e-6)  # α1·‖g1‖² = 1/α1
    np.testing.assert_allclose(clipped, alpha, rtol=1e-6)  # the update g1/2 has norm 1


def test_a_gram_rounding_left_indefinite_is_treated_as_singular():
    # |cos| > 1 by one float32 step: the nearest semi-definite Gram has opposite gradients, so the update vanishes
    cosine = -1.0 - 2.0 ** -23
    gram = np.array([[1.0, cosine], [cosine, 1.0]])
    assert np.linalg.eigvalsh(gram)[0] < 0
    alpha, clipped = solve(gram)
    assert np.all(np.isfinite(alpha)) and np.all(alpha > 1e5)
    assert alpha[0] == pytest.approx(alpha[1], rel=1e-6)
    np.testing.assert_array_equal(clipped, alpha)


def test_dependent_gradients_stay_bounded_after_the_clip():
    rng = np.random.default_rng(7)
    for tasks in (3, 4, 5):
        gradients = rng.normal(size=(tasks, 2)).astype(np.float32)  # more tasks than dimensions
        _, clipped = solve(gradients @ gradients.T)
        assert np.all(np.isfinite(clipped)) and np.all(clipped > 0)
        assert np.linalg.norm(clipped @ gradients.astype(np.float64)) < 1.01
