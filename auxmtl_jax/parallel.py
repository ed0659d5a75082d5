"""Data parallelism: one `('data',)` mesh over all devices, batch sharded, everything else replicated.

Works unchanged on one CPU, several GPUs, a TPU slice and several hosts (after `initialize_distributed`); each
host feeds its own share of the global batch. Several processes are coordinated by `coordination`: timeouts as
config fields, barriers after compilation, and a watchdog that stops the survivors of a lost process.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from auxmtl_jax import coordination
from auxmtl_jax.errors import UserError

DATA_AXIS = "data"


def initialize_distributed(distributed_cfg) -> None:
    """Starts multi-host JAX when the config names a coordinator (or always, when more processes are given), with
    the config's timeouts; then the watchdog that stops this process when a peer is lost (`coordination`)."""
    coordination.initialize(distributed_cfg)


def create_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D data mesh over the first `num_devices` devices (all of them when None)."""
    devices = jax.devices()
    if num_devices is not None:
        if not 1 <= num_devices <= len(devices):
            raise UserError(f"config.num_devices={num_devices} but {len(devices)} device(s) are available.")
        if jax.process_count() > 1 and num_devices != len(devices):
            raise UserError("config.num_devices must be unset for multi-host runs (every device is used).")
        devices = devices[:num_devices]
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch_size(global_batch_size: int, mesh: Mesh, key: str) -> None:
    """The global batch must split evenly over devices and hosts."""
    divisor = int(np.lcm(mesh.size, jax.process_count()))
    if global_batch_size % divisor:
        raise UserError(f"{key}={global_batch_size} must be divisible by the {mesh.size} device(s) "
                         f"and {jax.process_count()} host(s) of the mesh.")


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each host's share into globally sharded arrays (batch axis split over `data`)."""
    sharding = batch_sharding(mesh)
    return {key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
            for key, value in local_batch.items()}

