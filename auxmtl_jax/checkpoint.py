"""Checkpoints, workdir bookkeeping and the inference export.

- `Checkpointer`: orbax, asynchronous, keep-last-N; saves the train state and the data-iterator state together,
  so re-running the same command on the same workdir resumes exactly.
- `check_workdir_config`: a workdir remembers its config (config.json); resuming with a different one fails with
  the list of differing keys instead of silently mixing runs.
- `load_prior_params`: the `main` subtree of another run's latest checkpoint, for the paper's Prior strategy.
- `export_inference`: WORKDIR/inference/ = `main` params + batch_stats + model config, nothing train-only.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import serialization

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
INFERENCE_DIR = "inference"
INFERENCE_VARIABLES = "main_variables.msgpack"
INFERENCE_CONFIG = "model.json"

# Config keys that may change between a run and its resumption (they do not change the result).
RESUMABLE_KEYS = (
    "progress_bar", "log_every_steps", "eval_every_steps", "checkpoint_every_steps", "max_checkpoints_to_keep",
    "input.num_workers", "dataset.data_dir", "dataset.manual_dir", "dataset.prepare", "analysis.figures",
    "distributed.", "runs", "num_devices",
)


class Checkpointer:
    """Saves and restores `{'state': train state, 'data': iterator state}` under WORKDIR/checkpoints."""

    def __init__(self, workdir: epath.Path, *, max_to_keep: int):
        self.directory = epath.Path(workdir) / CHECKPOINT_DIR
        self._manager = ocp.CheckpointManager(
            self.directory.resolve(),
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                                 enable_async_checkpointing=True),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, data_state: Mapping[str, Any]) -> None:
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(dict(data_state))))

    def restore(self, step: int, target_state: Any) -> tuple[Any, dict]:
        """Restores onto the structure, shapes and shardings of `target_state`."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"Checkpoint {self.directory}/{step} does not match this config's model/optimizer "
                             f"state ({error}). Use a fresh --workdir for a different setup.") from error
        return restored["state"], restored["data"]

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a.b': value} view of a nested config, tuples as lists (as JSON stores them)."""
    flat = {}
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and key != "runs" and key != "reference_results":
            flat.update(flatten_config(value, path + "."))
        else:
            flat[path] = json.loads(json.dumps(value, default=_jsonable))
    return flat


def _jsonable(value):
    if isinstance(value, (tuple, set)):
        return list(value)
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    return str(value)


def config_to_json(config) -> str:
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return json.dumps(data, indent=2, sort_keys=True, default=_jsonable)


def check_workdir_config(workdir: epath.Path, config) -> None:
    """Records the config in a fresh workdir; in one with checkpoints, requires the same config."""
    workdir = epath.Path(workdir)
    path = workdir / CONFIG_FILE
    current = json.loads(config_to_json(config))
    has_checkpoints = (workdir / CHECKPOINT_DIR).exists() and any((workdir / CHECKPOINT_DIR).iterdir())
    if path.exists() and has_checkpoints:
        try:
            saved = json.loads(path.read_text())
        except ValueError as error:
            raise ValueError(f"{path} is not valid JSON ({error}); expected the config of the run in this workdir.")
        differing = _differing_keys(flatten_config(saved), flatten_config(current))
        if differing:
            details = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in differing[:12])
            raise ValueError(f"Workdir {workdir} holds checkpoints of a run with another config ({details}). "
                             "Resume with the same config, or use a fresh --workdir.")
    if jax.process_index() == 0:
        _write_text_atomic(path, config_to_json(config))


def _differing_keys(saved: dict, current: dict) -> list[tuple[str, Any, Any]]:
    keys = sorted(set(saved) | set(current))
    return [(key, saved.get(key), current.get(key)) for key in keys
            if saved.get(key) != current.get(key) and not key.startswith(RESUMABLE_KEYS)]


def _write_text_atomic(path: epath.Path, text: str) -> None:
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    tmp.write_text(text)
    os.replace(tmp, path)


def load_prior_params(path: str, scope: str) -> dict:
    """The `params['main']` subtree (`scope`='main') or its encoder (`scope`='encoder') of another run.

    `path` is that run's workdir (its latest checkpoint is read) or its exported inference folder.
    """
    if scope not in ("main", "encoder"):
        raise ValueError(f"config.init_from.scope={scope!r}; expected 'main' or 'encoder'.")
    root = epath.Path(path)
    if (root / INFERENCE_VARIABLES).exists():
        main = load_inference_variables(root)["params"]
    elif (root / CHECKPOINT_DIR).exists():
        manager = ocp.CheckpointManager((root / CHECKPOINT_DIR).resolve(),
                                        options=ocp.CheckpointManagerOptions(read_only=True))
        step = manager.latest_step()
        if step is None:
            raise ValueError(f"config.init_from.path={path!r}: {root / CHECKPOINT_DIR} holds no checkpoint.")
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
        main = jax.tree.map(np.asarray, restored["state"]["params"]["main"])
        manager.close()
    else:
        raise ValueError(f"config.init_from.path={path!r} is neither a workdir with {CHECKPOINT_DIR}/ nor an "
                         f"exported {INFERENCE_DIR}/ folder with {INFERENCE_VARIABLES}.")
    return main if scope == "main" else {"encoder": main["encoder"]}


def merge_params(target: Mapping[str, Any], loaded: Mapping[str, Any], *, what: str) -> dict:
    """Replaces the leaves of `target` covered by `loaded`; any missing, extra or mis-shaped key is one error."""
    target_flat = _flatten(target)
    loaded_flat = _flatten(loaded)
    prefixes = tuple(key.split("/")[0] + "/" for key in loaded_flat)
    covered = {key for key in target_flat if key.startswith(prefixes)}
    missing = sorted(covered - set(loaded_flat))
    extra = sorted(set(loaded_flat) - set(target_flat))
    mismatched = sorted(f"{key} {tuple(np.shape(loaded_flat[key]))} vs {tuple(np.shape(target_flat[key]))}"
                        for key in set(loaded_flat) & set(target_flat)
                        if np.shape(loaded_flat[key]) != np.shape(target_flat[key]))
    if missing or extra or mismatched:
        parts = [f"{name} ({len(keys)}): {', '.join(keys[:10])}{' ...' if len(keys) > 10 else ''}"
                 for name, keys in (("missing in the loaded params", missing), ("not in the model", extra),
                                    ("shape mismatch (loaded vs model)", mismatched)) if keys]
        raise ValueError(f"Cannot load {what}: " + "; ".join(parts))
    merged = dict(target_flat)
    for key, value in loaded_flat.items():
        merged[key] = np.asarray(value, dtype=np.asarray(target_flat[key]).dtype)
    return _unflatten(merged)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _unflatten(flat: Mapping[str, Any]) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split("/")
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return tree


def export_inference(workdir: epath.Path, main_variables: Mapping[str, Any], model_config: Mapping[str, Any]) -> epath.Path:
    """Writes WORKDIR/inference/ (main params + batch_stats + model.json) atomically; returns its path."""
    final = epath.Path(workdir) / INFERENCE_DIR
    tmp = epath.Path(workdir) / f".{INFERENCE_DIR}.{uuid.uuid4().hex}.tmp"
    tmp.mkdir(parents=True)
    try:
        host_variables = jax.tree.map(np.asarray, dict(main_variables))
        (tmp / INFERENCE_VARIABLES).write_bytes(serialization.msgpack_serialize(host_variables))
        (tmp / INFERENCE_CONFIG).write_text(json.dumps(model_config, indent=2, sort_keys=True, default=_jsonable))
        if final.exists():
            old = epath.Path(workdir) / f".{INFERENCE_DIR}.{uuid.uuid4().hex}.old"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def load_inference_variables(directory: epath.Path) -> dict:
    """{'params': ..., 'batch_stats': ...} of `main` from an exported inference folder."""
    path = epath.Path(directory) / INFERENCE_VARIABLES
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; expected an exported model folder (WORKDIR/{INFERENCE_DIR}).")
    return serialization.msgpack_restore(path.read_bytes())


def load_inference_config(directory: epath.Path) -> dict:
    path = epath.Path(directory) / INFERENCE_CONFIG
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; expected an exported model folder (WORKDIR/{INFERENCE_DIR}).")
    return json.loads(path.read_text())
