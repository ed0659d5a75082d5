"""Gradient treatments at about one backward pass: the heads' backward once, then the shared part's alone per task.

The loss terms are `heads ∘ shared` (`SplitLoss`). Each task-specific module (a decoder, an aux module, a deep-
supervision head) reads its own copy of the shared representation, so ONE ordinary backward pass of Σ terms gives
every task-specific parameter's plain gradient and, on each copy, the gradient of the losses of the module that
reads it. A treatment then needs only the shared part's per-task gradients: the shared part's VJP (alone) for each
of the T task cotangents (plus one row for the sum of the unweighted terms). Today's alternative
(`core.treated_step`) pushes every task row through every decoder; the two give the same update up to float32
rounding (tests/weighting/test_split_backward.py).

`space='representation'` solves on the copies' gradients instead (the representation the decoders read; LibMTL's
`rep_grad`, Sener & Koltun's MGDA-UB), then runs the shared VJP once with the combined cotangent: equal weighting's
cost, an approximation of the parameter-space treatment (docs/weightings.md).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from auxmtl_jax.weighting.base import combine, owner_keys, partition, term_name, weighted_keys
from auxmtl_jax.weighting.chaining import Chain
from auxmtl_jax.weighting.core import Weighted, objective_value, shared_gram, solve, with_weighting_grads

# How the shared part's per-task VJPs run: "unrolled" (one ordinary backward pass per row) or "vmap" (one batched
# pass). Unrolled reads 38% fewer bytes at the demo size (XLA's estimate, 2.28 vs 3.84 GB for Auxi-all/PCGrad) and
# ran Auxi-all/PCGrad at 1.01x Joint/PCGrad against vmap's 1.15x (docs/benchmarks.md); vmap compiles faster.
SHARED_ROWS = "unrolled"
PARAMETERS = "parameters"
REPRESENTATION_SPACE = "representation"
SPACES = (PARAMETERS, REPRESENTATION_SPACE)


class SplitLoss(NamedTuple):
    """The loss terms as `heads ∘ shared`.

    shared(params) -> (representation, shared_aux): reads only the shared parameters (`base.partition`).
    heads(params, copies) -> (terms, heads_aux): `copies` maps every key of `term_keys` to a representation; the
        module behind term `k` reads `copies[k]` only.
    merge_aux(shared_aux, heads_aux): what the whole forward's aux would be (new BatchNorm statistics).
    own_copies: False when a term's value also depends on another term's copy (Auxi-NAS cells read earlier tasks'
        cells); such terms are summed into one row, never treated apart.
    """

    shared: Callable[[Any], tuple[Any, Any]]
    heads: Callable[[Any, Mapping[str, Any]], tuple[Mapping[str, jax.Array], Any]]
    term_keys: tuple[str, ...]
    merge_aux: Callable[[Any, Any], Any]
    own_copies: bool = True


def tree_stack(trees: list[Any]) -> Any:
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def tree_sum(trees: list[Any]) -> Any:
    return jax.tree.map(lambda *leaves: sum(leaves[1:], leaves[0]), *trees)


def shared_rows(shared_vjp, cotangents):
    """The shared part's gradient for each row of the stacked `cotangents`, stacked the same way."""
    if SHARED_ROWS == "vmap":
        return jax.vmap(shared_vjp)(cotangents)[0]
    count = jax.tree.leaves(cotangents)[0].shape[0]
    return tree_stack([shared_vjp(jax.tree.map(lambda leaf, index=index: leaf[index], cotangents))[0]
                       for index in range(count)])


def split_treated_step(chain: Chain, split: SplitLoss, aux_as_tasks: bool, space: str = PARAMETERS):
    """The treatment of `chain` (after its loss weighting, if any) on the split loss; same conventions as
    `core.treated_step` (scope 'shared': decoders keep their task's gradient, w_t·g_t after a loss weighting;
    scope 'all': c_t scales every parameter of task t)."""
    scope_all = chain.treatment.scope == "all"
    in_representation = space == REPRESENTATION_SPACE

    def step(params, state: dict, rng: jax.Array) -> Weighted:
        shared_params, specific_params = partition(params)
        representation, shared_vjp, shared_aux = jax.vjp(
            lambda shared: split.shared(combine(shared, specific_params)), shared_params, has_aux=True)
        copies = {key: representation for key in split.term_keys}
        terms, heads_vjp, heads_aux = jax.vjp(
            lambda specific, copies: split.heads(combine(shared_params, specific), copies),
            specific_params, copies, has_aux=True)
        specific_grads, copy_grads = heads_vjp({key: jnp.ones_like(value) for key, value in terms.items()})

        keys = weighted_keys(terms, aux_as_tasks)
        names = tuple(term_name(key) for key in keys)
        others = [key for key in terms if key not in keys]
        num_tasks = len(keys)
        cotangents = tree_stack([copy_grads[key] for key in keys]
                                + ([tree_sum([copy_grads[key] for key in others])] if others else []))
        if in_representation:
            rows = jax.tree.map(lambda leaf: leaf[:num_tasks], cotangents)
        else:
            rows = shared_rows(shared_vjp, cotangents)
        gram = shared_gram(rows, jax.tree.map(lambda _: True, rows), num_tasks)
        losses = jnp.stack([terms[key] for key in keys])
        coefficients, new_state, weighting_grads = solve(chain, losses, gram, state, rng, params, terms, keys)

        def combined(row):
            grad = jnp.tensordot(coefficients.shared.astype(row.dtype), row[:num_tasks], axes=1)
            return grad + row[num_tasks] if others else grad

        if in_representation:
            (shared_grads,) = shared_vjp(jax.tree.map(combined, cotangents))
        else:
            shared_grads = jax.tree.map(combined, rows)
        if scope_all:
            own = coefficients.shared
        elif chain.weighting is not None:
            own = jax.lax.stop_gradient(coefficients.loss)
        else:
            own = None
        scale = {} if own is None else {key: own[index] for index, key in enumerate(keys)}
        specific_grads = jax.tree.map(
            lambda grad, owner: grad * scale[owner].astype(grad.dtype) if owner in scale else grad,
            specific_grads, owner_keys(specific_params))
        grads = with_weighting_grads(combine(shared_grads, specific_grads), weighting_grads)
        total = objective_value(coefficients, losses, terms, keys)
        return Weighted(total, dict(terms), split.merge_aux(shared_aux, heads_aux), grads, new_state,
                        dict(zip(names, coefficients.shared)), gram)

    return step
