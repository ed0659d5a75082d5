"""Population training for the search: vmapped real train steps equal separate runs, one trace for any genotypes,
Polyak averages, frozen inactive candidates, the population sharded over a `candidates` mesh axis, evaluation."""

import functools
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from auxmtl_configs import common
from auxmtl_jax import nas
from auxmtl_jax import training
from auxmtl_jax import metrics as metrics_lib
from auxmtl_jax.models import build_model
from auxmtl_jax.nas import population as population_lib
from test_models import TASKS, model_config, random_batch

SPACE = nas.CellSpace(("segmentation", "depth"), ("stage4", "stage5"), 2)
POLYAK_DECAY = 0.9


@pytest.fixture(scope="module")
def setup():
    config = common.base_config()
    config.tasks = tuple(TASKS)
    model = build_model(model_config(), TASKS, SimpleNamespace(genotype=SPACE, channels=8))
    lr_fn = training.create_learning_rate_fn(config.optimizer, 10)
    start, tx = training.create_train_state(config, model, jax.random.key(0), lr_fn)
    traces = []

    def counted(population, batch):
        traces.append(1)
        return population_lib.population_train_step(population, batch, model=model, config=config, tx=tx,
                                                    learning_rate_fn=lr_fn, polyak_decay=POLYAK_DECAY)

    single = jax.jit(functools.partial(training.train_step, model=model, config=config, tx=tx,
                                       learning_rate_fn=lr_fn))
    return SimpleNamespace(config=config, model=model, start=start, step=jax.jit(counted), traces=traces, raw=counted,
                           single=single, batch=random_batch(jax.random.key(1), (4, 64, 64, 3)))


def genotypes(*seeds):
    return np.stack([nas.random_genotype(SPACE, np.random.default_rng(seed)).as_array() for seed in seeds])


@pytest.mark.slow
def test_population_steps_equal_separate_runs_and_trace_once(setup):
    population = population_lib.start_population(setup.start, genotypes(0, 1))
    population, metrics = setup.step(population, setup.batch)
    for index, seed in enumerate((0, 1)):
        alone, alone_metrics = setup.single(setup.start, setup.batch, genotypes(seed)[0])
        for name in ("loss/total", "aux_loss/depth", "aux_loss/segmentation"):
            np.testing.assert_allclose(metrics[name][index], alone_metrics[name], rtol=1e-5)
        # the updated parameters: relative to the step's size, float reordering only
        for got, want, old in zip(jax.tree.leaves(population.train.params), jax.tree.leaves(alone.params),
                                  jax.tree.leaves(setup.start.params)):
            scale = np.abs(np.asarray(want) - np.asarray(old)).max() + 1e-12
            assert np.abs(np.asarray(got[index]) - np.asarray(want)).max() <= 1e-2 * scale + 1e-7
    # another population of other genotypes: the same compiled step
    other = population_lib.start_population(setup.start, genotypes(2, 3))
    setup.step(other, setup.batch)
    assert len(setup.traces) == 1


@pytest.mark.slow
def test_polyak_average_and_inactive_candidates(setup):
    population = population_lib.start_population(setup.start, genotypes(4, 5))
    population = population.replace(active=jnp.asarray([True, False]))
    stepped, _ = setup.step(population, setup.batch)
    start_main = setup.start.params["main"]
    for start_leaf, new_leaf, average in zip(jax.tree.leaves(start_main), jax.tree.leaves(stepped.train.params["main"]),
                                             jax.tree.leaves(stepped.polyak)):
        np.testing.assert_allclose(average[0], POLYAK_DECAY * start_leaf + (1 - POLYAK_DECAY) * new_leaf[0],
                                   rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(new_leaf[1], start_leaf)  # frozen
        np.testing.assert_array_equal(average[1], start_leaf)
    assert not np.array_equal(jax.tree.leaves(stepped.train.params["main"])[0][0], jax.tree.leaves(start_main)[0])
    assert int(stepped.train.step[1]) == 0 and int(stepped.train.step[0]) == 1


@pytest.mark.slow
@pytest.mark.exhaustive  # 2-3 minutes; the search end to end (tests/e2e/test_nas_search.py) runs sharded in CI
def test_population_sharded_over_a_candidates_axis_equals_one_device(setup):
    mesh = population_lib.candidates_mesh(jax.devices()[:4])
    population = population_lib.start_population(setup.start, genotypes(6, 7, 8, 9))
    sharding = population_lib.population_sharding(mesh, population)
    sharded = jax.device_put(population, sharding)
    step = jax.jit(population_lib.shard_over_candidates(setup.raw, mesh))
    result, metrics = step(sharded, setup.batch)
    assert result.polyak["encoder"]["stem"]["conv"]["kernel"].sharding.spec[0] == population_lib.CANDIDATES_AXIS
    reference, reference_metrics = setup.step(population, setup.batch)
    np.testing.assert_allclose(metrics["loss/total"], reference_metrics["loss/total"], rtol=1e-5)
    for got, want in zip(jax.tree.leaves(result.polyak), jax.tree.leaves(reference.polyak)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"population of 3 candidates does not split over 4 devices"):
        population_lib.population_sharding(mesh, population_lib.start_population(setup.start, genotypes(1, 2, 3)))


def test_search_mesh_uses_the_most_devices_that_split_the_population():
    devices = jax.devices()[:4]
    sizes = {population: population_lib.search_mesh(population, devices) for population in (1, 2, 3, 4, 6, 8, 7)}
    assert sizes[1] is None and sizes[7] is None  # no split: plain vmap on one device
    assert {population: mesh.size for population, mesh in sizes.items() if mesh is not None} == {
        2: 2, 3: 3, 4: 4, 6: 3, 8: 4}
    assert population_lib.search_mesh(4, devices[:1]) is None


def test_sharded_evaluation_equals_one_device(setup):
    mesh = population_lib.candidates_mesh(jax.devices()[:2])
    population, _ = setup.step(population_lib.start_population(setup.start, genotypes(3, 4)), setup.batch)
    states = population_lib.empty_metric_states(tuple(TASKS), TASKS["segmentation"], 2)
    evaluate = functools.partial(population_lib.population_eval_step, model=setup.model)
    expected = jax.jit(evaluate)(population, states, setup.batch)
    split = NamedSharding(mesh, PartitionSpec(population_lib.CANDIDATES_AXIS))
    got = jax.jit(population_lib.shard_over_candidates(evaluate, mesh, candidate_args=2))(
        jax.device_put(population, split), jax.device_put(states, split), setup.batch)
    for index in range(2):
        want = population_lib.candidate_metrics(expected, index)
        have = population_lib.candidate_metrics(got, index)
        for task in TASKS:
            for name, value in want[task].items():
                assert have[task][name] == pytest.approx(value, rel=1e-4, abs=1e-6), (index, task, name)


@pytest.mark.slow
def test_evaluation_uses_each_candidates_polyak_main(setup):
    population = population_lib.start_population(setup.start, genotypes(0, 1))
    population, _ = setup.step(population, setup.batch)
    states = population_lib.empty_metric_states(tuple(TASKS), TASKS["segmentation"], 2)
    states = jax.jit(functools.partial(population_lib.population_eval_step, model=setup.model))(
        population, states, setup.batch)
    for index in range(2):
        main = {"params": jax.tree.map(lambda leaf: leaf[index], population.polyak),
                "batch_stats": jax.tree.map(lambda leaf: leaf[index], population.train.batch_stats["main"])}
        alone = training.eval_step(main, metrics_lib.init_state(tuple(TASKS), TASKS["segmentation"]),
                                    setup.batch, model=setup.model)
        expected = metrics_lib.compute(alone)
        got = population_lib.candidate_metrics(states, index)
        for task in TASKS:
            for name, value in expected[task].items():
                assert got[task][name] == pytest.approx(value, rel=1e-4, abs=1e-6), (task, name)
    # the two candidates trained different aux cells, so their shared encoders moved differently
    assert population_lib.candidate_metrics(states, 0) != population_lib.candidate_metrics(states, 1)
