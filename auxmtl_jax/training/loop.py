"""The training loop of one run: resume from the last checkpoint, step, log, check for NaN/Inf, checkpoint,
evaluate, export `main` and write results.json. No figures and no dispatch: `programs` does both."""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from auxmtl_jax import checkpoint as checkpoint_lib
from auxmtl_jax import comparison
from auxmtl_jax import coordination
from auxmtl_jax import input_pipeline
from auxmtl_jax import parallel
from auxmtl_jax import reporting
from auxmtl_jax import workdir as workdir_lib
from auxmtl_jax.analysis import gradients
from auxmtl_jax.errors import UserError
from auxmtl_jax.models import MultiTaskModel
from auxmtl_jax.training import divergence, preemption
from auxmtl_jax.training import selection as selection_lib
from auxmtl_jax.training.checks import check_run, check_workdir_genotype, prepare_run, reference_results
from auxmtl_jax.training.evaluate import Evaluator, flatten_results, model_export_config, write_results
from auxmtl_jax.training.state import TrainState, create_sharded_train_state, main_variables, run_weighting
from auxmtl_jax.training.steps import step_functions

log = logging.getLogger("auxmtl_jax")


class TrainedRun(NamedTuple):
    """What one finished run hands its caller: the results.json record, and what drawing its figures needs."""

    record: dict
    state: TrainState
    model: MultiTaskModel
    dataset: input_pipeline.DatasetInfo
    eval_data: Any  # the evaluator's test batches


class _Evaluations(NamedTuple):
    """What a periodic evaluation runs: the test evaluator, and the validation evaluator with its selection."""

    plan: selection_lib.EvaluationPlan
    test: Evaluator
    validation: Evaluator | None
    selection: selection_lib.Selection | None


class NonFiniteError(UserError, FloatingPointError):
    """Training produced a NaN/Inf loss or train state; nothing non-finite was saved.

    A user error: its message says which step, loss and batch, and either the last checkpoint from before the run
    began to diverge and the flags that continue from it at a lower learning rate (later checkpoints are moved to
    WORKDIR/checkpoints_diverged/), or that the run must start over, and why (`training.divergence`).
    """


def first_non_finite(window: list[tuple[int, dict]]) -> tuple[int, str] | None:
    """(step, loss name) of the first NaN/Inf loss in a window of host metrics, or None."""
    for step, values in window:
        for key, value in values.items():
            if "loss" in key and not math.isfinite(float(value)):
                return step, key
    return None


def _is_float(leaf) -> bool:
    return jnp.issubdtype(leaf.dtype, jnp.inexact)


@jax.jit
def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree) if _is_float(leaf)]))


@jax.jit
def _finite_per_leaf(tree):
    return jax.tree.map(lambda leaf: jnp.all(jnp.isfinite(leaf)) if _is_float(leaf) else jnp.asarray(True), tree)


def first_non_finite_leaf(tree) -> str | None:
    """Path ('params/main/encoder/...') of the first leaf holding a NaN/Inf, or None; one reduced flag when clean."""
    if bool(jax.device_get(_all_finite(tree))):
        return None
    flags, _ = jax.tree_util.tree_flatten_with_path(jax.device_get(_finite_per_leaf(tree)))
    for path, finite in flags:
        if not finite:
            return "/".join(str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))) for key in path)
    return None


def train_run(config: ml_collections.ConfigDict, workdir: epath.Path, checked: bool = False) -> TrainedRun:
    """One run in `workdir`: resumes from its last checkpoint, evaluates, exports `main`, writes results.

    Nothing is written before `check_run` passes (`checked`: the caller has run it on this config) and `workdir`
    is a directory this user may write in, or may create.
    """
    workdir_lib.check_output_dir(workdir, "workdir")
    dataset, model, mesh = prepare_run(config) if checked else check_run(config)
    workdir = epath.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    checkpointer = checkpoint_lib.Checkpointer(workdir, max_to_keep=config.max_checkpoints_to_keep)
    plan = selection_lib.evaluation_plan(config)
    writer = selection = None
    try:
        start_step = checkpointer.latest_step() or 0
        workdir_lib.check_workdir_config(workdir, config, resume_step=start_step)
        check_workdir_genotype(workdir, model, resume_step=start_step)
        with preemption.handle_signals():
            state, state_sharding, tx, learning_rate_fn = create_sharded_train_state(config, model, mesh)
            train_iter = input_pipeline.create_train_iterator(config.dataset, config.input, tasks=tuple(config.tasks),
                                                              global_batch_size=config.batch_size, seed=config.seed)
            pending_log, logged = [], {}
            if start_step:
                start_step, state, data_state = checkpointer.restore_latest_intact(state)
                data_state, pending_log = split_pending_log(data_state)
                data_state, logged = split_evaluation_log(data_state)
                train_iter.set_state(data_state)
                log.info("resumed %s from step %d", workdir, start_step)
            writer = reporting.MetricWriter(workdir)
            writer.truncate_after(start_step)
            if start_step == 0 and jax.process_index() == 0:
                log.info("parameters of %s:\n%s", config.name, reporting.parameter_overview(state.params))

            step_fn, grad_fn = step_functions(config, model, tx, learning_rate_fn, mesh, state_sharding,
                                              run_weighting(config))
            step_fn, grad_fn = coordination.together(step_fn, "train step"), coordination.together(grad_fn, "grad")
            evaluator = Evaluator(config, model, dataset, mesh)
            validator = None
            if plan.validation_split:
                validator = Evaluator(config, model, dataset, mesh, split=plan.validation_split)
                selection = selection_lib.Selection(plan, workdir, reference_results(config), tuple(config.tasks))
                selection.resume(start_step, logged.get(selection_lib.VALIDATION_KIND, {}))
            evaluations = _Evaluations(plan, evaluator, validator, selection)
            coordinates = _gradient_coordinates(config, state)
            loop = _TrainLoop(config, workdir, mesh, writer, checkpointer, train_iter, pending_log, logged)
            with jax.set_mesh(mesh):
                state = loop.run(state, start_step, step_fn, grad_fn, coordinates, evaluations)
                report = _report(config, evaluations, loop.logged, state)
    finally:
        checkpointer.close()
        if selection is not None:
            selection.close()
        if writer is not None:
            writer.close()
    results = report["metrics"]
    record = write_results(workdir, config.name, config.num_train_steps, results, reference_results(config), report)
    if jax.process_index() == 0:
        checkpoint_lib.export_inference(workdir, main_variables(state), model_export_config(config, dataset))
        print(f"\n{config.name} (step {config.num_train_steps}):\n"
              f"{comparison.format_table({config.name: results}, reference_results(config))}", flush=True)
    return TrainedRun(record, state, model, dataset, evaluator.data)


PENDING_LOG = "pending_log"  # saved beside the iterator state: the train metrics of steps not yet logged


EVALUATION_LOG = "evaluation_log"  # saved beside the iterator state: every evaluation so far, by kind


def split_evaluation_log(data_state: dict | None) -> tuple[dict | None, dict[str, dict[int, dict]]]:
    """A checkpoint's data state without its evaluation log, and that log: {kind: {step: {task: {metric: v}}}}."""
    if not data_state or EVALUATION_LOG not in data_state:
        return data_state, {}
    data_state = dict(data_state)
    logged = {kind: {int(step): selection_lib.unflatten_results(values) for step, values in lines}
              for kind, lines in data_state.pop(EVALUATION_LOG).items()}
    return data_state, logged


def _report(config, evaluations: _Evaluations, logged: Mapping[str, Mapping[int, dict]], state) -> dict:
    """results.json's description of what was reported: the final, last-K mean and selected test metrics.

    The test split is evaluated here only for the selected step's weights, and only when no periodic test
    evaluation of that step exists."""
    plan, tests = evaluations.plan, logged.get(selection_lib.EVAL_KIND, {})
    final = tests[config.num_train_steps]
    last_mean = None
    if plan.average_last > 1:
        last_mean = selection_lib.mean_results([tests[step] for step in plan.last_steps])
    test_read_at = list(tests)
    selected = None
    if evaluations.selection is not None and evaluations.selection.best is not None:
        step = evaluations.selection.best[0]
        if step in tests:
            test = tests[step]
        else:
            test = evaluations.test.evaluate_variables(evaluations.selection.restore_best(main_variables(state)))
            test_read_at.append(step)
        evaluations.selection.prune(None)
        selected = evaluations.selection.record(test, step)
    elif plan.report == "selected":
        raise UserError(f"no validation evaluation of {config.name} gave a finite "
                        f"{evaluations.selection.criterion.name}; nothing to select (see metrics.jsonl).")
    return selection_lib.report_record(plan, final=final, num_train_steps=config.num_train_steps,
                                       last_mean=last_mean, selection=selected, test_read_at=test_read_at)


def split_pending_log(data_state: dict | None) -> tuple[dict | None, list[tuple[int, dict]]]:
    """A checkpoint's data state without the pending log window, and that window: [(step, {metric: value})]."""
    if not data_state or PENDING_LOG not in data_state:
        return data_state, []
    data_state = dict(data_state)
    pending = [(int(step), dict(values)) for step, values in data_state.pop(PENDING_LOG)]
    return data_state, pending


def _gradient_coordinates(config, state: TrainState):
    """The sampled encoder weights Fig. 5's statistics follow (None when they are not logged)."""
    if not config.analysis.grad_log_every_steps:
        return None
    return gradients.sample_coordinates(jax.device_get(state.params["main"]["encoder"]),
                                        samples_per_layer=config.analysis.grad_samples_per_layer,
                                        seed=config.seed)


class _TrainLoop:
    """The step loop with its periodic duties: logging, NaN checks, gradient statistics, checkpoints, eval."""

    def __init__(self, config, workdir, mesh, writer, checkpointer, train_iter, pending_log=(), logged=None):
        self.config, self.workdir, self.mesh = config, workdir, mesh
        self.writer, self.checkpointer, self.train_iter = writer, checkpointer, train_iter
        self.window: list[tuple[int, Any]] = list(pending_log)  # restored: the steps since the last log
        # Every evaluation so far, {kind: {step: results}}; checkpointed, so a resumed run reports the same.
        self.logged: dict[str, dict[int, dict]] = {kind: dict(values) for kind, values in (logged or {}).items()}

    def _due(self, step: int, every: int) -> bool:
        return step % every == 0 or step == self.config.num_train_steps

    def run(self, state, start_step, step_fn, grad_fn, coordinates, evaluations: _Evaluations):
        config = self.config
        progress = reporting.Progress(total=config.num_train_steps, initial=start_step,
                                      batch_size=config.batch_size, enabled=config.progress_bar)
        grad_every = config.analysis.grad_log_every_steps
        try:
            for step in range(start_step, config.num_train_steps):
                batch = parallel.global_batch(next(self.train_iter), self.mesh)
                extra = {}
                if grad_every and (step + 1) % grad_every == 0:
                    extra = jax.device_get(grad_fn(state, batch, coordinates))
                state, step_metrics = step_fn(state, batch)
                done = step + 1
                self.window.append((done, step_metrics))
                if self._due(done, config.log_every_steps) or extra:
                    self._log(done, progress, extra)
                    self.checkpointer.record_committed()
                if self._due(done, config.eval_every_steps):
                    self._evaluate(done, state, evaluations)
                if self._due(done, config.checkpoint_every_steps):
                    self._save(done, state)
                if preemption.reached(done) and done < config.num_train_steps:
                    self._stop_preempted(done, state)
        finally:
            progress.close()
        if config.num_train_steps not in self.logged.get(selection_lib.EVAL_KIND, {}):
            self._evaluate(config.num_train_steps, state, evaluations)  # resumed from a checkpoint without it
        return state

    def _evaluate(self, step: int, state: TrainState, evaluations: _Evaluations) -> None:
        """The periodic evaluation of `step`: validation (and the selection) when configured, test when due."""
        if evaluations.validation is not None:
            results = evaluations.validation(state)
            self._record(step, selection_lib.VALIDATION_KIND, results)
            steps = self.checkpointer.all_steps()
            evaluations.selection.after_validation(step, results, main_variables(state), steps[0] if steps else None)
        if evaluations.plan.reads_test_at(step):  # the last step is always one of the last K
            self._record(step, selection_lib.EVAL_KIND, evaluations.test(state))

    def _record(self, step: int, kind: str, results: dict) -> None:
        self.writer.write(step, kind, flatten_results(results))
        self.logged.setdefault(kind, {})[step] = results

    def _save(self, step: int, state: TrainState) -> None:
        """A checkpoint of `step`: only a finite state, with the iterator state and the steps not yet logged."""
        self._check_finite()
        self._check_state_finite(step, state)
        self.writer.write(step, divergence.CHECKPOINT_KIND,
                          {divergence.PARAM_NORM: divergence.param_norm(state.params)})
        pending = [[window_step, {key: float(value) for key, value in values.items()}]
                   for window_step, values in self.window]
        evaluation_log = {kind: [[logged_step, flatten_results(results)] for logged_step, results in sorted(by_step.items())]
                          for kind, by_step in self.logged.items()}
        self.checkpointer.save(step, state, {**self.train_iter.get_state(), PENDING_LOG: pending,
                                             EVALUATION_LOG: evaluation_log})

    def _stop_preempted(self, step: int, state: TrainState) -> None:
        """Saves a verified checkpoint of the agreed `step` (unless this step's periodic one was just saved) and
        stops the run with `Preempted`."""
        started = time.perf_counter()
        if self.checkpointer.latest_step() != step:
            self._save(step, state)
        self.checkpointer.wait()
        seconds = time.perf_counter() - started
        message = (f"{preemption.signal_name()}: saved a verified checkpoint of step {step} of "
                   f"{self.config.num_train_steps} in {self.workdir} ({seconds:.1f} s); re-run the same command to "
                   "resume")
        raise preemption.Preempted(message, step)

    def _check_finite(self) -> None:
        host = [(step, jax.device_get(values)) for step, values in self.window]
        bad = first_non_finite(host)
        if bad is not None:
            step, key = bad
            raise NonFiniteError(self._non_finite_message(
                f"{key} became non-finite at step {step} ({self._batch_position(step, host[-1][0])})", host))
        self.window = host

    def _batch_position(self, step: int, latest: int) -> str:
        """Where the batch that `step` trained on sits in the data order, so that it can be inspected."""
        next_batch = self.train_iter.get_state().get("next_batch")
        if not isinstance(next_batch, int):
            return "its batch position is unknown"
        position = next_batch - (latest - step) - 1
        return (f"its batch is number {position} of the training data order for seed {self.config.seed}: "
                f"input_pipeline.create_train_iterator(...) with set_state(dict(it.get_state(), "
                f"next_batch={position})) yields it")

    def _check_state_finite(self, step: int, state: TrainState) -> None:
        """Never saves a checkpoint holding NaN/Inf parameters or optimiser state."""
        leaf = first_non_finite_leaf(state)
        if leaf is not None:
            raise NonFiniteError(self._non_finite_message(
                f"the train state became non-finite by step {step} (first non-finite leaf: {leaf}); it was not saved",
                self.window))

    def _non_finite_message(self, what: str, window: list[tuple[int, Any]]) -> str:
        """`what` happened; the kept checkpoints from after the divergence began are moved aside, and the advice
        names the one to continue from (or says the run must start over)."""
        self.checkpointer.wait()
        config = self.config
        records = divergence.read_records(self.workdir, workdir_lib.METRICS_FILE)
        host = [(step, jax.device_get(values)) for step, values in window]
        verdict = divergence.judge(self.checkpointer.all_steps(),
                                   divergence.loss_history(records, host, tuple(config.tasks)),
                                   divergence.norm_history(records))
        for step in verdict.diverged:
            self.checkpointer.move_aside(step, workdir_lib.DIVERGED_DIR)
        return (f"{what} in {self.workdir}; training stopped: " + divergence.advice(
            verdict, workdir=self.workdir, learning_rate=config.optimizer.learning_rate,
            accepted=config.get("accept_changed_keys"), moved_to=self.workdir / workdir_lib.DIVERGED_DIR))

    def _log(self, step: int, progress: reporting.Progress, extra: Mapping[str, Any]) -> None:
        self._check_finite()
        values = {key: float(np.mean([float(v[key]) for _, v in self.window])) for key in self.window[-1][1]}
        values["images_per_sec"] = progress.update(step, values["loss/total"])
        self.writer.write(step, "train", {**values, **{k: float(v) for k, v in extra.items()}})
        self.window = []
