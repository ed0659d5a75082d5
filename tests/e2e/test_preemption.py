"""SIGTERM, as a cluster scheduler sends it before evicting a job, to a one-process run: the run saves a verified
checkpoint at the next step, prints one line and exits 75; re-running the same command ends bit-identical to an
uninterrupted run. (Two processes: test_multiprocess.py; an experiment and a search: their own test files.)"""

import os
import random
import re
import subprocess
import sys

from auxmtl_jax import checkpoint as checkpoint_lib
from auxmtl_jax.training import preemption
from test_multiprocess import NUM_TRAIN_STEPS, assert_same_run, data_dir  # noqa: F401  (the module's tiny dataset)

WORKER = os.path.join(os.path.dirname(__file__), "multiprocess_worker.py")


def run_one_process(data_dir, workdir, *extra) -> subprocess.CompletedProcess:
    args = [sys.executable, WORKER, "0", "1", "0", data_dir, str(workdir), *map(str, extra)]
    return subprocess.run(args, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_sigterm_at_a_random_step_checkpoints_it_and_the_rerun_is_bit_identical(data_dir, tmp_path):
    straight = run_one_process(data_dir, tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]

    at = random.randint(1, NUM_TRAIN_STEPS - 1)  # SIGTERM while asking for batch `at`: step `at` is the next
    workdir = tmp_path / "preempted"
    stopped = run_one_process(data_dir, workdir, at)
    assert stopped.returncode == preemption.PREEMPTED_EXIT_STATUS, (at, stopped.stderr[-3000:])
    lines = [line for line in stopped.stderr.splitlines() if line.startswith("preempted:")]
    assert len(lines) == 1 and "Traceback" not in stopped.stderr, (at, stopped.stderr[-3000:])
    assert re.match(rf"preempted: SIGTERM: saved a verified checkpoint of step {at} of {NUM_TRAIN_STEPS} in "
                    rf"{re.escape(str(workdir))} \([\d.]+ s\); re-run the same command to resume$", lines[0]), lines
    assert checkpoint_lib.Checkpointer(workdir, read_only=True).latest_step() == at
    assert checkpoint_lib.integrity_problem(workdir / "checkpoints" / str(at),
                                            workdir / "checkpoint_integrity" / f"{at}.json") is None
    assert not (workdir / "results.json").exists()

    resumed = run_one_process(data_dir, workdir)
    assert resumed.returncode == 0, (at, resumed.stderr[-3000:])
    assert_same_run(workdir, tmp_path / "straight", extra_checkpoint=at)
