"""Coordination timeouts of a 2-process run on 127.0.0.1 (`auxmtl_jax.coordination`): a process that never arrives
at a barrier stops the one waiting there after `distributed.barrier_timeout_s`, with one line naming it and the
setting. (The lost-peer watchdog: test_multiprocess.py; an unreachable coordinator: test_bad_inputs.py.)"""

import os
import subprocess
import sys

from test_multiprocess import free_port

WORKER = """
import os, sys, time
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
import ml_collections
from auxmtl_jax import coordination, errors
process_id, port = int(sys.argv[1]), sys.argv[2]
config = ml_collections.ConfigDict(dict(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                                        process_id=process_id, initialization_timeout_s=60, heartbeat_timeout_s=60,
                                        barrier_timeout_s=3, shutdown_timeout_s=5))
with errors.reported_as_one_line():
    coordination.initialize(config)
    if process_id == 0:
        coordination.barrier("compiled train step")
    else:
        time.sleep(10)  # busy elsewhere: never arrives
"""


def test_a_process_missing_a_barrier_stops_the_waiting_one_with_one_line(tmp_path):
    port = str(free_port())
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    processes = [subprocess.Popen([sys.executable, "-c", WORKER, str(index), port], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, env=env) for index in (0, 1)]
    output, _ = processes[0].communicate(timeout=120)
    processes[1].kill()
    processes[1].communicate()
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert processes[0].returncode == 1 and len(errors) == 1 and "Traceback" not in output, output
    assert errors[0].startswith("error: process 0 of 2 waited config.distributed.barrier_timeout_s=3 s at "
                                "'compiled train step' for process 1, which did not arrive: "), errors
