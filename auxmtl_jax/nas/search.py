"""The Auxi-NAS search loop (paper Sec. 3.2): sample genotypes, train them briefly, score them, update by PPO.

One generation: the controller samples ``search.population`` genotypes (a pure function of the seed, the
generation and the controller's parameters); all are trained at once from the same starting state by one compiled
population step (``population.py``) on the meta-train split (``train[:f]``), for ``search.steps[0]`` steps; each
is scored on the meta-val split (``train[f:]``; the test split is never read) with `main`'s Polyak-averaged
weights. Candidates whose score falls below ``search.termination_fraction`` x the running mean of earlier
first-stage scores stop there (progressive early termination, Nekrasov et al.); the others train
``search.steps[1]`` more steps and are scored again. The rewards (``reward.py``) update the controller by PPO.

Every generation starts the meta-train iterator afresh from the same seed, so all candidates see the same
batches. The workdir holds ``search.jsonl`` (a line per candidate), ``best_genotype.json``, orbax checkpoints of
the controller/PPO state after each generation (``programs`` draws the figures of ``analysis/search_plot.py``
afterwards); re-running the same command resumes after the last complete
generation and samples exactly the genotypes an uninterrupted search would.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import time
from types import SimpleNamespace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from auxmtl_jax import disk, input_pipeline
from auxmtl_jax import workdir as workdir_lib
from auxmtl_jax.errors import UserError
from auxmtl_jax.models import build_model
from auxmtl_jax.nas import population as population_lib
from auxmtl_jax.nas import ppo as ppo_lib
from auxmtl_jax.nas import reward as reward_lib
from auxmtl_jax.models.genotype import CellSpace, check_cross_task_inputs
from auxmtl_jax.nas.controller import Controller
from auxmtl_jax.training import checks, preemption, state as state_lib

log = logging.getLogger("auxmtl_jax")
SEARCH_LOG = workdir_lib.SEARCH_LOG
BEST_GENOTYPE = workdir_lib.BEST_GENOTYPE
SEARCH_CHECKPOINTS = workdir_lib.CHECKPOINT_DIR  # controller/PPO state after each generation


def search_space(config, stage_names: tuple[str, ...]) -> CellSpace:
    """The space of ``config.search``: its tasks and stages (all sown stages when empty), n = P by default, and
    its cross-task input rule (``search.cross_task_inputs``: "paper", the default, or our wider "all_cells")."""
    stages = tuple(config.search.stages) or stage_names
    missing = [stage for stage in stages if stage not in stage_names]
    if missing:
        raise UserError(f"search.stages: {missing} are not sown by this encoder; it sows {stage_names}")
    cells = config.search.cells_per_task or len(stages)
    return CellSpace(tuple(config.search.tasks or config.tasks), stages, int(cells), cross_task_inputs(config))


def cross_task_inputs(config) -> str:
    """``search.cross_task_inputs`` (a config without the field searches under the paper's rule)."""
    rule = config.search.get("cross_task_inputs", "paper")
    check_cross_task_inputs(rule, "search.cross_task_inputs")
    return rule


def meta_splits(config) -> tuple[str, str]:
    """Deterministic meta-train / meta-val slices of the dataset's train split."""
    fraction = config.search.meta_train_fraction
    if not 0 < fraction < 1:
        raise UserError(f"search.meta_train_fraction={fraction!r}; expected a fraction in (0, 1)")
    percent = round(100 * fraction)
    split = config.dataset.train_split
    return f"{split}[:{percent}%]", f"{split}[{percent}%:]"


def meta_dataset_configs(config):
    """Dataset configs whose train split is the meta-train slice and whose eval split is the meta-val slice."""
    meta_train, meta_val = meta_splits(config)
    train_cfg, val_cfg = config.dataset.copy_and_resolve_references(), config.dataset.copy_and_resolve_references()
    train_cfg.train_split, val_cfg.eval_split = meta_train, meta_val
    return train_cfg, val_cfg


def ppo_config(config) -> ppo_lib.PPOConfig:
    """``config.search.ppo`` as a PPOConfig; unknown or bad fields give one error naming them."""
    fields = config.search.ppo.to_dict()
    known = {field.name for field in dataclasses.fields(ppo_lib.PPOConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise UserError(f"search.ppo: unknown field(s) {unknown}; expected some of {sorted(known)}")
    try:
        return ppo_lib.PPOConfig(**fields)
    except ValueError as error:
        raise UserError(f"search.ppo: {error}") from None


def validate_search_config(config) -> ppo_lib.PPOConfig:
    """Checks ``config.search`` before anything is written; returns its PPO settings."""
    search = config.search
    for key in ("num_candidates", "population"):
        value = search[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"search.{key}={value!r}; expected a positive integer")
    steps = tuple(search.steps)
    if (len(steps) != 2 or any(isinstance(step, bool) or not isinstance(step, int) or step < 0 for step in steps)
            or steps[0] < 1):
        raise UserError(f"search.steps={steps!r}; expected (first-stage steps >= 1, second-stage steps >= 0)")
    if not 0 <= search.polyak_decay < 1:
        raise UserError(f"search.polyak_decay={search.polyak_decay!r}; expected a value in [0, 1)")
    if search.termination_fraction < 0:
        raise UserError(f"search.termination_fraction={search.termination_fraction!r}; expected >= 0")
    devices = search.get("devices", 0)
    available = len(jax.local_devices())
    if isinstance(devices, bool) or not isinstance(devices, int) or not 0 <= devices <= available:
        raise UserError(f"search.devices={devices!r}; expected 0 (every local device) up to the {available} local "
                         f"device(s)")
    cross_task_inputs(config)
    settings = ppo_config(config)
    if search.population > settings.buffer_size:
        raise UserError(f"search.population={search.population} exceeds search.ppo.buffer_size="
                         f"{settings.buffer_size}: a generation's candidates must fit the PPO buffer")
    meta_splits(config)
    rescore_settings(config)
    return settings


def rescore_settings(config) -> tuple[int, tuple[int, ...]]:
    """(top, seeds) of ``config.search.rescore`` (top 0 = no re-scoring), checked before any work."""
    settings = config.search.get("rescore")
    if not settings:
        return 0, ()
    top, seeds = settings.get("top", 0), tuple(settings.get("seeds", ()))
    if isinstance(top, bool) or not isinstance(top, int) or top < 0:
        raise UserError(f"search.rescore.top={top!r}; expected a non-negative integer (0 = no re-scoring)")
    if (not seeds and top) or any(isinstance(seed, bool) or not isinstance(seed, int) or seed < 0 for seed in seeds) \
            or len(set(seeds)) != len(seeds):
        raise UserError(f"search.rescore.seeds={seeds!r}; expected distinct non-negative integers")
    if config.seed in seeds:
        raise UserError(f"search.rescore.seeds={seeds!r} holds the search's own seed {config.seed}; expected other "
                        "seeds (the search's reward under its seed is already in search.jsonl)")
    return top, seeds


@dataclasses.dataclass
class SearchSetup:
    """Everything one search run compiles and reuses across generations."""

    config: Any
    controller: Controller
    model: Any
    start: state_lib.TrainState
    step_fn: Any
    eval_fn: Any
    sample_fn: Any
    meta_train: Any
    meta_val: Any
    num_classes: int | None
    ppo: ppo_lib.PPOConfig
    mesh: Any  # the `candidates` mesh, or None on one device

    def place(self, tree):
        """``tree`` (leading axis = candidate) split over the mesh's devices; unchanged on one device."""
        if self.mesh is None:
            return tree
        return jax.device_put(tree, population_lib.candidate_sharding(self.mesh))


def build_search_model(config, num_classes: int | None):
    """(the network with every candidate cell of the search space, that space), built for the training crop as a
    trained model is (`model.aspp_rates='feature'` scales to it)."""
    channels = state_lib.task_channels(config.tasks, num_classes)
    crop = tuple(config.input.crop_size)
    space = search_space(config, build_model(config.model, channels, input_size=crop).stage_names)
    model = build_model(config.model, channels, aux_cfg=SimpleNamespace(genotype=space, channels=config.aux.channels),
                        input_size=crop)
    return model, space


def prepare_search(config) -> SearchSetup:
    """Validates the config, prepares the data and compiles-on-first-use everything a search reuses."""
    checks.validate_config(config)
    ppo_settings = validate_search_config(config)
    checks.check_input_files(config)
    input_pipeline.prepare_dataset(config.dataset)
    dataset = input_pipeline.dataset_info(config.dataset)
    model, space = build_search_model(config, dataset.num_classes)
    lr_fn = state_lib.run_learning_rate_fn(config, sum(config.search.steps))
    start, tx = state_lib.create_train_state(config, model, jax.random.key(config.seed), lr_fn)
    step_fn = functools.partial(population_lib.population_train_step, model=model, config=config, tx=tx,
                                learning_rate_fn=lr_fn, polyak_decay=config.search.polyak_decay)
    eval_fn = functools.partial(population_lib.population_eval_step, model=model)
    devices = jax.local_devices()[:config.search.get("devices", 0) or None]
    mesh = population_lib.search_mesh(config.search.population, devices)
    if mesh is not None:
        log.info("each generation's %d candidates are split over %d devices", config.search.population, mesh.size)
        step_fn = population_lib.shard_over_candidates(step_fn, mesh)
        eval_fn = population_lib.shard_over_candidates(eval_fn, mesh, candidate_args=2)
    controller = Controller(space, hidden_size=config.search.controller.hidden_size,
                            num_layers=config.search.controller.num_layers)
    sample_fn = jax.jit(controller.sample_batch, static_argnums=2)
    meta_train_cfg, meta_val_cfg = meta_dataset_configs(config)
    meta_val = input_pipeline.create_eval_dataset(meta_val_cfg, config.input, tasks=tuple(config.tasks),
                                                  global_batch_size=config.eval_batch_size)
    return SearchSetup(config, controller, model, start, jax.jit(step_fn), jax.jit(eval_fn), sample_fn,
                       meta_train_cfg, meta_val, dataset.num_classes, ppo_settings, mesh)


def score_population(search: SearchSetup, population: population_lib.PopulationState) -> list[tuple[float, dict]]:
    """(reward, metrics) of every candidate on the whole meta-val split."""
    count = population.active.shape[0]
    states = search.place(population_lib.empty_metric_states(tuple(search.config.tasks), search.num_classes, count))
    for batch in search.meta_val:
        states = search.eval_fn(population, states, batch)
    results = []
    for index in range(count):
        metrics = population_lib.candidate_metrics(states, index)
        results.append((reward_lib.reward(metrics), metrics))
    return results


def train_population(search: SearchSetup, population, batches, steps: int, *, generation: int, first_step: int):
    """`steps` population steps; a preemption stops the search between two of them (the generation in progress
    is discarded: the search checkpoints whole generations, and re-running it repeats this one exactly)."""
    for index in range(steps):
        population, _ = search.step_fn(population, next(batches))
        step = generation * sum(search.config.search.steps) + first_step + index + 1
        if preemption.reached(step):
            batches.close()
            message = (f"{preemption.signal_name()}: stopped the search during generation {generation}, which is "
                       f"discarded; re-run the same command to resume after generation {generation - 1}")
            raise preemption.Preempted(message, step)
    return population


def run_generation(search: SearchSetup, ppo_state: ppo_lib.PPOState, generation: int, reference: float):
    """Samples, trains and scores one population; returns the PPO inputs, per-candidate records and the new
    running reference for early termination."""
    config = search.config.search
    key = jax.random.fold_in(jax.random.key(search.config.seed), generation)
    sampled = search.sample_fn(ppo_state.params, key, config.population)
    tokens = np.asarray(sampled.tokens)
    genotypes = [search.controller.genotype(row) for row in tokens]
    started = time.perf_counter()
    population = search.place(population_lib.start_population(search.start,
                                                              np.stack([g.as_array() for g in genotypes])))
    batches = input_pipeline.create_train_iterator(search.meta_train, search.config.input,
                                                   tasks=tuple(search.config.tasks),
                                                   global_batch_size=search.config.batch_size, seed=search.config.seed)
    population = train_population(search, population, batches, config.steps[0], generation=generation, first_step=0)
    first = score_population(search, population)
    first_rewards = np.asarray([reward for reward, _ in first])
    threshold = config.termination_fraction * reference if math.isfinite(reference) else -math.inf
    survivors = first_rewards >= threshold
    final = first
    if config.steps[1] > 0 and survivors.any():
        population = population.replace(active=search.place(jnp.asarray(survivors)))
        population = train_population(search, population, batches, config.steps[1], generation=generation,
                            first_step=config.steps[0])
        second = score_population(search, population)
        final = [second[index] if survivors[index] else first[index] for index in range(len(first))]
    batches.close()
    seconds = (time.perf_counter() - started) / len(genotypes)
    mean_first = float(first_rewards.mean())
    reference = mean_first if not math.isfinite(reference) else 0.9 * reference + 0.1 * mean_first
    records = []
    for index, genotype in enumerate(genotypes):
        reward, metrics = final[index]
        records.append({"candidate": generation * config.population + index, "generation": generation,
                        "genotype": genotype.to_json_dict(), "reward": reward, "first_stage_reward": first[index][0],
                        "metrics": metrics, "steps_trained": config.steps[0] + (config.steps[1] if survivors[index]
                                                                                 else 0),
                        "early_terminated": bool(not survivors[index] and config.steps[1] > 0),
                        "seconds": seconds})
    rewards = np.asarray([record["reward"] for record in records], np.float32)
    return sampled, rewards, records, reference


def run_search(config, workdir: str) -> dict:
    """Runs (or resumes) the search in ``workdir``; returns the best candidate's record."""
    workdir = epath.Path(workdir)
    checks.validate_config(config)
    validate_search_config(config)
    generations = math.ceil(config.search.num_candidates / config.search.population)
    done = _completed_generations(workdir)
    if done is not None and done >= generations:  # finished: nothing to build or train (a re-run to re-score)
        workdir_lib.check_workdir_config(workdir, config, resume_step=done)
        log.info("the search in %s has finished its %d generations", workdir, generations)
        return max(_read_log(workdir, before_generation=done), key=lambda record: record["reward"])
    search = prepare_search(config)
    workdir.mkdir(parents=True, exist_ok=True)
    manager = ocp.CheckpointManager((workdir / SEARCH_CHECKPOINTS).absolute(),
                                    options=ocp.CheckpointManagerOptions(max_to_keep=2))
    latest = manager.latest_step()
    workdir_lib.check_workdir_config(workdir, config, resume_step=latest or 0)
    ppo_settings = search.ppo
    ppo_state = ppo_lib.init_ppo_state(search.controller.init(jax.random.key(config.seed + 1)), ppo_settings,
                                       search.controller)
    generation, reference = 0, math.nan
    if latest is not None:
        template = {"ppo": ppo_state, "reference": np.zeros((), np.float32)}
        restored = manager.restore(latest, args=ocp.args.StandardRestore(template))
        ppo_state, reference, generation = restored["ppo"], float(restored["reference"]), latest
        log.info("resumed the search in %s after generation %d", workdir, generation - 1)
    records = _read_log(workdir, before_generation=generation)
    from tqdm import tqdm

    bar = tqdm(total=generations * config.search.population, initial=len(records), unit="candidate",
               disable=not config.progress_bar)
    started, evaluated_here = time.perf_counter(), 0
    with preemption.handle_signals():
        try:
            for generation in range(generation, generations):
                sampled, rewards, new_records, reference = run_generation(search, ppo_state, generation, reference)
                key = jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), generation), 1)
                ppo_state, _ = ppo_lib.update(ppo_state, sampled.tokens, sampled.log_prob, rewards, key,
                                              ppo_settings, search.controller)
                records += new_records
                _append_log(workdir, new_records)
                best = max(records, key=lambda record: record["reward"])
                workdir_lib.write_text_atomic(workdir / BEST_GENOTYPE,
                                              json.dumps(best["genotype"], indent=1) + "\n")
                # force: only this loop decides (orbax's own check would feed the preemption sync point other steps)
                manager.save(generation + 1, force=True, args=ocp.args.StandardSave(
                    {"ppo": ppo_state, "reference": np.asarray(reference, np.float32)}))
                manager.wait_until_finished()
                evaluated_here += len(new_records)
                hours = (time.perf_counter() - started) / 3600
                bar.update(len(new_records))
                bar.set_postfix(best=f"{best['reward']:.4f}", per_hour=f"{evaluated_here / max(hours, 1e-9):.0f}")
        finally:
            bar.close()
            manager.close()
    return max(records, key=lambda record: record["reward"])


def _completed_generations(workdir: epath.Path) -> int | None:
    """How many generations the search in ``workdir`` has checkpointed (None: it has not started)."""
    if not (workdir / SEARCH_CHECKPOINTS).is_dir():
        return None
    manager = ocp.CheckpointManager((workdir / SEARCH_CHECKPOINTS).absolute(),
                                    options=ocp.CheckpointManagerOptions(read_only=True))
    try:
        return manager.latest_step()
    finally:
        manager.close()


def _read_log(workdir: epath.Path, *, before_generation: int) -> list[dict]:
    """The candidates of complete generations; lines of a generation a kill interrupted are dropped."""
    path = workdir / SEARCH_LOG
    if not path.exists():
        return []
    kept = [record for record in disk.read_json_lines(path) if record.get("generation", math.inf) < before_generation]
    workdir_lib.write_text_atomic(path, "".join(json.dumps(record) + "\n" for record in kept))
    return kept


def _append_log(workdir: epath.Path, records: list[dict]) -> None:
    if jax.process_index() != 0:
        return
    with (workdir / SEARCH_LOG).open("a") as stream:
        for record in records:
            stream.write(json.dumps(record) + "\n")
