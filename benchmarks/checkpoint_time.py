r"""How long a checkpoint takes: the grace period a preemption (SIGTERM) needs, per config.

Creates a config's real train state (jitted init), then saves it with the run's own `Checkpointer` several times
and waits for each save to be committed and its integrity record written, exactly what a preempted run does
before it exits. Prints the state's size, and per save the time to start it (the train loop's share) and to
finish it (what the grace period must cover), as median and max over the saves.

  python benchmarks/checkpoint_time.py --config=configs/synthetic_three_task.py          # the demo
  python benchmarks/checkpoint_time.py --config=configs/sunrgbd_three_task.py:strategy=auxi_all   # paper size
"""

from __future__ import annotations

import statistics
import tempfile
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from auxmtl_jax import checkpoint as checkpoint_lib
from auxmtl_jax import parallel
from auxmtl_jax.training.state import create_model, create_sharded_train_state

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file with optional ':variant'.")
_SAVES = flags.DEFINE_integer("saves", 5, "Checkpoints to save and time.")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 37, "Segmentation classes (SUN RGB-D: 37; NYUv2: 13 or 40).")
_DIR = flags.DEFINE_string("dir", None, "Where to write them (default: a temporary folder, removed afterwards): "
                           "put it on the disk the runs use.")


def main(argv):
    del argv
    config = _CONFIG.value
    mesh = parallel.create_mesh(config.get("num_devices"))
    model = create_model(config, _NUM_CLASSES.value)
    state, *_ = create_sharded_train_state(config, model, mesh)
    megabytes = sum(np.asarray(leaf).nbytes for leaf in jax.tree.leaves(state)) / 1e6
    with tempfile.TemporaryDirectory(dir=_DIR.value) as root:
        checkpointer = checkpoint_lib.Checkpointer(root, max_to_keep=2)
        started, finished = [], []
        for step in range(1, _SAVES.value + 1):
            begin = time.perf_counter()
            checkpointer.save(step, state, {"next_batch": step})
            started.append(time.perf_counter() - begin)
            checkpointer.wait()
            finished.append(time.perf_counter() - begin)
        checkpointer.close()
    print(f"{config.name}: train state {megabytes:.1f} MB on {jax.device_count()} {jax.devices()[0].platform} "
          f"device(s); {_SAVES.value} saves")
    print(f"  start a save (the loop waits):        median {statistics.median(started):.2f} s, max {max(started):.2f} s")
    print(f"  save committed + integrity recorded:  median {statistics.median(finished):.2f} s, "
          f"max {max(finished):.2f} s")


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
