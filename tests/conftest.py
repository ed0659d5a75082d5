"""Test-wide setup: four virtual CPU devices (set before JAX starts) and a compilation cache shared by the workers.

Many end-to-end tests compile the same train step (the same config trained straight, killed and resumed, on 1 and
4 devices, ...); JAX's persistent cache lets every worker reuse one compilation instead of repeating it.
"""

import os
import tempfile

# Tests run tiny networks for a few steps, so compiling dominates: skip LLVM's expensive optimisations.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0 "
                      "--xla_llvm_disable_expensive_passes=true")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402  (must come after XLA_FLAGS)

jax.config.update("jax_threefry_partitionable", True)
jax.config.update("jax_compilation_cache_dir", os.environ.get(
    "AUXMTL_TEST_COMPILATION_CACHE", os.path.join(tempfile.gettempdir(), "auxmtl_jax_test_compilation_cache")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
