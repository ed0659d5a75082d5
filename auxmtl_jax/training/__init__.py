"""Training one run: the train state and optimiser (`state`), the pure jitted steps (`steps`), pre-flight checks
(`checks`), evaluation and results files (`evaluate`) and the loop that ties them together (`loop`).

`programs` chooses between training one run, a sweep and a search; this package trains and evaluates one run.
"""

from auxmtl_jax.training.checks import (check_input_files, check_run, prepare_run, reference_results,
                                        validate_config)
from auxmtl_jax.training.evaluate import Evaluator, evaluate_checkpoint, model_export_config, write_results
from auxmtl_jax.training.loop import NonFiniteError, TrainedRun, first_non_finite, first_non_finite_leaf, train_run
from auxmtl_jax.training.state import (SCRATCH, TrainState, create_learning_rate_fn, create_model, create_optimizer,
                                       create_sharded_train_state, create_train_state, init_variables, main_variables,
                                       run_learning_rate_fn, run_weighting, task_channels)
from auxmtl_jax.training.steps import eval_step, gradient_statistics, loss_terms, step_functions, train_step

__all__ = ["SCRATCH", "Evaluator", "NonFiniteError", "TrainState", "TrainedRun", "check_input_files", "check_run",
           "create_learning_rate_fn", "create_model", "create_optimizer", "create_sharded_train_state",
           "create_train_state", "eval_step", "init_variables", "evaluate_checkpoint", "first_non_finite", "first_non_finite_leaf",
           "gradient_statistics", "loss_terms", "main_variables", "model_export_config", "prepare_run",
           "reference_results", "run_learning_rate_fn", "run_weighting", "step_functions", "task_channels",
           "train_run", "train_step", "validate_config", "write_results"]
