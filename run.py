r"""Trains and evaluates a multi-task network with auxiliary modules (flags only; the work is in auxmtl_jax.programs).

  python run.py --config=configs/sunrgbd_three_task.py --workdir=workdirs/sunrgbd
  python run.py --config=configs/nyuv2_two_task.py:strategy=auxi:depth,decoder=context --workdir=workdirs/nyu_ctx
  python run.py --config=configs/synthetic_three_task.py --workdir=workdirs/demo --config.num_train_steps=300

Re-running the same command on the same workdir resumes from the last checkpoint. SIGTERM or SIGINT saves a
checkpoint at the next step (one all processes agree on) and exits with status 75; re-running resumes from there.
A bad input (config key or value, file, dataset, changed config on resume) stops with one line `error: ...` before
anything is written; `--verbose` adds its traceback.
"""

import logging as std_logging

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from auxmtl_jax import errors
from auxmtl_jax import programs
from auxmtl_jax.training import preemption

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, optionally with ':variant'.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, results and the export.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show the Python traceback of an error (for bug reports).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        errors.exit_with_error(f"unexpected arguments {' '.join(argv[1:])}; expected only --flags",
                               errors.USAGE_ERROR_STATUS)
    logging.set_verbosity(logging.WARNING)  # orbax and TFDS log every step of their work at INFO
    std_logging.getLogger("auxmtl_jax").setLevel(std_logging.INFO)
    with preemption.exits_when_preempted(), errors.reported_as_one_line(_VERBOSE.value):
        programs.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main, flags_parser=errors.parse_absl_flags)
