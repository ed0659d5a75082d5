"""The run-directory contract: what a workdir holds, the one atomic writer, and the resume check (its readers
are `analysis.figures.read_results` / `read_metrics`).

A workdir remembers its config (config.json); resuming with a different one fails with the list of differing
keys and the two ways on, unless `accept_changed_keys` names them (the change is then recorded in config.json
under `config_changes`). Every file a run, a search or an experiment writes is named here.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Mapping

import jax
import numpy as np
from etils import epath

from auxmtl_jax import weighting as weighting_lib
from auxmtl_jax.disk import write_text_atomic  # noqa: F401  (the one atomic writer, re-exported)
from auxmtl_jax.errors import UserError

CONFIG_FILE = "config.json"  # the run's config, with `config_changes` after an accepted change
CHECKPOINT_DIR = "checkpoints"  # orbax: train state + data-iterator state per step
INTEGRITY_DIR = "checkpoint_integrity"  # <step>.json: size and SHA-256 of each file of that checkpoint
DAMAGED_DIR = "checkpoints_damaged"  # damaged checkpoints are moved here, never deleted
SELECTED_DIR = "selected_checkpoints"  # `main` at the steps chosen on dataset.validation_split (the best so far)
SELECTED_INTEGRITY_DIR = "selected_checkpoint_integrity"
DIVERGED_DIR = "checkpoints_diverged"  # after a NaN stop: checkpoints from after the divergence began
INFERENCE_DIR = "inference"  # the export: `main` variables + model description
INFERENCE_VARIABLES = "main_variables.msgpack"
INFERENCE_CONFIG = "model.json"
METRICS_FILE = "metrics.jsonl"  # one JSON object per train log / evaluation / checkpoint (its parameter norm)
TENSORBOARD_DIR = "tensorboard"  # TensorBoard event files of the same scalars
RESULTS_FILE = "results.json"  # the final test metrics, Δm% and its convention
RESULTS_TABLE = "results.txt"
COMPARISON_TABLE = "comparison.txt"  # a sweep's table of its runs
AUX_GENOTYPE = "aux_genotype.json"  # the Auxi-NAS genotype a run trains, next to config.json
PREDICTIONS_FIGURE = "predictions.png"
SEARCH_LOG = "search.jsonl"  # an Auxi-NAS search: one line per candidate
BEST_GENOTYPE = "best_genotype.json"
CONFIG_CHANGES_KEY = "config_changes"

# Config keys that may change between a run and its resumption: they do not change the trained weights
# (`num_devices` changes them only by float rounding, see README "Data parallelism"), or only what is reported.
RESUMABLE_KEYS = (
    "progress_bar", "log_every_steps", "eval_every_steps", "checkpoint_every_steps", "max_checkpoints_to_keep",
    "input.num_workers", "input.num_threads", "dataset.data_dir", "dataset.manual_dir", "dataset.prepare",
    "analysis.figures", "distributed.", "runs", "num_devices", "reference_results", "accept_changed_keys",
    "search.rescore.", CONFIG_CHANGES_KEY,
)


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a.b': value} view of a nested config, tuples as lists (as JSON stores them)."""
    flat = {}
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and key not in ("runs", "reference_results"):
            flat.update(flatten_config(value, path + "."))
        else:
            flat[path] = json.loads(json.dumps(value, default=to_jsonable))
    return flat


def to_jsonable(value):
    """A JSON-ready form of a config value: tuples and sets as lists, numpy scalars as numbers, others as text."""
    if isinstance(value, (tuple, set)):
        return list(value)
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    return str(value)


def config_to_json(config) -> str:
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return json.dumps(data, indent=2, sort_keys=True, default=to_jsonable)


def check_workdir_config(workdir: epath.Path, config, *, resume_step: int | None = None) -> None:
    """Records the config in a fresh workdir; in one with checkpoints, requires the same config.

    Keys listed in `config.accept_changed_keys` (comma-separated dotted keys or `prefix.` groups) may differ:
    the run continues from its last checkpoint with the new values, and config.json records the change
    (`config_changes`: step, key, old and new value) next to the new config.
    """
    workdir = epath.Path(workdir)
    path = workdir / CONFIG_FILE
    current = json.loads(config_to_json(config))
    has_checkpoints = (workdir / CHECKPOINT_DIR).exists() and any((workdir / CHECKPOINT_DIR).iterdir())
    accepted = parse_accepted_keys(config.get("accept_changed_keys"), flatten_config(current))
    history = []
    if path.exists() and has_checkpoints:
        try:
            saved = json.loads(path.read_text())
        except ValueError as error:
            raise UserError(f"{path} is not valid JSON ({error}); expected the config of the run in this workdir.")
        history = list(saved.get(CONFIG_CHANGES_KEY, []))
        differing = _differing_keys(flatten_config(saved), flatten_config(current))
        refused = [item for item in differing if not _is_accepted(item[0], accepted)]
        if refused:
            raise UserError(_refusal_message(workdir, refused, resume_step))
        if differing:
            history.append({"step": resume_step, "changes": {key: [old, new] for key, old, new in differing}})
    if history:
        current[CONFIG_CHANGES_KEY] = history
    if jax.process_index() == 0:
        write_text_atomic(path, json.dumps(current, indent=2, sort_keys=True))


def parse_accepted_keys(text: str | None, config_keys: Mapping[str, Any]) -> tuple[str, ...]:
    """'optimizer.learning_rate, aux.' -> ('optimizer.learning_rate', 'aux.'); each must name config keys."""
    accepted = tuple(part.strip() for part in (text or "").split(",") if part.strip())
    for key in accepted:
        if not any(_is_accepted(config_key, (key,)) for config_key in config_keys):
            raise UserError(f"config.accept_changed_keys names {key!r}, which is no config key; expected "
                             "comma-separated dotted keys such as 'optimizer.learning_rate' or groups such as "
                             "'optimizer.'.")
    return accepted


def _is_accepted(key: str, accepted: tuple[str, ...]) -> bool:
    return any(key == name or (name.endswith(".") and key.startswith(name)) for name in accepted)


def _refusal_message(workdir: epath.Path, differing: list[tuple[str, Any, Any]], resume_step: int | None) -> str:
    details = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in differing[:12])
    keys = ",".join(key for key, _, _ in differing)
    where = f"its last checkpoint (step {resume_step})" if resume_step else "its last checkpoint"
    return (f"Workdir {workdir} holds checkpoints of a run with another config ({details}); expected the config it "
            f"was started with, or continue from {where} with the new values: "
            f"--config.accept_changed_keys={keys} (recorded in {workdir / CONFIG_FILE}), or start a new run from "
            f"it: --workdir=NEW_WORKDIR --config.init_from.path={workdir} --config.init_from.scope=main.")


# Config keys added after runs may have been started, with the value that reproduces the behaviour from before
# them: a workdir whose config.json lacks such a key resumes when the key has that value.
ADDED_KEYS = {"init_from.base_lr_scale": 1.0, "optimizer.schedule": "poly", "model.pretrained_required": False,
              "search.devices": 0, "optimizer.name": "sgd", "optimizer.step_every_steps": 10_000,
              "optimizer.step_factor": 0.1, "dataset.validation_split": None, "evaluation.reduction": "per_pixel",
              "evaluation.average_last": 1, "evaluation.select_by": "delta_m", "evaluation.report": None,
              "model.aspp_rates": "paper", "aux.min_head_size": 0, "search.cross_task_inputs": "all_cells"}
ADDED_KEYS.update({f"weighting.{key}": value
                   for key, value in flatten_config(weighting_lib.DEFAULT_OPTIONS).items()})


def _differing_keys(saved: dict, current: dict) -> list[tuple[str, Any, Any]]:
    keys = sorted(set(saved) | set(current))

    def added_as_before(key: str) -> bool:
        return key not in saved and key in ADDED_KEYS and current.get(key) == ADDED_KEYS[key]

    return [(key, saved.get(key), current.get(key)) for key in keys
            if saved.get(key) != current.get(key) and not key.startswith(RESUMABLE_KEYS) and not added_as_before(key)]


def _local(path) -> pathlib.Path | None:
    """`path` as a local absolute path (`~` expanded), None for a remote one (gs://...)."""
    text = os.fspath(path)
    return None if "://" in text else pathlib.Path(os.path.expanduser(text)).absolute()


def _nearest_existing(path: pathlib.Path) -> pathlib.Path:
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def _kind(path: pathlib.Path) -> str:
    if path.is_symlink() and not path.exists():
        return "a broken symbolic link"
    return "a file" if path.is_file() else "not a directory"


def check_output_dir(path, what: str) -> None:
    """`path` can take a program's output, checked before anything is written: an existing directory this user
    may write in, or a missing one whose nearest existing ancestor is such a directory (it is created later).

    Anything else is one UserError naming `what` (the flag or config key) and the path: a file, something under
    a file, a directory without write permission (`os.access`, so a read-only mount counts, and root may write
    where permission bits say no, as it can). A remote path (gs://...) is only checked not to be a file.
    """
    where = f"{what}={os.fspath(path)}"
    expected = "expected a directory (created if missing)"
    local = _local(path)
    if local is None:
        if epath.Path(path).exists() and not epath.Path(path).is_dir():
            raise UserError(f"{where} is a file; {expected}.")
        return
    if os.path.lexists(local):
        if not local.is_dir():
            raise UserError(f"{where} is {_kind(local)}; {expected}.")
        if not os.access(local, os.W_OK | os.X_OK):
            raise UserError(f"{where} is not writable (permission denied or a read-only file system); expected a "
                            "directory this user may write in.")
        return
    ancestor = _nearest_existing(local)
    if not ancestor.is_dir():
        raise UserError(f"{where} cannot be created: {ancestor} is {_kind(ancestor)}; {expected}.")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"{where} cannot be created: {ancestor} is not writable (permission denied or a read-only "
                        "file system); expected a directory this user may create.")


def check_input_dir(path, what: str, *, may_be_missing: bool = False) -> None:
    """`path` is a directory this user may read (`may_be_missing`: or does not exist yet, and then its nearest
    existing ancestor is a directory); otherwise one UserError naming `what` and the path."""
    where = f"{what}={os.fspath(path)}"
    local = _local(path)
    if local is None:
        if epath.Path(path).exists() and not epath.Path(path).is_dir():
            raise UserError(f"{where} is a file; expected a directory.")
        return
    if not os.path.lexists(local):
        if not may_be_missing:
            raise UserError(f"{where} does not exist; expected a directory.")
        ancestor = _nearest_existing(local)
        if not ancestor.is_dir():
            raise UserError(f"{where} cannot be created: {ancestor} is {_kind(ancestor)}; expected a directory.")
        return
    if not local.is_dir():
        raise UserError(f"{where} is {_kind(local)}; expected a directory.")
    if not os.access(local, os.R_OK | os.X_OK):
        raise UserError(f"{where} is not readable (permission denied); expected a directory this user may read.")
