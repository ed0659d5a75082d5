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


# Double-float arithmetic: a value is a pair (hi, lo) of float32 arrays whose exact sum it is, |lo| ≤ ½ulp(hi),
# good to about 2⁻⁴⁸ relative: enough to resolve what float32 loses to cancellation in G·α when gradients nearly
# cancel. The error-free transformations (Dekker, Knuth) use no fused multiply-add and no float64, and split on the
# bits, so a compiler that contracts a·b + c into one rounding cannot change them.
DoubleFloat = tuple  # (hi, lo)


def _split(a: jax.Array) -> DoubleFloat:
    """a = hi + lo exactly with hi rounded to 12 significant bits, so products of halves are exact in float32."""
    bits = jax.lax.bitcast_convert_type(a, jnp.uint32)
    hi = jax.lax.bitcast_convert_type((bits + jnp.uint32(0x800)) & jnp.uint32(0xFFFFF000), jnp.float32)
    return hi, a - hi


def _two_sum(a: jax.Array, b: jax.Array) -> DoubleFloat:
    s = a + b
    v = s - a
    return s, (a - (s - v)) + (b - v)


def _quick_two_sum(a: jax.Array, b: jax.Array) -> DoubleFloat:  # needs |a| ≥ |b|
    s = a + b
    return s, b - (s - a)


def _two_product(a: jax.Array, b: jax.Array) -> DoubleFloat:
    """a·b from the four exact products of halves. Dekker's form, which corrects the rounded a·b, is not used:
    XLA contracts that product into a fused multiply-add in some uses and not in others (seen on CPU)."""
    a_hi, a_lo = _split(a)
    b_hi, b_lo = _split(b)
    s, e = _two_sum(a_hi * b_hi, a_hi * b_lo)
    s, f = _two_sum(s, a_lo * b_hi)
    return _quick_two_sum(s, (e + f) + a_lo * b_lo)


def df_add(x: DoubleFloat, y: DoubleFloat) -> DoubleFloat:
    """x + y to within about 2⁻⁴⁷·(|x| + |y|): relative to the operands, not to a sum that cancels them, which is
    what a residual needs (and half the work of the add that is accurate relative to the sum)."""
    s, e = _two_sum(x[0], y[0])
    return _quick_two_sum(s, e + (x[1] + y[1]))


def df_neg(x: DoubleFloat) -> DoubleFloat:
    return -x[0], -x[1]


def df_mul(x: DoubleFloat, y: DoubleFloat) -> DoubleFloat:
    p, e = _two_product(x[0], y[0])
    return _quick_two_sum(p, e + (x[0] * y[1] + x[1] * y[0]))


def df_div(x: DoubleFloat, y: DoubleFloat) -> DoubleFloat:
    first = x[0] / y[0]
    rest = df_add(x, df_neg(df_mul(y, (first, jnp.zeros_like(first)))))
    return _quick_two_sum(first, rest[0] / y[0])


def df_sum(x: DoubleFloat, axis: int = -1) -> DoubleFloat:
    """The sum along a (short, static) axis, one double-float addition at a time."""
    hi, lo = jnp.moveaxis(x[0], axis, 0), jnp.moveaxis(x[1], axis, 0)
    total = (hi[0], lo[0])
    for i in range(1, hi.shape[0]):
        total = df_add(total, (hi[i], lo[i]))
    return total


def df_matvec(matrix: jax.Array, x: jax.Array) -> DoubleFloat:
    """matrix·x for float32 matrix and vector, to double-float accuracy (every product is exact)."""
    return df_sum(_two_product(matrix, x[None, :]))


def df_dot(x: DoubleFloat, y: jax.Array) -> DoubleFloat:
    return df_sum(df_mul(x, (y, jnp.zeros_like(y))))


def quadratic_form(matrix: jax.Array, x: jax.Array) -> jax.Array:
    """xᵀ·matrix·x, rounded once to float32 from a double-float evaluation: accurate even when x's terms cancel
    (x large along a near-null direction of the matrix), where float32 `x @ matrix @ x` loses every digit."""
    return df_dot(df_matvec(matrix, x), x)[0]


def _df_eliminate(matrix: DoubleFloat, rhs: DoubleFloat) -> tuple[DoubleFloat, DoubleFloat]:
    """Gaussian elimination without pivoting of a small double-float system: (upper triangle, its right-hand side).
    All pivots (the upper triangle's diagonal) are positive if and only if the matrix is positive definite."""
    index = jnp.arange(matrix[0].shape[0])

    def eliminate(k, system):
        (hi, lo), (b_hi, b_lo) = system
        factor = df_div((hi[:, k], lo[:, k]), (hi[k, k], lo[k, k]))
        factor = tuple(jnp.where(index > k, part, 0.0) for part in factor)
        update = df_mul((factor[0][:, None], factor[1][:, None]), (hi[k][None, :], lo[k][None, :]))
        return df_add((hi, lo), df_neg(update)), df_add((b_hi, b_lo), df_neg(df_mul(factor, (b_hi[k], b_lo[k]))))

    return jax.lax.fori_loop(0, index.shape[0] - 1, eliminate, (matrix, rhs))


def df_solve(matrix: DoubleFloat, rhs: DoubleFloat) -> DoubleFloat:
    """x with matrix·x = rhs for a small symmetric positive-definite double-float matrix (elimination without
    pivoting is stable for such matrices)."""
    n = matrix[0].shape[0]
    (hi, lo), (b_hi, b_lo) = _df_eliminate(matrix, rhs)

    def substitute(step, x):  # x_k from the rows below, unknown entries still zero
        k = n - 1 - step
        known = df_sum(df_mul((hi[k], lo[k]), x))
        entry = df_div(df_add((b_hi[k], b_lo[k]), df_neg(known)), (hi[k, k], lo[k, k]))
        return x[0].at[k].set(entry[0]), x[1].at[k].set(entry[1])

    return jax.lax.fori_loop(0, n, substitute, (jnp.zeros_like(b_hi), jnp.zeros_like(b_lo)))


def _shifted(matrix: jax.Array, shift: DoubleFloat) -> DoubleFloat:
    """matrix + shift·I as a double-float matrix."""
    diagonal = df_add((jnp.diag(matrix), jnp.zeros_like(shift[0])), shift)
    on_diagonal = jnp.diag_indices(matrix.shape[0])
    return matrix.at[on_diagonal].set(diagonal[0]), jnp.zeros_like(matrix).at[on_diagonal].set(diagonal[1])


def definiteness_shift(matrix: jax.Array, steps: int = 40) -> jax.Array:
    """The least s in [2⁻⁶⁰, T·max|matrix|] (to a relative 2⁻³⁴) with matrix + s·I positive definite by a
    double-float elimination test, or 2⁻⁶⁰ if matrix already is: how far rounding left a float32 Gram matrix of
    dependent vectors from positive semi-definite (the test resolves eigenvalues to about 1e-14·‖matrix‖)."""
    num = matrix.shape[0]
    zeros = jnp.zeros((num,), jnp.float32)

    def definite(log_shift):
        shift = jnp.full((num,), jnp.exp2(log_shift), jnp.float32)
        upper, _ = _df_eliminate(_shifted(matrix, (shift, zeros)), (zeros, zeros))
        return jnp.all(jnp.diag(upper[0]) > 0)

    low = jnp.float32(-60.0)
    high = jnp.log2(num * jnp.maximum(jnp.max(jnp.abs(matrix)), 1e-30)) + 1.0

    def bisect(_, bracket):
        low, high = bracket
        middle = 0.5 * (low + high)
        ok = definite(middle)
        return jnp.where(ok, low, middle), jnp.where(ok, middle, high)

    _, high = jax.lax.fori_loop(0, steps, bisect, (low, high))
    return jnp.exp2(jnp.where(definite(low), low, high))


NASH_RIDGE = 1e-12  # on the scale where the Gram's diagonal is near 1; see nash_bargaining_weights


def _power_of_two_scale(diagonal: jax.Array) -> jax.Array:
    """2^k with 2^(2k)·d within a factor 2 of 1 for each diagonal entry d (zero and tiny ones count as 1e-30 of
    the largest); scaling by it is exact in floating point."""
    floor = jnp.maximum(1e-30 * jnp.max(diagonal), jnp.finfo(jnp.float32).tiny)
    exponent = jnp.clip(jnp.round(-0.5 * jnp.log2(jnp.maximum(diagonal, floor))), -63, 63).astype(jnp.int32)
    return jax.lax.bitcast_convert_type((exponent + 127) << 23, jnp.float32)


def _newton_step_size(beta: jax.Array, step: jax.Array, decrement2: jax.Array, curvature: jax.Array,
                      refinements: int = 8) -> jax.Array:
    """The minimiser s of F(β + s·p) for Nash's objective F along the Newton direction p (exact line search).

    φ'(s) = −λ² + s·(pᵀM̃p + Σ p_i²/(β_i(β_i + s·p_i))) is increasing on the steps that keep β + s·p > 0; its root
    is bracketed on a grid of powers of √2 from 2⁻¹⁰ to 2³⁰ and refined by bisection. With λ² = −∇Fᵀp the Newton
    decrement, the terms need no cancellation, so float32 finds s.
    """
    def slope(s):
        moved = beta + s[..., None] * step
        terms = jnp.sum(step ** 2 / (beta * jnp.where(moved > 0, moved, 1.0)), axis=-1)
        return jnp.where(jnp.all(moved > 0, axis=-1), s * (curvature + terms) - decrement2, jnp.inf)

    grid = 2.0 ** (jnp.arange(-20, 61, dtype=jnp.float32) / 2)
    below = slope(grid) <= 0
    count = jnp.sum(below)
    low = jnp.where(count > 0, grid[jnp.maximum(count - 1, 0)], 0.0)
    high = jnp.where(count < grid.shape[0], grid[jnp.minimum(count, grid.shape[0] - 1)], grid[-1])

    def bisect(_, bracket):
        low, high = bracket
        middle = 0.5 * (low + high)
        negative = slope(middle) <= 0
        return jnp.where(negative, middle, low), jnp.where(negative, high, middle)

    low, high = jax.lax.fori_loop(0, refinements, bisect, (low, high))
    return jnp.where(low > 0, low, 0.5 * high)


def nash_bargaining_weights(gram: jax.Array, iterations: int = 20) -> jax.Array:
    """The α > 0 with (gram·α)_i = 1/α_i (Nash-MTL's bargaining solution, Navon et al. 2022), in float32 to about
    1e-6 relative also for nearly opposite gradients (cosine −0.999999, where α is ~10³ times its usual size).

    With P = diag(2^k) bringing gram's diagonal within a factor 2 of 1 (exactly, being powers of two), α = P·β where
    β minimises the strictly convex, self-concordant F(β) = ½βᵀM̃β − Σ log β_i, M̃ = P·gram·P + ρI. From the best
    multiple of (1, …, 1), each of `iterations` Newton steps p = −H⁻¹∇F moves by the exact line search along p (the
    full step once the Newton decrement is below ¼, where Newton converges quadratically): about 10 steps reach
    float32 rounding even at cosine −0.999999. When gradients nearly cancel, M̃β is a small difference of large
    terms and H = M̃ + diag(β⁻²) is ill-conditioned, so ∇F, H and the solve are evaluated in double-float (pairs of
    float32, about 48 bits); β itself stays float32.

    The ridge ρ = 1e-12 moves the solution by about ρ/(2λ_min) relative, λ_min the smallest eigenvalue of P·gram·P
    (5e-7 at cosine −0.999999 between two tasks; above 1e-4 only for λ_min < 5e-9, where float32 hardly tells the
    gradients from dependent ones). Its purpose is the case with no solution: where the Gram is singular with a
    non-negative null vector v (a non-negative combination Σ v_i g_i of the gradients vanishes: exactly opposite
    gradients, a zero gradient, any gradients that are Pareto-stationary together), F is unbounded below and the
    exact α diverges along v. The ridge caps β along v near ρ^(−½) = 10⁶ (reached within about 15 steps); that
    combination cancels in the update, which is then the bargaining solution of the other tasks on the orthogonal
    complement of the cancelling gradients, of squared norm αᵀ·gram·α = T − |support of v|: zero when every task
    takes part in the cancellation. A Gram that rounding left indefinite (float32 Grams of dependent gradients can
    be) is first shifted to positive semi-definite (`definiteness_shift`), so it is treated as such a singular one.
    """
    gram = gram.astype(jnp.float32)
    num_tasks = gram.shape[0]
    scale = _power_of_two_scale(jnp.diag(gram))
    matrix = gram * jnp.outer(scale, scale)
    ridge = NASH_RIDGE + definiteness_shift(matrix)

    def gradient_of_f(beta):  # M̃β − 1/β in double-float
        inverse = df_div((jnp.ones_like(beta), jnp.zeros_like(beta)), (beta, jnp.zeros_like(beta)))
        ridged = df_add(df_matvec(matrix, beta), _two_product(ridge, beta))
        return df_add(ridged, df_neg(inverse)), inverse

    def curvature_along(step):  # pᵀM̃p
        return df_dot(df_add(df_matvec(matrix, step), _two_product(ridge, step)), step)[0]

    def body(_, beta):
        gradient, inverse = gradient_of_f(beta)
        ridge_pair = (jnp.full_like(beta, ridge), jnp.zeros_like(beta))
        hessian = _shifted(matrix, df_add(ridge_pair, df_mul(inverse, inverse)))
        step = df_neg(df_solve(hessian, gradient))[0]
        decrement2 = jnp.maximum(-df_dot(gradient, step)[0], 0.0)
        size = jnp.where(decrement2 < 1.0 / 16, 1.0,
                         _newton_step_size(beta, step, decrement2, curvature_along(step)))
        stepped = beta + size * step
        return jnp.where(jnp.all(jnp.isfinite(stepped) & (stepped > 0)), stepped, beta)

    ones = jnp.ones((num_tasks,), jnp.float32)
    start = ones * jnp.sqrt(num_tasks / jnp.maximum(quadratic_form(matrix, ones) + num_tasks * ridge,
                                                    num_tasks * NASH_RIDGE))
    beta = jax.lax.fori_loop(0, iterations, body, start)
    return scale * beta
