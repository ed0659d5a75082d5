"""Sizes that keep the decoders honest (issue 30, item 5): `model.aspp_rates` (the paper's rates at its size, rates
scaled to the feature map at small crops, explicit rates) and `aux.min_head_size` (the aux head's smallest map)."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from auxmtl_configs import common, experiments, synthetic_three_task
from auxmtl_jax import workdir as workdir_lib
from auxmtl_jax.errors import UserError
from auxmtl_jax.models import build_model
from auxmtl_jax.models.auxiliary import AuxiliaryModule
from auxmtl_jax.models.decoders import ASPP, atrous_branch_names, feature_aspp_rates, resolve_aspp_rates
from auxmtl_jax.training import checks

TASKS = {"segmentation": 5, "depth": 1}


def model_config(**overrides):
    fields = dict(encoder="mobilenet_v2", width_multiplier=0.25, output_stride=None, decoder="context",
                  head_channels=8, dtype="float32")
    fields.update(overrides)
    return SimpleNamespace(**fields)


@pytest.mark.parametrize("stride, paper", [(8, (12, 24, 36)), (16, (6, 12, 18)), (32, (3, 6, 9))])
def test_paper_rates_at_the_paper_size_and_feature_rates_reproduce_them_there(stride, paper):
    assert resolve_aspp_rates("paper", stride, None) == paper
    assert resolve_aspp_rates("feature", stride, (385, 385)) == paper  # the 49x49 map at stride 8


def test_feature_rates_keep_every_atrous_tap_inside_a_small_map():
    # A 64x80 crop at stride 8: an 8x10 map, where 12/24/36 collapse to the centre tap.
    rates = resolve_aspp_rates("feature", 8, (64, 80))
    assert rates == (2, 4, 6)
    assert all(0 < rate < 8 for rate in rates)
    for stride in (8, 16, 32):
        for shorter in range(2, 200):
            rates = feature_aspp_rates((shorter, shorter + 3), stride)
            assert all(0 < rate < shorter for rate in rates), (stride, shorter, rates)
            assert list(rates) == sorted(rates)


def test_the_built_network_uses_the_training_crops_rates_at_every_input_size():
    """The feature map the rates are scaled to is the real one, and an evaluation at another size keeps the trained
    rates (and finds the trained branches)."""
    model = build_model(model_config(aspp_rates="feature"), TASKS, input_size=(64, 80))
    assert model.main.aspp_rates == (2, 4, 6)
    images = jax.ShapeDtypeStruct((1, 64, 80, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), images)
    assert {"branch_rate2", "branch_rate4", "branch_rate6"} <= set(variables["params"]["main"]["aspp"])
    main = {"params": variables["params"]["main"], "batch_stats": variables["batch_stats"]["main"]}
    shared = jax.eval_shape(lambda v, x: model.main.apply(v, x, train=False, part="shared"), main, images)
    assert shared.shape[1:3] == (8, 10)
    larger = jax.eval_shape(model.predict, main, jax.ShapeDtypeStruct((1, 96, 128, 3), jnp.float32))
    assert larger["depth"].shape == (1, 96, 128, 1)


def test_paper_is_the_default_and_an_explicit_tuple_is_used_as_given():
    assert build_model(model_config(), TASKS).main.aspp_rates == (12, 24, 36)
    assert build_model(model_config(decoder="deeplab", output_stride=16), TASKS).main.aspp_rates == (6, 12, 18)
    assert build_model(model_config(decoder="deeplab", aspp_rates=[3, 5]), TASKS).main.aspp_rates == (3, 5)
    assert build_model(model_config(aspp_rates=(2, 4, 6)), TASKS, input_size=(385, 385)).main.aspp_rates == (2, 4, 6)
    assert build_model(model_config(decoder="ushape", aspp_rates="feature"), TASKS).main.aspp_rates is None


def test_repeated_rates_get_distinct_branches():
    assert atrous_branch_names((12, 24, 36)) == ("branch_rate12", "branch_rate24", "branch_rate36")
    assert atrous_branch_names((1, 1, 2)) == ("branch_rate1", "branch_rate1_2", "branch_rate2")
    assert feature_aspp_rates((3, 3), 8) == (1, 1, 2)
    variables = jax.eval_shape(lambda x: ASPP(4, (1, 1, 2)).init(jax.random.key(0), x, False),
                               jnp.zeros((1, 3, 3, 4)))
    assert set(variables["params"]) == {"branch_1x1", "branch_rate1", "branch_rate1_2", "branch_rate2",
                                        "branch_pool", "project"}


@pytest.mark.parametrize("value", ["featur", "", (), (0, 2), (2.0, 4), (True,), 3, None])
def test_a_bad_aspp_rates_value_is_one_error_line_before_any_work(value):
    with pytest.raises(UserError, match=r"^model\.aspp_rates: got .*; expected 'paper'") as error:
        build_model(model_config(aspp_rates=value), TASKS, input_size=(64, 80))
    assert "\n" not in str(error.value)
    config = synthetic_three_task.get_config("runlocal,strategy=joint")
    config.model.aspp_rates = value
    with pytest.raises(UserError, match=r"^config\.model\.aspp_rates: got "):
        checks.validate_config(config)  # before the dataset is prepared or anything is written


def test_feature_rates_need_the_training_crop():
    with pytest.raises(UserError, match=r"input_size=crop_size"):
        build_model(model_config(aspp_rates="feature"), TASKS)


# MobileNetV2's stages at a 64x80 crop (strides 4, 8, 16, 32).
STAGE_SIZES = {"stage2": (16, 20), "stage3": (8, 10), "stage4": (4, 5), "stage5": (2, 3)}


def aux_module(**overrides):
    fields = dict(task="depth", out_channels=1, features=tuple(STAGE_SIZES), channels=4)
    fields.update(overrides)
    return AuxiliaryModule(**fields)


def head_input_size(module, stages):
    variables = module.init(jax.random.key(0), stages, (64, 80), train=False)
    _, state = module.apply(variables, stages, (64, 80), train=False, capture_intermediates=True,
                            mutable=["intermediates"])
    return state["intermediates"]["head"]["__call__"][0].shape[1:3], variables


@pytest.fixture(scope="module")
def stages():
    keys = jax.random.split(jax.random.key(1), len(STAGE_SIZES))
    return {name: jax.random.normal(key, (2, *size, 3)) for key, (name, size) in zip(keys, STAGE_SIZES.items())}


@pytest.mark.parametrize("minimum, expected", [(0, (2, 3)), (3, (4, 5)), (8, (8, 10)), (100, (16, 20))])
def test_the_aux_head_predicts_from_at_least_min_head_size_cells(stages, minimum, expected):
    module = aux_module(min_head_size=minimum)
    assert module.head_size(stages) == expected
    size, variables = head_input_size(module, stages)
    assert size == expected
    assert min(size) >= min(minimum, 16)  # 16: the finest selected map, the most it can give
    unchanged = jax.tree.map(jnp.shape, aux_module().init(jax.random.key(0), stages, (64, 80), train=False))
    assert jax.tree.map(jnp.shape, variables) == unchanged  # the same parameters at every minimum


def test_a_minimum_above_every_map_is_finest_and_finest_ignores_it(stages):
    variables = aux_module().init(jax.random.key(0), stages, (64, 80), train=False)
    above = aux_module(min_head_size=1000).apply(variables, stages, (64, 80), train=False)
    finest = aux_module(resolution="finest", min_head_size=8).apply(variables, stages, (64, 80), train=False)
    np.testing.assert_allclose(above, finest, rtol=1e-5, atol=1e-6)
    assert aux_module(resolution="finest", min_head_size=8).head_size(stages) == (16, 20)


@pytest.mark.parametrize("value", [-1, 2.5, True, "8"])
def test_a_bad_min_head_size_is_one_error_line(value):
    aux = SimpleNamespace(tasks=("depth",), features=(), adaptor="conv1x1", aggregate="concat", channels=8,
                          min_head_size=value)
    with pytest.raises(UserError, match=r"^aux\.min_head_size: got .*; expected 0"):
        build_model(model_config(decoder="ushape"), TASKS, aux)


def test_validate_config_checks_min_head_size_before_any_work():
    config = synthetic_three_task.get_config("runlocal,strategy=auxi_all")
    config.aux.min_head_size = -1
    with pytest.raises(UserError, match=r"^config\.aux\.min_head_size: got -1; expected 0"):
        checks.validate_config(config)


def test_defaults_keep_todays_behaviour_and_old_workdirs_resume():
    """The CPU experiment configs keep 'paper' and 0, so past reports stay reproducible; docs/models.md names the
    configs that should switch."""
    for config in (common.base_config(), synthetic_three_task.get_config(),
                   experiments.get_config("size=cpu,dataset=synthetic_scenes,tasks=segmentation+depth")):
        assert (config.model.aspp_rates, config.aux.min_head_size) == ("paper", 0)
    config = common.base_config()
    config.model.aspp_rates = (2, 4, 6)  # an object field: a tuple replaces the string
    assert workdir_lib.ADDED_KEYS["model.aspp_rates"] == "paper"
    assert workdir_lib.ADDED_KEYS["aux.min_head_size"] == 0
