"""Configs: variant strings, strategies as field settings, and every strategy of every config training 2 steps."""

import copy
import importlib
import json
from pathlib import Path

import numpy as np
import pytest

from auxmtl_jax import programs
from auxmtl_jax import training
from auxmtl_jax import workdir as workdir_lib

EXAMPLE_GENOTYPE = Path(__file__).resolve().parents[1] / "configs" / "genotypes" / "example_three_task.json"
CONFIG_MODULES = ("synthetic_three_task", "sunrgbd_three_task", "nyuv2_two_task", "nyuv2_three_task",
                  "cityscapes_two_task", "libmtl_nyuv2", "libmtl_cityscapes")
LIBMTL_CONFIGS = ("libmtl_nyuv2", "libmtl_cityscapes")
PAPER_RECIPE_CONFIGS = tuple(module for module in CONFIG_MODULES[1:] if module not in LIBMTL_CONFIGS)


def record_classes(config):
    from auxmtl_jax import input_pipeline

    return input_pipeline.dataset_info(config.dataset).num_classes


def get_config(module, arg=None):
    return importlib.import_module(f"auxmtl_configs.{module}").get_config(arg)


def strategies_of(config):
    first, last = config.tasks[0], config.tasks[-1]
    return ["joint", f"single:{last}", "kendall", "deep_supervision", f"auxi:{first}", "auxi_all", "prior"]


@pytest.mark.parametrize("module", PAPER_RECIPE_CONFIGS)
def test_paper_configs_use_the_paper_recipe(module):
    config = get_config(module)
    optimizer = config.optimizer
    assert (optimizer.name, optimizer.schedule) == ("sgd", "poly")
    assert (optimizer.learning_rate, optimizer.momentum, optimizer.weight_decay, optimizer.poly_power) == (
        0.01, 0.9, 1e-4, 0.9)
    # Cityscapes' depth is disparity-like, which the random rescale (depth / s) would get wrong
    scale_range = (1.0, 1.0) if module == "cityscapes_two_task" else (0.5, 2.1)
    assert config.batch_size == 12 and tuple(config.input.scale_range) == scale_range
    assert config.model.encoder == "mobilenet_v2" and config.aux.tasks == tuple(config.tasks)


@pytest.mark.parametrize("module", CONFIG_MODULES[1:])
def test_paper_configs_stop_without_an_imagenet_encoder_unless_told_scratch(module):
    config = get_config(module)
    with pytest.raises(ValueError, match=r"config\.model\.encoder_init is not set.*encoder_init=scratch"):
        training.validate_config(config)
    config.model.encoder_init = "scratch"
    training.validate_config(config)
    assert get_config(module, "runlocal").model.encoder_init == "scratch"  # smoke tests say so explicitly
    training.validate_config(get_config("synthetic_three_task"))  # the demo trains from scratch by design


def conv(cin, cout, kernel, bias=False):
    return cin * cout * kernel * kernel + (cout if bias else 0)


def bn(channels):
    return 2 * channels  # torch's BN weight and bias (flax's scale and bias); running statistics are no params


def torchvision_resnet50_parameters():
    """torchvision's ResNet-50 without fc, layer by layer (v1.5 bottlenecks; dilation changes no shape)."""
    count, inplanes = conv(3, 64, 7) + bn(64), 64
    for blocks, width in ((3, 64), (4, 128), (6, 256), (3, 512)):
        for block in range(blocks):
            count += conv(inplanes, width, 1) + bn(width) + conv(width, width, 3) + bn(width)
            count += conv(width, 4 * width, 1) + bn(4 * width)
            if block == 0:
                count += conv(inplanes, 4 * width, 1) + bn(4 * width)  # downsample
            inplanes = 4 * width
    return count


def deeplab_head_parameters(in_channels, num_classes, width=256):
    """torchvision's / LibMTL's DeepLabHead(in_channels, num_classes): ASPP (1x1, three atrous 3x3, pooling 1x1,
    each conv + BN; 1x1 projection of the five + BN), 3x3 conv + BN, 1x1 classifier with bias."""
    aspp = (conv(in_channels, width, 1) + bn(width) + 3 * (conv(in_channels, width, 3) + bn(width))
            + conv(in_channels, width, 1) + bn(width) + conv(5 * width, width, 1) + bn(width))
    return aspp + conv(width, width, 3) + bn(width) + conv(width, num_classes, 1, bias=True)


LIBMTL_SETTINGS = {  # (train images, batch, classes): LibMTL examples/{nyu,cityscapes}/main.py and READMEs
    "libmtl_nyuv2": (795, 8, 13),
    "libmtl_cityscapes": (2975, 64, 7),
}


@pytest.mark.parametrize("module", LIBMTL_CONFIGS)
def test_libmtl_configs_follow_libmtl(module):
    train_images, batch, _ = LIBMTL_SETTINGS[module]
    epoch = train_images // batch  # DataLoader(drop_last=True)
    config = get_config(module, "strategy=joint")
    optimizer = config.optimizer
    assert (optimizer.name, optimizer.learning_rate, optimizer.weight_decay) == ("adam", 1e-4, 1e-5)
    assert (optimizer.schedule, optimizer.step_every_steps, optimizer.step_factor) == ("step", 100 * epoch, 0.5)
    assert (config.batch_size, config.num_train_steps, config.eval_every_steps) == (batch, 200 * epoch, epoch)
    assert (config.model.encoder, config.model.decoder, config.model.output_stride) == ("resnet50", "deeplab", 8)
    assert config.dataset.config == "mtan" and config.model.pretrained_required
    assert tuple(config.input.scale_range) == (1.0, 1.0) and not config.input.flip  # no augmentation
    assert tuple(config.input.crop_size) == {"libmtl_nyuv2": (288, 384), "libmtl_cityscapes": (128, 256)}[module]
    assert (tuple(config.input.mean), tuple(config.input.std)) == ((0.0,) * 3, (255.0,) * 3)  # images in [0, 1]
    assert config.loss_weighting == "equal" and config.aux.tasks == () and config.deep_supervision.tasks == ()
    config.model.encoder_init = "scratch"
    training.validate_config(config)
    schedule = training.run_learning_rate_fn(config, config.num_train_steps)
    boundary = 100 * epoch
    assert [float(schedule(step)) for step in (0, boundary - 1, boundary, config.num_train_steps - 1)] == \
        pytest.approx([1e-4, 1e-4, 5e-5, 5e-5], rel=1e-6)


@pytest.mark.parametrize("module", LIBMTL_CONFIGS)
def test_libmtl_models_have_the_parameters_of_a_dilated_resnet50_and_deeplab_heads(module):
    """Counted under jax.eval_shape (no initialiser runs) against the architecture's own arithmetic."""
    import jax
    import jax.numpy as jnp

    from test_models import count_parameters

    num_classes = LIBMTL_SETTINGS[module][2]
    config = get_config(module, "strategy=joint")
    model = training.create_model(config, num_classes=num_classes)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
    channels = {"segmentation": num_classes, "depth": 1, "normal": 3}
    heads = {f"{task}_decoder": deeplab_head_parameters(2048, channels[task]) for task in config.tasks}
    encoder = torchvision_resnet50_parameters()
    assert encoder == 23_508_032
    main = shapes["params"]["main"]
    assert {name: count_parameters(tree) for name, tree in main.items()} == {"encoder": encoder, **heads}
    total = {"libmtl_nyuv2": 71_888_721, "libmtl_cityscapes": 55_760_968}[module]  # the docstrings' numbers
    assert count_parameters(main) == encoder + sum(heads.values()) == total
    assert model.main.output_stride == 8 and main["segmentation_decoder"]["aspp"].keys() >= {
        "branch_rate12", "branch_rate24", "branch_rate36"}


@pytest.mark.parametrize("module", ["cityscapes_two_task", *LIBMTL_CONFIGS])
def test_new_configs_compose_with_every_strategy_and_shrink_with_runlocal(module):
    """Every strategy, a gradient treatment and the other aux-module choices validate and build (under eval_shape)
    at the runlocal size."""
    import jax
    import jax.numpy as jnp

    from test_models import count_parameters

    config = get_config(module)
    runlocal = get_config(module, "runlocal")
    assert (runlocal.num_train_steps, runlocal.batch_size, runlocal.model.width_multiplier) == (2, 4, 0.25)
    assert runlocal.model.encoder_init == "scratch" and tuple(runlocal.input.crop_size) == (32, 40)
    assert runlocal.optimizer.name == config.optimizer.name
    strategies = [strategy for strategy in strategies_of(config) if strategy != "prior"] + ["prior:/runs/x"]
    images = jax.ShapeDtypeStruct((1, 32, 40, 3), jnp.float32)
    others = ["strategy=auxi_all,weighting=pcgrad",
              "strategy=auxi_all,adaptor=conv3x3,aggregate=sum,aux_resolution=finest"]
    for variant in [f"strategy={strategy}" for strategy in strategies] + others:
        small = get_config(module, f"runlocal,{variant}")
        training.validate_config(small)
        model = training.create_model(small, num_classes=7)
        shapes = jax.eval_shape(model.init, jax.random.key(0), images)
        assert count_parameters(shapes["params"]["main"]) < 3_000_000, variant
        if small.aux.tasks:
            assert set(shapes["params"]["aux"]) == set(small.aux.tasks), variant


def test_the_synthetic_encoder_start_fits_the_cpu_experiments_and_sees_other_scenes():
    from auxmtl_datasets.synthetic_scenes import builder, render
    from auxmtl_jax.experiments import EXPERIMENTS, runner

    start = get_config("synthetic_pretrain")
    training.validate_config(start)
    base = runner.base_config(EXPERIMENTS["strategies"], size="cpu", dataset="synthetic_scenes")
    assert (start.model.encoder, start.model.width_multiplier) == (base.model.encoder, base.model.width_multiplier)
    assert start.aux.tasks == () and start.tasks == ("segmentation", "depth", "normal")
    scenes = {config.name: config for config in builder.SyntheticScenes.BUILDER_CONFIGS}
    pretrain, demo = scenes[start.dataset.config], scenes[base.dataset.config]
    assert (pretrain.height, pretrain.width) == (demo.height, demo.width) and pretrain.seed != demo.seed
    first = render.render_example(pretrain.seed, "train", 0, 48, 64)["image"]
    assert not np.array_equal(first, render.render_example(demo.seed, "train", 0, 48, 64)["image"])
    assert get_config("synthetic_pretrain", "runlocal").dataset.config == "tiny"


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
    config = get_config("nyuv2_two_task", "strategy=deep_supervision:depth")
    assert config.deep_supervision.tasks == ("depth",) and config.name == "deep_supervision_depth"
    config = get_config("nyuv2_two_task", "strategy=prior:/runs/depth")
    assert (config.init_from.path, config.init_from.scope, config.init_from.base_lr_scale) == (
        "/runs/depth", "network", 0.1)
    assert config.aux.tasks == ()
    config = get_config("nyuv2_two_task", "prior=/runs/seg,strategy=auxi:depth")  # the paper's AT_2
    assert (config.init_from.path, config.init_from.scope, config.init_from.base_lr_scale) == (
        "/runs/seg", "network", 0.1)
    assert config.aux.tasks == ("depth",) and config.name == "auxi_depth_from_prior"
    config = get_config("nyuv2_two_task", "strategy=auxi:depth")
    assert (config.init_from.path, config.init_from.scope, config.init_from.base_lr_scale) == (None, "encoder", 1.0)
    config = get_config("synthetic_three_task", f"strategy=auxi_nas:{EXAMPLE_GENOTYPE}")
    assert (config.aux.genotype, config.aux.tasks, config.aux.features) == (str(EXAMPLE_GENOTYPE), (), ())
    assert config.name == "auxi_nas"
    config = get_config("synthetic_three_task", f"strategy=auxi_nas:{EXAMPLE_GENOTYPE},strategy=auxi_all")
    assert config.aux.genotype is None and config.aux.tasks == tuple(config.tasks)


@pytest.mark.parametrize("arg, message", [
    ("strategy=auxi:height", r"task 'height' is not among config\.tasks"),
    ("strategy=mtan", r"Unknown strategy 'mtan'"),
    ("strategy=single", r"must be written as 'single:<task>'"),
    ("strategy=auxi_nas", r"must be written as 'auxi_nas:<genotype\.json>'"),
    ("strategy=joint:depth", r"must be written as 'joint'"),
    ("strategy=deep_supervision:height", r"task 'height' is not among config\.tasks"),
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


@pytest.mark.slow
@pytest.mark.parametrize("module", [pytest.param(module, marks=pytest.mark.exhaustive) for module in CONFIG_MODULES])
def test_every_strategy_trains_two_steps(module, data_dir, tmp_path):
    """Every strategy of every shipped config trains two steps (`-m exhaustive`; CI trains each strategy in its own
    tests, and every shipped config's Auxi-all in `test_each_shipped_config_trains_auxi_all_two_steps`)."""
    strategies = strategies_of(get_config(module))
    prior_source = None
    for strategy in strategies:
        if strategy == "prior":
            strategy = f"prior:{prior_source}"
        config = on_tiny_data(get_config(module, f"runlocal,strategy={strategy}"), data_dir)
        workdir = tmp_path / strategy.split(":")[0]
        record = programs.run(config, str(workdir))
        assert set(record["metrics"]) == set(config.tasks), strategy
        prior_source = prior_source or str(workdir)


# The peer-layout configs train on fake data in their own layouts instead (tests/e2e/test_peer_protocols.py).
SYNTHETIC_SMOKE_CONFIGS = [module for module in CONFIG_MODULES
                           if module not in ("synthetic_three_task", "libmtl_nyuv2", "libmtl_cityscapes",
                                             "cityscapes_two_task")]


@pytest.mark.slow
@pytest.mark.parametrize("module", SYNTHETIC_SMOKE_CONFIGS)
def test_each_shipped_config_trains_auxi_all_two_steps(module, data_dir, tmp_path):
    config = on_tiny_data(get_config(module, "runlocal,strategy=auxi_all"), data_dir)
    record = programs.run(config, str(tmp_path))
    assert set(record["metrics"]) == set(config.tasks)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["decoder=baseline", "decoder=context",
                                     # CI trains the dilated ResNet-50 in test_peer_protocols (libmtl_nyuv2)
                                     pytest.param("encoder=resnet50", marks=pytest.mark.exhaustive)])
def test_architecture_variants_train_two_steps(variant, data_dir, tmp_path):
    config = on_tiny_data(get_config("nyuv2_two_task", f"runlocal,strategy=auxi_all,{variant}"), data_dir)
    record = programs.run(config, str(tmp_path))
    assert set(record["metrics"]) == {"segmentation", "depth"}


@pytest.mark.parametrize("genotype_file", sorted(EXAMPLE_GENOTYPE.parent.glob("*.json")), ids=lambda path: path.name)
def test_shipped_genotypes_fit_the_demo_network(genotype_file):
    import jax
    import jax.numpy as jnp

    from auxmtl_jax import nas

    config = get_config("synthetic_three_task", f"strategy=auxi_nas:{genotype_file}")
    model = training.create_model(config, num_classes=13)
    assert model.aux_genotype == nas.load_genotype(genotype_file)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 64, 80, 3), jnp.float32))
    assert set(shapes["params"]["aux"]) == set(nas.load_genotype(genotype_file).tasks)


@pytest.mark.slow
def test_auxi_nas_trains_evaluates_resumes_and_keeps_its_genotype(data_dir, tmp_path):
    """The README's Auxi-NAS run: trains the example genotype with two evaluations and checkpoints, exports `main`
    only, records the genotype; resuming with a changed genotype file is refused, a bad one fails before any
    output."""
    from auxmtl_jax import checkpoint as checkpoint_lib
    from auxmtl_jax import nas

    genotype_file = tmp_path / "genotype.json"
    genotype_file.write_text(EXAMPLE_GENOTYPE.read_text())
    config = on_tiny_data(get_config("synthetic_three_task", f"runlocal,strategy=auxi_nas:{genotype_file}"),
                          data_dir)
    config.num_train_steps, config.eval_every_steps, config.checkpoint_every_steps = 4, 2, 2
    workdir = tmp_path / "run"
    record = programs.run(config, str(workdir))
    assert set(record["metrics"]) == set(config.tasks)
    assert nas.load_genotype(workdir / workdir_lib.AUX_GENOTYPE) == nas.load_genotype(EXAMPLE_GENOTYPE)
    logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert {f"aux_loss/{task}" for task in config.tasks} <= set().union(*logged)
    assert [line["step"] for line in logged if line["kind"] == "eval"] == [2, 4]
    exported = checkpoint_lib.load_inference_variables(workdir / checkpoint_lib.INFERENCE_DIR)
    assert set(exported["params"]) == {"encoder", *(f"{task}_decoder" for task in config.tasks)}

    # a fine-tune of this run (init_from scope 'all') starts from its trained Auxi-NAS cells
    import jax

    finetune = copy.deepcopy(config)
    finetune.init_from.path, finetune.init_from.scope = str(workdir), "all"
    model = training.create_model(finetune, num_classes=record_classes(config))
    state, _ = training.create_train_state(finetune, model, jax.random.key(1), training.run_learning_rate_fn(finetune, 4))
    trained = checkpoint_lib.load_init_variables(str(workdir), "all")
    for got, want in zip(jax.tree.leaves(state.params["aux"]), jax.tree.leaves(trained["params"]["aux"])):
        np.testing.assert_array_equal(np.asarray(got), want)

    changed = json.loads(genotype_file.read_text())
    changed["cells"]["depth"][0][2] = 4
    genotype_file.write_text(json.dumps(changed))
    config.num_train_steps = 6
    config.accept_changed_keys = "num_train_steps"
    with pytest.raises(ValueError, match=r"trained with the genotype in .*aux_genotype\.json.*different one"):
        programs.run(config, str(workdir))

    genotype_file.write_text("{}")
    with pytest.raises(nas.GenotypeError, match=r"aux.genotype '.*genotype\.json'|genotype file '.*genotype\.json'"):
        programs.run(config, str(tmp_path / "never"))
    assert not (tmp_path / "never").exists()
