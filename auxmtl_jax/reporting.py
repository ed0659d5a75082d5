"""What a run tells its user: metrics.jsonl, TensorBoard events, a progress bar and a parameter overview."""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any, Mapping

import jax
import numpy as np
from etils import epath

log = logging.getLogger("auxmtl_jax")
METRICS_FILE = "metrics.jsonl"


class MetricWriter:
    """Appends `{"step", "kind", ...}` lines to WORKDIR/metrics.jsonl and scalars to TensorBoard (process 0 only)."""

    def __init__(self, workdir: epath.Path, *, enabled: bool = True):
        self.enabled = enabled and jax.process_index() == 0
        self._path = epath.Path(workdir) / METRICS_FILE
        self._tensorboard = None
        if self.enabled:
            from tensorboardX import SummaryWriter  # imported lazily: it is slow to import

            self._tensorboard = SummaryWriter(str(epath.Path(workdir) / "tensorboard"))

    def write(self, step: int, kind: str, scalars: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        values = {key: float(value) for key, value in scalars.items()}
        with self._path.open("a") as f:
            f.write(json.dumps({"step": int(step), "kind": kind, **values}) + "\n")
        for key, value in values.items():
            if math.isfinite(value):
                self._tensorboard.add_scalar(f"{kind}/{key}", value, step)

    def truncate_after(self, step: int) -> None:
        """Drops lines past `step`, so a resumed run does not log the replayed steps twice."""
        if not self.enabled or not self._path.exists():
            return
        kept = []
        for line in self._path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (ValueError, KeyError):
                continue  # a line cut short by a kill
        self._path.write_text("".join(line + "\n" for line in kept))

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()


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
