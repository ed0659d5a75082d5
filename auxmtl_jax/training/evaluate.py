"""Evaluation and what it leaves behind: the streaming test-split evaluator, a checkpoint's metrics, Δm% references,
results.json / results.txt and the model description stored with the export."""

from __future__ import annotations

import functools
import json
from typing import Mapping

import jax
import ml_collections
from etils import epath
from jax.sharding import Mesh

from auxmtl_jax import checkpoint as checkpoint_lib
from auxmtl_jax import comparison
from auxmtl_jax import coordination
from auxmtl_jax import input_pipeline
from auxmtl_jax import metrics as metrics_lib
from auxmtl_jax import parallel
from auxmtl_jax import workdir as workdir_lib
from auxmtl_jax.models import MultiTaskModel
from auxmtl_jax.training.checks import prepare_run, validate_config
from auxmtl_jax.training.state import TrainState, create_sharded_train_state, main_variables, task_channels
from auxmtl_jax.training.steps import eval_step


class Evaluator:
    """Streams a whole split (the test split unless `split` is given) through `main` of a train state into on-device
    metrics, reduced as config.evaluation.reduction says; callable repeatedly."""

    def __init__(self, config, model: MultiTaskModel, dataset: input_pipeline.DatasetInfo, mesh: Mesh,
                 split: str | None = None):
        self.mesh = mesh
        self.split = split or config.dataset.eval_split
        replicated = parallel.replicated_sharding(mesh)
        self.data = input_pipeline.create_eval_dataset(config.dataset, config.input, tasks=tuple(config.tasks),
                                                       global_batch_size=config.eval_batch_size, split=self.split)
        reduction = (config.get("evaluation") or {}).get("reduction", "per_pixel")
        # The step donates its metric state, so every evaluation starts from newly made zeros.
        self._new_metric_state = jax.jit(
            functools.partial(metrics_lib.init_state, tuple(config.tasks), dataset.num_classes, reduction=reduction),
            out_shardings=replicated)
        self._eval_step = coordination.together(
            jax.jit(functools.partial(eval_step, model=model),
                    in_shardings=(replicated, replicated, parallel.batch_sharding(mesh)),
                    out_shardings=replicated, donate_argnums=1), "eval step")

    def __call__(self, state: TrainState) -> dict:
        return self.evaluate_variables(main_variables(state))

    def evaluate_variables(self, variables) -> dict:
        """The metrics of `main` with these variables ({'params', 'batch_stats'}, as `main_variables` gives)."""
        metric_state = self._new_metric_state()
        for local_batch in self.data:
            metric_state = self._eval_step(variables, metric_state, parallel.global_batch(local_batch, self.mesh))
        return metrics_lib.compute(metric_state)


def _results_delta_m(results, references) -> float | None:
    if references is None:
        return None
    try:
        return comparison.delta_m(results, references)
    except ValueError:
        return None


def write_results(workdir: epath.Path, name: str, step: int, results: dict, references,
                  report: Mapping | None = None) -> dict:
    """WORKDIR/results.json and a readable results.txt, both written atomically. `results` are the reported
    metrics; `report` adds what they are (`selection.report_record`: rule, reduction, the other evaluations)."""
    record = {"name": name, "step": int(step), "metrics": results, **{k: v for k, v in (report or {}).items()
                                                                       if k != "metrics"},
              "delta_m": _results_delta_m(results, references), "delta_m_convention": comparison.DELTA_M_DEFAULT}
    if jax.process_index() == 0:
        workdir_lib.write_text_atomic(workdir / workdir_lib.RESULTS_FILE, json.dumps(record, indent=2, allow_nan=True))
        workdir_lib.write_text_atomic(workdir / workdir_lib.RESULTS_TABLE,
                                      comparison.format_table({name: results}, references) + "\n")
    return record


def model_export_config(config, dataset: input_pipeline.DatasetInfo) -> dict:
    """The model description stored next to exported weights: enough to rebuild `main` and preprocess images."""
    return {"model": config.model.to_dict(),
            "tasks": task_channels(config.tasks, dataset.num_classes),
            "class_names": list(dataset.class_names or []),
            "input": {"mean": list(config.input.mean), "std": list(config.input.std),
                      "eval_size": list(config.input.eval_size or dataset.image_size),
                      "crop_size": list(config.input.crop_size)},  # model.aspp_rates='feature' scales to it
            "dataset": {"name": config.dataset.name, "config": config.dataset.config}}


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, step: int | None = None) -> dict:
    """Test-split metrics {task: {metric: value}} of checkpoint `step` of a run (its latest when None).

    `config` is the run's config. Nothing is written to the workdir.
    """
    parallel.initialize_distributed(config.distributed)
    validate_config(config)
    dataset, model, mesh = prepare_run(config)
    checkpointer = checkpoint_lib.Checkpointer(epath.Path(workdir), read_only=True)
    try:
        step = checkpointer.checked_step(step)
        state, _, _, _ = create_sharded_train_state(config, model, mesh)
        state, _ = checkpointer.restore(step, state)
    finally:
        checkpointer.close()
    with jax.set_mesh(mesh):
        return Evaluator(config, model, dataset, mesh)(state)


def flatten_results(results: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """{task: {metric: v}} -> {"task/metric": v}, the form metrics.jsonl's eval lines use."""
    return {f"{task}/{metric}": value for task, values in results.items() for metric, value in values.items()}
