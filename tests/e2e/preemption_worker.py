"""One process of a preemption test run (started by test_preemption.py and test_multiprocess.py).

  python tests/e2e/preemption_worker.py PROCESS_ID NUM_PROCESSES PORT DATA_DIR WORKDIR [AT [SIGNALLED [SIGNAL]]]

Trains `multiprocess_worker.worker_config` (2 devices per process; NUM_PROCESSES=1 runs without jax.distributed)
through run.py's own exit handling. With AT, process SIGNALLED (default 0) sends itself SIGNAL (default TERM; KILL
for a lost process) when it asks for training batch AT (1-based): a real signal, delivered as a scheduler's or the
OOM killer's would be, at a known step.
"""

import os
import signal
import sys

from multiprocess_worker import worker_config  # noqa: E402  (sets XLA_FLAGS before JAX starts)

from auxmtl_jax import errors, input_pipeline, programs  # noqa: E402
from auxmtl_jax.training import preemption  # noqa: E402


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
