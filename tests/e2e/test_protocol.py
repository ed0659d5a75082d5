"""The paper's protocols (Sec. 4.1-4.2): Prior and Auxi-T_i from a prior (whole single-task network, lr / 10),
deep supervision per task (0.1 x the sum over stages), and pre-train -> fine-tune with the aux modules carried over
at a constant lr."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from auxmtl_jax import checkpoint as checkpoint_lib
from auxmtl_jax import input_pipeline
from auxmtl_jax import programs
from auxmtl_jax import training

LEARNING_RATE = 0.01


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def tiny_config(data_dir, variant):
    config = importlib.import_module("auxmtl_configs.synthetic_three_task").get_config(f"runlocal,{variant}")
    config.dataset.data_dir = data_dir
    config.num_train_steps = 2
    config.optimizer.learning_rate = LEARNING_RATE
    config.input.eval_size = (32, 40)
    config.analysis.grad_log_every_steps = 0
    config.analysis.figures = False
    return config


def fresh_state(config):
    """The train state a run of ``config`` starts from (init_from merged in) and its schedule."""
    input_pipeline.prepare_dataset(config.dataset)
    model = training.create_model(config, input_pipeline.dataset_info(config.dataset).num_classes)
    schedule = training.run_learning_rate_fn(config, config.num_train_steps)
    state, _ = training.create_train_state(config, model, jax.random.key(config.seed), schedule)
    return model, state, schedule


def assert_trees_equal(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def assert_trees_differ(got, want):
    assert any(not np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))


@pytest.fixture(scope="module")
def segmentation_prior(data_dir, tmp_path_factory):
    """A trained single-task segmentation run (T_1) and its variables."""
    workdir = tmp_path_factory.mktemp("single_segmentation")
    programs.run(tiny_config(data_dir, "strategy=single:segmentation"), str(workdir))
    return workdir, checkpoint_lib.load_init_variables(str(workdir), "all")


@pytest.mark.parametrize("variant, aux_tasks", [("strategy=prior:{}", ()),
                                                ("strategy=auxi:depth,prior={}", ("depth",))])
def test_prior_loads_the_single_task_network_and_divides_the_lr_by_10(variant, aux_tasks, segmentation_prior,
                                                                      data_dir):
    workdir, prior = segmentation_prior
    config = tiny_config(data_dir, variant.format(workdir))
    assert (config.init_from.scope, config.init_from.base_lr_scale) == ("network", 0.1)
    model, state, schedule = fresh_state(config)
    _, scratch, _ = fresh_state(tiny_config(data_dir, variant.split(",")[0] if "auxi" in variant
                                            else "strategy=joint"))  # the same model, nothing loaded
    main = state.params["main"]
    for module in ("encoder", "segmentation_decoder"):
        assert_trees_equal(main[module], prior["params"]["main"][module])
        assert_trees_equal(state.batch_stats["main"][module], prior["batch_stats"]["main"][module])
    for module in ("depth_decoder", "normal_decoder"):  # the tasks the prior did not train start fresh
        assert_trees_equal(main[module], scratch.params["main"][module])
    assert_trees_differ(main["encoder"], scratch.params["main"]["encoder"])
    assert model.aux_tasks == aux_tasks
    assert float(schedule(0)) == pytest.approx(0.1 * LEARNING_RATE)
    assert float(training.run_learning_rate_fn(tiny_config(data_dir, "strategy=joint"), 2)(0)) == pytest.approx(
        LEARNING_RATE)


def test_prior_from_a_run_with_an_unknown_task_fails_clearly(segmentation_prior, data_dir):
    workdir, _ = segmentation_prior
    config = tiny_config(data_dir, f"strategy=prior:{workdir}")
    config.tasks = ("depth", "normal")
    with pytest.raises(ValueError, match=r"init_from\.path=.*not in the model \(\d+\): segmentation_decoder/"):
        fresh_state(config)


@pytest.mark.parametrize("source", ["workdir", "inference"])
def test_encoder_init_from_a_run_loads_its_encoder_only(source, segmentation_prior, data_dir):
    # A shared encoder start (the experiments' `--set model.encoder_init=RUN`): the run's encoder and its BN
    # statistics, the full learning rate, every decoder and aux module fresh.
    workdir, prior = segmentation_prior
    path = workdir if source == "workdir" else workdir / "inference"
    config = tiny_config(data_dir, "strategy=auxi_all")
    config.model.encoder_init = str(path)
    training.check_input_files(config)
    _, state, schedule = fresh_state(config)
    _, scratch, _ = fresh_state(tiny_config(data_dir, "strategy=auxi_all"))
    assert_trees_equal(state.params["main"]["encoder"], prior["params"]["main"]["encoder"])
    assert_trees_equal(state.batch_stats["main"]["encoder"], prior["batch_stats"]["main"]["encoder"])
    for module in ("segmentation_decoder", "depth_decoder", "normal_decoder"):
        assert_trees_equal(state.params["main"][module], scratch.params["main"][module])
    assert_trees_equal(state.params["aux"], scratch.params["aux"])
    assert float(schedule(0)) == pytest.approx(LEARNING_RATE)


def test_a_prior_overrides_the_shared_encoder_start(segmentation_prior, data_dir, tmp_path):
    workdir, prior = segmentation_prior
    other = tmp_path / "other_start"
    programs.run(tiny_config(data_dir, "strategy=single:depth"), str(other))
    config = tiny_config(data_dir, f"strategy=prior:{workdir}")
    config.model.encoder_init = str(other)
    _, state, _ = fresh_state(config)
    assert_trees_equal(state.params["main"]["encoder"], prior["params"]["main"]["encoder"])


def test_deep_supervision_of_one_task_is_a_tenth_of_the_sum_over_stages(data_dir):
    config = tiny_config(data_dir, "strategy=deep_supervision:depth")
    assert config.name == "deep_supervision_depth" and config.deep_supervision.tasks == ("depth",)
    model, state, _ = fresh_state(config)
    assert set(state.params["deep_supervision"]) == {"depth"}
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.normal(size=(2, 32, 40, 3)), jnp.float32),
             "segmentation": jnp.asarray(rng.integers(0, 4, size=(2, 32, 40)), jnp.int32),
             "depth": jnp.asarray(rng.uniform(0.5, 5.0, size=(2, 32, 40, 1)), jnp.float32),
             "normal": jnp.asarray(rng.normal(size=(2, 32, 40, 3)), jnp.float32)}
    terms, _ = training.loss_terms(model, config, state.params, state.batch_stats, batch)
    assert set(terms) == {"loss/segmentation", "loss/depth", "loss/normal", "ds_loss/depth"}
    outputs, _ = model.apply({"params": state.params, "batch_stats": state.batch_stats}, batch["image"], train=True)
    stages = outputs.deep_supervision["depth"]
    assert len(stages) == len(model.stage_names)
    by_hand = 0.1 * sum(np.mean(np.abs(np.asarray(stage) - np.asarray(batch["depth"]))) for stage in stages)
    assert float(terms["ds_loss/depth"]) == pytest.approx(by_hand, rel=1e-5)


def on_tiny_data(config, data_dir):
    config.dataset.name, config.dataset.config = "synthetic_scenes", "tiny"
    config.dataset.data_dir, config.dataset.prepare = data_dir, True
    config.input.eval_size = (32, 40)
    config.num_train_steps = 2
    return config


def test_pretrain_then_fine_tune_carries_the_aux_modules_at_a_constant_lr(data_dir, tmp_path):
    """The two-stage NYUv2 recipe (configs nyuv2_expansion_pretrain -> nyuv2_finetune) on the tiny data."""
    pretrain_config = on_tiny_data(importlib.import_module("auxmtl_configs.nyuv2_expansion_pretrain").get_config(
        "runlocal"), data_dir)
    assert (pretrain_config.dataset.train_split, pretrain_config.dataset.eval_split) == ("train[:95%]",
                                                                                         "train[95%:]")
    pretrain = tmp_path / "pretrain"
    programs.run(pretrain_config, str(pretrain))
    pretrained = checkpoint_lib.load_init_variables(str(pretrain), "all")
    finetune = importlib.import_module("auxmtl_configs.nyuv2_finetune")
    config = on_tiny_data(finetune.get_config(f"runlocal,from={pretrain}"), data_dir)
    assert (config.init_from.scope, config.optimizer.schedule, config.optimizer.learning_rate) == (
        "all", "constant", 1e-5)
    _, state, schedule = fresh_state(config)
    assert set(state.params["aux"]) == {"segmentation", "depth"}
    assert_trees_equal(state.params["aux"], pretrained["params"]["aux"])
    assert_trees_equal(state.params["main"], pretrained["params"]["main"])
    assert_trees_equal(state.batch_stats, pretrained["batch_stats"])
    assert [float(schedule(step)) for step in (0, 1, 2, 10_000)] == pytest.approx([1e-5] * 4)
    record = programs.run(config, str(tmp_path / "finetune"))
    assert set(record["metrics"]) == set(config.tasks)
    with pytest.raises(ValueError, match=r"nyuv2_finetune\.py needs exactly one pre-trained run"):
        finetune.get_config("strategy=joint")


def test_bad_protocol_settings_fail_clearly(data_dir, tmp_path):
    for field, value, message in [("optimizer.schedule", "cosine", r"config\.optimizer\.schedule='cosine'"),
                                  ("init_from.scope", "decoder", r"config\.init_from\.scope='decoder'"),
                                  ("init_from.base_lr_scale", 0.0, r"config\.init_from\.base_lr_scale=0\.0")]:
        config = tiny_config(data_dir, "strategy=joint")
        group, key = field.split(".")
        config[group][key] = value
        with pytest.raises(ValueError, match=message):
            training.validate_config(config)
    config = tiny_config(data_dir, "strategy=joint")
    config.init_from.path, config.init_from.scope = str(tmp_path), "all"
    with pytest.raises(ValueError, match=r"is neither a workdir"):
        fresh_state(config)
