"""How many threads and worker processes the input pipeline uses: sized from this host's cores unless the config
says (`config.input.num_workers`, `config.input.num_threads`; None = sized here).

The rule (docs/data.md "Input pipeline"), with `cores` = the cores this process may run on
(`os.sched_getaffinity`, else `os.cpu_count()`):

- workers: 0 (augment in the training process) below `MIN_CORES_FOR_WORKERS` cores, where a worker process only
  adds a copy of every batch and steals the core the training step needs; else half the cores, at most
  `MAX_AUTO_WORKERS` (each worker is a Python process with its own imports and buffers). The other half stays
  with the training process: its step dispatch, host-to-device copies, checkpoints and evaluation.
- threads per augmenting process: every core, at most `MAX_AUTO_THREADS`, in-process; 1 in each worker (the
  workers already split the cores). One thread augments one whole batch, so the prefetch buffer holds at least
  as many batches as there are threads.

Pure Python (no grain, no JAX), so a config can be checked anywhere.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

from auxmtl_jax.errors import UserError

MIN_CORES_FOR_WORKERS = 4
MAX_AUTO_WORKERS = 8
MAX_AUTO_THREADS = 8


class Sizing(NamedTuple):
    """Worker processes (0 = augment in-process), threads per augmenting process, batches prefetched per process."""

    num_workers: int
    num_threads: int
    prefetch: int


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS reports one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def _configured(input_cfg: Any, key: str, minimum: int, cores: int) -> int | None:
    value = getattr(input_cfg, key, None)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"config.input.{key}={value!r}; expected None (sized from this host's {cores} cores) or "
                        f"an integer >= {minimum}.")
    return int(value)


def default_workers(cores: int) -> int:
    """Worker processes for `cores` cores when `config.input.num_workers` is None."""
    return 0 if cores < MIN_CORES_FOR_WORKERS else min(cores // 2, MAX_AUTO_WORKERS)


def default_threads(cores: int, num_workers: int) -> int:
    """Augmenting threads per process for `cores` cores when `config.input.num_threads` is None."""
    return 1 if num_workers > 0 else max(1, min(cores, MAX_AUTO_THREADS))


def resolve(input_cfg: Any, *, in_process: bool = False, cores: int | None = None) -> Sizing:
    """The pipeline's sizing from `input_cfg.num_workers` / `num_threads` (absent or None: sized from `cores`,
    default this host's). `in_process`: evaluation, which never starts workers. Raises one `UserError` line
    naming the key and value for a negative, fractional or boolean setting."""
    cores = available_cores() if cores is None else int(cores)
    workers = _configured(input_cfg, "num_workers", 0, cores)
    threads = _configured(input_cfg, "num_threads", 1, cores)
    if in_process:
        workers = 0
    elif workers is None:
        workers = default_workers(cores)
    if threads is None:
        threads = default_threads(cores, workers)
    prefetch = max(1 if workers else 2, threads)
    return Sizing(num_workers=workers, num_threads=threads, prefetch=prefetch)
