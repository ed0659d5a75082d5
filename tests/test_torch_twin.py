"""The PyTorch twin (benchmarks/torch_twin.py) against our network: parameter counts, outputs, losses; and a
smoke run of benchmarks/compare_torch.py. Skipped where torch is not installed (CI)."""

import importlib
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from auxmtl_jax import tasks as task_lib  # noqa: E402
from auxmtl_jax.models import build_model  # noqa: E402

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
TASKS = {"segmentation": 13, "depth": 1, "normal": 3}


def load_benchmark_module(name):
    """A module of benchmarks/ (a folder of scripts, not a package), imported the way its scripts import it."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return importlib.import_module(name)


torch_twin = load_benchmark_module("torch_twin")


@pytest.fixture(autouse=True)
def one_torch_thread():
    """torch's OpenMP threads slow to a crawl on cores that other processes (parallel test workers) keep busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def configs(encoder="mobilenet_v2", decoder="ushape", width=1.0, head_channels=None, aux_channels=64,
            resolution="hierarchy", features=(), output_stride=None, aux_tasks=tuple(TASKS)):
    model_cfg = SimpleNamespace(encoder=encoder, decoder=decoder, width_multiplier=width, output_stride=output_stride,
                                head_channels=head_channels, dtype="float32")
    aux_cfg = SimpleNamespace(tasks=aux_tasks, features=features, adaptor="conv1x1", aggregate="concat",
                              channels=aux_channels, resolution=resolution)
    return model_cfg, aux_cfg


def twin_for(model_cfg, aux_cfg):
    return torch_twin.build_twin(
        model_cfg.encoder, model_cfg.decoder, model_cfg.width_multiplier, TASKS, aux_tasks=aux_cfg.tasks,
        aux_channels=aux_cfg.channels, head_channels=model_cfg.head_channels, output_stride=model_cfg.output_stride,
        aux_features=aux_cfg.features, aux_resolution=aux_cfg.resolution)


def our_parameter_counts(model_cfg, aux_cfg):
    model = build_model(model_cfg, TASKS, aux_cfg)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
    count = lambda tree: sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))  # noqa: E731
    return count(shapes["params"]["main"]), count(shapes["params"].get("aux", {}))


@pytest.mark.parametrize("resolution", ["hierarchy", "finest"])
@pytest.mark.parametrize("decoder", ["baseline", "context", "ushape"])
def test_parameter_counts_match_ours_for_every_decoder(decoder, resolution):
    model_cfg, aux_cfg = configs(decoder=decoder, resolution=resolution)
    twin = twin_for(model_cfg, aux_cfg)
    assert (torch_twin.main_parameter_count(twin), torch_twin.aux_parameter_count(twin)) == \
        our_parameter_counts(model_cfg, aux_cfg)


@pytest.mark.parametrize("overrides", [
    dict(decoder="ushape", width=0.5, head_channels=16, aux_channels=32),
    dict(decoder="context", width=0.25, head_channels=64, aux_channels=8, features=("stage2", "stage4")),
    dict(decoder="baseline", width=0.25, output_stride=16, aux_tasks=("depth",)),
    dict(encoder="resnet50", decoder="ushape", width=0.25, aux_channels=16),
    dict(encoder="resnet50", decoder="context", width=0.25, output_stride=16, aux_tasks=()),
], ids=["ushape-0.5", "context-0.25-features", "baseline-os16-aux-depth", "resnet50-ushape", "resnet50-joint"])
def test_parameter_counts_match_ours_for_widths_and_channels(overrides):
    model_cfg, aux_cfg = configs(**overrides)
    twin = twin_for(model_cfg, aux_cfg)
    assert (torch_twin.main_parameter_count(twin), torch_twin.aux_parameter_count(twin)) == \
        our_parameter_counts(model_cfg, aux_cfg)


def random_variables(model, images, seed=0):
    """Our variables with random values (positive BatchNorm variances), made without running our init."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), images)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name == "var":
            return rng.uniform(0.5, 2.0, leaf.shape).astype(np.float32)
        scale = 0.1 if name in ("mean", "bias") else 1.0 / math.sqrt(max(1, math.prod(leaf.shape[:-1])))
        return (scale * rng.standard_normal(leaf.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.mark.parametrize("resolution", ["hierarchy", "finest"])
def test_twin_with_our_weights_gives_our_outputs(resolution):
    """Same weights in, same main and aux outputs out (shapes and values), in eval and in train mode."""
    model_cfg, aux_cfg = configs(width=0.25, head_channels=8, aux_channels=8, resolution=resolution,
                                 features=("stage1", "stage3", "stage4", "stage5"))
    model = build_model(model_cfg, TASKS, aux_cfg)
    images = np.random.default_rng(1).standard_normal((2, 64, 48, 3)).astype(np.float32)
    variables = random_variables(model, jax.ShapeDtypeStruct(images.shape, jnp.float32))
    ours = jax.jit(lambda variables, images: (model.apply(variables, images, train=False)[0],
                                              model.apply(variables, images, train=True)[0]))(variables, images)
    twin = twin_for(model_cfg, aux_cfg)
    torch_twin.load_flax_variables(twin, variables)
    torch_images = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    # Eval mode agrees to float32 rounding. In train mode the deepest stage's BatchNorm normalises 2x2x2 values
    # per channel and flax takes their variance as E[x^2] - E[x]^2, which magnifies rounding to ~1e-3; a wrong
    # layer would differ by the outputs' own scale.
    relative_tolerance = {False: 1e-5, True: 1e-2}
    for train, our_outputs in zip((False, True), ours):
        twin.train(train)
        with torch.no_grad():
            twin_outputs = dict(zip(("main", "aux"), twin(torch_images)))
        for group in ("main", "aux"):
            expected = getattr(our_outputs, group)
            assert set(twin_outputs[group]) == set(expected)
            for task, output in twin_outputs[group].items():
                expected_array = np.asarray(expected[task])
                np.testing.assert_allclose(output.numpy().transpose(0, 2, 3, 1), expected_array, rtol=0,
                                           atol=relative_tolerance[train] * np.abs(expected_array).max(),
                                           err_msg=f"{group}/{task}, train={train}")


def test_losses_match_ours():
    rng = np.random.default_rng(0)
    shape = (2, 9, 7)
    segmentation = rng.integers(0, 5, shape).astype(np.int32)
    segmentation[0, :3] = task_lib.SEGMENTATION_IGNORE_LABEL
    depth = rng.uniform(0.0, 3.0, (*shape, 1)).astype(np.float32)
    depth[1, 2:5] = 0.0
    normal = rng.standard_normal((*shape, 3)).astype(np.float32)
    normal[0, 4:] = 0.0
    labels = {"segmentation": segmentation, "depth": depth, "normal": normal}
    predictions = {"segmentation": rng.standard_normal((*shape, 5)), "depth": np.abs(rng.standard_normal((*shape, 1))),
                   "normal": rng.standard_normal((*shape, 3))}
    to_nchw = lambda array: torch.from_numpy(np.ascontiguousarray(array.transpose(0, 3, 1, 2)))  # noqa: E731
    for task, prediction in predictions.items():
        prediction = prediction.astype(np.float32)
        ours = task_lib.task_loss(task, jnp.asarray(prediction), {task: jnp.asarray(labels[task])})
        label = torch.from_numpy(segmentation).long() if task == "segmentation" else to_nchw(labels[task])
        twin = torch_twin.task_loss(task, to_nchw(prediction), label)
        np.testing.assert_allclose(float(twin), float(ours), rtol=1e-5, err_msg=task)
    all_ignored = torch.full(shape, task_lib.SEGMENTATION_IGNORE_LABEL)
    assert float(torch_twin.task_loss("segmentation", to_nchw(predictions["segmentation"]), all_ignored)) == 0.0


def test_train_step_and_inference_run():
    model_cfg, aux_cfg = configs(width=0.25, head_channels=8, aux_channels=8)
    twin = twin_for(model_cfg, aux_cfg)
    optimizer = torch_twin.make_optimizer(twin)
    step = torch_twin.make_train_step(twin, optimizer, compute_dtype=torch.bfloat16)
    images = torch.randn(2, 3, 32, 32)
    labels = {"segmentation": torch.randint(0, 13, (2, 32, 32)), "depth": torch.rand(2, 1, 32, 32) + 0.5,
              "normal": torch.nn.functional.normalize(torch.randn(2, 3, 32, 32), dim=1)}
    before = twin.main.encoder.stem.conv.weight.detach().clone()
    loss = step(images, labels)
    assert torch.isfinite(loss) and not torch.equal(before, twin.main.encoder.stem.conv.weight)
    outputs = torch_twin.make_inference(twin)(images)
    assert {task: tuple(output.shape) for task, output in outputs.items()} == {
        "segmentation": (2, 13, 32, 32), "depth": (2, 1, 32, 32), "normal": (2, 3, 32, 32)}
    assert not twin.main.training


def test_compare_torch_pieces_at_a_tiny_size():
    """The twin's runners, our inference runner and the table, on a 32x32 batch of two (no torch.compile)."""
    compare_torch = load_benchmark_module("compare_torch")
    args = compare_torch.parse_args(["--size=32", "--batch=2", "--steps=1", "--blocks=1", "--strategies=auxi_all",
                                     "--dtypes=float32", "--no-compile",
                                     "--config=configs/sunrgbd_three_task.py:width=0.25"])
    base = compare_torch.load_config(args.config)
    train_config = compare_torch.row_config(base, "auxi_all", "float32", args.size, args.batch)
    infer_config = compare_torch.row_config(base, "joint", "float32", args.size, args.batch)
    batch = compare_torch.random_batch(train_config, args.num_classes)
    device = torch.device("cpu")
    runners = [
        compare_torch.make_runner(("train", "auxi_all", "float32"), "eager", lambda: compare_torch.torch_train_block(
            train_config, args.num_classes, batch, device, compile=False, channels_last=False)),
        compare_torch.make_runner(("infer", "main", "float32"), "ours", lambda: compare_torch.ours_infer_block(
            infer_config, args.num_classes, batch)),
        compare_torch.make_runner(("infer", "main", "float32"), "eager", lambda: compare_torch.torch_infer_block(
            infer_config, args.num_classes, batch, device, compile=False, channels_last=True)),
    ]
    assert [runner.error for runner in runners] == [None, None, None]
    seconds = compare_torch.time_interleaved(runners, args.blocks, args.steps)
    assert all(len(times) == 1 and times[0] > 0 for times in seconds.values())
    table = compare_torch.format_table(runners, seconds, args.batch).splitlines()
    assert len(table) == 4 and table[2].startswith("| train | auxi_all | float32 | n/a |")
    assert table[3].startswith("| infer | main | float32 |") and "x |" in table[3]
