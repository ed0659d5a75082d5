"""Gradient magnitudes of sampled shared-encoder parameters (paper Fig. 5).

The paper samples parameters of the shared conv layers and follows their mean gradient magnitude during training,
for Joint vs Auxi runs. Use from a training loop (only on gradient-logging steps, so ordinary steps pay nothing):

    coordinates = sample_coordinates(params['main']['encoder'], samples_per_layer=N, seed=S)   # once, at start
    entries = gradient_log_entries(loss_parts_fn, params, coordinates)                          # jit-able

    sample_coordinates(encoder_params, *, samples_per_layer: int, seed: int = 0,
                       layers: Sequence[str] | None = None) -> dict[str, np.ndarray]
    gradient_log_entries(loss_parts_fn, params, coordinates) -> dict[str, jax.Array]

`loss_parts_fn(encoder_params) -> (main_loss, aux_loss)` returns two scalars and closes over everything else
(the rest of `params`, batch statistics, the batch); `aux_loss` may be a constant 0 for runs without aux modules.
The entries are `grad/<layer>` (the gradient of main + aux loss), `grad_main/<layer>` and `grad_aux/<layer>`, each
the mean |gradient| over the layer's sampled coordinates, as 0-d float32 arrays (call `float` on them, after the
jitted function returns, to write them to metrics.jsonl). `<layer>` is the '/'-joined path of a conv kernel inside
the encoder params, e.g. `block3/expand/Conv_0/kernel`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from auxmtl_jax.errors import UserError

PyTree = Any
LOG_PREFIXES = ("grad", "grad_main", "grad_aux")


def depth_order_key(layer: str) -> tuple:
    """Sort key putting layer paths in approximate network order: `stem` first, digits compared as numbers."""
    natural = [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", layer)]
    return (0 if layer.startswith("stem") else 1, natural)


def _key_name(key) -> str:
    """The readable name of one pytree path entry (dict key, attribute or sequence index)."""
    for attribute in ("key", "name", "idx"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def _leaves_by_path(tree: PyTree) -> dict[str, Any]:
    """Maps the '/'-joined path of every leaf to the leaf."""
    return {"/".join(_key_name(k) for k in path): leaf for path, leaf in jax.tree.flatten_with_path(tree)[0]}


def encoder_conv_layers(encoder_params: PyTree) -> list[str]:
    """Paths of the conv kernels (4-D leaves named `kernel`) in an encoder's params, in approximate depth order."""
    return sorted(
        (
            path
            for path, leaf in _leaves_by_path(encoder_params).items()
            if path.rsplit("/", 1)[-1] == "kernel" and np.ndim(leaf) == 4
        ),
        key=depth_order_key,
    )


def _layer_rng(seed: int, layer: str, shape: Sequence[int]) -> np.random.Generator:
    """An RNG that depends only on (seed, layer path, kernel shape), so samples survive changes elsewhere."""
    token = f"{int(seed)}|{layer}|{'x'.join(str(int(d)) for d in shape)}".encode()
    return np.random.default_rng(int.from_bytes(hashlib.sha256(token).digest()[:16], "little"))


def sample_coordinates(
    encoder_params: PyTree,
    *,
    samples_per_layer: int,
    seed: int = 0,
    layers: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
    """A fixed random sample of flat kernel indices per conv layer (every index when the layer is smaller).

    Each layer's sample depends only on seed, layer path and kernel shape, never on parameter values, so two runs
    with the same encoder (e.g. Joint and Auxi-T2) track exactly the same parameters. Indices are sorted int32.
    """
    if isinstance(samples_per_layer, bool) or not isinstance(samples_per_layer, (int, np.integer)):
        raise UserError(f"samples_per_layer must be an int, got {samples_per_layer!r}")
    if samples_per_layer < 1:
        raise UserError(f"samples_per_layer must be >= 1, got {samples_per_layer}")
    available = encoder_conv_layers(encoder_params)
    if not available:
        raise ValueError("encoder params contain no conv kernels (4-D leaves named 'kernel'); pass "
                         "params['main']['encoder']")
    if layers is None:
        layers = available
    unknown = [layer for layer in layers if layer not in available]
    if unknown:
        raise UserError(f"unknown encoder conv layer(s) {unknown}; expected some of {available}")
    leaves = _leaves_by_path(encoder_params)
    coordinates = {}
    for layer in layers:
        shape = np.shape(leaves[layer])
        size = int(np.prod(shape))
        if size <= samples_per_layer:
            coordinates[layer] = np.arange(size, dtype=np.int32)
        else:
            chosen = _layer_rng(seed, layer, shape).choice(size, samples_per_layer, replace=False)
            coordinates[layer] = np.sort(chosen).astype(np.int32)
    return coordinates


def mean_abs_grad(encoder_grads: PyTree, coordinates: Mapping[str, Any]) -> dict[str, jax.Array]:
    """Mean |gradient| over the sampled coordinates of each layer of an encoder gradient pytree (jit-able)."""
    leaves = _leaves_by_path(encoder_grads)
    missing = [layer for layer in coordinates if layer not in leaves]
    if missing:
        raise ValueError(f"sampled layer(s) {missing} not found in the encoder gradients; were the coordinates "
                         f"sampled from a different encoder? gradient leaves: {sorted(leaves)}")
    return {
        layer: jnp.mean(jnp.abs(jnp.take(jnp.ravel(leaves[layer]), jnp.asarray(indices))))
        for layer, indices in coordinates.items()
    }


def split_encoder_gradient(
    loss_parts_fn: Callable[[PyTree], tuple[Any, Any]], encoder_params: PyTree
) -> tuple[PyTree, PyTree]:
    """(main part, aux part): gradients of `main_loss` and of `aux_loss` w.r.t. the encoder params.

    `loss_parts_fn(encoder_params) -> (main_loss, aux_loss)`; `aux_loss` may be a constant (then its part is 0).
    One forward pass and two pull-backs (not a vmapped Jacobian: XLA cannot batch grouped-conv transposes, which
    depthwise encoders need). Their sum is the gradient of main_loss + aux_loss.
    """

    def losses(encoder):
        main_loss, aux_loss = loss_parts_fn(encoder)
        main_loss = jnp.asarray(main_loss)
        if main_loss.shape != () or jnp.shape(aux_loss) != ():
            raise ValueError(f"loss_parts_fn must return two scalars (main_loss, aux_loss); got shapes "
                             f"{main_loss.shape} and {jnp.shape(aux_loss)}")
        return main_loss, jnp.asarray(aux_loss, main_loss.dtype)

    (main_loss, aux_loss), pull_back = jax.vjp(losses, encoder_params)
    (main_part,) = pull_back((jnp.ones_like(main_loss), jnp.zeros_like(aux_loss)))
    (aux_part,) = pull_back((jnp.zeros_like(main_loss), jnp.ones_like(aux_loss)))
    return main_part, aux_part


def gradient_log_entries(
    loss_parts_fn: Callable[[PyTree], tuple[Any, Any]],
    params: Mapping[str, Any],
    coordinates: Mapping[str, Any],
) -> dict[str, jax.Array]:
    """The `grad/<layer>`, `grad_main/<layer>`, `grad_aux/<layer>` entries of a metrics.jsonl train line (jit-able).

    `params` is the full training params tree; the gradient is taken w.r.t. `params['main']['encoder']`.
    """
    main = params.get("main") if isinstance(params, Mapping) else None
    if not isinstance(main, Mapping) or "encoder" not in main:
        top = list(params) if isinstance(params, Mapping) else type(params).__name__
        raise ValueError(f"params must hold the encoder at params['main']['encoder']; got top level {top}")
    main_part, aux_part = split_encoder_gradient(loss_parts_fn, params["main"]["encoder"])
    total = jax.tree.map(jnp.add, main_part, aux_part)
    entries = {}
    for prefix, grads in zip(LOG_PREFIXES, (total, main_part, aux_part)):
        for layer, value in mean_abs_grad(grads, coordinates).items():
            entries[f"{prefix}/{layer}"] = value
    return entries
