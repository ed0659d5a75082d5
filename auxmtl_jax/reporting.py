"""What a run tells its user: metrics.jsonl, TensorBoard events, a progress bar and a parameter overview."""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import struct
import time
from typing import Any, Mapping

import jax
import numpy as np
from etils import epath

from auxmtl_jax import disk

log = logging.getLogger("auxmtl_jax")
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class MetricWriter:
    """Appends `{"step", "kind", ...}` lines to WORKDIR/metrics.jsonl and scalars to TensorBoard (process 0 only).

    Each line and each batch of events is appended whole or not at all (`disk.append`): a write that fails for
    lack of space stops the run with one `disk.DiskFullError`, and the files end at their last whole record.
    """

    def __init__(self, workdir: epath.Path, *, enabled: bool = True):
        self.enabled = enabled and jax.process_index() == 0
        self._path = epath.Path(workdir) / METRICS_FILE
        self._events = _EventFile(epath.Path(workdir) / TENSORBOARD_DIR) if self.enabled else None

    def write(self, step: int, kind: str, scalars: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        values = {key: float(value) for key, value in scalars.items()}
        line = json.dumps({"step": int(step), "kind": kind, **values}) + "\n"
        disk.append(self._path, line.encode(), f"appending a {kind} line to {METRICS_FILE}")
        self._events.write(step, {f"{kind}/{key}": value for key, value in values.items() if math.isfinite(value)})

    def truncate_after(self, step: int) -> None:
        """Drops lines past `step`, so a resumed run does not log the replayed steps twice (rewritten atomically:
        a full disk leaves the file as it was)."""
        if not self.enabled or not self._path.exists():
            return
        kept = []
        for line in self._path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (ValueError, KeyError):
                continue  # a line cut short by a kill
        disk.write_text_atomic(self._path, "".join(line + "\n" for line in kept))

    def close(self) -> None:
        """Nothing is buffered: every write is on disk when it returns."""


class _EventFile:
    """A TensorBoard event file written synchronously, one append per `write`.

    Not tensorboardX's `SummaryWriter`: its writer thread dies on a full disk and the run then blocks forever on
    its full queue; here a failed write is one `disk.DiskFullError` and the file keeps its whole records.
    """

    def __init__(self, directory: epath.Path):
        from tensorboardX.proto import event_pb2  # imported lazily: tensorboardX is slow to import
        from tensorboardX.record_writer import masked_crc32c
        from tensorboardX.summary import scalar

        self._event, self._crc, self._scalar = event_pb2.Event, masked_crc32c, scalar
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self.path = directory / name
        with disk.space_for(directory, f"creating {directory}", None):
            directory.mkdir(parents=True, exist_ok=True)
        self._append([self._event(wall_time=time.time(), file_version="brain.Event:2")])

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        now = time.time()
        self._append([self._event(wall_time=now, step=int(step), summary=self._scalar(tag, value))
                      for tag, value in scalars.items()])

    def _append(self, events) -> None:
        records = []
        for event in events:  # TFRecord framing: length, its CRC, data, its CRC
            data = event.SerializeToString()
            header = struct.pack("Q", len(data))
            records += [header, struct.pack("I", self._crc(header)), data, struct.pack("I", self._crc(data))]
        disk.append(self.path, b"".join(records), "writing TensorBoard events")


class Progress:
    """A tqdm bar with loss, images/s and ETA; falls back to log lines when disabled or not on process 0."""

    def __init__(self, *, total: int, initial: int, batch_size: int, enabled: bool):
        self.batch_size = batch_size
        self._bar = None
        self._last_time, self._last_step = time.perf_counter(), initial
        if enabled and jax.process_index() == 0:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def update(self, step: int, loss: float) -> float:
        """Advances to `step`; returns images/s since the previous update."""
        now = time.perf_counter()
        images_per_sec = (step - self._last_step) * self.batch_size / max(now - self._last_time, 1e-9)
        if self._bar is not None:
            self._bar.update(step - self._last_step)
            self._bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{images_per_sec:.1f}")
        else:
            log.info("step %d  loss %.4f  %.1f img/s", step, loss, images_per_sec)
        self._last_time, self._last_step = now, step
        return images_per_sec

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def parameter_overview(params: Mapping[str, Any], depth: int = 2) -> str:
    """A table of parameter counts per subtree (e.g. main/encoder, main/decoder, aux/depth) and the total."""
    rows: dict[str, int] = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        names = [str(getattr(key, "key", getattr(key, "idx", key))) for key in path]
        group = "/".join(names[:depth])
        rows[group] = rows.get(group, 0) + int(np.prod(leaf.shape))
    width = max([len(name) for name in rows] + [len("total")])
    lines = [f"{'subtree':<{width}}  {'parameters':>12}"]
    lines += [f"{name:<{width}}  {count:>12,}" for name, count in sorted(rows.items())]
    lines.append(f"{'total':<{width}}  {sum(rows.values()):>12,}")
    return "\n".join(lines)
