"""Preemption: SIGTERM (or SIGINT) asks the run to checkpoint at a step every process agrees on, then stop.

Cluster schedulers (SLURM, Kubernetes, preemptible VMs) send SIGTERM and wait a grace period before killing.

- Several processes (`jax.distributed`): JAX's preemption service catches SIGTERM in any process and the
  coordination service agrees on one step for all of them (`multihost_utils.reached_preemption_sync_point`, the
  step after the furthest any process had reached). SIGINT is forwarded to it as SIGTERM.
- One process: there is nobody to agree with; the step after the signal is the one.

Each process then writes a verified checkpoint of that step (data-iterator state and the pending log window
included), logs one line, and the command exits with `PREEMPTED_EXIT_STATUS`. Re-running the same command
resumes and ends as the uninterrupted run would. A second signal while the first is being handled stops the
process at once (the usual way out of a hung save).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from typing import Iterator

import jax
from jax.experimental import multihost_utils

log = logging.getLogger("auxmtl_jax")

PREEMPTED_EXIT_STATUS = 75  # EX_TEMPFAIL (sysexits.h): a temporary failure; re-running the command continues
SIGNALS = (signal.SIGTERM, signal.SIGINT)

_received: list[str] = []  # the names of the signals received while `handle_signals` was active
_depth = 0  # nesting depth of `handle_signals`: only the outermost installs and restores handlers


class Preempted(Exception):
    """The run saved a verified checkpoint at the agreed step and stopped; re-running the command resumes.

    Not a user error and not a bug: the command line prints `message` and exits with PREEMPTED_EXIT_STATUS.
    """

    def __init__(self, message: str, step: int | None = None):
        super().__init__(message)
        self.message, self.step = message, step


def _multi_process() -> bool:
    return jax.distributed.is_initialized()


def _on_signal(signum, frame) -> None:
    name = signal.Signals(signum).name
    if _received:  # a second signal: stop now, as if no handler were installed
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        log.warning("%s received again while stopping; exiting at once", name)
        os.kill(os.getpid(), signum)
        return
    _received.append(name)
    log.warning("%s received: checkpointing at the next step every process agrees on, then stopping", name)
    if _multi_process():  # hand it to JAX's preemption notifier, which owns SIGTERM in multi-process runs
        os.kill(os.getpid(), signal.SIGTERM)


@contextlib.contextmanager
def handle_signals() -> Iterator[None]:
    """While active (in the main thread), SIGTERM and SIGINT request a checkpoint-and-stop instead of killing.

    In a multi-process run only SIGINT gets a Python handler: a Python SIGTERM handler would replace the one JAX's
    preemption service installs. Nested uses share the outermost one. Outside the main thread it does nothing.
    """
    global _depth
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if _depth == 0:
        _received.clear()
        handled = (signal.SIGINT,) if _multi_process() else SIGNALS
        previous = {sig: signal.signal(sig, _on_signal) for sig in handled}
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def requested() -> str | None:
    """The name of the first stop signal this process received (None when none, or in another process)."""
    return _received[0] if _received else None


def reached(step: int) -> bool:
    """Whether to checkpoint at `step` and stop. Every process must call it at every step, with the same steps
    (the multi-process agreement counts on it)."""
    if _multi_process():
        return bool(multihost_utils.reached_preemption_sync_point(step))
    return bool(_received)


def signal_name() -> str:
    """What asked for the stop, for the log line."""
    if requested():
        return requested()
    return "a preemption notice (SIGTERM to one of the run's processes)"


@contextlib.contextmanager
def exits_when_preempted() -> Iterator[None]:
    """For command lines: a `Preempted` raised inside prints its one line and exits with PREEMPTED_EXIT_STATUS."""
    try:
        yield
    except Preempted as stopped:
        print(f"preempted: {stopped.message}", file=sys.stderr, flush=True)
        raise SystemExit(PREEMPTED_EXIT_STATUS) from None
