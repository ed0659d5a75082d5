"""One process of a 2-process x 2-device first train step on 127.0.0.1, started by
test_data_parallel_equivalence.py; process 0 writes the step's gradient to OUT_NPZ.

  python tests/e2e/data_parallel_worker.py PROCESS_ID NUM_PROCESSES PORT HEIGHT WIDTH BATCH OUT_NPZ

The config is benchmarks/data_parallel_equivalence.py's (`equivalence_config`) at crop HEIGHT x WIDTH and global
batch BATCH, in float64, with `--config.distributed.*` naming the coordinator; each process feeds its own half
of the global batch, as a multi-host run does.
"""

import os
import sys
import tempfile

os.environ["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0 "
                           "--xla_llvm_disable_expensive_passes=true")
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402  (after XLA_FLAGS)
import numpy as np  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)
jax.config.update("jax_compilation_cache_dir", os.environ.get(
    "AUXMTL_TEST_COMPILATION_CACHE", os.path.join(tempfile.gettempdir(), "auxmtl_jax_test_compilation_cache")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "benchmarks"))
import data_parallel_equivalence as equivalence  # noqa: E402

from auxmtl_jax import parallel  # noqa: E402


def main(argv):
    process_id, num_processes, port, height, width, batch_size = map(int, argv[1:7])
    out = argv[7]
    with equivalence.float64():
        config = equivalence.equivalence_config((height, width), batch_size, dtype="float64")
        config.distributed.coordinator_address = f"127.0.0.1:{port}"
        config.distributed.num_processes = num_processes
        config.distributed.process_id = process_id
        parallel.initialize_distributed(config.distributed)
        assert jax.process_count() == num_processes and jax.device_count() == 2 * num_processes
        local = equivalence.rendered_batch(config, jax.process_index(), jax.process_count())
        gradient = equivalence.first_step_gradient(config, local)
    if jax.process_index() == 0:
        np.savez(out, **gradient)


if __name__ == "__main__":
    main(sys.argv)
