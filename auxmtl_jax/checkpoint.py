"""Checkpoints, loading another run's weights, and the inference export (file names: `workdir`).

- `Checkpointer`: orbax, asynchronous, keep-last-N; saves the train state and every process's data-iterator
  state together, so re-running the same command on the same workdir resumes exactly, on one host or several.
- `load_init_variables`: another run's variables cut to a scope (encoder, whole network, `main`, with aux
  modules), for the paper's Prior strategy and pre-train -> fine-tune.
- `export_inference`: WORKDIR/inference/ = `main` params + batch_stats + model config, nothing train-only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import pathlib
import shutil
import uuid
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import serialization

from auxmtl_jax import disk
from auxmtl_jax.errors import MissingInputError, UserError
from auxmtl_jax.workdir import (CHECKPOINT_DIR, DAMAGED_DIR, INFERENCE_CONFIG, INFERENCE_DIR, INFERENCE_VARIABLES,
                               INTEGRITY_DIR, to_jsonable, write_text_atomic)

log = logging.getLogger("auxmtl_jax")

DATA_ITEM = "input_iterators"
INTEGRITY_FORMAT = "auxmtl_jax.checkpoint_integrity/1"

def _process_file_name(process_index: int, process_count: int) -> str:
    return f"process_{process_index}-of-{process_count}.json"


class ProcessLocalJsonHandler(ocp.CheckpointHandler):
    """Every process saves and restores its own JSON document (`process_<i>-of-<n>.json`).

    Input iterators are per host: each host reads its own shard, so each host's position must be kept.
    """

    def save(self, directory: epath.Path, args: "ProcessLocalJsonSave") -> None:
        path = epath.Path(directory) / _process_file_name(jax.process_index(), jax.process_count())
        path.write_text(json.dumps(args.item, sort_keys=True))

    def restore(self, directory: epath.Path, args: "ProcessLocalJsonRestore | None" = None) -> Any:
        directory = epath.Path(directory)
        path = directory / _process_file_name(jax.process_index(), jax.process_count())
        if not path.exists():
            written = sorted(p.name for p in directory.iterdir() if p.name.startswith("process_"))
            raise UserError(f"{path} does not exist: this checkpoint holds input states {written}, but this run "
                             f"has {jax.process_count()} process(es). Resume with the process count it was "
                             "saved with.")
        return json.loads(path.read_text())

    def finalize(self, directory: epath.Path) -> None:
        pass

    def close(self) -> None:
        pass


@ocp.args.register_with_handler(ProcessLocalJsonHandler, for_save=True)
@dataclasses.dataclass
class ProcessLocalJsonSave(ocp.args.CheckpointArgs):
    item: Mapping[str, Any]


@ocp.args.register_with_handler(ProcessLocalJsonHandler, for_restore=True)
@dataclasses.dataclass
class ProcessLocalJsonRestore(ocp.args.CheckpointArgs):
    pass


def file_digests(directory: epath.Path) -> dict[str, dict[str, Any]]:
    """``{relative path: {'size', 'sha256'}}`` of every file under ``directory``."""
    root = pathlib.Path(directory)
    digests = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest = hashlib.sha256()
        with path.open("rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                digest.update(chunk)
        digests[path.relative_to(root).as_posix()] = {"size": path.stat().st_size, "sha256": digest.hexdigest()}
    return digests


def integrity_problem(step_dir: epath.Path, record_path: epath.Path) -> str | None:
    """Why the checkpoint in ``step_dir`` does not match its integrity record (None when it does; the record
    must exist)."""
    try:
        recorded = json.loads(record_path.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return f"its integrity record {record_path} is unreadable"
    found = file_digests(step_dir)
    for name, expected in sorted(recorded.items()):
        if name not in found:
            return f"{name} is missing"
        if found[name]["size"] != expected["size"]:
            return f"{name} has {found[name]['size']} bytes, {expected['size']} were saved"
        if found[name]["sha256"] != expected["sha256"]:
            return f"{name} differs from what was saved (content hash)"
    return None


class Checkpointer:
    """Saves and restores the train state and each process's input-iterator state under WORKDIR/checkpoints.

    After a save is committed, an integrity record (size and SHA-256 of every file) goes to
    WORKDIR/checkpoint_integrity/<step>.json; `restore_latest_intact` verifies it before restoring and falls back
    to the newest intact step, moving damaged ones aside to WORKDIR/checkpoints_damaged/. A save that fails for lack
    of space is one `disk.DiskFullError`; its uncommitted folder is removed, the steps before it stay intact.
    """

    def __init__(self, workdir: epath.Path, *, max_to_keep: int | None = None, read_only: bool = False,
                 folders: tuple[str, str] = (CHECKPOINT_DIR, INTEGRITY_DIR)):
        self.workdir = epath.Path(workdir)
        self.directory = self.workdir / folders[0]
        self.integrity_dir = self.workdir / folders[1]
        self._unrecorded: list[int] = []
        self._saving = (0, 0)  # (step, bytes of its state) of the latest save, which orbax may still be writing
        if read_only and not self.directory.exists():
            raise MissingInputError(f"{self.directory} does not exist; expected the workdir of a run.")
        options = (ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0) if read_only else
                   ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True,
                                                enable_async_checkpointing=True))
        self._manager = ocp.CheckpointManager(self.directory.resolve(), options=options)
        disk.quiet_background_reports()

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(int(step) for step in self._manager.all_steps())

    def checked_step(self, step: int | None) -> int:
        """`step` (the latest when None), or one error listing the steps this workdir holds."""
        steps = sorted(self._manager.all_steps())
        if not steps:
            raise UserError(f"{self.directory} holds no checkpoint.")
        if step is None:
            return steps[-1]
        if step not in steps:
            raise UserError(f"{self.directory} has no checkpoint of step {step}; it holds steps {steps}.")
        return int(step)

    def save(self, step: int, state: Any, data_state: Mapping[str, Any]) -> None:
        """Saves `state` (global arrays) and this process's `data_state`; every process must call it."""
        self.record_committed(wait=True)  # orbax waits for the previous save anyway; if it failed, it stops here
        self._saving = (int(step), disk.tree_nbytes(state))
        with self._space_for_save():
            self._manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), **{DATA_ITEM: ProcessLocalJsonSave(dict(data_state))}))
        self._unrecorded.append(int(step))

    def record_committed(self, wait: bool = False) -> None:
        """Writes the integrity records of saves that have been committed since (all of them with ``wait``)."""
        if not self._unrecorded:
            return
        if not wait and self._manager.is_saving_in_progress():
            return
        with self._space_for_save():  # at once when not in progress; raises the error of a failed save
            self._manager.wait_until_finished()
        kept = set(self._manager.all_steps())
        for step in self._unrecorded:
            if step in kept and jax.process_index() == 0:
                self.integrity_dir.mkdir(parents=True, exist_ok=True)
                record = {"format": INTEGRITY_FORMAT, "step": step, "files": file_digests(self.directory / str(step))}
                write_text_atomic(self._record_path(step), json.dumps(record, indent=1) + "\n")
        self._unrecorded = []
        if jax.process_index() == 0 and self.integrity_dir.exists():
            for path in self.integrity_dir.glob("*.json"):  # records of steps orbax has since deleted
                if path.stem.isdigit() and int(path.stem) not in kept:
                    path.unlink()

    def _record_path(self, step: int) -> epath.Path:
        return self.integrity_dir / f"{step}.json"

    def _space_for_save(self):
        """A save that fails for lack of space: one `disk.DiskFullError`, its uncommitted folder removed."""
        step, state_bytes = self._saving
        return disk.checkpoint_space(self.directory, step, state_bytes, self.all_steps, jax.process_index() == 0)

    def restore_latest_intact(self, target_state: Any) -> tuple[int, Any, dict | None]:
        """``(step, state, data_state)`` of the newest checkpoint whose files match their integrity record and
        that restores; ``(0, target_state, None)`` when the workdir has none. Each damaged step is logged in one line
        and moved aside; when every step is damaged, one ValueError says so and what to do."""
        steps = sorted(self._manager.all_steps(), reverse=True)
        damaged = []
        for step in steps:
            if self._record_path(step).exists():
                problem = integrity_problem(self.directory / str(step), self._record_path(step))
                if problem is None:
                    return (step, *self.restore(step, target_state))
            else:  # saved by an older version, or the run stopped before writing the record: try it unverified
                try:
                    restored = self.restore(step, target_state, mismatch_is_damage=True)
                    log.warning("checkpoint step %d of %s has no integrity record (saved by an older version, or "
                                "the run stopped before writing it); restored it unverified", step, self.directory)
                    return (step, *restored)
                except _DamagedCheckpoint as error:
                    problem = f"it has no integrity record and does not restore ({error})"
            damaged.append(step)
            aside = self.move_aside(step)
            log.warning("checkpoint step %d of %s is damaged: %s; moved it to %s and trying the previous one",
                        step, self.directory, problem, aside)
        if damaged:
            raise UserError(f"every checkpoint of {self.workdir} is damaged (steps {sorted(damaged)}, moved to "
                             f"{self.workdir / DAMAGED_DIR}); nothing intact to resume from. Train again in a fresh "
                             f"--workdir, or delete {self.directory} to start this run over.")
        return 0, target_state, None

    def delete(self, step: int) -> None:
        """Deletes checkpoint `step` and its integrity record (every process calls it)."""
        self.record_committed(wait=True)
        self._manager.delete(step)
        if jax.process_index() == 0 and self._record_path(step).exists():
            self._record_path(step).unlink()

    def move_aside(self, step: int, folder: str = DAMAGED_DIR) -> epath.Path:
        """Moves checkpoint `step` and its integrity record out of the way (never deleted) to
        WORKDIR/<folder>/<step>-<id>/; returns that folder. Resuming no longer sees the step."""
        aside = self.workdir / folder / f"{step}-{uuid.uuid4().hex[:8]}"
        if jax.process_index() == 0:
            aside.mkdir(parents=True, exist_ok=True)
            shutil.move(str(self.directory / str(step)), str(aside / "checkpoint"))
            if self._record_path(step).exists():
                shutil.move(str(self._record_path(step)), str(aside / "integrity.json"))
        self._manager.reload()
        return aside

    def restore(self, step: int, target_state: Any, *, mismatch_is_damage: bool = False) -> tuple[Any, dict]:
        """Restores onto the structure, shapes and shardings of `target_state` (global shardings on a mesh).

        Returns the state and this process's input-iterator state.
        """
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
        try:
            try:
                restored = self._restore_items(step, abstract)
            except ValueError as mismatch:
                restored = self._restore_without_empty_fields(step, abstract, target_state, mismatch)
        except Exception as error:  # noqa: BLE001  (orbax/tensorstore raise many types on unreadable files)
            if mismatch_is_damage:
                raise _DamagedCheckpoint(f"{type(error).__name__}: {str(error).splitlines()[0][:200]}") from error
            if not isinstance(error, (ValueError, KeyError, TypeError)):
                raise
            raise UserError(f"Checkpoint {self.directory}/{step} does not match this run's model/optimizer "
                             f"state or process count ({error}). Use a fresh --workdir for a different "
                             "setup.") from error
        return restored["state"], restored[DATA_ITEM]

    def _restore_items(self, step: int, abstract_state: Any) -> dict:
        return self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), **{DATA_ITEM: ProcessLocalJsonRestore()}))

    def _restore_without_empty_fields(self, step: int, abstract: Any, target_state: Any,
                                      mismatch: ValueError) -> dict:
        """A checkpoint written before the state gained a field that holds no arrays here (such as an empty
        `weighting_state`): restores the other fields and keeps the target's value of the new one."""
        if not dataclasses.is_dataclass(target_state):
            raise mismatch
        fields = {field.name: getattr(abstract, field.name) for field in dataclasses.fields(target_state)}
        empty = [name for name, value in fields.items() if not jax.tree.leaves(value)]
        if not empty:
            raise mismatch
        restored = self._restore_items(step, {name: value for name, value in fields.items() if name not in empty})
        restored_state = restored["state"]
        return {"state": target_state.replace(**restored_state), DATA_ITEM: restored[DATA_ITEM]}

    def wait(self) -> None:
        self.record_committed(wait=True)

    def close(self) -> None:
        self.record_committed(wait=True)
        with self._space_for_save():  # orbax repeats a failed save's error
            self._manager.close()


class _DamagedCheckpoint(Exception):
    """An unverified checkpoint that does not restore."""


INIT_SCOPES = ("encoder", "network", "main", "all")


def load_init_variables(path: str, scope: str) -> dict:
    """``{'params': {group: ...}, 'batch_stats': {group: ...}}`` of another run, cut to ``scope``.

    - ``encoder``: `main`'s encoder;
    - ``network``: `main`'s encoder, shared ASPP and every task decoder the run has: a single-task run's whole
      network (the paper's Prior, Sec. 4.2);
    - ``main``: all of `main` (every key must match the new model's);
    - ``all``: `main` and the run's aux / deep-supervision modules (fine-tuning a run with its aux modules).

    `path` is that run's workdir (its latest checkpoint is read) or its exported inference folder (`main` only).
    BN statistics travel with their weights.
    """
    root = epath.Path(path)
    if init_source(path, scope) == INFERENCE_DIR:
        main = load_inference_variables(root)
        variables = {"params": {"main": main["params"]}, "batch_stats": {"main": main.get("batch_stats", {})}}
    else:
        manager = ocp.CheckpointManager((root / CHECKPOINT_DIR).resolve(),
                                        options=ocp.CheckpointManagerOptions(read_only=True))
        restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore()))
        manager.close()
        state = jax.tree.map(np.asarray, restored["state"])
        variables = {"params": dict(state["params"]), "batch_stats": dict(state.get("batch_stats") or {})}
    return {collection: _cut_to_scope(tree, scope) for collection, tree in variables.items()}


def init_source(path: str, scope: str, what: str = "config.init_from.path") -> str:
    """What `init_from.path` (or the config key `what`) is, checked without reading weights: INFERENCE_DIR (an
    exported `main`) or CHECKPOINT_DIR (a workdir with at least one checkpoint); anything else is one UserError."""
    if scope not in INIT_SCOPES:
        raise UserError(f"config.init_from.scope={scope!r}; expected one of {', '.join(INIT_SCOPES)}.")
    root = epath.Path(path)
    if (root / INFERENCE_VARIABLES).exists():
        if scope == "all":
            raise UserError(f"{what}={path!r} is an exported inference folder, which holds `main` "
                            "only; config.init_from.scope='all' needs the run's workdir.")
        return INFERENCE_DIR
    if (root / CHECKPOINT_DIR).is_dir():
        manager = ocp.CheckpointManager((root / CHECKPOINT_DIR).resolve(),
                                        options=ocp.CheckpointManagerOptions(read_only=True))
        step = manager.latest_step()
        manager.close()
        if step is None:
            raise UserError(f"{what}={path!r}: {root / CHECKPOINT_DIR} holds no checkpoint; "
                            "expected a run that has saved one.")
        return CHECKPOINT_DIR
    raise MissingInputError(f"{what}={path!r} is neither a workdir with {CHECKPOINT_DIR}/ nor an "
                            f"exported {INFERENCE_DIR}/ folder with {INFERENCE_VARIABLES}.")


def _cut_to_scope(tree: Mapping[str, Any], scope: str) -> dict:
    """The groups and `main` modules of one variable collection that ``scope`` loads."""
    main = dict(tree.get("main", {}))
    if scope == "encoder":
        return {"main": {key: value for key, value in main.items() if key == "encoder"}}
    if scope == "network":
        return {"main": {key: value for key, value in main.items()
                         if key in ("encoder", "aspp") or key.endswith("_decoder")}}
    if scope == "main":
        return {"main": main}
    return {group: dict(value) for group, value in tree.items() if group in ("main", "aux", "deep_supervision")}


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
        raise UserError(f"Cannot load {what}: " + "; ".join(parts))
    merged = dict(target_flat)
    for key, value in loaded_flat.items():
        merged[key] = np.asarray(value, dtype=target_flat[key].dtype)
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
    weights = serialization.msgpack_serialize(jax.tree.map(np.asarray, dict(main_variables)))
    description = json.dumps(model_config, indent=2, sort_keys=True, default=to_jsonable)
    try:
        with disk.space_for(final, "exporting the model", len(weights) + len(description)):
            tmp.mkdir(parents=True)
            (tmp / INFERENCE_VARIABLES).write_bytes(weights)
            (tmp / INFERENCE_CONFIG).write_text(description)
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
        raise MissingInputError(f"{path} does not exist; expected an exported model folder (WORKDIR/{INFERENCE_DIR}).")
    try:
        return serialization.msgpack_restore(path.read_bytes())
    except Exception as error:  # msgpack raises several unrelated types for damaged bytes
        raise UserError(f"{path} is damaged ({type(error).__name__}: {error}); expected the weights an exported "
                        f"model folder holds (export it again from its workdir).") from None


def load_inference_config(directory: epath.Path) -> dict:
    """The model description (model.json) of an exported inference folder."""
    if epath.Path(directory).exists() and not epath.Path(directory).is_dir():
        raise UserError(f"{directory} is a file; expected an exported model folder (WORKDIR/{INFERENCE_DIR}).")
    path = epath.Path(directory) / INFERENCE_CONFIG
    if not path.exists():
        raise MissingInputError(f"{path} does not exist; expected an exported model folder (WORKDIR/{INFERENCE_DIR}).")
    try:
        config = json.loads(path.read_text())
    except ValueError as error:
        raise UserError(f"{path} is not valid JSON ({error}); expected the model description of an exported model "
                        "folder.") from None
    if not isinstance(config, dict) or not {"model", "tasks"} <= set(config):
        raise UserError(f"{path} lacks 'model' and 'tasks'; expected the model description of an exported model "
                        "folder.")
    return config
