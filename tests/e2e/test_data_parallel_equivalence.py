"""Data parallelism is the same computation: the first train step's gradient on 1 device, on 4 devices and on
2 processes x 2 devices (127.0.0.1) agree leaf by leaf.

The gradient is the one the jitted train step (`training.step_functions`) hands its optimiser, the global batch
sharded over the mesh by `parallel.global_batch` (benchmarks/data_parallel_equivalence.py, `first_step_gradient`).
Size: the runlocal network (configs/synthetic_three_task.py:runlocal,strategy=auxi_all) on 64x80 crops, global
batch 8, so the stride-32 BatchNorms take their statistics over 8 x 2 x 3 = 48 elements (runlocal's 32x40 x 4
gives 8).

The comparison runs in float64. In float32 no size gives 1e-5 per leaf, and not because of the data parallelism
(docs/reliability.md, "Devices, hosts and reproducibility", has the numbers): the device count changes the order
of float32 sums; at runlocal size a relative change of 1e-7 moves the gradient of this network at init by up to
3e-4 (smoothly: float64 does the same when the images change by 1e-7); at larger sizes a few of the
millions of ReLU inputs land on the other side of 0, which switches the gradient through them on or off (up to
4e-2 on the leaves before them). In float64 both are ~1e-13, so what remains of a difference is the computation
itself (measured: 6e-14 at worst; the heads' upsampling and the task losses stay float32, layers.to_task_output
and tasks.py, which can leave ~1e-7).

Criterion, per leaf: ||g_b - g_a|| <= 1e-5 ||g_a|| + 1e-10 m, m the median leaf's ||g_a|| (0.23 here). The
second term is for the 7 leaves whose exact gradient is zero and whose float64 values are rounding alone (under
4e-16): the project BatchNorm biases of encoder blocks 7-10 and 14-16, whose output reaches nothing but the next
1x1 expand convolution and its BatchNorm, which removes a per-channel shift. The smallest other leaf is 5e-4, so
the term leaves the 1e-5 bound of every real leaf as it is. (Not the global norm: at this size one leaf dominates
it, the normal head's output bias, 1e8, from predicted normals that are exactly zero.)
"""

import importlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
WORKER = Path(__file__).resolve().parent / "data_parallel_worker.py"
CROP_SIZE, BATCH_SIZE = (64, 80), 8
RTOL, FLOOR = 1e-5, 1e-10  # FLOOR: times the median leaf's norm
NUM_PROCESSES = 2
RUN_TIMEOUT_S = 300


def load_benchmark_module(name):
    """A module of benchmarks/ (a folder of scripts, not a package), imported the way its scripts import it."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return importlib.import_module(name)


equivalence = load_benchmark_module("data_parallel_equivalence")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TwoProcessStep:
    """The first step on 2 processes x 2 devices (data_parallel_worker.py), started on entering and run in the
    background; `gradient()` waits for it and returns what process 0 wrote; leaving kills what still runs."""

    def __init__(self, tmp_path):
        self.tmp_path, self.out, self.processes = tmp_path, tmp_path / "gradient.npz", []

    def __enter__(self):
        port, env = free_port(), {**os.environ, "PYTHONUNBUFFERED": "1"}
        for process_id in range(NUM_PROCESSES):
            log = open(self.tmp_path / f"worker_{process_id}.log", "w")
            args = [sys.executable, str(WORKER), str(process_id), str(NUM_PROCESSES), str(port),
                    *map(str, CROP_SIZE), str(BATCH_SIZE), str(self.out)]
            self.processes.append((subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env), log))
        self.deadline = time.monotonic() + RUN_TIMEOUT_S
        return self

    def __exit__(self, *exc_info):
        for process, log in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait()
            log.close()

    def gradient(self) -> dict[str, np.ndarray]:
        try:
            for process, _ in self.processes:
                process.wait(timeout=max(1.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pytest.fail(f"the 2-process step did not finish in {RUN_TIMEOUT_S}s; logs in {self.tmp_path}")
        logs = "\n".join(f"== {path.name}\n{path.read_text()[-3000:]}"
                         for path in sorted(self.tmp_path.glob("worker_*.log")))
        assert [process.returncode for process, _ in self.processes] == [0] * NUM_PROCESSES, logs
        with np.load(self.out) as saved:
            return {name: saved[name] for name in saved.files}


def assert_same_gradient(reference: dict[str, np.ndarray], other: dict[str, np.ndarray], what: str) -> None:
    assert other.keys() == reference.keys(), what
    floor = FLOOR * equivalence.median_leaf_norm(reference)
    failures = []
    for name, a in reference.items():
        b = other[name]
        assert b.shape == a.shape and b.dtype == np.float64, (what, name, b.shape, b.dtype)
        difference, size = np.linalg.norm(b - a), np.linalg.norm(a)
        if not difference <= RTOL * size + floor:
            failures.append(f"{name}: ||diff|| {difference:.3e} > {RTOL:g} x {size:.3e} + {floor:.1e}")
    assert not failures, f"{what}: {len(failures)} of {len(reference)} leaves differ:\n" + "\n".join(failures)


@pytest.mark.exhaustive  # CI: two processes train, stop and resume in test_multiprocess (about 100 s here)
def test_first_step_gradient_is_the_same_on_1_device_4_devices_and_2_processes(tmp_path):
    assert jax.device_count() >= 4
    with TwoProcessStep(tmp_path) as two_processes:  # runs while this process takes the 1- and 4-device steps
        with equivalence.float64():
            config = equivalence.equivalence_config(CROP_SIZE, BATCH_SIZE, dtype="float64")
            batch = equivalence.rendered_batch(config)
            one = equivalence.first_step_gradient(config, batch, 1)
            four = equivalence.first_step_gradient(config, batch, 4)
        assert all(leaf.dtype == np.float64 for leaf in one.values())
        # Every parameter group takes part: main (encoder, decoders) and the aux modules.
        assert {name.split("/")[0] for name in one} == {"main", "aux"}
        assert equivalence.global_norm(one) > 0
        assert_same_gradient(one, four, "4 devices vs 1")
        assert_same_gradient(one, two_processes.gradient(), "2 processes x 2 devices vs 1 device")
