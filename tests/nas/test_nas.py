"""Auxi-NAS space: genotype format and validation, cells (every op, both aggregators, cross-task inputs), the basic
module as a genotype, one compiled function for many genotypes, and the aux/main gradient contract."""

import copy
import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from auxmtl_jax import nas
from auxmtl_jax import tasks as task_lib
from auxmtl_jax.models import build_model
from test_models import TASKS, model_config, random_batch, random_variables

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "configs" / "genotypes" / "example_three_task.json"
STAGES = ("stage2", "stage3", "stage4", "stage5")
# 40x48 gives odd sizes on the deeper stages (10x12, 5x6, 3x3, 2x2), so pooling borders are exercised.
IMAGE_SHAPE = (2, 40, 48, 3)
CHANNELS = 8
# A small space for the compile-heavy tests: 2 tasks x 2 cells on the two deepest stages (a searchable build holds
# every operation on every path). Locations: 0 stage4, 1 stage5, 2-3 segmentation cells, 4-5 depth cells. Our
# wider cross-task rule, so depth's first cell may read segmentation's last (the paper's rule: test_nas_rules.py).
SMALL_SPACE = nas.CellSpace(("segmentation", "depth"), ("stage4", "stage5"), 2, "all_cells")
SMALL_GENOTYPE = nas.Genotype(SMALL_SPACE.tasks, SMALL_SPACE.stages, (
    ((0, 1, 5, 0, 1), (2, 1, 3, 4, 0)),  # deform | sep3x3 -> concat; (cell0) dil6 + (stage5) skip -> sum
    ((3, 0, 2, 1, 0), (4, 2, 4, 5, 1)),  # reads segmentation.cell1, then segmentation.cell0 (cross-task)
), SMALL_SPACE.cross_task_inputs)


@pytest.fixture(scope="module")
def example():
    return nas.load_genotype(EXAMPLE)


@pytest.fixture(scope="module")
def batch():
    return random_batch(jax.random.key(3), IMAGE_SHAPE)


def nas_model(genotype, **aux_fields):
    return build_model(model_config(), TASKS, SimpleNamespace(genotype=genotype, channels=CHANNELS, **aux_fields))


def flat(tree):
    return traverse_util.flatten_dict(tree, sep="/")


def subset(variables, like):
    """The entries of ``variables`` at the paths of ``like`` (a static build's variables from a searchable one's)."""
    full = flat(variables)
    return traverse_util.unflatten_dict({path: full[path] for path in flat(like)}, sep="/")


def jitted_apply(model, train):
    if model.aux_searchable:
        return jax.jit(lambda v, x, g: model.apply(v, x, train=train, genotype=g))
    return jax.jit(lambda v, x: model.apply(v, x, train=train))


def test_example_file_exercises_every_op_aggregator_and_cross_task_inputs(example):
    cells = np.asarray(example.as_array())
    assert set(cells[..., 2:4].reshape(-1)) == set(range(len(nas.OPERATIONS)))
    assert set(cells[..., 4].reshape(-1)) == set(range(len(nas.AGGREGATORS)))
    space = example.space
    cross_task = [(t, i) for t in range(len(space.tasks)) for i, cell in enumerate(example.cells[t])
                  for location in cell[:2] if space.location_stage(location) >= 0
                  and location >= len(space.stages) and (location - len(space.stages)) // space.cells_per_task != t]
    assert len(cross_task) >= 4
    # each task also reads a coarser location into a finer cell (upsampling) and a finer one into a coarser cell
    moves = {np.sign(space.location_stage(location) - space.cell_stage(i))
             for cells_ in example.cells for i, cell in enumerate(cells_) for location in cell[:2]}
    assert moves == {-1, 0, 1}


def test_round_trips_through_json_sequence_and_array(example, tmp_path):
    path = tmp_path / "copy.json"
    example.save(path)
    assert nas.load_genotype(path) == example
    assert list(tmp_path.iterdir()) == [path]  # written atomically, no temporary left behind
    assert nas.Genotype.from_sequence(example.space, example.sequence()) == example
    assert nas.Genotype.from_array(example.space, example.as_array()) == example
    assert len(example.sequence()) == 5 * 4 * 3 == example.space.sequence_length
    # a file may order its vocabularies differently: tokens index the file's own lists
    data = json.loads(EXAMPLE.read_text())
    data["operations"] = data["operations"][::-1]
    data["aggregators"] = data["aggregators"][::-1]
    n_ops = len(nas.OPERATIONS)
    for cells in data["cells"].values():
        for cell in cells:
            cell[2], cell[3], cell[4] = n_ops - 1 - cell[2], n_ops - 1 - cell[3], 1 - cell[4]
    assert nas.genotype_from_json_dict(data) == example


@pytest.mark.parametrize("rule", nas.CROSS_TASK_INPUTS)
def test_random_genotypes_are_valid_and_cover_the_space(rule):
    space = nas.CellSpace(("segmentation", "depth", "normal"), STAGES, 4, rule)
    rng = np.random.default_rng(0)
    genotypes = [nas.random_genotype(space, rng) for _ in range(300)]
    tokens = np.stack([genotype.as_array() for genotype in genotypes])
    assert set(tokens[..., 2:4].reshape(-1)) == set(range(len(nas.OPERATIONS)))
    last = tokens[:, 2, 3, :2].reshape(-1)  # the last cell of the last task reads every location its rule allows
    assert set(last.tolist()) == set(space.allowed_inputs(2, 3))


def corrupt(mutate):
    data = json.loads(EXAMPLE.read_text())
    mutate(data)
    return data


def set_token(task, cell, token, value):
    def mutate(data):
        data["cells"][task][cell][token] = value
    return mutate


BAD_GENOTYPES = {
    "location not generated yet": (set_token("depth", 0, 1, 8),
                                   r"cells\['depth'\]\[0\] input_b=8: points at a location not generated yet; "
                                   r"this cell may read locations 0..7"),
    # the example was written under our wider rule: its depth cell0 reads segmentation.cell1
    "forbidden by the paper's rule": (lambda d: d.__setitem__("cross_task_inputs", "paper"),
                                      r"cells\['depth'\]\[0\] input_b=5: segmentation.cell1 is a cell of an earlier "
                                      r"task that cross_task_inputs='paper' forbids here .*this cell may read "
                                      r"locations 0..3 \(0=stage2, 1=stage3, 2=stage4, 3=stage5\)$"),
    "unknown rule": (lambda d: d.__setitem__("cross_task_inputs", "some"),
                     r"cross_task_inputs='some'; expected one of \('paper', 'all_cells'\)"),
    "own later cell": (set_token("segmentation", 1, 0, 6), r"cells\['segmentation'\]\[1\] input_a=6"),
    "negative location": (set_token("normal", 3, 0, -1), r"cells\['normal'\]\[3\] input_a=-1"),
    "unknown op index": (set_token("depth", 2, 3, 6), r"cells\['depth'\]\[2\] op_b=6: no such entry"),
    "unknown aggregator index": (set_token("normal", 0, 4, 2), r"cells\['normal'\]\[0\] aggregator=2"),
    "token not an integer": (set_token("depth", 1, 2, "skip"), r"cells\['depth'\]\[1\] op_a: expected an integer"),
    "boolean token": (set_token("depth", 1, 4, True), r"cells\['depth'\]\[1\] aggregator: expected an integer"),
    "short cell": (lambda d: d["cells"]["depth"][1].pop(), r"cells\['depth'\]\[1\]: expected 5 integers"),
    "unequal cell counts": (lambda d: d["cells"]["normal"].pop(), r"same number of cells"),
    "unknown operation name": (lambda d: d["operations"].__setitem__(1, "conv5x5"),
                               r"operations \['conv5x5'\] unknown"),
    "unknown aggregator name": (lambda d: d["aggregators"].__setitem__(0, "max"), r"aggregators \['max'\] unknown"),
    "wrong format": (lambda d: d.__setitem__("format", "other/1"), r"format 'other/1'"),
    "missing key": (lambda d: d.pop("stages"), r"missing key\(s\) \['stages'\]"),
    "unknown key": (lambda d: d.__setitem__("cell", []), r"unknown key\(s\) \['cell'\]"),
    "cells not per task": (lambda d: d["cells"].pop("normal"), r"one entry per task"),
    "unknown task": (lambda d: (d["tasks"].__setitem__(2, "edges"), d["cells"].__setitem__("edges", d["cells"].pop(
        "normal"))), r"tasks must be a non-empty list of \('segmentation', 'depth', 'normal'\), got \[.*'edges'\]"),
    "repeated stage": (lambda d: d["stages"].__setitem__(1, "stage2"), r"distinct stage names"),
}


@pytest.mark.parametrize("case", sorted(BAD_GENOTYPES))
def test_bad_genotype_files_give_one_clear_error(case, tmp_path):
    mutate, message = BAD_GENOTYPES[case]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(corrupt(mutate)))
    with pytest.raises(nas.GenotypeError, match=r"genotype file '.*bad\.json': .*" + message):
        nas.load_genotype(path)


def test_unreadable_genotype_files_name_the_file(tmp_path):
    with pytest.raises(nas.GenotypeError, match=r"genotype file '.*missing\.json': cannot read it"):
        nas.load_genotype(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("{\"format\": ")
    with pytest.raises(nas.GenotypeError, match=r"genotype file '.*broken\.json': not valid JSON"):
        nas.load_genotype(tmp_path / "broken.json")
    with pytest.raises(nas.GenotypeError, match=r"expected 60 tokens"):
        nas.Genotype.from_sequence(nas.CellSpace(("segmentation", "depth", "normal"), STAGES, 4), [0] * 59)


@pytest.mark.parametrize("model_fields, aux_fields, message", [
    (dict(encoder="resnet50"), dict(), None),  # resnet sows stage2..5 too: fits
    (dict(), dict(tasks=("depth",)), r"aux.tasks=\('depth',\) contradicts aux.genotype '.*example_three_task.json'"),
    (dict(), dict(features=("stage3", "stage4")), r"aux.features=.* contradicts"),
])
def test_genotype_must_fit_the_model(model_fields, aux_fields, message):
    config = SimpleNamespace(genotype=str(EXAMPLE), channels=CHANNELS, **aux_fields)
    if message is None:
        assert build_model(model_config(**model_fields), TASKS, config).aux_tasks == ("segmentation", "depth",
                                                                                      "normal")
    else:
        with pytest.raises(nas.GenotypeError, match=message):
            build_model(model_config(**model_fields), TASKS, config)


def test_genotype_tasks_and_stages_the_model_lacks_are_refused(example):
    with pytest.raises(nas.GenotypeError, match=r"task\(s\) \['normal'\] are not main tasks"):
        build_model(model_config(), {"segmentation": 5, "depth": 1}, SimpleNamespace(genotype=example, channels=8))
    resnet_stages = dataclasses.replace(example, stages=("stage1",) + example.stages[1:])
    with pytest.raises(nas.GenotypeError, match=r"stage\(s\) \['stage1'\] are not sown by this encoder"):
        build_model(model_config(encoder="resnet50"), TASKS, SimpleNamespace(genotype=resnet_stages, channels=8))
    reversed_stages = dataclasses.replace(example, stages=example.stages[::-1])
    with pytest.raises(nas.GenotypeError, match=r"must be listed shallow to deep"):
        build_model(model_config(), TASKS, SimpleNamespace(genotype=reversed_stages, channels=8))


def test_static_build_has_only_the_chosen_operations(example, batch):
    model = nas_model(example)
    params = jax.eval_shape(model.init, jax.random.key(0), batch["image"])["params"]["aux"]
    depth = params["depth"]
    assert set(depth) == {"stem_stage2", "stem_stage3", "stem_stage4", "stem_stage5", "cell0", "cell1", "cell2",
                          "cell3", "head"}
    # depth cell2 = (depth.cell1, segmentation.cell3, deform_conv3x3, skip, sum): only the deformable conv has
    # parameters; cell3 aggregates by concat (a 1x1 conv back to the width)
    assert set(depth["cell2"]) == {"path_a"} and set(depth["cell2"]["path_a"]) == {"deform_conv3x3"}
    assert depth["cell3"]["aggregate"]["concat"]["conv"]["kernel"].shape == (1, 1, 2 * CHANNELS, CHANNELS)
    # the head reads the locations no later depth cell reads: stage4 and cell3
    assert set(depth["head"]) == {"from_stage4", "from_cell3", "bn", "output"}
    assert set(params["normal"]["head"]) == {"from_stage3", "from_stage5", "from_cell3", "bn", "output"}


@pytest.mark.slow
def test_every_op_and_aggregator_runs_in_a_cell_with_cross_task_inputs(batch):
    """One genotype per (op, aggregator): every cell uses that op on both paths; later tasks read earlier tasks'
    cells. Outputs are finite, shaped like the task, and differ between ops (each op does something different)."""
    space = nas.CellSpace(("segmentation", "depth", "normal"), STAGES, 4, "all_cells")  # cell 0 reads across
    model = nas_model(space)
    variables = random_variables(model, batch["image"])
    apply = jitted_apply(model, train=False)
    outputs = {}
    for op in range(len(nas.OPERATIONS)):
        for aggregator in range(len(nas.AGGREGATORS)):
            cells = []
            for t in range(3):
                # cell 0 reads stage2 and the previous task's last cell (or stage3 for the first task)
                first = (0, space.cell_location(t - 1, 3) if t else 1, op, op, aggregator)
                rest = [(space.cell_location(t, i - 1), i + 1 if i < 3 else 3, op, op, aggregator) for i in range(1, 4)]
                cells.append(tuple([first, *rest]))
            genotype = nas.Genotype(space.tasks, space.stages, tuple(cells), space.cross_task_inputs)
            result, _ = apply(variables, batch["image"], genotype.as_array())
            for task, prediction in result.aux.items():
                assert prediction.shape == batch["image"].shape[:3] + (TASKS[task],)
                assert np.all(np.isfinite(prediction))
            outputs[nas.OPERATIONS[op], nas.AGGREGATORS[aggregator]] = np.asarray(result.aux["normal"])
    for (first, second) in [(a, b) for a in outputs for b in outputs if a < b]:
        assert not np.allclose(outputs[first], outputs[second], atol=1e-6), (first, second)


@pytest.mark.parametrize("aggregate", ["concat", "sum"])
def test_basic_module_is_a_genotype_with_the_same_outputs(aggregate, batch):
    """Eq. 2 (1x1 adaptors, hierarchy) from the basic module and from basic_genotype, parameters carried over."""
    basic = build_model(model_config(), TASKS, SimpleNamespace(
        tasks=tuple(TASKS), features=STAGES, adaptor="conv1x1", aggregate=aggregate, channels=CHANNELS,
        resolution="hierarchy"))
    genotype = nas.basic_genotype(tuple(TASKS), STAGES, aggregate)
    cells = nas_model(genotype)
    basic_variables = random_variables(basic, batch["image"])
    cell_shapes = jax.eval_shape(cells.init, jax.random.key(0), batch["image"])
    carried = carry_basic_variables(basic_variables, genotype)
    assert jax.tree.map(jnp.shape, carried) == jax.tree.map(lambda leaf: leaf.shape, cell_shapes)
    for train in (False, True):
        expected, expected_stats = jitted_apply(basic, train)(basic_variables, batch["image"])
        actual, actual_stats = jitted_apply(cells, train)(carried, batch["image"])
        for task in TASKS:
            np.testing.assert_allclose(actual.aux[task], expected.aux[task], rtol=1e-4, atol=1e-5)
        if train:
            np.testing.assert_allclose(actual_stats["aux"]["depth"]["head"]["bn"]["var"],
                                       expected_stats["aux"]["depth"]["head"]["hidden"]["bn"]["var"], rtol=1e-4)


def carry_basic_variables(variables, genotype):
    """Basic-module variables in the cell build's layout: adaptors become stems, the head's 3x3 kernel is split
    over the locations the cell head reads (in concatenation order)."""
    carried = copy.deepcopy(jax.tree.map(np.asarray, variables))
    for t, task in enumerate(genotype.tasks):
        reads = nas.output_locations(genotype.space, t, genotype.cells[t])
        names = [genotype.space.location_name(location).split(".")[-1] for location in reads]
        for collection in ("params", "batch_stats"):
            old = carried[collection]["aux"][task]
            new = {f"stem_{stage}": old.pop(f"adaptor_{stage}") for stage in genotype.stages}
            head = old.pop("head")
            new["head"] = {"bn": head["hidden"]["bn"]}
            if collection == "params":
                new["head"]["output"] = head["output"]
                kernels = np.split(head["hidden"]["conv"]["kernel"], len(names), axis=2)
                new["head"].update({f"from_{name}": {"kernel": kernel} for name, kernel in zip(names, kernels)})
            assert not old
            carried[collection]["aux"][task] = new
    return carried


@pytest.mark.slow
@pytest.mark.exhaustive  # a minute of compiling static builds; CI keeps the vmapped population and the search
def test_one_compiled_function_serves_many_genotypes_and_matches_static_builds(batch):
    space = SMALL_SPACE
    searchable = nas_model(space)
    variables = random_variables(searchable, batch["image"])
    traces = []

    @jax.jit
    def loss_and_grads(variables, images, genotype):
        traces.append(1)

        def loss(params):
            outputs, stats = searchable.apply({"params": params, "batch_stats": variables["batch_stats"]}, images,
                                              train=True, genotype=genotype)
            return sum(task_lib.task_losses(outputs.aux, batch).values()), (outputs.aux, stats)

        return jax.value_and_grad(loss, has_aux=True)(variables["params"])

    others = [nas.random_genotype(space, np.random.default_rng(seed)) for seed in (1, 2)]
    for genotype in [SMALL_GENOTYPE, *others]:
        (loss, (aux, stats)), grads = loss_and_grads(variables, batch["image"], genotype.as_array())
        static = nas_model(genotype)
        static_variables = subset(variables, jax.eval_shape(static.init, jax.random.key(0), batch["image"]))

        @jax.jit
        def static_loss_and_grads(variables, images):
            def loss(params):
                outputs, stats = static.apply({"params": params, "batch_stats": variables["batch_stats"]}, images,
                                              train=True)
                return sum(task_lib.task_losses(outputs.aux, batch).values()), (outputs.aux, stats)

            return jax.value_and_grad(loss, has_aux=True)(variables["params"])

        (static_loss, (static_aux, static_stats)), static_grads = static_loss_and_grads(static_variables,
                                                                                       batch["image"])
        np.testing.assert_allclose(loss, static_loss, rtol=1e-5)
        assert set(aux) == set(static_aux) == set(space.tasks)
        for task in space.tasks:
            np.testing.assert_allclose(aux[task], static_aux[task], rtol=1e-4, atol=1e-5)
        # the static build's gradients and statistics are the searchable build's at the same paths; every other
        # (unchosen) operation gets exactly zero gradient
        searchable_grads, chosen = flat(grads["aux"]), flat(static_grads["aux"])
        for path, value in chosen.items():
            np.testing.assert_allclose(searchable_grads[path], value, rtol=2e-3, atol=1e-6, err_msg=path)
        for path in set(searchable_grads) - set(chosen):
            assert not np.any(searchable_grads[path]), path
        for path, value in flat(static_stats["aux"]).items():
            np.testing.assert_allclose(flat(stats["aux"])[path], value, rtol=1e-4, atol=1e-6, err_msg=path)
    assert len(traces) == 1
    assert loss_and_grads._cache_size() == 1


def test_genotype_argument_is_required_exactly_for_a_searchable_build(example, batch):
    searchable, static = nas_model(example.space), nas_model(example)
    variables = jax.eval_shape(searchable.init, jax.random.key(0), batch["image"])
    with pytest.raises(ValueError, match=r"pass genotype=<int array \[T, n, 5\]> exactly when"):
        jax.eval_shape(lambda v, x: searchable.apply(v, x, train=False), variables, batch["image"])
    with pytest.raises(ValueError, match=r"exactly when"):
        jax.eval_shape(lambda v, x: static.apply(v, x, train=False, genotype=example.as_array()),
                       subset(variables, jax.eval_shape(static.init, jax.random.key(0), batch["image"])),
                       batch["image"])
    with pytest.raises(ValueError, match=r"genotype array of shape \(3, 3, 5\); this space needs \(3, 4, 5\)"):
        jax.eval_shape(lambda v, x: searchable.apply(v, x, train=False, genotype=jnp.zeros((3, 3, 5), jnp.int32)),
                       variables, batch["image"])


@pytest.mark.slow
def test_searchable_build_under_the_papers_rule_matches_static_builds(batch):
    """Under the paper's rule a cell switches over its allowed locations only, not a prefix of the locations: the
    token is mapped to its branch, and the searchable build still equals the static one."""
    # Locations: 0 stage4, 1 stage5, 2-3 segmentation cells, 4-5 depth's, 6-7 normal's.
    space = nas.CellSpace(("segmentation", "depth", "normal"), SMALL_SPACE.stages, 2)
    assert space.cross_task_inputs == "paper" and space.allowed_inputs(2, 1) == (0, 1, 2, 4, 6)
    handmade = nas.Genotype(space.tasks, space.stages, (
        ((0, 1, 1, 4, 0), (2, 0, 0, 1, 1)),
        ((1, 0, 4, 1, 0), (2, 4, 1, 4, 0)),
        ((0, 1, 0, 4, 0), (4, 6, 3, 1, 1)),  # normal cell1: depth.cell0 (location 4 is its branch 3), own cell0
    ))
    searchable = nas_model(space)
    variables = random_variables(searchable, batch["image"])
    # train mode: BatchNorm normalises by the batch, so every input's signal reaches the output (in eval mode the
    # random running means swamp the small activations and a wrong input would go unnoticed)
    apply = jitted_apply(searchable, train=True)
    for genotype in (handmade, nas.random_genotype(space, 4)):
        static = nas_model(genotype)
        static_variables = subset(variables, jax.eval_shape(static.init, jax.random.key(0), batch["image"]))
        expected, _ = jitted_apply(static, train=True)(static_variables, batch["image"])
        actual, _ = apply(variables, batch["image"], genotype.as_array())
        for task in space.tasks:
            np.testing.assert_allclose(actual.aux[task], expected.aux[task], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("build", ["static", "searchable"])
def test_gradients_keep_genotype_aux_and_main_paths_apart(build, batch):
    model = nas_model(SMALL_GENOTYPE if build == "static" else SMALL_SPACE)
    variables = random_variables(model, batch["image"])
    genotype = None if build == "static" else SMALL_GENOTYPE.as_array()

    @jax.jit
    def gradients(params):
        def stacked(params):
            outputs, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, batch["image"],
                                     train=True, genotype=genotype)
            return jnp.stack([sum(task_lib.task_losses(outputs.main, batch).values()),
                              sum(task_lib.task_losses(outputs.aux, batch).values())])

        grads = jax.jacrev(stacked)(params)
        return jax.tree.map(lambda g: g[0], grads), jax.tree.map(lambda g: g[1], grads)

    main_grads, aux_grads = gradients(variables["params"])
    assert not any(np.any(leaf) for leaf in jax.tree.leaves(main_grads["aux"]))
    assert np.any(aux_grads["main"]["encoder"]["stem"]["conv"]["kernel"])
    for name, grads in aux_grads["main"].items():
        if name != "encoder":
            assert not any(np.any(leaf) for leaf in jax.tree.leaves(grads)), name
    chosen = flat(jax.eval_shape(nas_model(SMALL_GENOTYPE).init, jax.random.key(0), batch["image"])["params"]["aux"])
    for path, leaf in flat(aux_grads["aux"]).items():
        assert np.any(leaf) == (path in chosen), path
    # a later task's loss reaches the earlier task's cells it reads (depth.cell0 reads segmentation.cell1), not
    # that task's head
    depth_only = jax.jit(jax.grad(lambda p: task_lib.task_loss("depth", model.apply(
        {"params": p, "batch_stats": variables["batch_stats"]}, batch["image"], train=True,
        genotype=genotype)[0].aux["depth"], batch)))(variables["params"])["aux"]["segmentation"]
    assert np.any(depth_only["cell1"]["path_a"]["sep_conv3x3_dil6"]["pointwise"]["conv"]["kernel"])
    assert np.any(depth_only["cell0"]["path_a"]["deform_conv3x3"]["conv"]["offsets"]["kernel"])
    assert not any(np.any(leaf) for leaf in jax.tree.leaves(depth_only["head"]))


@pytest.mark.slow
def test_a_population_of_genotypes_runs_under_vmap(batch):
    """The search trains several candidates at once: params and genotypes stacked on a leading axis, one vmap."""
    model = nas_model(SMALL_SPACE)
    genotypes = np.stack([SMALL_GENOTYPE.as_array(),
                          nas.random_genotype(SMALL_SPACE, np.random.default_rng(5)).as_array()])
    population = [random_variables(model, batch["image"], seed=seed) for seed in (0, 1)]
    variables = jax.tree.map(lambda *leaves: jnp.stack(leaves), *population)
    apply = jax.jit(jax.vmap(lambda v, g: model.apply(v, batch["image"], train=False, genotype=g)[0].aux))
    together = apply(variables, genotypes)
    single = jitted_apply(model, train=False)
    for index in range(2):
        alone = single(population[index], batch["image"], genotypes[index])[0].aux
        for task in SMALL_SPACE.tasks:
            np.testing.assert_allclose(together[task][index], alone[task], rtol=1e-4, atol=1e-5)
