"""The environment of benchmarks/gpu_check.py: package versions, import probes in fresh interpreters, the
``--simulate-missing`` rehearsal, carried wheels, the config package of a
checkout that is not pip-installed. Standard library only: it runs before jax is imported."""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.metadata
import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
INPUT_PACKAGES = ("grain", "tensorflow_datasets")  # only auxmtl_jax.input_pipeline needs them
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "chex", "einops", "etils", "absl-py", "PyYAML",
            "numpy", "scipy", "pillow", "ml_collections", "tensorflow-datasets", "grain", "array-record", "torch",
            "torchvision", "tensorboardX", "tqdm", "matplotlib", "safetensors")
PROBE_TARGETS = ("auxmtl_jax.models", "auxmtl_jax.weighting", "auxmtl_jax.variants", "auxmtl_jax.training.steps",
                 "auxmtl_jax.training")


class _Blocker:
    """``--simulate-missing``: top-level imports of these names fail as if not installed, except from the carried
    wheels (so the GPU host's situation can be rehearsed on a machine that has them)."""

    def __init__(self, names, allowed_paths):
        self.names, self.allowed_paths = set(names), list(allowed_paths)

    def find_spec(self, name, path=None, target=None):
        if name not in self.names:
            return None  # not blocked, or a submodule of a package that was found where allowed
        spec = importlib.machinery.PathFinder.find_spec(name, self.allowed_paths) if self.allowed_paths else None
        if spec is None:
            raise ModuleNotFoundError(f"No module named {name!r} (gpu_check --simulate-missing)", name=name)
        return spec


def simulate_missing(names, wheels_dir: Path) -> None:
    if names:
        sys.meta_path.insert(0, _Blocker(names, [str(path) for path in wheels(wheels_dir)]))


def wheels(wheels_dir: Path) -> list[Path]:
    """Pure-Python wheels (importable from the zip as they are) in the carried folder."""
    return sorted(path for path in Path(wheels_dir).glob("*.whl") if path.name.endswith("-none-any.whl"))


def importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def add_wheels(wheels_dir: Path) -> list[str]:
    """Puts the carried pure-Python wheels on sys.path (after site-packages: installed packages win)."""
    added = [str(path) for path in wheels(wheels_dir) if str(path) not in sys.path]
    sys.path.extend(added)
    return added


def package_versions(simulated_missing=()) -> dict[str, str | None]:
    versions, simulated = {}, {name.lower().replace("-", "_") for name in simulated_missing}
    for name in PACKAGES:
        if name.lower().replace("-", "_") in simulated:
            versions[name] = None
            continue
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


_PROBE = r"""
import importlib, json, sys, traceback
blocked, paths, targets = json.loads(sys.argv[1])
for name in blocked:
    sys.modules[name] = None  # an import of it fails
sys.path[:0] = paths
results = {}
for target in targets:
    try:
        importlib.import_module(target)
        results[target] = "ok"
    except Exception as error:
        chain = [f"{frame.filename.split('auxmtl_jax/')[-1]}:{frame.lineno}"
                 for frame in traceback.extract_tb(error.__traceback__) if "auxmtl_jax" in frame.filename]
        results[target] = f"{type(error).__name__}: {error}" + (f" (at {' -> '.join(chain[-2:])})" if chain else "")
print(json.dumps(results))
"""


def probe_imports(wheels_dir: Path) -> dict:
    """Which parts of the library import without TFDS and grain (and without ml_collections), each in a fresh
    interpreter; both probes run at once."""
    paths = [str(REPO), *(str(path) for path in wheels(wheels_dir))]
    settings = {"without grain, tensorflow_datasets": list(INPUT_PACKAGES),
                "also without ml_collections": [*INPUT_PACKAGES, "ml_collections"]}
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    running = {name: subprocess.Popen([sys.executable, "-c", _PROBE, json.dumps([blocked, paths, PROBE_TARGETS])],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
               for name, blocked in settings.items()}
    results = {}
    for name, process in running.items():
        out, err = process.communicate(timeout=120)
        lines = out.strip().splitlines()
        results[name] = json.loads(lines[-1]) if process.returncode == 0 and lines else {
            "probe": f"failed (rc {process.returncode}): {(err.strip().splitlines() or [''])[-1]}"}
    return results


def wheels_to_carry() -> list[str]:
    """What the check needs that this interpreter cannot import (besides jax itself)."""
    needed = {"ml_collections": "ml_collections", "absl": "absl-py", "yaml": "PyYAML", "etils": "etils",
              "optax": "optax", "flax": "flax", "orbax.checkpoint": "orbax-checkpoint"}
    return [wheel for module, wheel in needed.items() if not importable(module)]


def config_package() -> str:
    """``auxmtl_configs`` (setup.py maps configs/ to it): installed, or loaded from configs/ of this checkout."""
    if importable("auxmtl_configs"):
        return "installed"
    spec = importlib.util.spec_from_file_location("auxmtl_configs", REPO / "configs" / "__init__.py",
                                                  submodule_search_locations=[str(REPO / "configs")])
    module = importlib.util.module_from_spec(spec)
    sys.modules["auxmtl_configs"] = module
    spec.loader.exec_module(module)
    return "loaded from configs/ (not installed)"


def kill_descendants() -> None:
    """SIGKILL to this process's children and theirs, by id (Linux /proc); nothing else."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    found, frontier = [], [os.getpid()]
    while frontier:
        children = [pid for pid, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    for pid in found:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
