"""One process of a 2-device-per-process training run on 127.0.0.1 (test_multiprocess.py, test_preemption.py).

  python tests/e2e/multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT DATA_DIR WORKDIR [AT [SIGNALLED [SIGNAL]]]

Trains `worker_config` (NUM_PROCESSES=1 runs without jax.distributed) through run.py's own exit handling. With AT,
process SIGNALLED (default 0) sends itself SIGNAL (default TERM, a preemption; KILL, a lost process: no cleanup
runs) when it asks for training batch AT (1-based): a real signal, delivered as a scheduler's or the OOM killer's
would be, at a known step.
"""

import os
import signal
import sys
import tempfile

os.environ["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0 "
                           "--xla_llvm_disable_expensive_passes=true")
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402  (after XLA_FLAGS)

jax.config.update("jax_threefry_partitionable", True)
jax.config.update("jax_compilation_cache_dir", os.environ.get(
    "AUXMTL_TEST_COMPILATION_CACHE", os.path.join(tempfile.gettempdir(), "auxmtl_jax_test_compilation_cache")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

from auxmtl_configs import synthetic_three_task  # noqa: E402
from auxmtl_jax import errors, input_pipeline, programs  # noqa: E402
from auxmtl_jax.training import preemption  # noqa: E402

NUM_TRAIN_STEPS = 6


class SignalSelfAt:
    """A train iterator that sends its process `signum` when batch `signal_at` (1-based) is requested."""

    def __init__(self, iterator, signal_at, signum=signal.SIGTERM):
        self.iterator, self.signal_at, self.signum, self.served = iterator, signal_at, signum, 0

    def __iter__(self):
        return self

    def __next__(self):
        if self.served + 1 == self.signal_at:
            os.kill(os.getpid(), self.signum)
        self.served += 1
        return next(self.iterator)

    def get_state(self):
        return self.iterator.get_state()

    def set_state(self, state):
        self.iterator.set_state(state)

    def close(self):
        close = getattr(self.iterator, "close", None)
        if close is not None:
            close()


def worker_config(process_id: int, num_processes: int, port: int, data_dir: str):
    config = synthetic_three_task.get_config("runlocal,strategy=auxi_all")
    config.dataset.data_dir = data_dir
    config.dataset.prepare = False
    config.analysis.grad_log_every_steps = 0
    config.analysis.figures = False
    config.num_train_steps = NUM_TRAIN_STEPS
    config.log_every_steps = config.checkpoint_every_steps = 2
    config.eval_every_steps = 3
    config.batch_size = config.eval_batch_size = 4
    config.distributed.coordinator_address = f"127.0.0.1:{port}"
    config.distributed.num_processes = num_processes
    config.distributed.process_id = process_id
    config.distributed.heartbeat_timeout_s = 15  # the lost-peer bound the tests wait for
    return config


def main(argv):
    process_id, num_processes, port = map(int, argv[1:4])
    data_dir, workdir = argv[4], argv[5]
    signal_at = int(argv[6]) if len(argv) > 6 else 0
    signalled = int(argv[7]) if len(argv) > 7 else 0
    signum = signal.Signals["SIG" + (argv[8] if len(argv) > 8 else "TERM")]
    config = worker_config(process_id, num_processes, port, data_dir)
    if num_processes == 1:
        config.distributed.coordinator_address = None
        config.distributed.num_processes = None
        config.distributed.process_id = None
    if signal_at and process_id == signalled:
        create = input_pipeline.create_train_iterator
        input_pipeline.create_train_iterator = lambda *a, **k: SignalSelfAt(create(*a, **k), signal_at, signum)
    with preemption.exits_when_preempted(), errors.reported_as_one_line():
        programs.run(config, workdir)


if __name__ == "__main__":
    main(sys.argv)
