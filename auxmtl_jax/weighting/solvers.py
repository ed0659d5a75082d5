"""Small convex solves on a T×T Gram matrix, in fixed iteration counts so they stay inside the jitted step."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

LineSearch = Callable[[jax.Array, jax.Array], jax.Array]  # (w, direction) -> step in [0, 1]


def frank_wolfe(gradient: Callable[[jax.Array], jax.Array], line_search: LineSearch, num_tasks: int,
                iterations: int) -> jax.Array:
    """Minimises a convex function over the probability simplex from its centre by pairwise Frank-Wolfe: each
    iteration moves weight from the worst task in use to the vertex of steepest descent, by the fraction of the
    movable weight that `line_search(w, direction)` chooses. Unlike plain Frank-Wolfe it does not zigzag near a
    face, and converges linearly on these problems."""

    def body(_, w):
        slope = gradient(w)
        to = jnp.argmin(slope)
        away = jnp.argmax(jnp.where(w > 0, slope, -jnp.inf))
        direction = w[away] * (jax.nn.one_hot(to, num_tasks, dtype=w.dtype)
                               - jax.nn.one_hot(away, num_tasks, dtype=w.dtype))
        return jnp.maximum(w + line_search(w, direction) * direction, 0.0)

    return jax.lax.fori_loop(0, iterations, body, jnp.full((num_tasks,), 1.0 / num_tasks, jnp.float32))


def min_norm_weights(gram: jax.Array, iterations: int = 100) -> jax.Array:
    """argmin_{w in simplex} wᵀ·gram·w: the weights of the min-norm point of the gradients' convex hull (MGDA).

    The line search is exact: along w + γd the quadratic is minimised at γ = −dᵀGw / dᵀGd, clipped to [0, 1].
    """
    def exact_step(w, direction):
        curvature = direction @ gram @ direction
        slope = direction @ gram @ w
        return jnp.where(curvature > 0, jnp.clip(-slope / jnp.where(curvature > 0, curvature, 1.0), 0.0, 1.0), 0.0)

    return frank_wolfe(lambda w: 2.0 * gram @ w, exact_step, gram.shape[0], iterations)


def grid_line_search(objective: Callable[[jax.Array], jax.Array], points: int = 65) -> LineSearch:
    """A line search for any 1-D convex objective: the best of `points` steps on [0, 1], then of `points` steps
    around it (resolution 2/(points−1)², here 1/2048)."""
    coarse = jnp.linspace(0.0, 1.0, points)
    fine = jnp.linspace(-1.0, 1.0, points) / (points - 1)

    def search(w, direction):
        best = coarse[jnp.argmin(jax.vmap(lambda step: objective(w + step * direction))(coarse))]
        candidates = jnp.clip(best + fine, 0.0, 1.0)
        return candidates[jnp.argmin(jax.vmap(lambda step: objective(w + step * direction))(candidates))]

    return search


def minimise_on_simplex(objective: Callable[[jax.Array], jax.Array], num_tasks: int,
                        iterations: int = 100) -> jax.Array:
    """argmin over the simplex of a smooth convex `objective`, by Frank-Wolfe with `grid_line_search`."""
    return frank_wolfe(jax.grad(objective), grid_line_search(objective), num_tasks, iterations)


def nash_bargaining_weights(gram: jax.Array, iterations: int = 20) -> jax.Array:
    """The α > 0 with (gram·α)_i = 1/α_i (Nash-MTL's bargaining solution, Navon et al. 2022).

    With D = diag(gram)^(−½), α = D·β where β solves the same condition for the unit-diagonal D·gram·D, so tasks
    whose gradients differ in size by orders of magnitude solve as well as equal ones. β minimises the strictly
    convex, self-concordant F(β) = ½βᵀMβ − Σ log β_i, found by damped Newton steps (step 1/(1 + Newton decrement)
    keeps β > 0) from the solution for orthogonal gradients. A ridge of 1e-6 keeps F bounded below when gradients
    are collinear (for nearly opposite gradients it caps β near 10³, where the update's norm clip governs anyway),
    and a step that float32 cannot resolve is not taken.
    """
    num_tasks = gram.shape[0]
    diagonal = jnp.diag(gram)
    floor = 1e-30 * jnp.maximum(jnp.max(diagonal), 1e-30)
    inverse_sqrt = 1.0 / jnp.sqrt(jnp.maximum(diagonal, floor))
    unit = gram * jnp.outer(inverse_sqrt, inverse_sqrt) + 1e-6 * jnp.eye(num_tasks, dtype=gram.dtype)

    def body(_, beta):
        gradient = unit @ beta - 1.0 / beta
        hessian = unit + jnp.diag(1.0 / beta ** 2)
        newton = jnp.linalg.solve(hessian, gradient)
        decrement = jnp.sqrt(jnp.maximum(gradient @ newton, 0.0))
        stepped = beta - newton / (1.0 + decrement)
        return jnp.where(jnp.all(jnp.isfinite(stepped)), stepped, beta)

    beta = jax.lax.fori_loop(0, iterations, body, jnp.ones((num_tasks,), gram.dtype))
    return inverse_sqrt * beta
