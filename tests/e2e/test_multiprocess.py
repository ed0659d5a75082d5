"""A 2-process x 2-device run on 127.0.0.1, killed with SIGKILL after a checkpoint and resumed, ends where an
uninterrupted 2-process run ends (workers: tests/multiprocess_worker.py)."""

import json
import os
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
from auxmtl_jax import input_pipeline

WORKER = os.path.join(os.path.dirname(__file__), "multiprocess_worker.py")
NUM_PROCESSES = 2
RUN_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tfds"))
    cfg = ml_collections.ConfigDict(dict(name="synthetic_scenes", config="tiny", manual_dir=None, data_dir=path,
                                         prepare=True, train_split="train", eval_split="test"))
    input_pipeline.prepare_dataset(cfg)
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_processes(data_dir, workdir, logs, *, kill_at=0) -> list[int]:
    """Runs every process of one training run to its end (or its self-kill); returns their exit codes."""
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    processes = []
    for process_id in range(NUM_PROCESSES):
        log = open(logs / f"{epath.Path(workdir).name}_{kill_at}_{process_id}.log", "w")
        args = [sys.executable, WORKER, str(process_id), str(NUM_PROCESSES), str(port), data_dir, str(workdir)]
        processes.append((subprocess.Popen(args + ([str(kill_at)] if kill_at else []), stdout=log,
                                           stderr=subprocess.STDOUT, env=env), log))
    deadline = time.monotonic() + RUN_TIMEOUT_S
    try:
        for process, _ in processes:
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pytest.fail(f"a {NUM_PROCESSES}-process run did not finish in {RUN_TIMEOUT_S}s; logs in {logs}")
    finally:
        for process, log in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
            log.close()
    return [process.returncode for process, _ in processes]


def log_tails(logs) -> str:
    return "\n".join(f"== {path.name}\n{path.read_text()[-3000:]}" for path in sorted(logs.iterdir()))


def logged(workdir):
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {(line["step"], line["kind"]): line for line in lines}


def test_two_process_run_killed_after_a_checkpoint_resumes_to_the_uninterrupted_result(data_dir, tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert run_processes(data_dir, straight, logs) == [0, 0], log_tails(logs)

    # Batch 5 is asked for right after checkpoint 4 was started; checkpoint 2 is complete by then. Each process
    # SIGKILLs itself when it asks for batch 5; one that is slower to ask may instead be aborted by JAX's
    # coordination service the moment its peer dies, as the surviving hosts of a real multi-host kill are.
    codes = run_processes(data_dir, killed, logs, kill_at=5)
    assert -signal.SIGKILL in codes and set(codes) <= {-signal.SIGKILL, -signal.SIGABRT}, log_tails(logs)
    assert checkpoint_lib.Checkpointer(killed, read_only=True).latest_step() in (2, 4)
    assert not (killed / "results.json").exists()
    saved_states = sorted(path.name for path in (killed / "checkpoints" / "2" / checkpoint_lib.DATA_ITEM).iterdir()
                          if path.suffix == ".json")
    assert saved_states == ["process_0-of-2.json", "process_1-of-2.json"]

    assert run_processes(data_dir, killed, logs) == [0, 0], log_tails(logs)
    expected, resumed = logged(straight), logged(killed)
    assert sorted(resumed) == sorted(expected)
    assert [step for step, kind in expected if kind == "eval"] == [3, 6]
    for key, record in expected.items():
        for name, value in record.items():
            if name in ("kind", "images_per_sec"):
                continue
            assert resumed[key][name] == pytest.approx(value, rel=1e-6, abs=1e-9, nan_ok=True), (key, name)
    assert json.loads((killed / "results.json").read_text()) == json.loads((straight / "results.json").read_text())
    final = {name: checkpoint_lib.load_inference_variables(workdir / checkpoint_lib.INFERENCE_DIR)
             for name, workdir in (("straight", straight), ("killed", killed))}
    assert jax.tree.structure(final["straight"]) == jax.tree.structure(final["killed"])
    for a, b in zip(jax.tree.leaves(final["straight"]), jax.tree.leaves(final["killed"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
