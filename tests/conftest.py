"""Test-wide setup: four virtual CPU devices (set before JAX starts), a compilation cache shared by the workers, and
every test folder on sys.path (tests share helpers by module name: `from test_train import tiny_config`).

The folders mirror the package; tests/e2e/ holds the end-to-end runs of the training program, all marked `slow`
(`pytest -m "not slow"` is the quick loop).

Many end-to-end tests compile the same train step (the same config trained straight, killed and resumed, on 1 and
4 devices, ...); JAX's persistent cache lets every worker reuse one compilation instead of repeating it.
"""

import os
import pathlib
import sys
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

TESTS = pathlib.Path(__file__).resolve().parent
for folder in sorted(path for path in TESTS.iterdir() if path.is_dir() and not path.name.startswith((".", "_"))):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))


OPT_IN_MARKERS = ("weighting_matrix", "exhaustive")
# Folders whose files take minutes each. They are collected first, so that under `--dist loadfile
# --no-loadscope-reorder` they start first and the many short files fill the end, instead of one worker finishing
# a long file alone (xdist's default order, most tests first, left test_multiprocess's 270 s to the end).
LONG_FILES_FIRST = ("e2e", "experiments")


def pytest_collection_modifyitems(config, items):
    """Opt-in tests (`weighting_matrix`: 7 minutes; `exhaustive`: every strategy of every shipped config) run only
    when the -m expression names their marker, whatever else -m says; the long files' tests come first."""
    expression = config.getoption("markexpr") or ""
    for marker in OPT_IN_MARKERS:
        if marker in expression:
            continue
        deselected = [item for item in items if item.get_closest_marker(marker)]
        if deselected:
            config.hook.pytest_deselected(items=deselected)
            items[:] = [item for item in items if not item.get_closest_marker(marker)]
    items.sort(key=lambda item: item.path.parent.name not in LONG_FILES_FIRST)  # stable: file order is kept
