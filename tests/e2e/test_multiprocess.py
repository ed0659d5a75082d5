"""A 2-process x 2-device run on 127.0.0.1 (workers: multiprocess_worker.py): one process SIGKILLed mid-run (the
survivor stops with one line within the heartbeat bound; under `-m exhaustive` the re-run resumes), and one sent
SIGTERM (both checkpoint at the step they agree on, exit 75, and the re-run resumes); the re-runs end where an
uninterrupted run ends."""

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest
from etils import epath

from auxmtl_jax import checkpoint as checkpoint_lib
from auxmtl_jax import coordination
from auxmtl_jax import input_pipeline
from auxmtl_jax.training import preemption

WORKER = os.path.join(os.path.dirname(__file__), "multiprocess_worker.py")
NUM_PROCESSES = 2
NUM_TRAIN_STEPS = 6  # multiprocess_worker's: logs and checkpoints at 2, 4, 6; evaluations at 3, 6
HEARTBEAT_TIMEOUT_S = 15  # multiprocess_worker.worker_config's distributed.heartbeat_timeout_s
RUN_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tfds"))
    cfg = ml_collections.ConfigDict(dict(name="synthetic_scenes", config="tiny", manual_dir=None, data_dir=path,
                                         prepare=True, train_split="train", eval_split="test"))
    input_pipeline.prepare_dataset(cfg)
    return path


@pytest.fixture(scope="module")
def straight(data_dir, tmp_path_factory):
    """An uninterrupted 2-process run: the result the interrupted ones must reach."""
    root = tmp_path_factory.mktemp("straight")
    logs = root / "logs"
    logs.mkdir()
    codes, _ = run_processes(data_dir, root / "run", logs)
    assert codes == [0, 0], log_tails(logs)
    return root / "run"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_processes(data_dir, workdir, logs, *, at=0, signalled=1, signal_name="TERM") -> tuple[list[int], list[str]]:
    """Runs every process of one training run to its end; returns their exit codes and outputs. With `at`, process
    `signalled` sends itself SIG`signal_name` when it asks for training batch `at`."""
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    processes = []
    for process_id in range(NUM_PROCESSES):
        path = logs / f"{epath.Path(workdir).name}_{signal_name}{at}_{process_id}_{time.monotonic_ns()}.log"
        log = open(path, "w")
        args = [sys.executable, WORKER, str(process_id), str(NUM_PROCESSES), str(port), data_dir, str(workdir)]
        if at:
            args += [str(at), str(signalled), signal_name]
        processes.append((subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env), log, path))
    deadline = time.monotonic() + RUN_TIMEOUT_S
    try:
        for process, _, _ in processes:
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pytest.fail(f"a {NUM_PROCESSES}-process run did not finish in {RUN_TIMEOUT_S}s; logs in {logs}")
    finally:
        for process, log, _ in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
            log.close()
    return [process.returncode for process, _, _ in processes], [path.read_text() for _, _, path in processes]


def log_tails(logs) -> str:
    return "\n".join(f"== {path.name}\n{path.read_text()[-3000:]}" for path in sorted(logs.iterdir()))


def logged(workdir):
    """metrics.jsonl as {(step, kind): record}, without the wall-clock throughput."""
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {(line["step"], line["kind"]): {k: v for k, v in line.items() if k != "images_per_sec"} for line in lines}


def assert_same_run(resumed, straight, *, extra_checkpoint=None):
    """Bit-identical final weights and results, and the same metrics log (plus the preemption's checkpoint row)."""
    expected, found = logged(straight), logged(resumed)
    if extra_checkpoint is not None and (extra_checkpoint, "checkpoint") not in expected:
        assert found.pop((extra_checkpoint, "checkpoint"))["param_norm"] > 0
    assert found == expected
    assert json.loads((resumed / "results.json").read_text()) == json.loads((straight / "results.json").read_text())
    final = [checkpoint_lib.load_inference_variables(workdir / checkpoint_lib.INFERENCE_DIR)
             for workdir in (straight, resumed)]
    assert jax.tree.structure(final[0]) == jax.tree.structure(final[1])
    for a, b in zip(jax.tree.leaves(final[0]), jax.tree.leaves(final[1])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def lose_a_process(data_dir, workdir, logs) -> list[str]:
    """Runs both processes and SIGKILLs process 1 when it asks for batch 5; returns the outputs."""
    # Process 1 is SIGKILLed (no cleanup runs) when it asks for batch 5, right after checkpoint 4 was started.
    codes, outputs = run_processes(data_dir, workdir, logs, at=5, signalled=1, signal_name="KILL")
    assert codes == [coordination.PEER_LOST_EXIT_STATUS, -signal.SIGKILL], log_tails(logs)
    return outputs


def test_a_lost_process_stops_its_peer_with_one_line_keeping_the_last_common_checkpoint(data_dir, tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    workdir = tmp_path / "killed"
    outputs = lose_a_process(data_dir, workdir, logs)
    errors = [line for line in outputs[0].splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in outputs[0], outputs[0][-3000:]
    assert errors[0].startswith("error: process 0 of 2 lost process 1: no heartbeat for "), errors
    silent = int(re.search(r"no heartbeat for (\d+) s", errors[0]).group(1))
    assert HEARTBEAT_TIMEOUT_S <= silent <= HEARTBEAT_TIMEOUT_S + 2, errors  # the stated bound: timeout + 1 s poll
    assert "config.distributed.heartbeat_timeout_s=15" in errors[0]
    # Checkpoint 4 was never committed by both processes, so it does not exist; 2 is intact.
    assert checkpoint_lib.Checkpointer(workdir, read_only=True).all_steps() == [2]
    saved_states = sorted(path.name for path in (workdir / "checkpoints" / "2" / checkpoint_lib.DATA_ITEM).iterdir()
                          if path.suffix == ".json")
    assert saved_states == ["process_0-of-2.json", "process_1-of-2.json"]
    assert not (workdir / "results.json").exists()


@pytest.mark.exhaustive  # CI re-runs after the SIGTERM stop below (and resumes after kills in one process)
def test_the_rerun_after_a_lost_process_resumes_to_the_uninterrupted_run(straight, data_dir, tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    workdir = tmp_path / "killed"
    lose_a_process(data_dir, workdir, logs)
    codes, _ = run_processes(data_dir, workdir, logs)
    assert codes == [0, 0], log_tails(logs)
    assert_same_run(workdir, straight)


def test_sigterm_to_one_process_checkpoints_both_at_one_agreed_step_and_the_rerun_is_bit_identical(
        straight, data_dir, tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    workdir = tmp_path / "preempted"
    at = random.randint(1, NUM_TRAIN_STEPS - 2)  # process 1 gets SIGTERM while asking for batch `at`
    codes, outputs = run_processes(data_dir, workdir, logs, at=at, signalled=1)
    assert codes == [preemption.PREEMPTED_EXIT_STATUS] * 2, (at, log_tails(logs))
    steps = set()
    for output in outputs:
        lines = [line for line in output.splitlines() if line.startswith("preempted:")]
        assert len(lines) == 1 and "Traceback" not in output, (at, output[-3000:])
        steps.add(int(re.search(r"saved a verified checkpoint of step (\d+) of 6", lines[0]).group(1)))
    assert len(steps) == 1, (at, steps)  # one agreed step
    (step,) = steps
    assert at <= step < NUM_TRAIN_STEPS, (at, step)
    checkpointer = checkpoint_lib.Checkpointer(workdir, read_only=True)
    assert checkpointer.latest_step() == step
    assert checkpoint_lib.integrity_problem(workdir / "checkpoints" / str(step),
                                            workdir / "checkpoint_integrity" / f"{step}.json") is None
    assert not (workdir / "results.json").exists()

    codes, _ = run_processes(data_dir, workdir, logs)
    assert codes == [0, 0], (at, log_tails(logs))
    assert_same_run(workdir, straight, extra_checkpoint=step)
