"""Gradient treatments: each maps the Gram matrix of the tasks' shared gradients to the coefficients c of the
shared update Σ_t c_t·g_t (`core.treated_step`). Decoders keep their own task's plain gradient, except under
GradNorm and MGDA-UB, whose coefficients weight the losses (scope 'all').

Each coefficient function is pure and works on any T×T Gram matrix, so it is checked on tiny vectors by hand; each
constructor takes the method's hyper-parameters (checked there) and returns its `base.Method`.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from auxmtl_jax.errors import UserError
from auxmtl_jax.weighting import solvers
from auxmtl_jax.weighting.base import GRADIENT, REPRESENTATION, Method, check_number, init_empty_state

MGDA_NORMALIZATIONS = ("none", "l2", "loss", "loss+")
CAGRAD_RESCALES = (0, 1, 2)
_EPS = 1e-8


def gradient_norms(gram: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.maximum(jnp.diag(gram), 0.0))


def mgda_coefficients(gram: jax.Array, losses: jax.Array, normalization: str = "none") -> jax.Array:
    """MGDA (Sener & Koltun 2018): the min-norm point of the convex hull of the (normalised) task gradients.

    `normalization` divides g_t by 1 ('none'), ‖g_t‖ ('l2'), L_t ('loss') or L_t·‖g_t‖ ('loss+'); the update is
    the min-norm combination of the normalised gradients.
    """
    scale = {"none": jnp.ones_like(losses), "l2": gradient_norms(gram), "loss": losses,
             "loss+": losses * gradient_norms(gram)}[normalization]
    scale = jnp.maximum(scale, _EPS)
    weights = solvers.min_norm_weights(gram / jnp.outer(scale, scale))
    return weights / scale


def pcgrad_coefficients(gram: jax.Array, rng: jax.Array) -> jax.Array:
    """PCGrad (Yu et al. 2020): each g_i, in turn against every other g_j in a random order, loses its component
    along g_j when the two conflict (g_i·g_j < 0); the update is the sum of the projected gradients.

    A projected gradient stays a combination of the originals, A_i·G, so the projections need only the Gram matrix.
    """
    num_tasks = gram.shape[0]
    combinations = jnp.eye(num_tasks, dtype=gram.dtype)
    for i in range(num_tasks):
        order = jax.random.permutation(jax.random.fold_in(rng, i), num_tasks)
        row = combinations[i]
        for position in range(num_tasks):
            j = order[position]
            dot = row @ gram[:, j]
            conflict = (j != i) & (dot < 0) & (gram[j, j] > 0)
            row = row - jnp.where(conflict, dot / jnp.where(gram[j, j] > 0, gram[j, j], 1.0), 0.0) * jax.nn.one_hot(
                j, num_tasks, dtype=gram.dtype)
        combinations = combinations.at[i].set(row)
    return jnp.sum(combinations, axis=0)


def cagrad_coefficients(gram: jax.Array, c: float = 0.4, rescale: int = 1) -> jax.Array:
    """CAGrad (Liu et al. 2021): d = g0 + (√φ/‖g_w‖)·g_w with g0 the mean gradient, φ = c²‖g0‖² and w the simplex
    weights minimising g_wᵀg0 + √φ‖g_w‖; then divided by 1 (rescale 0), 1 + c² (1, the paper's default) or 1 + c (2).
    """
    num_tasks = gram.shape[0]
    mean = jnp.full((num_tasks,), 1.0 / num_tasks, gram.dtype)
    radius = c * jnp.sqrt(jnp.mean(gram) + _EPS)

    def objective(w):
        return w @ gram @ mean + radius * jnp.sqrt(w @ gram @ w + _EPS)

    w = solvers.minimise_on_simplex(objective, num_tasks)
    coefficients = mean + radius / (jnp.sqrt(w @ gram @ w) + _EPS) * w
    return coefficients / {0: 1.0, 1: 1.0 + c ** 2, 2: 1.0 + c}[rescale]


def imtl_g_coefficients(gram: jax.Array) -> jax.Array:
    """IMTL-G (Liu et al. 2021): the combination Σα_t g_t with Σα_t = 1 whose projections on every unit task
    gradient u_t are equal: α_{2:T} = g_1·Uᵀ(D·Uᵀ)⁻¹ with D rows g_1 − g_t and U rows u_1 − u_t.

    Collinear or zero gradients make D·Uᵀ singular: its pseudo-inverse is used, and equal weights 1/T when even
    that gives no finite answer.
    """
    num_tasks = gram.shape[0]
    if num_tasks == 1:
        return jnp.ones((1,), gram.dtype)
    norms = jnp.maximum(gradient_norms(gram), _EPS)
    unit_dots = gram / norms[None, :]  # [i, j] = g_i·u_j
    target = unit_dots[0, 0] - unit_dots[0, 1:]  # g_1·(u_1 − u_j)
    # (g_1 − g_i)·(u_1 − u_j) for i, j in 2..T
    system = (unit_dots[0, 0] - unit_dots[0, 1:][None, :] - unit_dots[1:, 0][:, None] + unit_dots[1:, 1:])
    rest = jnp.linalg.pinv(system.T) @ target
    alpha = jnp.concatenate([1.0 - jnp.sum(rest, keepdims=True), rest])
    return jnp.where(jnp.all(jnp.isfinite(alpha)), alpha, jnp.full_like(alpha, 1.0 / num_tasks))


def aligned_mtl_coefficients(gram: jax.Array) -> jax.Array:
    """Aligned-MTL (Senushkin et al. 2023): the task gradients' matrix with all its singular values set to the
    smallest non-zero one, σ_min·U·Vᵀ, summed over tasks; as coefficients, σ_min·(G·Gᵀ)^(−½)·1 on the gradients'
    span (eigenvalues below T·ε·λ_max count as zero)."""
    eigenvalues, vectors = jnp.linalg.eigh(gram)
    tolerance = jnp.max(eigenvalues) * gram.shape[0] * jnp.finfo(gram.dtype).eps
    kept = eigenvalues > tolerance
    inverse_sqrt = jnp.where(kept, 1.0 / jnp.sqrt(jnp.where(kept, eigenvalues, 1.0)), 0.0)
    smallest = jnp.sqrt(jnp.min(jnp.where(kept, eigenvalues, jnp.inf)))
    smallest = jnp.where(jnp.any(kept), smallest, 0.0)
    return smallest * (vectors * inverse_sqrt) @ (vectors.T @ jnp.ones(gram.shape[0], gram.dtype))


def nash_mtl_coefficients(gram: jax.Array, max_norm: float = 1.0, iterations: int = 20) -> jax.Array:
    """Nash-MTL (Navon et al. 2022): α with α_i·(g_i·Σ_j α_j g_j) = 1 for every task (the Nash bargaining
    solution, `solvers.nash_bargaining_weights`), the update's norm clipped to `max_norm` (0: no clip) as in the
    reference code.

    At the solution ‖Σ_j α_j g_j‖² = αᵀGα = Σ_i α_i(Gα)_i = T, so the clip rescales α by max_norm/√T whenever
    max_norm < √T (always, at the default 1, for two tasks or more), nearly opposite gradients included. Where no
    solution exists (a non-negative combination of the gradients vanishes) the norm is smaller, √(T − k) for k
    tasks in the cancelling combination, and zero when all take part, so the clip need not apply. The norm is
    evaluated in double-float: with α large along a near-null direction of G, float32 αᵀGα loses its digits.
    """
    alpha = solvers.nash_bargaining_weights(gram, iterations)
    if max_norm > 0:
        norm = jnp.sqrt(jnp.maximum(solvers.quadratic_form(gram, alpha), 0.0))
        alpha = alpha * jnp.minimum(1.0, max_norm / jnp.maximum(norm, _EPS))
    return alpha


def gradnorm_gradient(weights: jax.Array, norms: jax.Array, losses: jax.Array, initial_losses: jax.Array,
                      alpha: float) -> jax.Array:
    """The gradient of GradNorm's loss (Chen et al. 2018) in the loss weights w.

    With G_t = w_t‖g_t‖, r_t = (L_t/L_t(0)) / mean_s(L_s/L_s(0)) and the target mean_s(G_s)·r_t^α held constant,
    the loss Σ_t |G_t − target_t| has gradient sign(G_t − target_t)·‖g_t‖.
    """
    ratios = losses / jnp.maximum(initial_losses, 1e-12)
    relative = ratios / jnp.maximum(jnp.mean(ratios), 1e-12)
    targets = jax.lax.stop_gradient(jnp.mean(weights * norms) * relative ** alpha)
    return jnp.sign(weights * norms - targets) * norms


def renormalised(weights: jax.Array) -> jax.Array:
    """GradNorm's weights after a step: clipped at 0 and rescaled to sum to T."""
    weights = jnp.maximum(weights, 0.0)
    return weights.shape[0] * weights / jnp.maximum(jnp.sum(weights), 1e-12)


def stateless(name: str, coefficients_fn: Callable[[jax.Array, jax.Array, jax.Array], jax.Array], *,
              kind: str = GRADIENT, scope: str = "shared") -> Method:
    """A treatment whose coefficients `coefficients_fn(gram, losses, rng)` depend on nothing else."""
    def update(losses, gram, state, rng, params, names):
        return coefficients_fn(gram, losses, rng), state

    return Method(name, kind, init_empty_state, update, scope=scope)


def _check_normalization(normalization: str) -> None:
    if normalization not in MGDA_NORMALIZATIONS:
        raise UserError(f"config.weighting.mgda.normalization={normalization!r}; expected one of "
                        f"{', '.join(MGDA_NORMALIZATIONS)}.")


def mgda(normalization: str = "none") -> Method:
    """MGDA on the shared parameters' gradients (`mgda_coefficients`)."""
    _check_normalization(normalization)
    return stateless("mgda", lambda gram, losses, rng: mgda_coefficients(gram, losses, normalization))


def mgda_ub(normalization: str = "none") -> Method:
    """MGDA on the gradients of the representation the decoders read (Sener & Koltun's upper bound); its
    coefficients weight the losses. It shares `config.weighting.mgda`'s options."""
    _check_normalization(normalization)
    return stateless("mgda_ub", lambda gram, losses, rng: mgda_coefficients(gram, losses, normalization),
                     kind=REPRESENTATION, scope="all")


def pcgrad() -> Method:
    return stateless("pcgrad", lambda gram, losses, rng: pcgrad_coefficients(gram, rng))


def cagrad(c: float = 0.4, rescale: int = 1) -> Method:
    check_number("cagrad", "c", c, minimum=0, strict=False)
    if rescale not in CAGRAD_RESCALES:
        raise UserError(f"config.weighting.cagrad.rescale={rescale!r}; expected one of {CAGRAD_RESCALES}.")
    c, rescale = float(c), int(rescale)
    return stateless("cagrad", lambda gram, losses, rng: cagrad_coefficients(gram, c, rescale))


def imtl_g() -> Method:
    return stateless("imtl_g", lambda gram, losses, rng: imtl_g_coefficients(gram))


def aligned_mtl() -> Method:
    return stateless("aligned_mtl", lambda gram, losses, rng: aligned_mtl_coefficients(gram))


def nash_mtl(max_norm: float = 1.0, iterations: int = 20) -> Method:
    check_number("nash_mtl", "max_norm", max_norm, minimum=0, strict=False)
    check_number("nash_mtl", "iterations", iterations, minimum=1, strict=False, integer=True)
    max_norm, iterations = float(max_norm), int(iterations)
    return stateless("nash_mtl", lambda gram, losses, rng: nash_mtl_coefficients(gram, max_norm, iterations))


class GradNormState(NamedTuple):
    weights: jax.Array  # the loss weights of the next step
    opt_state: Any  # their Adam state
    initial_losses: jax.Array  # L(0), recorded at the first step
    started: jax.Array  # whether L(0) is recorded


def gradnorm(alpha: float = 1.5, learning_rate: float = 0.025) -> Method:
    """GradNorm: loss weights that balance the tasks' gradient norms on the shared encoder (all its parameters,
    not only the last layer) at rates set by each loss's progress since step 0; α = 1.5 (the paper's NYUv2 value).
    The weights move by Adam at `learning_rate`, so their step does not depend on the gradients' scale (the paper
    trains them with the network's optimiser), and are renormalised to sum to T after each step. A treatment
    because it reads the per-task gradients; its coefficients weight the losses, so every parameter (scope 'all')."""
    check_number("gradnorm", "learning_rate", learning_rate, minimum=0, strict=True)
    check_number("gradnorm", "alpha", alpha, minimum=0, strict=False)
    alpha = float(alpha)
    tx = optax.adam(float(learning_rate))

    def init(names: Sequence[str]) -> GradNormState:
        weights = jnp.ones((len(names),), jnp.float32)
        return GradNormState(weights=weights, opt_state=tx.init(weights), initial_losses=jnp.ones_like(weights),
                             started=jnp.zeros((), jnp.bool_))

    def update(losses, gram, state: GradNormState, rng, params, names):
        initial = jnp.where(state.started, state.initial_losses, losses)
        gradient = gradnorm_gradient(state.weights, gradient_norms(gram), losses, initial, alpha)
        updates, opt_state = tx.update(gradient, state.opt_state, state.weights)
        new_weights = renormalised(optax.apply_updates(state.weights, updates))
        return state.weights, GradNormState(weights=new_weights, opt_state=opt_state, initial_losses=initial,
                                            started=jnp.ones((), jnp.bool_))

    return Method("gradnorm", GRADIENT, init, update, scope="all")
