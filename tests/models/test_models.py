"""Model library: output shapes, the {main, aux} split, gradient isolation, inference cost, config errors."""

import math
import re
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from auxmtl_jax import tasks as task_lib
from auxmtl_jax.models import (ADAPTORS, AGGREGATES, DECODERS, ENCODERS, OPERATIONS, RESOLUTIONS, ModelOutputs,
                               build_model, encoder_stages)
from auxmtl_jax.models.auxiliary import downsample_to
from auxmtl_jax.models.decoders import ASPP, DeepLabDecoder, ObjectContextDecoder, object_context_attention
from auxmtl_jax.models.layers import DepthwiseConv, symmetric_padding

TASKS = {"segmentation": 5, "depth": 1, "normal": 3}
IMAGE_SHAPE = (2, 32, 32, 3)


def model_config(**overrides):
    fields = dict(encoder="mobilenet_v2", width_multiplier=0.25, output_stride=None, decoder="ushape",
                  head_channels=8, dtype="float32")
    fields.update(overrides)
    return SimpleNamespace(**fields)


def aux_config(**overrides):
    fields = dict(tasks=tuple(TASKS), features=(), adaptor="conv1x1", aggregate="concat", channels=8)
    fields.update(overrides)
    return SimpleNamespace(**fields)


# Aux modules' share of the train step's FLOPs (ARCHITECTURE.md: about 10% of the main network's at most).
AUX_FLOP_SHARE_BOUND = 0.10


def count_parameters(tree):
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def main_variables(variables):
    return {"params": variables["params"]["main"], "batch_stats": variables["batch_stats"]["main"]}


def random_batch(key, shape=IMAGE_SHAPE):
    keys = jax.random.split(key, 4)
    batch, height, width, _ = shape
    normal = jax.random.normal(keys[3], (batch, height, width, 3))
    return {
        "image": jax.random.normal(keys[0], shape),
        "segmentation": jax.random.randint(keys[1], (batch, height, width), 0, TASKS["segmentation"]),
        "depth": jax.random.uniform(keys[2], (batch, height, width, 1), minval=0.5, maxval=5.0),
        "normal": normal / jnp.linalg.norm(normal, axis=-1, keepdims=True),
    }


@pytest.fixture(scope="module")
def batch():
    return random_batch(jax.random.key(1))


@pytest.fixture(scope="module")
def full_model():
    """MobileNetV2 U-shape, three tasks, aux for every task, deep supervision for depth."""
    return build_model(model_config(), TASKS, aux_config(), SimpleNamespace(tasks=("depth",)))


def random_variables(model, images, seed=0):
    """Variables with ``init``'s structure and dtypes, filled on the host (compiling ``init`` costs more CPU)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct(images.shape, images.dtype))

    def fill(path, leaf):
        name = jax.tree_util.keystr(path[-1:])
        if name == "['var']":
            return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), leaf.dtype)
        return jnp.asarray(rng.normal(0.0, 0.1, leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="module")
def full_variables(full_model, batch):
    return random_variables(full_model, batch["image"])


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("encoder", ENCODERS)
def test_output_shapes_for_every_encoder_decoder_and_task(encoder, decoder):
    model = build_model(model_config(encoder=encoder, decoder=decoder), TASKS, aux_config(),
                        SimpleNamespace(tasks=("segmentation", "normal")))
    images = jax.ShapeDtypeStruct(IMAGE_SHAPE, jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), images)
    outputs, new_batch_stats = jax.eval_shape(lambda v, x: model.apply(v, x, train=True), variables, images)

    assert set(variables["params"]) == {"main", "aux", "deep_supervision"}
    assert set(variables["params"]["aux"]) == set(TASKS)
    assert set(variables["params"]["deep_supervision"]) == {"segmentation", "normal"}
    assert jax.tree.structure(new_batch_stats) == jax.tree.structure(variables["batch_stats"])
    expected = {task: IMAGE_SHAPE[:3] + (channels,) for task, channels in TASKS.items()}
    assert {task: out.shape for task, out in outputs.main.items()} == expected
    assert {task: out.shape for task, out in outputs.aux.items()} == expected
    for task, predictions in outputs.deep_supervision.items():
        assert [out.shape for out in predictions] == [expected[task]] * len(model.stage_names)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(outputs))


def test_object_context_attention_rows_sum_to_one_and_weigh_similar_positions():
    rng = np.random.default_rng(0)
    query = jnp.asarray(rng.normal(size=(2, 12, 8)), jnp.float32)
    key = jnp.asarray(rng.normal(size=(2, 12, 8)), jnp.float32)
    weights = object_context_attention(query, key)
    assert weights.shape == (2, 12, 12)
    np.testing.assert_allclose(np.asarray(weights).sum(-1), 1.0, rtol=1e-6)
    scores = np.einsum("bqc,bkc->bqk", query, key) / math.sqrt(8)
    expected = np.exp(scores - scores.max(-1, keepdims=True))
    np.testing.assert_allclose(weights, expected / expected.sum(-1, keepdims=True), rtol=1e-5, atol=1e-7)


def test_ocnet_decoder_starts_without_context_and_predicts_at_feature_resolution():
    decoder = ObjectContextDecoder(out_channels=5, channels=16)
    feature = jnp.asarray(np.random.default_rng(1).normal(size=(2, 6, 5, 32)), jnp.float32)
    variables = decoder.init(jax.random.key(0), feature, train=False)
    assert set(variables["params"]) == {"reduce", "query_key", "value", "context_out", "fuse", "output"}
    assert variables["params"]["query_key"]["conv"]["kernel"].shape == (1, 1, 16, 8)
    assert not np.any(np.asarray(variables["params"]["context_out"]["kernel"]))  # zero-initialised context
    output = decoder.apply(variables, feature, train=False)
    assert output.shape == (2, 6, 5, 5)
    model = build_model(model_config(encoder="resnet50", decoder="ocnet"), TASKS)
    assert model.main.output_stride == 8


def libmtl_resnet_dilated_convs(dilate_scale=8):
    """(stride, dilation) of each bottleneck's 3x3 conv and its downsample's stride, per (layer, block), by LibMTL's
    rule (LibMTL/model/resnet_dilated.py `_nostride_dilate` on torchvision's ResNet-50): in each dilated layer a
    stride-2 conv becomes stride 1, with dilation dilate//2 if it is 3x3; every other 3x3 conv gets dilation dilate."""
    dilate = {8: {3: 2, 4: 4}, 16: {4: 2}}[dilate_scale]
    convs = {}
    for layer, blocks in enumerate((3, 4, 6, 3), start=1):
        for block in range(blocks):
            stride = 2 if layer > 1 and block == 0 else 1  # torchvision v1.5: the stride sits on the 3x3 conv
            dilation, downsample_stride = 1, stride if block == 0 else None
            if layer in dilate:
                dilation = dilate[layer] // 2 if stride == 2 else dilate[layer]
                stride, downsample_stride = 1, (1 if block == 0 else None)
            convs[layer, block] = (stride, dilation, downsample_stride)
    return convs


@pytest.mark.parametrize("output_stride", [8, 16])
def test_resnet50_dilates_like_libmtl_resnet_dilated(output_stride):
    from auxmtl_jax.models.encoders import resnet50_blocks

    ours = {(block.layer, block.index): (block.stride, block.dilation, block.stride if block.downsample else None)
            for block in resnet50_blocks(1.0, output_stride)}
    assert ours == libmtl_resnet_dilated_convs(output_stride)


def test_deeplab_decoder_is_libmtl_deeplab_head_with_dropout_in_training_only():
    """Full (not separable) atrous branches, projection of the five branches to the head width, 3x3 + 1x1; dropout
    acts only in training with a 'dropout' rng, elementwise with 1/(1-p) scaling like torch's nn.Dropout."""
    feature = jnp.asarray(np.random.default_rng(2).normal(size=(2, 6, 5, 16)), jnp.float32)
    decoder = DeepLabDecoder(out_channels=5, channels=8, rates=(1, 2, 3))
    variables = decoder.init(jax.random.key(0), feature, train=False)
    params = variables["params"]
    assert set(params) == {"aspp", "hidden", "output"}
    assert set(params["aspp"]) == {"branch_1x1", "branch_rate1", "branch_rate2", "branch_rate3", "branch_pool",
                                   "project"}
    assert params["aspp"]["branch_rate3"]["conv"]["kernel"].shape == (3, 3, 16, 8)
    assert params["aspp"]["project"]["conv"]["kernel"].shape == (1, 1, 5 * 8, 8)
    assert params["hidden"]["conv"]["kernel"].shape == (3, 3, 8, 8) and params["output"]["bias"].shape == (5,)

    def run(train, rng=None):
        rngs = None if rng is None else {"dropout": rng}
        return decoder.apply(variables, feature, train=train, rngs=rngs, mutable=["batch_stats"])[0]

    key = jax.random.key(1)
    np.testing.assert_array_equal(run(False, key), run(False))
    np.testing.assert_array_equal(run(True, key), run(True, key))
    assert not np.allclose(run(True, key), run(True))
    assert not np.allclose(run(True, key), run(True, jax.random.key(2)))

    aspp = ASPP(8, (1, 2), separable=False, project_channels=8, dropout_rate=0.5)
    aspp_variables = aspp.init(jax.random.key(0), feature, train=False)
    kept, _ = aspp.apply(aspp_variables, feature, train=True, mutable=["batch_stats"])
    dropped, _ = aspp.apply(aspp_variables, feature, train=True, rngs={"dropout": key}, mutable=["batch_stats"])
    kept, dropped = np.asarray(kept), np.asarray(dropped)
    zeroed = (dropped == 0) & (kept != 0)
    np.testing.assert_allclose(dropped[~zeroed], 2.0 * kept[~zeroed], rtol=1e-6)
    assert 0.4 < zeroed.sum() / (kept != 0).sum() < 0.6


def test_deeplab_dropout_key_reaches_the_decoders_in_apply_and_heads_forward():
    """`apply(dropout_rng=...)` and the split forward (`heads_forward`, what gradient treatments run) draw the same
    masks; without a key the decoders run without dropout."""
    tasks = {"segmentation": 5, "depth": 1}
    model = build_model(model_config(decoder="deeplab"), tasks, aux_config(tasks=("depth",)))
    assert model.main.output_stride == 8
    images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    variables = random_variables(model, images)
    key = jax.random.key(3)

    @jax.jit  # one compilation runs faster than the three forwards op by op
    def forwards(variables, images):
        plain, _ = model.apply(variables, images, train=True)
        dropped, _ = model.apply(variables, images, train=True, dropout_rng=key)
        representation, _ = model.shared_forward(variables, images, train=True)
        split, _ = model.heads_forward(variables, model.reads(representation), images, train=True, dropout_rng=key)
        return plain, dropped, split

    plain, dropped, split = forwards(variables, images)
    for task in tasks:
        assert not np.allclose(plain.main[task], dropped.main[task])
        np.testing.assert_allclose(split.main[task], dropped.main[task], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(plain.aux["depth"], dropped.aux["depth"])  # aux modules have no dropout


@pytest.mark.slow
def test_resnet_blocks_are_selectable_aux_inputs():
    """aux.features may name any ResNet-50 residual block; a layer's last block is that stage's feature."""
    from auxmtl_jax.models import encoder_features

    names = encoder_features("resnet50", width_multiplier=0.25)
    assert names[:4] == ("layer1_block0", "layer1_block1", "layer1_block2", "stage2") and names[-1] == "stage5"
    assert len(names) == 16 + 4 and encoder_features("mobilenet_v2") == tuple(
        stage.name for stage in encoder_stages("mobilenet_v2"))
    images = jax.random.normal(jax.random.key(0), (1, 32, 32, 3))
    by_block = build_model(model_config(encoder="resnet50"), {"depth": 1},
                           aux_config(tasks=("depth",), features=("layer3_block5", "layer2_block1")))
    assert by_block.aux_modules[0][1].features == ("layer2_block1", "layer3_block5")  # shallow to deep
    by_stage = build_model(model_config(encoder="resnet50"), {"depth": 1},
                           aux_config(tasks=("depth",), features=("layer2_block1", "stage4")))
    variables = by_block.init(jax.random.key(1), images)
    aux = dict(variables["params"]["aux"]["depth"])
    aux["adaptor_stage4"] = aux.pop("adaptor_layer3_block5")
    stats = dict(variables["batch_stats"]["aux"]["depth"])
    stats["adaptor_stage4"] = stats.pop("adaptor_layer3_block5")
    renamed = {"params": {**variables["params"], "aux": {"depth": aux}},
               "batch_stats": {**variables["batch_stats"], "aux": {"depth": stats}}}
    from_block, _ = by_block.apply(variables, images, train=False)
    from_stage, _ = by_stage.apply(renamed, images, train=False)
    np.testing.assert_allclose(from_block.aux["depth"], from_stage.aux["depth"], rtol=1e-6, atol=1e-6)
    message = r"aux\.features: \['layer9_0'\] not sown .*blocks layer<l>_block<b> \(layer1_block0 \.\. layer4_block2\)"
    with pytest.raises(ValueError, match=message):
        build_model(model_config(encoder="resnet50"), {"depth": 1}, aux_config(tasks=("depth",),
                                                                                 features=("layer9_0",)))


def test_stage_names_match_encoder_stages():
    assert build_model(model_config(), TASKS).stage_names == ("stage1", "stage2", "stage3", "stage4", "stage5")
    resnet = build_model(model_config(encoder="resnet50"), TASKS)
    assert resnet.stage_names == tuple(stage.name for stage in encoder_stages("resnet50", width_multiplier=0.25))
    assert resnet.stage_names == ("stage2", "stage3", "stage4", "stage5")


def test_bfloat16_keeps_float32_params_and_outputs():
    model = build_model(model_config(dtype="bfloat16", decoder="context"), TASKS, aux_config())
    images = jax.ShapeDtypeStruct(IMAGE_SHAPE, jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), images)
    outputs, _ = jax.eval_shape(lambda v, x: model.apply(v, x, train=True), variables, images)
    assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
    assert {leaf.dtype for leaf in jax.tree.leaves(outputs)} == {jnp.dtype(jnp.float32)}


def test_aux_feature_selection_adaptor_and_sum_aggregate():
    model = build_model(model_config(), TASKS,
                        aux_config(tasks=("depth",), features=("stage4", "stage2"), adaptor="conv3x3",
                                   aggregate="sum"))
    images = jax.ShapeDtypeStruct(IMAGE_SHAPE, jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), images)
    depth_aux = variables["params"]["aux"]["depth"]
    assert set(depth_aux) == {"adaptor_stage2", "adaptor_stage4", "head"}
    assert depth_aux["adaptor_stage2"]["conv"]["kernel"].shape[:2] == (3, 3)
    # sum keeps the adaptor width, so the head sees 8 channels (concat of two would give 16)
    assert depth_aux["head"]["hidden"]["conv"]["kernel"].shape[2] == 8
    assert "deep_supervision" not in variables["params"]


@pytest.mark.parametrize("operation", sorted(OPERATIONS))
def test_every_registered_operation_keeps_resolution(operation):
    module = OPERATIONS[operation](6, jnp.float32, "op")
    features = jax.ShapeDtypeStruct((1, 9, 9, 4), jnp.float32)
    variables = jax.eval_shape(lambda x: module.init(jax.random.key(0), x, train=False), features)
    output = jax.eval_shape(lambda v, x: module.apply(v, x, train=False), variables, features)
    assert output.shape == (1, 9, 9, 4 if operation == "skip" else 6)


def test_predict_equals_training_forward_in_eval_mode(full_model, full_variables, batch):
    outputs, new_batch_stats = jax.jit(lambda v, x: full_model.apply(v, x, train=False))(full_variables,
                                                                                         batch["image"])
    predicted = jax.jit(full_model.predict)(main_variables(full_variables), batch["image"])
    assert isinstance(outputs, ModelOutputs)
    for task in TASKS:
        np.testing.assert_allclose(predicted[task], outputs.main[task], rtol=1e-6, atol=1e-6)
    jax.tree.map(np.testing.assert_array_equal, new_batch_stats, full_variables["batch_stats"])
    assert float(jnp.min(predicted["depth"])) >= 0.0
    np.testing.assert_allclose(jnp.linalg.norm(predicted["normal"], axis=-1), 1.0, rtol=1e-5)


def test_apply_ignores_extra_top_level_params(full_model, full_variables, batch):
    params = dict(full_variables["params"], loss_weighting={"log_variance": jnp.zeros(3)})
    variables = {"params": params, "batch_stats": full_variables["batch_stats"]}
    outputs, _ = jax.eval_shape(lambda v, x: full_model.apply(v, x, train=True), variables, batch["image"])
    assert set(outputs.aux) == set(TASKS)


@pytest.mark.parametrize("resolution, decoder, adaptor, aggregate", [
    ("hierarchy", "ushape", "conv1x1", "concat"), ("finest", "ushape", "conv1x1", "concat"),
    ("hierarchy", "context", "conv1x1", "concat"), ("hierarchy", "ushape", "conv3x3", "sum")])
def test_gradients_keep_aux_and_main_paths_apart(resolution, decoder, adaptor, aggregate, batch):
    full_model = build_model(model_config(decoder=decoder), TASKS,
                             aux_config(resolution=resolution, adaptor=adaptor, aggregate=aggregate),
                             SimpleNamespace(tasks=("depth",)))
    full_variables = random_variables(full_model, batch["image"])

    def losses(params):
        outputs, new_batch_stats = full_model.apply(
            {"params": params, "batch_stats": full_variables["batch_stats"]}, batch["image"], train=True)
        main_loss = sum(task_lib.task_losses(outputs.main, batch).values())
        aux_loss = sum(task_lib.task_losses(outputs.aux, batch).values())
        return main_loss, aux_loss, new_batch_stats

    def stacked_losses(params):
        main_loss, aux_loss, new_batch_stats = losses(params)
        return jnp.stack([main_loss, aux_loss]), new_batch_stats

    @jax.jit
    def gradients(params):
        # one batched backward pass for both losses (cheaper to compile than two jax.grad calls)
        grads, new_batch_stats = jax.jacrev(stacked_losses, has_aux=True)(params)
        return jax.tree.map(lambda g: g[0], grads), jax.tree.map(lambda g: g[1], grads), new_batch_stats

    main_grads, aux_grads, new_batch_stats = gradients(full_variables["params"])

    for leaf in jax.tree.leaves(main_grads["aux"]) + jax.tree.leaves(main_grads["deep_supervision"]):
        assert not np.any(np.asarray(leaf))
    encoder_grads = aux_grads["main"]["encoder"]
    assert np.any(np.asarray(encoder_grads["stem"]["conv"]["kernel"]))
    assert np.any(np.asarray(encoder_grads["block17"]["project"]["conv"]["kernel"]))
    decoder_grads = {name: grads for name, grads in aux_grads["main"].items() if name != "encoder"}
    assert set(decoder_grads) == {f"{task}_decoder" for task in TASKS} | ({"aspp"} if decoder == "context" else set())
    for leaf in jax.tree.leaves(decoder_grads):
        assert not np.any(np.asarray(leaf))
    assert all(np.any(np.asarray(leaf)) for leaf in jax.tree.leaves(aux_grads["aux"]))
    # training mode updates the running statistics of main and the side modules
    assert not np.allclose(new_batch_stats["main"]["encoder"]["stem"]["bn"]["mean"],
                           full_variables["batch_stats"]["main"]["encoder"]["stem"]["bn"]["mean"])
    assert not np.allclose(new_batch_stats["aux"]["depth"]["head"]["hidden"]["bn"]["var"],
                           full_variables["batch_stats"]["aux"]["depth"]["head"]["hidden"]["bn"]["var"])


@pytest.mark.parametrize("aggregate, resolution", [("sum", "hierarchy"), ("concat", "hierarchy"), ("sum", "finest")])
def test_aggregation_values_follow_eq_2(aggregate, resolution):
    """h_p = h_{p-1} ⊙ D_p(O_p): the head's input is the sum (or concatenation) of the adapted stages, each earlier
    aggregate pooled to the next stage (hierarchy) or every stage upsampled to the finest one (finest)."""
    import flax.linen as nn

    from auxmtl_jax.models.auxiliary import AuxiliaryModule
    from auxmtl_jax.models.layers import resize_bilinear

    rng = np.random.default_rng(3)
    stages = {"stage3": jnp.asarray(rng.normal(size=(2, 8, 10, 4)), jnp.float32),
              "stage4": jnp.asarray(rng.normal(size=(2, 4, 5, 6)), jnp.float32),
              "stage5": jnp.asarray(rng.normal(size=(2, 2, 3, 8)), jnp.float32)}
    module = AuxiliaryModule(task="depth", out_channels=1, features=tuple(stages), aggregate=aggregate, channels=5,
                             resolution=resolution)
    variables = module.init(jax.random.key(0), stages, (16, 20), train=False)
    seen = {}

    def record(next_fun, args, kwargs, context):
        output = next_fun(*args, **kwargs)
        name = context.module.name or ""
        if context.method_name == "__call__" and (name.startswith("adaptor_") or name == "head"):
            seen[name] = (args[0], output)
        return output

    bound = module.bind(variables)
    with nn.intercept_methods(record):
        bound(stages, (16, 20), train=False)
    adapted = [seen[f"adaptor_{name}"][1] for name in stages]
    if resolution == "finest":
        adapted = [resize_bilinear(x, 8, 10) for x in adapted]
        expected = sum(adapted) if aggregate == "sum" else jnp.concatenate(adapted, -1)
    else:
        expected = adapted[0]
        for x in adapted[1:]:
            expected = downsample_to(expected, *x.shape[1:3])
            expected = expected + x if aggregate == "sum" else jnp.concatenate([expected, x], -1)
    head_input = seen["head"][0]
    assert head_input.shape == expected.shape
    assert head_input.shape[-1] == (5 if aggregate == "sum" else 15)
    np.testing.assert_allclose(head_input, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("implementation", ["shifted", "grouped"])
@pytest.mark.parametrize("stride, dilation", [(1, 1), (2, 1), (1, 3), (2, 2)])
def test_depthwise_conv_equals_a_grouped_flax_conv(implementation, stride, dilation):
    """Both implementations (CPU: shifted multiply-adds; elsewhere: grouped conv) give flax's grouped conv."""
    import flax.linen as nn

    x = jax.random.normal(jax.random.key(0), (2, 9, 11, 6))
    ours = DepthwiseConv(3, stride, dilation, implementation=implementation)
    reference = nn.Conv(6, (3, 3), strides=(stride, stride), padding=symmetric_padding(3, dilation),
                        kernel_dilation=(dilation, dilation), feature_group_count=6, use_bias=False)
    variables = ours.init(jax.random.key(1), x)
    assert jax.tree.map(jnp.shape, variables) == jax.tree.map(jnp.shape, reference.init(jax.random.key(1), x))
    np.testing.assert_allclose(ours.apply(variables, x), reference.apply(variables, x), rtol=1e-5, atol=1e-6)
    gradient = lambda module: jax.grad(lambda v, x: jnp.sum(jnp.sin(module.apply(v, x))), argnums=(0, 1))  # noqa: E731
    for a, b in zip(jax.tree.leaves(gradient(ours)(variables, x)), jax.tree.leaves(gradient(reference)(variables, x))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_downsample_to_pools_like_the_encoder_strides():
    x = jnp.arange(2 * 5 * 7 * 3, dtype=jnp.float32).reshape(2, 5, 7, 3)
    pooled = downsample_to(x, 3, 4)  # ceil(5/2), ceil(7/2): what a stride-2 'same' convolution gives
    assert pooled.shape == (2, 3, 4, 3)
    np.testing.assert_allclose(pooled[:, 0, 0], x[:, :2, :2].mean(axis=(1, 2)), rtol=1e-6)
    borders = [pooled[:, 2, 3], x[:, 4:, 6:].mean(axis=(1, 2))]  # SAME pads after; the pad is not averaged in
    np.testing.assert_allclose(*borders, rtol=1e-6)
    no_integer_factor = downsample_to(x, 2, 2)  # ceil(5/2) = 3, ceil(5/3) = 2 but 7/3 rounds to 2: bilinear
    np.testing.assert_allclose(no_integer_factor, jax.image.resize(x, (2, 2, 2, 3), "bilinear", antialias=False),
                               rtol=1e-6)
    assert downsample_to(x, 5, 7) is x


def train_flops(model, images, batch):
    """XLA's FLOP count of one loss-and-gradient computation (main + aux losses), from the lowered program."""
    variables = jax.eval_shape(model.init, jax.random.key(0), images)

    def loss(params, batch_stats):
        outputs, _ = model.apply({"params": params, "batch_stats": batch_stats}, images, train=True)
        return (sum(task_lib.task_losses(outputs.main, batch).values())
                + sum(task_lib.task_losses(outputs.aux, batch).values(), 0.0))

    return jax.jit(jax.grad(loss)).lower(variables["params"], variables["batch_stats"]).cost_analysis()["flops"]


@pytest.mark.slow
def test_hierarchy_aux_modules_cost_a_small_share_of_training_flops(batch):
    """Aux modules for all three tasks add under AUX_FLOP_SHARE_BOUND of Joint's train FLOPs when they follow the
    encoder's hierarchy (measured 3.0% here and 3.4% at width 1.0, 128x128), but not when they aggregate at the
    finest stage (52% here, 237% at width 1.0): the head's 3x3 conv on all stages' channels at stride 2."""
    joint = train_flops(build_model(model_config(), TASKS), batch["image"], batch)
    shares = {resolution: train_flops(build_model(model_config(), TASKS, aux_config(resolution=resolution)),
                                      batch["image"], batch) / joint - 1.0
              for resolution in RESOLUTIONS}
    assert 0.0 < shares["hierarchy"] < AUX_FLOP_SHARE_BOUND < shares["finest"], shares


def inference_flops(model, variables, images):
    compiled = jax.jit(lambda v, x: model.main.apply(v, x, train=False)).lower(variables, images).compile()
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax returned one dict per computation
        cost = cost[0]
    return cost["flops"]


def test_main_size_and_inference_cost_do_not_depend_on_aux(full_model, full_variables, batch):
    plain_model = build_model(model_config(), TASKS)
    plain_variables = jax.eval_shape(plain_model.init, jax.random.key(0), batch["image"])
    assert set(plain_variables["params"]) == {"main"}
    assert count_parameters(plain_variables["params"]["main"]) == count_parameters(
        full_variables["params"]["main"])
    assert count_parameters(full_variables["params"]) > count_parameters(plain_variables["params"])
    plain_flops = inference_flops(plain_model, main_variables(plain_variables), batch["image"])
    full_flops = inference_flops(full_model, main_variables(full_variables), batch["image"])
    assert plain_flops > 0
    assert plain_flops == full_flops


BAD_CONFIGS = [
    ("model.encoder", dict(model=model_config(encoder="vgg16")), "'vgg16'"),
    ("model.decoder", dict(model=model_config(decoder="fpn")), "'fpn'"),
    ("model.dtype", dict(model=model_config(dtype="float16")), "'float16'"),
    ("model.output_stride", dict(model=model_config(output_stride=4)), "4"),
    ("model.width_multiplier", dict(model=model_config(width_multiplier=0)), "0"),
    ("tasks", dict(tasks={"segmentation": 5, "edges": 1}), "'edges'"),
    ("tasks['depth']", dict(tasks={"depth": 3}), "3"),
    ("aux.tasks", dict(tasks={"depth": 1}, aux=aux_config(tasks=("normal",))), "'normal'"),
    ("aux.features", dict(model=model_config(encoder="resnet50"), aux=aux_config(features=("stage1",))),
     r"'stage1'.*sows \('stage2', 'stage3', 'stage4', 'stage5'\)"),
    ("aux.adaptor", dict(aux=aux_config(adaptor="deform_conv3x3")), "'deform_conv3x3'"),
    ("aux.aggregate", dict(aux=aux_config(aggregate="max")), "'max'"),
    ("aux.resolution", dict(aux=aux_config(resolution="coarsest")), "'coarsest'"),
    ("aux.channels", dict(aux=aux_config(channels=0)), "0"),
    ("deep_supervision.tasks", dict(tasks={"depth": 1}, deep_supervision=SimpleNamespace(tasks=("segmentation",))),
     "'segmentation'"),
]


@pytest.mark.parametrize("field, arguments, bad_value", BAD_CONFIGS, ids=[case[0] for case in BAD_CONFIGS])
def test_bad_config_raises_one_clear_error(field, arguments, bad_value):
    with pytest.raises(ValueError, match=rf"^{re.escape(field)}.*{bad_value}") as error:
        build_model(arguments.get("model", model_config()), arguments.get("tasks", TASKS), arguments.get("aux"),
                    arguments.get("deep_supervision"))
    if field in ("model.encoder", "model.decoder", "aux.adaptor", "aux.aggregate", "aux.resolution"):
        allowed = {"model.encoder": ENCODERS, "model.decoder": DECODERS, "aux.adaptor": ADAPTORS,
                   "aux.aggregate": tuple(AGGREGATES), "aux.resolution": RESOLUTIONS}[field]
        assert all(repr(name) in str(error.value) for name in allowed)


@pytest.mark.parametrize("decoder", ["baseline", "context", "ushape"])
def test_each_module_reads_only_its_own_copy_of_the_representation(decoder, batch):
    """The split the gradient treatments use: shared_forward then heads_forward is apply, and a change to the
    copy one module reads moves that module's output only (Context's ASPP is in the shared part)."""
    model = build_model(model_config(decoder=decoder), TASKS, aux_config())
    variables = jax.jit(model.init)(jax.random.key(0), batch["image"])
    plain, _ = model.apply(variables, batch["image"], train=False)
    representation, _ = model.shared_forward(variables, batch["image"], train=False)
    if decoder == "context":
        assert "aspp" in variables["params"]["main"]
    split, _ = model.heads_forward(variables, model.reads(representation), batch["image"], train=False)
    for task in TASKS:
        np.testing.assert_array_equal(split.main[task], plain.main[task])
        np.testing.assert_array_equal(split.aux[task], plain.aux[task])
    first, second, *_ = TASKS
    reads = model.reads(representation)
    reads["main"][first] = jax.tree.map(lambda value: value + 0.5, reads["main"][first])
    reads["aux"][second] = jax.tree.map(lambda value: value + 0.5, reads["aux"][second])
    moved, _ = model.heads_forward(variables, reads, batch["image"], train=False)
    assert not np.allclose(moved.main[first], plain.main[first])
    assert not np.allclose(moved.aux[second], plain.aux[second])
    for task in list(TASKS)[1:]:
        np.testing.assert_array_equal(moved.main[task], plain.main[task])
    np.testing.assert_array_equal(moved.aux[first], plain.aux[first])


# The plain deep encoder (issue 30's positive control): its layout, output stride, the absence of skip
# connections, gradient isolation of the side modules on it, and no ImageNet start.
PLAIN_STAGES = (("stage1", 2, 16), ("stage2", 4, 16), ("stage3", 8, 24), ("stage4", 16, 32), ("stage5", 32, 32))


def plain_encoder_variables_and_stages(output_stride=32, width_multiplier=0.25):
    from auxmtl_jax.models.encoders import encoder_module

    module = encoder_module("plain_deep", width_multiplier=width_multiplier, output_stride=output_stride,
                            dtype=jnp.float32)
    images = jax.ShapeDtypeStruct(IMAGE_SHAPE, jnp.float32)
    variables = jax.eval_shape(lambda x: module.init(jax.random.key(0), x, train=False), images)
    (stages, sown) = jax.eval_shape(
        lambda v, x: module.apply(v, x, train=True, mutable=["intermediates", "batch_stats"]), variables, images)
    return variables, stages, sown["intermediates"]


def test_plain_deep_is_a_chain_of_14_3x3_convs_sowing_five_stages_at_the_stated_strides_and_channels():
    assert tuple(encoder_stages("plain_deep")) == PLAIN_STAGES
    assert [stage.channels for stage in encoder_stages("plain_deep", width_multiplier=0.5)] == [8, 8, 16, 16, 16]
    variables, stages, sown = plain_encoder_variables_and_stages()
    params = variables["params"]
    assert set(params) == {f"conv{index}" for index in range(1, 15)}
    assert all(set(layer) == {"conv", "bn"} and layer["conv"]["kernel"].shape[:2] == (3, 3)
               for layer in params.values())
    assert list(stages) == list(sown) == [name for name, _, _ in PLAIN_STAGES]
    at_quarter_width = {stage.name: stage.channels for stage in encoder_stages("plain_deep", width_multiplier=0.25)}
    for name, stride, _ in PLAIN_STAGES:
        assert stages[name].shape == sown[name].shape == (2, 32 // stride, 32 // stride, at_quarter_width[name])


@pytest.mark.parametrize("output_stride", [8, 16])
def test_plain_deep_replaces_later_strides_by_dilation(output_stride):
    from auxmtl_jax.models.plain_encoder import plain_deep_layers

    _, stages, _ = plain_encoder_variables_and_stages(output_stride)
    assert [stage.stride for stage in encoder_stages("plain_deep", output_stride=output_stride)] == [
        min(stride, output_stride) for _, stride, _ in PLAIN_STAGES]
    assert [stages[name].shape[1] for name, _, _ in PLAIN_STAGES] == [
        32 // min(stride, output_stride) for _, stride, _ in PLAIN_STAGES]
    # torchvision's rule: the layer that would pass the output stride keeps the previous dilation at stride 1,
    # the stage's other layers use the doubled one.
    layers = {layer.index: (layer.stride, layer.dilation) for layer in plain_deep_layers(1.0, output_stride)}
    if output_stride == 8:
        assert [layers[index] for index in (6, 9, 10, 12, 13)] == [(2, 1), (1, 1), (1, 2), (1, 2), (1, 4)]
    else:
        assert [layers[index] for index in (9, 10, 12, 13)] == [(2, 1), (1, 1), (1, 1), (1, 2)]


def test_plain_deep_has_no_skip_connections(batch):
    """Each layer reads only the previous layer's output: applying conv1..conv14 one after another, with the
    encoder's parameters, gives every stage output exactly."""
    from auxmtl_jax.models.encoders import encoder_module
    from auxmtl_jax.models.layers import ConvBN
    from auxmtl_jax.models.plain_encoder import plain_deep_layers

    module = encoder_module("plain_deep", width_multiplier=0.25, output_stride=8, dtype=jnp.float32)
    variables = random_variables(SimpleNamespace(init=lambda key, x: module.init(key, x, train=False)),
                                 batch["image"])
    stages = module.apply(variables, batch["image"], train=False)
    x = batch["image"]
    for spec in plain_deep_layers(0.25, 8):
        name = f"conv{spec.index}"
        x = ConvBN(spec.out_channels, 3, stride=spec.stride, dilation=spec.dilation).apply(
            {"params": variables["params"][name], "batch_stats": variables["batch_stats"][name]}, x, False)
        if spec.stage is not None:
            np.testing.assert_array_equal(x, stages[spec.stage])


def test_gradients_keep_aux_and_main_paths_apart_with_the_plain_encoder(batch):
    tasks = {"segmentation": TASKS["segmentation"], "depth": 1}
    model = build_model(model_config(encoder="plain_deep", decoder="baseline"), tasks,
                        aux_config(tasks=tuple(tasks)), SimpleNamespace(tasks=("depth",)))
    variables = random_variables(model, batch["image"])

    @jax.jit
    def gradients(params):
        def stacked_losses(params):
            outputs, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, batch["image"],
                                     train=True)
            return jnp.stack([sum(task_lib.task_losses(outputs.main, batch).values()),
                              sum(task_lib.task_losses(outputs.aux, batch).values())])

        grads = jax.jacrev(stacked_losses)(params)
        return jax.tree.map(lambda g: g[0], grads), jax.tree.map(lambda g: g[1], grads)

    main_grads, aux_grads = gradients(variables["params"])
    for leaf in jax.tree.leaves(main_grads["aux"]) + jax.tree.leaves(main_grads["deep_supervision"]):
        assert not np.any(np.asarray(leaf))
    for layer in ("conv1", "conv14"):
        assert np.any(np.asarray(aux_grads["main"]["encoder"][layer]["conv"]["kernel"]))
    assert all(not np.any(np.asarray(leaf)) for task in tasks
               for leaf in jax.tree.leaves(aux_grads["main"][f"{task}_decoder"]))
    assert all(np.any(np.asarray(leaf)) for leaf in jax.tree.leaves(aux_grads["aux"]))


def test_plain_deep_has_no_imagenet_start():
    from auxmtl_jax import pretrained
    from auxmtl_jax.errors import UserError

    with pytest.raises(UserError, match=r"'plain_deep' has no pretrained-weight conversion"):
        pretrained.load_pretrained_encoder("weights.pth", "plain_deep")
