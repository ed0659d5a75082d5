"""Configs: variant strings, strategies as field settings, and every strategy of every config training 2 steps."""

import importlib

import pytest

from auxmtl_jax import train
from auxmtl_configs import common

CONFIG_MODULES = ("synthetic_three_task", "sunrgbd_three_task", "nyuv2_two_task", "nyuv2_three_task")


def get_config(module, arg=None):
    return importlib.import_module(f"auxmtl_configs.{module}").get_config(arg)


def strategies_of(config):
    first, last = config.tasks[0], config.tasks[-1]
    return ["joint", f"single:{last}", "kendall", "deep_supervision", f"auxi:{first}", "auxi_all", "prior"]


@pytest.mark.parametrize("module", CONFIG_MODULES[1:])
def test_paper_configs_use_the_paper_recipe(module):
    config = get_config(module)
    optimizer = config.optimizer
    assert (optimizer.learning_rate, optimizer.momentum, optimizer.weight_decay, optimizer.poly_power) == (
        0.01, 0.9, 1e-4, 0.9)
    assert config.batch_size == 12 and tuple(config.input.scale_range) == (0.5, 2.1)
    assert config.model.encoder == "mobilenet_v2" and config.aux.tasks == tuple(config.tasks)


def test_strategies_set_orthogonal_fields():
    config = get_config("sunrgbd_three_task", "strategy=auxi:depth,decoder=context,width=0.5")
    assert config.aux.tasks == ("depth",) and config.model.decoder == "context"
    assert config.model.width_multiplier == 0.5 and config.loss_weighting == "equal"
    config = get_config("sunrgbd_three_task", "strategy=single:normal")
    assert config.tasks == ("normal",) and config.aux.tasks == ()
    config = get_config("nyuv2_two_task", "strategy=deep_supervision")
    assert config.deep_supervision.tasks == ("segmentation", "depth") and config.aux.tasks == ()
    config = get_config("nyuv2_two_task", "strategy=kendall")
    assert config.loss_weighting == "kendall" and config.aux.tasks == ()
    config = get_config("nyuv2_two_task", "strategy=prior:/runs/depth")
    assert config.init_from.path == "/runs/depth"


@pytest.mark.parametrize("arg, message", [
    ("strategy=auxi:height", r"task 'height' is not among config\.tasks"),
    ("strategy=mtan", r"Unknown strategy 'mtan'"),
    ("strategy=single", r"must be written as 'single:<task>'"),
    ("decoder", r"is not of the form key=value"),
    ("colour=red", r"Unknown config variant key 'colour'"),
    ("width=wide", r"model\.width_multiplier='wide': expected a value of type float"),
])
def test_bad_variants_fail_clearly(arg, message):
    with pytest.raises(ValueError, match=message):
        get_config("nyuv2_two_task", arg)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def on_tiny_data(config, data_dir):
    """Swaps the config's dataset for the tiny synthetic one (it has all three tasks).

    The learning rate is set to one value for all configs, so configs whose tiny networks are otherwise the same
    share compiled train steps (the schedule's constants are part of the compiled program).
    """
    config.dataset.name = "synthetic_scenes"
    config.dataset.config = "tiny"
    config.dataset.data_dir = data_dir
    config.dataset.prepare = True
    config.num_train_steps = 2
    config.optimizer.learning_rate = 0.01
    config.input.eval_size = (32, 40)
    config.analysis.grad_log_every_steps = 0
    config.analysis.figures = False
    return config


@pytest.mark.parametrize("module", CONFIG_MODULES)
def test_every_strategy_trains_two_steps(module, data_dir, tmp_path):
    strategies = strategies_of(get_config(module))
    prior_source = None
    for strategy in strategies:
        if strategy == "prior":
            strategy = f"prior:{prior_source}"
        config = on_tiny_data(get_config(module, f"runlocal,strategy={strategy}"), data_dir)
        workdir = tmp_path / strategy.split(":")[0]
        record = train.train_and_evaluate(config, str(workdir))
        assert set(record["metrics"]) == set(config.tasks), strategy
        prior_source = prior_source or str(workdir)


@pytest.mark.parametrize("variant", ["decoder=baseline", "decoder=context", "encoder=resnet50"])
def test_architecture_variants_train_two_steps(variant, data_dir, tmp_path):
    config = on_tiny_data(get_config("nyuv2_two_task", f"runlocal,strategy=auxi_all,{variant}"), data_dir)
    record = train.train_and_evaluate(config, str(tmp_path))
    assert set(record["metrics"]) == {"segmentation", "depth"}
