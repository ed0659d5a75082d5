"""Several processes (`jax.distributed`), coordinated: timeouts from the config, barriers, and a lost-peer watchdog.

- `initialize`: connects to the coordinator with `config.distributed.*_timeout_s`. A coordinator that does not
  accept connections within `initialization_timeout_s` is one line naming the setting; a coordinator that is up
  while a peer never registers is JAX's own abort (its connect aborts the process; docs/reliability.md).
- `barrier` / `together`: processes meet after each compilation, before its first collective. Compiling can take
  minutes on a busy host and differ between processes, while a CPU collective (Gloo) waits only 30 s for its
  peers; the barrier waits `barrier_timeout_s` and, when it runs out, names the processes that did not arrive.
- The watchdog: every process writes a heartbeat into the coordinator's key-value store each second and watches
  its peers'. A peer silent for `heartbeat_timeout_s` (or a coordinator that no longer answers) stops this process
  within about one more second with one line naming the lost process, before anything more is written; the
  checkpoint being saved, if any, is never committed (orbax commits only when every process has finished it).
  JAX's own heartbeat check, which aborts with a stack trace, is set to twice that as a backstop. When the lost
  process is the coordinator (process 0), JAX's error polling aborts the survivors at once, before the watchdog.
"""

from __future__ import annotations

import atexit
import collections
import math
import os
import re
import socket
import sys
import threading
import time
from typing import Any, Callable

import jax

from auxmtl_jax.errors import UserError

PEER_LOST_EXIT_STATUS = 76  # EX_PROTOCOL (sysexits.h): another process of the run is gone; re-run them all
DEFAULT_TIMEOUTS_S = {"initialization_timeout_s": 300, "heartbeat_timeout_s": 100, "barrier_timeout_s": 900,
                      "shutdown_timeout_s": 60}  # configs/common.py's defaults (older configs lack the keys)
HEARTBEAT_EVERY_S = 1.0
_ALIVE_KEY = "auxmtl_jax/alive/{}"
_DONE = "done"

_settings: dict[str, Any] = {"barrier_timeout_s": 900.0, "heartbeat_timeout_s": 100.0}
_barriers: collections.Counter = collections.Counter()


class CoordinationError(UserError):
    """Another process did not connect, arrive or answer in time; names the process and the setting.

    Once raised, this process leaves without JAX's shutdown barrier (which would wait for the absent process and
    then abort with a stack trace): the process exits with status 1 right after its one line."""

    def __init__(self, message: str):
        super().__init__(message)
        _abandoned.append(True)


_abandoned: list[bool] = []


def _client():
    from jax._src import distributed  # the coordination-service client: barriers, key-value store

    return distributed.global_state.client


def _timeouts(distributed_cfg) -> dict[str, float]:
    values = {}
    for key, default in DEFAULT_TIMEOUTS_S.items():
        value = distributed_cfg.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise UserError(f"config.distributed.{key}={value!r}; expected a positive number of seconds.")
        values[key] = float(value)
    return values


def _processes_named(text: str) -> list[int]:
    """The process ids an error of the coordination service names ('task:1', or one per line after 'names:')."""
    found = {int(match) for match in re.findall(r"task:(\d+)", text)}
    tail = re.search(r"(?:task names|heartbeats\)):\s*\n((?:\s*\d+\s*\n?)+)", text)
    if tail:
        found |= {int(match) for match in re.findall(r"\d+", tail.group(1))}
    return sorted(found)


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


def initialize(distributed_cfg) -> None:
    """Starts multi-process JAX when the config names a coordinator or a process count, then the watchdog."""
    address = distributed_cfg.get("coordinator_address")
    num_processes = distributed_cfg.get("num_processes")
    timeouts = _timeouts(distributed_cfg)  # checked in every run, so a bad value never waits for a cluster
    if (address is None and num_processes is None) or jax.distributed.is_initialized():
        return
    process_id = distributed_cfg.get("process_id")
    if address is not None and process_id not in (0, None):
        _wait_for_coordinator(address, process_id, num_processes, timeouts["initialization_timeout_s"])
    try:
        jax.distributed.initialize(
            coordinator_address=address, num_processes=num_processes, process_id=process_id,
            initialization_timeout=math.ceil(timeouts["initialization_timeout_s"]),
            heartbeat_timeout_seconds=math.ceil(2 * timeouts["heartbeat_timeout_s"]),
            shutdown_timeout_seconds=math.ceil(timeouts["shutdown_timeout_s"]))
    except (RuntimeError, ValueError) as error:
        missing = _processes_named(str(error))
        who = f" (not connected: process {', '.join(map(str, missing))})" if missing else ""
        raise CoordinationError(
            f"process {process_id} of {num_processes} could not join the run at coordinator {address} within "
            f"config.distributed.initialization_timeout_s={timeouts['initialization_timeout_s']:g}{who}: "
            f"{_first_line(error)}; start every process with the same coordinator_address and num_processes, or "
            "raise the setting.") from error
    _settings.update(timeouts, address=address)
    _start_watchdog(jax.process_index(), jax.process_count(), timeouts["heartbeat_timeout_s"], address)


def _wait_for_coordinator(address: str, process_id: int, num_processes, timeout: float) -> None:
    """Waits until the coordinator accepts a TCP connection: JAX's own connect aborts the process when it cannot
    reach it, so this is the one place where an unreachable coordinator can still be one line."""
    host, _, port = address.rpartition(":")
    deadline, error = time.monotonic() + timeout, None
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=min(5.0, timeout)):
                return
        except (OSError, ValueError) as problem:
            error = problem
        if time.monotonic() >= deadline:
            break
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    raise CoordinationError(
        f"process {process_id} of {num_processes} could not reach the coordinator (process 0) at "
        f"config.distributed.coordinator_address={address} within config.distributed.initialization_timeout_s="
        f"{timeout:g} ({error}); start process 0 there, check the address, or raise the setting.")


def barrier(name: str) -> None:
    """Every process waits here for all the others, up to `barrier_timeout_s` (nothing to do in one process)."""
    client = _client()
    if client is None or jax.process_count() == 1:
        return
    _barriers[name] += 1
    timeout = _settings["barrier_timeout_s"]
    try:
        client.wait_at_barrier(f"auxmtl_jax/{name}/{_barriers[name]}", math.ceil(timeout * 1000))
    except Exception as error:  # noqa: BLE001  (the client raises its runtime error type)
        missing = [index for index in _processes_named(str(error)) if index != jax.process_index()]
        who = f"process {', '.join(map(str, missing))}" if missing else "another process"
        raise CoordinationError(
            f"process {jax.process_index()} of {jax.process_count()} waited "
            f"config.distributed.barrier_timeout_s={timeout:g} s at '{name}' for {who}, which did not arrive: "
            f"{_first_line(error)}; check that process's log, or raise the setting.") from error


def together(fn: Callable, name: str) -> Callable:
    """`fn` (a jitted function) compiled ahead of its first call for each input signature, followed by a
    `barrier`, so that all processes enter its collectives together. In one process: `fn` itself."""
    if jax.process_count() == 1:
        return fn
    compiled: dict[Any, Callable] = {}

    def call(*args):
        key = tuple((getattr(leaf, "shape", None), str(getattr(leaf, "dtype", type(leaf))))
                    for leaf in jax.tree.leaves(args))
        if key not in compiled:
            compiled[key] = fn.lower(*args).compile()
            barrier(f"compiled {name}")
        return compiled[key](*args)

    return call


def _stop(message: str) -> None:
    """Ends this process at once (from the watchdog thread): one line, no cleanup that would wait for peers."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(PEER_LOST_EXIT_STATUS)


def _start_watchdog(process_id: int, num_processes: int, timeout: float, address: str | None) -> None:
    stopped = threading.Event()
    client = _client()

    def leave() -> None:  # runs before JAX's own shutdown (atexit is last-in, first-out)
        stopped.set()
        if _abandoned:  # a peer is missing: JAX's shutdown barrier would wait for it, then abort
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)
        try:
            client.key_value_set(_ALIVE_KEY.format(process_id), _DONE, allow_overwrite=True)
        except Exception:  # noqa: BLE001  (the coordinator may already be gone; nothing to tell it then)
            pass

    def watch() -> None:
        peers = [index for index in range(num_processes) if index != process_id]
        seen = {index: (None, time.monotonic()) for index in peers}
        beat = 0
        while not stopped.wait(HEARTBEAT_EVERY_S):
            beat += 1
            try:
                client.key_value_set(_ALIVE_KEY.format(process_id), str(beat), allow_overwrite=True)
            except Exception as error:  # noqa: BLE001
                if stopped.is_set():
                    return
                _stop(f"process {process_id} of {num_processes} lost the coordinator, process 0 at {address} "
                      f"({_first_line(error)}); stopping without saving. Re-run every process to resume from the "
                      "last checkpoint all of them committed.")
            now = time.monotonic()
            for index in peers:
                try:
                    value = client.key_value_try_get(_ALIVE_KEY.format(index))
                except Exception:  # noqa: BLE001  (not written yet: the peer is still starting)
                    value = None
                if value == _DONE:
                    continue
                if value != seen[index][0]:
                    seen[index] = (value, now)
                elif now - seen[index][1] > timeout and not stopped.is_set():
                    _stop(f"process {process_id} of {num_processes} lost process {index}: no heartbeat for "
                          f"{now - seen[index][1]:.0f} s (config.distributed.heartbeat_timeout_s={timeout:g}); "
                          "stopping without saving. Re-run every process to resume from the last checkpoint all of "
                          "them committed.")

    atexit.register(leave)
    threading.Thread(target=watch, name="auxmtl_jax-peer-watchdog", daemon=True).start()
