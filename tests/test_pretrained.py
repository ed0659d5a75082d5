"""Tests for auxmtl_jax.pretrained: torchvision/timm weight import, export back, and feature equivalence.

The state dicts are built here with torchvision's exact key names and shapes (random values, no network), and the
reference forward passes below read those torch-layout (OIHW) weights directly in float64 numpy with PyTorch's
convolution semantics (symmetric zero padding), independent of our flax layers.
"""

from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from auxmtl_jax import pretrained
from auxmtl_jax.errors import UserError
from auxmtl_jax.models.encoders import encoder_module

# torchvision MobileNetV2 (t, c, n, s) and the blocks (features.i) whose outputs are our stage1..stage5.
MOBILENET_V2_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                        (6, 160, 3, 2), (6, 320, 1, 1))
MOBILENET_V2_STAGE_BLOCKS = {1: "stage1", 3: "stage2", 6: "stage3", 13: "stage4", 17: "stage5"}
RESNET50_DEPTHS = (3, 4, 6, 3)
BATCH_NORM_EPSILON = 1e-5
RELATIVE_TOLERANCE = 1e-4


def _add_conv(state_dict, rng, prefix, out_channels, in_channels_per_group, kernel_size):
    fan_in = in_channels_per_group * kernel_size * kernel_size
    state_dict[f"{prefix}.weight"] = (rng.standard_normal((out_channels, in_channels_per_group, kernel_size,
                                                           kernel_size)) * np.sqrt(2.0 / fan_in)).astype(np.float32)


def _add_batch_norm(state_dict, rng, prefix, channels):
    state_dict[f"{prefix}.weight"] = rng.uniform(0.5, 1.5, channels).astype(np.float32)
    state_dict[f"{prefix}.bias"] = rng.normal(0.0, 0.1, channels).astype(np.float32)
    state_dict[f"{prefix}.running_mean"] = rng.normal(0.0, 0.1, channels).astype(np.float32)
    state_dict[f"{prefix}.running_var"] = rng.uniform(0.5, 1.5, channels).astype(np.float32)
    state_dict[f"{prefix}.num_batches_tracked"] = np.array(7, np.int64)


def torchvision_mobilenet_v2_state_dict(seed: int) -> dict[str, np.ndarray]:
    """A random state dict with torchvision ``mobilenet_v2()``'s key names and shapes, classifier included."""
    rng = np.random.default_rng(seed)
    state_dict = {}
    _add_conv(state_dict, rng, "features.0.0", 32, 3, 3)
    _add_batch_norm(state_dict, rng, "features.0.1", 32)
    in_channels, index = 32, 1
    for expand_ratio, channels, repeats, _ in MOBILENET_V2_SETTING:
        for _ in range(repeats):
            hidden = in_channels * expand_ratio
            base = f"features.{index}.conv"
            if expand_ratio == 1:
                depthwise, project_conv, project_bn = f"{base}.0", f"{base}.1", f"{base}.2"
            else:
                _add_conv(state_dict, rng, f"{base}.0.0", hidden, in_channels, 1)
                _add_batch_norm(state_dict, rng, f"{base}.0.1", hidden)
                depthwise, project_conv, project_bn = f"{base}.1", f"{base}.2", f"{base}.3"
            _add_conv(state_dict, rng, f"{depthwise}.0", hidden, 1, 3)
            _add_batch_norm(state_dict, rng, f"{depthwise}.1", hidden)
            _add_conv(state_dict, rng, project_conv, channels, hidden, 1)
            _add_batch_norm(state_dict, rng, project_bn, channels)
            in_channels, index = channels, index + 1
    _add_conv(state_dict, rng, "features.18.0", 1280, 320, 1)
    _add_batch_norm(state_dict, rng, "features.18.1", 1280)
    state_dict["classifier.1.weight"] = rng.standard_normal((1000, 1280)).astype(np.float32)
    state_dict["classifier.1.bias"] = rng.standard_normal(1000).astype(np.float32)
    return state_dict


def torchvision_resnet50_state_dict(seed: int) -> dict[str, np.ndarray]:
    """A random state dict with torchvision ``resnet50()``'s key names and shapes (timm uses the same names)."""
    rng = np.random.default_rng(seed)
    state_dict = {}
    _add_conv(state_dict, rng, "conv1", 64, 3, 7)
    _add_batch_norm(state_dict, rng, "bn1", 64)
    in_channels = 64
    for layer, depth in enumerate(RESNET50_DEPTHS, start=1):
        width = 64 * 2 ** (layer - 1)
        for index in range(depth):
            base = f"layer{layer}.{index}"
            for k, (out_channels, in_per_group, kernel) in enumerate(
                    ((width, in_channels, 1), (width, width, 3), (4 * width, width, 1)), start=1):
                _add_conv(state_dict, rng, f"{base}.conv{k}", out_channels, in_per_group, kernel)
                _add_batch_norm(state_dict, rng, f"{base}.bn{k}", out_channels)
            if index == 0:
                _add_conv(state_dict, rng, f"{base}.downsample.0", 4 * width, in_channels, 1)
                _add_batch_norm(state_dict, rng, f"{base}.downsample.1", 4 * width)
            in_channels = 4 * width
    state_dict["fc.weight"] = rng.standard_normal((1000, 2048)).astype(np.float32)
    state_dict["fc.bias"] = rng.standard_normal(1000).astype(np.float32)
    return state_dict


def timm_mobilenet_v2_names(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rename a torchvision MobileNetV2 state dict to timm ``mobilenetv2_100``'s names."""
    positions, index = {}, 1
    for stage, (_, _, repeats, _) in enumerate(MOBILENET_V2_SETTING):
        for position in range(repeats):
            positions[index] = f"blocks.{stage}.{position}"
            index += 1
    first_block = {"0.0": "conv_dw", "0.1": "bn1", "1": "conv_pw", "2": "bn2"}
    other_blocks = {"0.0": "conv_pw", "0.1": "bn1", "1.0": "conv_dw", "1.1": "bn2", "2": "conv_pwl", "3": "bn3"}
    fixed = {"features.0.0": "conv_stem", "features.0.1": "bn1", "features.18.0": "conv_head",
             "features.18.1": "bn2", "classifier.1": "classifier"}
    renamed = {}
    for key, value in state_dict.items():
        module, leaf = key.rsplit(".", 1)
        if module in fixed:
            renamed[f"{fixed[module]}.{leaf}"] = value
            continue
        _, block, _, layer = module.split(".", 3)
        table = first_block if block == "1" else other_blocks
        renamed[f"{positions[int(block)]}.{table[layer]}.{leaf}"] = value
    return renamed


def conv2d_reference(x, weight, *, stride=1, padding=0, groups=1):
    """PyTorch ``F.conv2d`` on NCHW with an (O, I/groups, kh, kw) weight, in float64 numpy."""
    batch, channels, height, width = x.shape
    out_channels, in_per_group, kernel_h, kernel_w = weight.shape
    assert channels == in_per_group * groups
    x = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    out_h = (height + 2 * padding - kernel_h) // stride + 1
    out_w = (width + 2 * padding - kernel_w) // stride + 1
    grouped_x = x.reshape(batch, groups, in_per_group, *x.shape[2:])
    grouped_w = weight.astype(np.float64).reshape(groups, out_channels // groups, in_per_group, kernel_h, kernel_w)
    out = np.zeros((batch, groups, out_channels // groups, out_h, out_w))
    for i in range(kernel_h):
        for j in range(kernel_w):
            patch = grouped_x[..., i:i + stride * (out_h - 1) + 1:stride, j:j + stride * (out_w - 1) + 1:stride]
            out += np.einsum("ngchw,goc->ngohw", patch, grouped_w[..., i, j])
    return out.reshape(batch, out_channels, out_h, out_w)


def batch_norm_reference(x, state_dict, prefix):
    """PyTorch eval-mode ``BatchNorm2d`` on NCHW."""
    def per_channel(name):
        return state_dict[f"{prefix}.{name}"].astype(np.float64)[None, :, None, None]
    normalized = (x - per_channel("running_mean")) / np.sqrt(per_channel("running_var") + BATCH_NORM_EPSILON)
    return normalized * per_channel("weight") + per_channel("bias")


def max_pool_reference(x):
    """PyTorch ``MaxPool2d(3, stride=2, padding=1)`` on NCHW."""
    x = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
    out_h, out_w = (x.shape[2] - 3) // 2 + 1, (x.shape[3] - 3) // 2 + 1
    windows = [x[:, :, i:i + 2 * (out_h - 1) + 1:2, j:j + 2 * (out_w - 1) + 1:2] for i in range(3) for j in range(3)]
    return np.max(windows, axis=0)


def relu6(x):
    return np.clip(x, 0.0, 6.0)


def relu(x):
    return np.maximum(x, 0.0)


def mobilenet_v2_reference(state_dict, images_nchw):
    """torchvision MobileNetV2 forward (eval) returning the outputs of features.1/3/6/13/17 by our stage names."""
    def conv_bn(x, conv, bn, **kwargs):
        return batch_norm_reference(conv2d_reference(x, state_dict[f"{conv}.weight"], **kwargs), state_dict, bn)

    x = relu6(conv_bn(images_nchw, "features.0.0", "features.0.1", stride=2, padding=1))
    stages, in_channels, index = {}, 32, 1
    for expand_ratio, channels, repeats, first_stride in MOBILENET_V2_SETTING:
        for repeat in range(repeats):
            stride = first_stride if repeat == 0 else 1
            base = f"features.{index}.conv"
            y = x
            if expand_ratio == 1:
                depthwise, project = f"{base}.0", (f"{base}.1", f"{base}.2")
            else:
                y = relu6(conv_bn(y, f"{base}.0.0", f"{base}.0.1"))
                depthwise, project = f"{base}.1", (f"{base}.2", f"{base}.3")
            y = relu6(conv_bn(y, f"{depthwise}.0", f"{depthwise}.1", stride=stride, padding=1, groups=y.shape[1]))
            y = conv_bn(y, *project)
            x = x + y if stride == 1 and in_channels == channels else y
            if index in MOBILENET_V2_STAGE_BLOCKS:
                stages[MOBILENET_V2_STAGE_BLOCKS[index]] = x
            in_channels, index = channels, index + 1
    return stages


def resnet50_reference(state_dict, images_nchw):
    """torchvision ResNet-50 forward (eval, stride on the 3x3) returning layer1..layer4 as stage2..stage5."""
    def conv_bn(x, conv, bn, **kwargs):
        return batch_norm_reference(conv2d_reference(x, state_dict[f"{conv}.weight"], **kwargs), state_dict, bn)

    x = max_pool_reference(relu(conv_bn(images_nchw, "conv1", "bn1", stride=2, padding=3)))
    stages = {}
    for layer, depth in enumerate(RESNET50_DEPTHS, start=1):
        for index in range(depth):
            base = f"layer{layer}.{index}"
            stride = 2 if index == 0 and layer > 1 else 1
            y = relu(conv_bn(x, f"{base}.conv1", f"{base}.bn1"))
            y = relu(conv_bn(y, f"{base}.conv2", f"{base}.bn2", stride=stride, padding=1))
            y = conv_bn(y, f"{base}.conv3", f"{base}.bn3")
            shortcut = conv_bn(x, f"{base}.downsample.0", f"{base}.downsample.1", stride=stride) if index == 0 else x
            x = relu(y + shortcut)
        stages[f"stage{layer + 1}"] = x
    return stages


STATE_DICT_BUILDERS = {"mobilenet_v2": torchvision_mobilenet_v2_state_dict,
                       "resnet50": torchvision_resnet50_state_dict}
REFERENCE_FORWARDS = {"mobilenet_v2": mobilenet_v2_reference, "resnet50": resnet50_reference}
IGNORED_TORCHVISION_PREFIXES = {"mobilenet_v2": ("features.18.", "classifier."), "resnet50": ("fc.",)}


@pytest.fixture(scope="module")
def torchvision_state_dicts():
    return {encoder: build(seed) for seed, (encoder, build) in enumerate(STATE_DICT_BUILDERS.items())}


def sown_stages(encoder, variables, images_nhwc):
    """Run our width-1.0 encoder in eval mode and return its sown stage outputs (``intermediates``)."""
    module = encoder_module(encoder, width_multiplier=1.0, output_stride=32, dtype=jnp.float32)

    @jax.jit
    def forward(variables, images):
        stages, state = module.apply(variables, images, train=False, mutable=["intermediates"])
        return {name: state["intermediates"][name] for name in stages}

    return jax.device_get(forward(variables, images_nhwc))


def relative_error(ours, reference):
    return float(np.max(np.abs(ours - reference)) / np.max(np.abs(reference)))


def flat_leaves(tree):
    return traverse_util.flatten_dict(jax.device_get(tree))


def assert_same_variables(a, b):
    for collection in ("params", "batch_stats"):
        flat_a, flat_b = flat_leaves(a[collection]), flat_leaves(b[collection])
        assert flat_a.keys() == flat_b.keys()
        for path in flat_a:
            np.testing.assert_array_equal(flat_a[path], flat_b[path], err_msg="/".join(path))


@pytest.mark.parametrize("encoder", ["mobilenet_v2", "resnet50"])
def test_converted_encoder_computes_the_torchvision_stages(encoder, torchvision_state_dicts):
    state_dict = torchvision_state_dicts[encoder]
    variables = pretrained.convert_torch_encoder(state_dict, encoder)
    images = np.random.default_rng(10).standard_normal((2, 3, 32, 32)).astype(np.float32)

    reference = REFERENCE_FORWARDS[encoder](state_dict, images.astype(np.float64))
    ours = sown_stages(encoder, variables, images.transpose(0, 2, 3, 1))

    assert set(ours) == set(reference)
    for stage, expected in reference.items():
        expected = expected.transpose(0, 2, 3, 1)
        assert ours[stage].shape == expected.shape, stage
        assert relative_error(ours[stage], expected) < RELATIVE_TOLERANCE, stage


@pytest.mark.parametrize("encoder", ["mobilenet_v2", "resnet50"])
def test_converted_variables_fill_the_whole_encoder(encoder, torchvision_state_dicts):
    converted = pretrained.convert_torch_encoder(torchvision_state_dicts[encoder], encoder)
    module = encoder_module(encoder, width_multiplier=1.0, output_stride=32, dtype=jnp.float32)
    initialised = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
    for collection in ("params", "batch_stats"):
        expected = {path: leaf.shape for path, leaf in traverse_util.flatten_dict(initialised[collection]).items()}
        got = {path: leaf.shape for path, leaf in flat_leaves(converted[collection]).items()}
        assert got == expected
        assert all(leaf.dtype == np.float32 for leaf in flat_leaves(converted[collection]).values())


def test_depthwise_kernel_layout():
    state_dict = torchvision_mobilenet_v2_state_dict(seed=3)
    converted = pretrained.convert_torch_encoder(state_dict, "mobilenet_v2")
    torch_kernel = state_dict["features.2.conv.1.0.weight"]  # (96, 1, 3, 3)
    ours = converted["params"]["block2"]["depthwise"]["conv"]["kernel"]
    assert ours.shape == (3, 3, 1, 96)
    np.testing.assert_array_equal(ours[1, 2, 0, 5], torch_kernel[5, 0, 1, 2])
    np.testing.assert_array_equal(converted["batch_stats"]["block2"]["depthwise"]["bn"]["var"],
                                  state_dict["features.2.conv.1.1.running_var"])


def test_timm_names_convert_like_torchvision(torchvision_state_dicts):
    torchvision_names = torchvision_state_dicts["mobilenet_v2"]
    timm_names = timm_mobilenet_v2_names(torchvision_names)
    assert "blocks.4.2.conv_pwl.weight" in timm_names and "conv_head.weight" in timm_names
    assert pretrained.detect_naming(timm_names, "mobilenet_v2") == pretrained.TIMM
    assert pretrained.detect_naming(torchvision_names, "mobilenet_v2") == pretrained.TORCHVISION
    assert_same_variables(pretrained.convert_torch_encoder(timm_names, "mobilenet_v2"),
                          pretrained.convert_torch_encoder(torchvision_names, "mobilenet_v2"))


@pytest.mark.parametrize("encoder", ["mobilenet_v2", "resnet50"])
def test_export_round_trip(encoder, torchvision_state_dicts, tmp_path):
    state_dict = torchvision_state_dicts[encoder]
    converted = pretrained.convert_torch_encoder(state_dict, encoder)
    path = pretrained.export_torchvision_state_dict(converted, encoder, tmp_path / "encoder.safetensors")

    exported = load_file(str(path))
    expected_keys = {key for key in state_dict if not key.startswith(IGNORED_TORCHVISION_PREFIXES[encoder])}
    assert set(exported) == expected_keys
    for key, value in exported.items():
        if not key.endswith("num_batches_tracked"):
            np.testing.assert_array_equal(value, state_dict[key], err_msg=key)
    assert_same_variables(pretrained.load_pretrained_encoder(path, encoder), converted)
    assert [p.name for p in tmp_path.iterdir()] == ["encoder.safetensors"]


def test_safetensors_and_npz_files_load(torchvision_state_dicts, tmp_path):
    state_dict = torchvision_state_dicts["mobilenet_v2"]
    expected = pretrained.convert_torch_encoder(state_dict, "mobilenet_v2")
    save_file(state_dict, str(tmp_path / "weights.safetensors"))
    np.savez(tmp_path / "weights.npz", **state_dict)
    for name in ("weights.safetensors", "weights.npz"):
        assert_same_variables(pretrained.load_pretrained_encoder(tmp_path / name, "mobilenet_v2"), expected)

    stem = state_dict["features.0.0.weight"]
    save_file({"features.0.0.weight": stem.astype(jnp.bfloat16)}, str(tmp_path / "half.safetensors"))
    loaded = pretrained.load_state_dict(tmp_path / "half.safetensors")["features.0.0.weight"]
    assert loaded.dtype == np.float32
    np.testing.assert_allclose(loaded, stem, rtol=1e-2)


def test_pth_files_load_with_torch(torchvision_state_dicts, tmp_path):
    torch = pytest.importorskip("torch", reason="PyTorch is not installed (optional extra: auxmtl_jax[torch])")
    state_dict = torchvision_state_dicts["mobilenet_v2"]
    tensors = {key: torch.from_numpy(value) for key, value in state_dict.items()}
    torch.save(tensors, tmp_path / "plain.pth")
    # A DataParallel training checkpoint: weights under 'state_dict', keys prefixed 'module.'.
    torch.save({"epoch": 3, "state_dict": {f"module.{key}": value for key, value in tensors.items()}},
               tmp_path / "checkpoint.pt")
    expected = pretrained.convert_torch_encoder(state_dict, "mobilenet_v2")
    for name in ("plain.pth", "checkpoint.pt"):
        assert_same_variables(pretrained.load_pretrained_encoder(tmp_path / name, "mobilenet_v2"), expected)

    torch.save({key: value.to(torch.bfloat16) if value.is_floating_point() else value
                for key, value in tensors.items()}, tmp_path / "half.pth")
    loaded = pretrained.load_state_dict(tmp_path / "half.pth")
    assert loaded["features.0.0.weight"].dtype == np.float32
    np.testing.assert_allclose(loaded["features.0.0.weight"], state_dict["features.0.0.weight"], rtol=1e-2)


def test_pth_without_torch_says_how_to_proceed(tmp_path, monkeypatch):
    path = tmp_path / "weights.pth"
    path.write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    with pytest.raises(UserError, match=r"needs PyTorch \(pip install .*torch.*\.safetensors"):
        pretrained.load_state_dict(path)


def test_every_bad_key_is_listed_in_one_error(torchvision_state_dicts):
    state_dict = dict(torchvision_state_dicts["mobilenet_v2"])
    del state_dict["features.4.conv.1.1.running_var"]
    del state_dict["features.17.conv.2.weight"]
    state_dict["features.5.conv.9.weight"] = np.zeros((1,), np.float32)
    state_dict["features.3.conv.0.0.weight"] = np.zeros((144, 24, 3, 3), np.float32)
    with pytest.raises(ValueError) as raised:
        pretrained.convert_torch_encoder(state_dict, "mobilenet_v2")
    message = str(raised.value)
    assert "unexpected (1): features.5.conv.9.weight" in message
    assert "missing (2):" in message
    assert "features.4.conv.1.1.running_var" in message and "features.17.conv.2.weight" in message
    assert "features.3.conv.0.0.weight: got (144, 24, 3, 3), expected (144, 24, 1, 1)" in message


def test_a_different_architecture_is_rejected_with_its_path(torchvision_state_dicts, tmp_path):
    path = tmp_path / "resnet.safetensors"
    save_file(torchvision_state_dicts["resnet50"], str(path))
    with pytest.raises(ValueError, match=r"resnet\.safetensors: cannot convert this state dict to mobilenet_v2 "
                                         r"\(.* matched 0 of 255 .*\):\n  unexpected \(263\): conv1\.weight") as raised:
        pretrained.load_pretrained_encoder(path, "mobilenet_v2")
    assert "missing (251): conv_stem.weight" in str(raised.value)


def test_bad_inputs_are_explained(tmp_path):
    with pytest.raises(ValueError, match="'vgg16' has no pretrained-weight conversion"):
        pretrained.convert_torch_encoder({}, "vgg16")
    with pytest.raises(ValueError, match=r"unsupported weight file extension '\.h5'"):
        pretrained.load_state_dict(tmp_path / "weights.h5")
    with pytest.raises(FileNotFoundError, match="absent.safetensors: weight file not found"):
        pretrained.load_pretrained_encoder(tmp_path / "absent.safetensors", "resnet50")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00" * 5)
    with pytest.raises(ValueError, match="corrupt.safetensors: could not read .safetensors weight file"):
        pretrained.load_state_dict(corrupt)


def fake_network_variables(encoder_module_instance):
    """Variables shaped like the full network's: the encoder under 'main', plus a decoder and an aux module."""
    shapes = jax.eval_shape(lambda: encoder_module_instance.init(jax.random.key(1), jnp.zeros((1, 32, 32, 3)),
                                                                 train=False))
    encoder = jax.tree.map(lambda leaf: np.full(leaf.shape, 0.5, leaf.dtype), shapes)
    return {"params": {"main": {"encoder": encoder["params"], "decoder": {"kernel": jnp.ones((3, 3))}},
                       "aux": {"depth": {"kernel": jnp.zeros((2,))}}},
            "batch_stats": {"main": {"encoder": encoder["batch_stats"]}}}


def test_merge_encoder_replaces_only_the_encoder(torchvision_state_dicts):
    converted = pretrained.convert_torch_encoder(torchvision_state_dicts["mobilenet_v2"], "mobilenet_v2")
    variables = fake_network_variables(
        encoder_module("mobilenet_v2", width_multiplier=1.0, output_stride=16, dtype=jnp.float32))
    original_stem = np.asarray(variables["params"]["main"]["encoder"]["stem"]["conv"]["kernel"])

    merged = pretrained.merge_encoder(variables, converted)

    assert_same_variables({c: merged[c]["main"]["encoder"] for c in ("params", "batch_stats")}, converted)
    assert merged["params"]["main"]["decoder"] is variables["params"]["main"]["decoder"]
    assert merged["params"]["aux"] is variables["params"]["aux"]
    np.testing.assert_array_equal(variables["params"]["main"]["encoder"]["stem"]["conv"]["kernel"], original_stem)


def test_merge_encoder_lists_every_mismatch(torchvision_state_dicts):
    converted = pretrained.convert_torch_encoder(torchvision_state_dicts["mobilenet_v2"], "mobilenet_v2")
    narrow = fake_network_variables(
        encoder_module("mobilenet_v2", width_multiplier=0.5, output_stride=32, dtype=jnp.float32))
    with pytest.raises(ValueError, match=r"shape mismatch \(\d+\): .*params/stem/conv/kernel: got \(3, 3, 3, 32\), "
                                         r"expected \(3, 3, 3, 16\)"):
        pretrained.merge_encoder(narrow, converted)

    wide = fake_network_variables(
        encoder_module("mobilenet_v2", width_multiplier=1.0, output_stride=32, dtype=jnp.float32))
    broken = {"params": dict(converted["params"]), "batch_stats": converted["batch_stats"]}
    del broken["params"]["block17"]
    broken["params"]["head"] = {"kernel": np.zeros(1)}
    with pytest.raises(ValueError) as raised:
        pretrained.merge_encoder(wide, broken)
    assert "missing (9): params/block17/depthwise/bn/bias" in str(raised.value)
    assert "unexpected (1): params/head/kernel" in str(raised.value)

    with pytest.raises(ValueError, match=r"variables has no params\['main'\]\['encoder'\]"):
        pretrained.merge_encoder({"params": {"main": {}}, "batch_stats": {}}, converted)


def test_merged_network_runs_the_pretrained_encoder(torchvision_state_dicts):
    """In the full network (main + aux), the merged encoder sows the same stages as the torch reference."""
    from types import SimpleNamespace

    from auxmtl_jax.models.networks import build_model

    state_dict = torchvision_state_dicts["mobilenet_v2"]
    model = build_model(SimpleNamespace(encoder="mobilenet_v2", decoder="baseline", width_multiplier=1.0,
                                        output_stride=32, head_channels=8), {"depth": 1},
                        SimpleNamespace(tasks=("depth",)))
    shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
    variables = jax.tree.map(lambda leaf: jnp.zeros(leaf.shape, leaf.dtype), shapes)

    merged = pretrained.merge_encoder(variables, pretrained.convert_torch_encoder(state_dict, "mobilenet_v2"))

    images = np.random.default_rng(4).standard_normal((1, 3, 32, 32)).astype(np.float32)
    _, state = jax.jit(functools.partial(model.main.apply, train=False, mutable=["intermediates"]))(
        {"params": merged["params"]["main"], "batch_stats": merged["batch_stats"]["main"]},
        images.transpose(0, 2, 3, 1))
    reference = mobilenet_v2_reference(state_dict, images.astype(np.float64))
    for stage, expected in reference.items():
        ours = np.asarray(state["intermediates"]["encoder"][stage])
        assert relative_error(ours, expected.transpose(0, 2, 3, 1)) < RELATIVE_TOLERANCE, stage
    assert merged["params"]["aux"] is variables["params"]["aux"]


def test_export_rejects_bad_requests_without_writing(tmp_path, torchvision_state_dicts):
    converted = pretrained.convert_torch_encoder(torchvision_state_dicts["mobilenet_v2"], "mobilenet_v2")
    with pytest.raises(ValueError, match=r"export writes \.safetensors files; got extension '\.pth'"):
        pretrained.export_torchvision_state_dict(converted, "mobilenet_v2", tmp_path / "encoder.pth")
    with pytest.raises(ValueError, match="encoder variables do not match a width-1.0 resnet50"):
        pretrained.export_torchvision_state_dict(converted, "resnet50", tmp_path / "encoder.safetensors")
    assert list(tmp_path.iterdir()) == []


def _randomise_batch_norm_statistics(torch, model):
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            channels = module.num_features
            module.running_mean.copy_(torch.randn(channels, generator=generator) * 0.2)
            module.running_var.copy_(torch.rand(channels, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(channels, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(channels, generator=generator) * 0.2)


def _torch_stage_outputs(torch, model, stage_modules, images_nchw):
    outputs = {}
    handles = [model.get_submodule(name).register_forward_hook(
        lambda _module, _inputs, output, stage=stage: outputs.__setitem__(stage, output.numpy().transpose(0, 2, 3, 1)))
        for name, stage in stage_modules.items()]
    with torch.no_grad():
        model(torch.from_numpy(images_nchw))
    for handle in handles:
        handle.remove()
    return outputs


REAL_MODELS = {
    ("torchvision", "mobilenet_v2"): ("mobilenet_v2",
                                      {f"features.{i}": stage for i, stage in MOBILENET_V2_STAGE_BLOCKS.items()}),
    ("torchvision", "resnet50"): ("resnet50", {f"layer{i}": f"stage{i + 1}" for i in range(1, 5)}),
    ("timm", "mobilenet_v2"): ("mobilenetv2_100", {"blocks.0": "stage1", "blocks.1": "stage2", "blocks.2": "stage3",
                                                   "blocks.4": "stage4", "blocks.6": "stage5"}),
    ("timm", "resnet50"): ("resnet50", {f"layer{i}": f"stage{i + 1}" for i in range(1, 5)}),
}


@pytest.mark.parametrize("library,encoder", list(REAL_MODELS))
def test_real_torch_models_match(library, encoder, tmp_path):
    """With torch installed: randomly initialised torchvision/timm models agree with our converted encoders."""
    torch = pytest.importorskip("torch", reason="PyTorch is not installed (optional extra: auxmtl_jax[torch])")
    source = pytest.importorskip(library, reason=f"{library} is not installed (only needed for this check)")
    from safetensors.torch import save_file as save_torch_file

    torch.manual_seed(0)
    name, stage_modules = REAL_MODELS[(library, encoder)]
    if library == "torchvision":
        model = getattr(source.models, name)(weights=None)
    else:
        model = source.create_model(name, pretrained=False)
    _randomise_batch_norm_statistics(torch, model)
    model.eval()
    images = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    reference = _torch_stage_outputs(torch, model, stage_modules, images)

    torch.save(model.state_dict(), tmp_path / "model.pth")
    save_torch_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    for file_name in ("model.pth", "model.safetensors"):
        variables = pretrained.load_pretrained_encoder(tmp_path / file_name, encoder)
        ours = sown_stages(encoder, variables, images.transpose(0, 2, 3, 1))
        assert set(ours) == set(reference)
        for stage, expected in reference.items():
            assert relative_error(ours[stage], expected) < RELATIVE_TOLERANCE, (file_name, stage)

    if library == "torchvision":
        from safetensors.torch import load_file as load_torch_file

        exported = pretrained.export_torchvision_state_dict(variables, encoder, tmp_path / "ours.safetensors")
        fresh = getattr(source.models, name)(weights=None).eval()
        result = fresh.load_state_dict(load_torch_file(str(exported)), strict=False)
        assert result.unexpected_keys == []
        assert all(key.startswith(IGNORED_TORCHVISION_PREFIXES[encoder]) for key in result.missing_keys)
        round_trip = _torch_stage_outputs(torch, fresh, stage_modules, images)
        for stage, expected in reference.items():
            np.testing.assert_array_equal(round_trip[stage], expected, err_msg=stage)
