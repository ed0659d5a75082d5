"""ImageNet-pretrained encoders: import torchvision/timm weight files, and export ours back to torchvision names.

Supported: MobileNetV2 (width 1.0) and ResNet-50, from ``.pth``/``.pt`` (needs PyTorch, imported only here),
``.safetensors`` or ``.npz`` files. Key names are recognised in torchvision's layout (``features.{i}...``,
``layer{l}.{b}...``) and timm's (``conv_stem``, ``blocks.{s}.{j}.conv_pw/conv_dw/conv_pwl``; timm's ``resnet50``
uses torchvision's names). Nothing is ever downloaded.

Conversion: convolution kernels OIHW -> HWIO (a depthwise kernel (C, 1, kh, kw) becomes (kh, kw, 1, C) by the
same transpose), BatchNorm ``weight/bias`` -> params ``scale/bias`` and ``running_mean/running_var`` ->
batch_stats ``mean/var``. The ImageNet classifier (``classifier.*``, ``fc.*``, MobileNetV2's 1280-channel head
``features.18.*`` / timm ``conv_head``, ``bn2``) and ``num_batches_tracked`` counters are ignored; any other
unmatched, missing or shape-mismatched key is an error listing all of them.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import tempfile
from collections.abc import Mapping
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from auxmtl_jax.errors import MissingInputError, UserError
from auxmtl_jax.models.encoders import encoder_module, mobilenet_v2_blocks, resnet50_blocks

SUPPORTED_ENCODERS = ("mobilenet_v2", "resnet50")
SUPPORTED_EXTENSIONS = (".pth", ".pt", ".safetensors", ".npz")
TORCHVISION = "torchvision"
TIMM = "timm"

_IGNORED_PREFIXES = {
    ("mobilenet_v2", TORCHVISION): ("features.18.", "classifier."),
    ("mobilenet_v2", TIMM): ("conv_head.", "bn2.", "classifier."),
    ("resnet50", TORCHVISION): ("fc.",),
    ("resnet50", TIMM): ("fc.",),
}
_IGNORED_SUFFIXES = (".num_batches_tracked",)
# torch BatchNorm tensor name -> (our collection, our leaf name).
_BATCH_NORM_LEAVES = {
    "weight": ("params", "scale"),
    "bias": ("params", "bias"),
    "running_mean": ("batch_stats", "mean"),
    "running_var": ("batch_stats", "var"),
}
_CONTAINER_KEYS = ("state_dict", "model")

StateDict = dict[str, np.ndarray]
Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class _Layer:
    """One torch module (``conv`` or ``bn``) at ``torch_prefix`` and the flax module path it maps to."""

    torch_prefix: str
    path: Path
    kind: str


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """One torch tensor name and the flax leaf (collection, path) it maps to."""

    torch_key: str
    collection: str
    path: Path
    is_conv_kernel: bool


def check_weight_file(path: str | os.PathLike) -> pathlib.Path:
    """``path`` if it is an existing file with a supported weight-file extension; otherwise one UserError."""
    path = pathlib.Path(path)
    if path.suffix.lower() not in SUPPORTED_EXTENSIONS:
        raise UserError(f"{path}: unsupported weight file extension {path.suffix!r}; expected one of "
                        f"{SUPPORTED_EXTENSIONS}.")
    if not path.is_file():
        raise MissingInputError(f"{path}: weight file not found; expected an existing "
                                f"{'/'.join(SUPPORTED_EXTENSIONS)} file.")
    return path


def load_state_dict(path: str | os.PathLike) -> StateDict:
    """Read a weight file (``.pth``/``.pt``, ``.safetensors`` or ``.npz``) into ``{name: numpy array}``."""
    path = check_weight_file(path)
    suffix = path.suffix.lower()
    if suffix in (".pth", ".pt"):
        return _load_torch_file(path)
    try:
        if suffix == ".safetensors":
            state_dict = _load_safetensors(path)
        else:
            with np.load(path, allow_pickle=False) as archive:
                state_dict = {name: archive[name] for name in archive.files}
    except Exception as error:  # the readers raise library-specific errors for corrupt files
        raise UserError(f"{path}: could not read {suffix} weight file: {error}") from error
    return dict(state_dict)


def _load_safetensors(path: pathlib.Path) -> StateDict:
    """Read a ``.safetensors`` file into numpy; bfloat16 tensors are widened to float32."""
    from safetensors.numpy import load_file

    return {name: _widen_bfloat16(value) for name, value in load_file(str(path)).items()}


def _widen_bfloat16(array: np.ndarray) -> np.ndarray:
    return array.astype(np.float32) if array.dtype == np.dtype(jnp.bfloat16) else array


def _load_torch_file(path: pathlib.Path) -> StateDict:
    """Read a PyTorch pickle of tensors with ``weights_only=True`` (no arbitrary code) into numpy arrays."""
    try:
        import torch
    except ImportError as error:
        raise UserError(
            f"{path}: reading .pth/.pt files needs PyTorch (pip install 'auxmtl_jax[torch]' or pip install torch), "
            "or convert the file to .safetensors once where torch is available "
            "(safetensors.torch.save_file(torch.load(path), 'weights.safetensors')).") from error
    try:
        loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:
        raise UserError(f"{path}: could not read PyTorch weight file: {error}") from error
    loaded = _unwrap_checkpoint(loaded)
    if not isinstance(loaded, Mapping):
        raise UserError(f"{path}: expected a state dict (a mapping of names to tensors), got {type(loaded).__name__}.")
    not_tensors = sorted(name for name, value in loaded.items() if not isinstance(value, torch.Tensor))
    if not_tensors:
        raise UserError(f"{path}: state dict entries that are not tensors: {', '.join(not_tensors)}.")
    return _strip_data_parallel_prefix(
        {name: _tensor_to_numpy(tensor, torch) for name, tensor in loaded.items()})


def _unwrap_checkpoint(loaded: Any) -> Any:
    """A training checkpoint keeps the weights under ``state_dict`` or ``model``; return that mapping."""
    if isinstance(loaded, Mapping):
        for key in _CONTAINER_KEYS:
            if isinstance(loaded.get(key), Mapping):
                return loaded[key]
    return loaded


def _strip_data_parallel_prefix(state_dict: StateDict) -> StateDict:
    """Drop the ``module.`` prefix that ``torch.nn.DataParallel`` adds to every key."""
    if state_dict and all(name.startswith("module.") for name in state_dict):
        return {name[len("module."):]: value for name, value in state_dict.items()}
    return state_dict


def _tensor_to_numpy(tensor: Any, torch: Any) -> np.ndarray:
    tensor = tensor.detach().cpu()
    if tensor.is_floating_point() and tensor.dtype not in (torch.float32, torch.float64):
        tensor = tensor.float()  # numpy has no bfloat16
    return tensor.numpy()


def _mobilenet_v2_layers(naming: str) -> list[_Layer]:
    """Layer table of MobileNetV2 (width 1.0) for torchvision or timm key names."""
    if naming == TORCHVISION:
        layers = [_Layer("features.0.0", ("stem", "conv"), "conv"), _Layer("features.0.1", ("stem", "bn"), "bn")]
    else:
        layers = [_Layer("conv_stem", ("stem", "conv"), "conv"), _Layer("bn1", ("stem", "bn"), "bn")]
    timm_positions = _timm_block_positions()
    for block in mobilenet_v2_blocks(1.0, 32):
        name = f"block{block.index}"
        if naming == TORCHVISION:
            base = f"features.{block.index}.conv"
            if block.expand_ratio == 1:
                parts = [("0.0", "depthwise", "conv"), ("0.1", "depthwise", "bn"),
                         ("1", "project", "conv"), ("2", "project", "bn")]
            else:
                parts = [("0.0", "expand", "conv"), ("0.1", "expand", "bn"), ("1.0", "depthwise", "conv"),
                         ("1.1", "depthwise", "bn"), ("2", "project", "conv"), ("3", "project", "bn")]
        else:
            base = "blocks.{}.{}".format(*timm_positions[block.index])
            if block.expand_ratio == 1:
                parts = [("conv_dw", "depthwise", "conv"), ("bn1", "depthwise", "bn"),
                         ("conv_pw", "project", "conv"), ("bn2", "project", "bn")]
            else:
                parts = [("conv_pw", "expand", "conv"), ("bn1", "expand", "bn"), ("conv_dw", "depthwise", "conv"),
                         ("bn2", "depthwise", "bn"), ("conv_pwl", "project", "conv"), ("bn3", "project", "bn")]
        layers += [_Layer(f"{base}.{suffix}", (name, part, kind), kind) for suffix, part, kind in parts]
    return layers


def _timm_block_positions() -> dict[int, tuple[int, int]]:
    """timm groups MobileNetV2's blocks by stage (``blocks.{stage}.{j}``): our block index -> (stage, j)."""
    positions = {}
    stage, previous_channels = -1, None
    for block in mobilenet_v2_blocks(1.0, 32):
        if block.out_channels != previous_channels:
            stage, position = stage + 1, 0
        positions[block.index] = (stage, position)
        position += 1
        previous_channels = block.out_channels
    return positions


def _resnet50_layers() -> list[_Layer]:
    """Layer table of ResNet-50 (torchvision and timm share these names)."""
    layers = [_Layer("conv1", ("conv1",), "conv"), _Layer("bn1", ("bn1",), "bn")]
    for block in resnet50_blocks(1.0, 32):
        base, name = f"layer{block.layer}.{block.index}", f"layer{block.layer}_{block.index}"
        for k in (1, 2, 3):
            layers += [_Layer(f"{base}.conv{k}", (name, f"conv{k}"), "conv"),
                       _Layer(f"{base}.bn{k}", (name, f"bn{k}"), "bn")]
        if block.downsample:
            layers += [_Layer(f"{base}.downsample.0", (name, "downsample_conv"), "conv"),
                       _Layer(f"{base}.downsample.1", (name, "downsample_bn"), "bn")]
    return layers


def _tensors(encoder: str, naming: str) -> list[_Tensor]:
    """Every torch tensor name the encoder needs (classifier excluded) and the flax leaf it fills."""
    layers = _mobilenet_v2_layers(naming) if encoder == "mobilenet_v2" else _resnet50_layers()
    tensors = []
    for layer in layers:
        if layer.kind == "conv":
            tensors.append(_Tensor(f"{layer.torch_prefix}.weight", "params", layer.path + ("kernel",), True))
        else:
            tensors += [_Tensor(f"{layer.torch_prefix}.{name}", collection, layer.path + (leaf,), False)
                        for name, (collection, leaf) in _BATCH_NORM_LEAVES.items()]
    return tensors


@functools.lru_cache(maxsize=None)
def abstract_encoder_variables(encoder: str) -> dict[str, dict]:
    """``{'params', 'batch_stats'}`` of our width-1.0 encoder as shape/dtype structs (traced, never computed)."""
    _check_encoder(encoder)
    module = encoder_module(encoder, width_multiplier=1.0, output_stride=32, dtype=jnp.float32)
    abstract = jax.eval_shape(functools.partial(module.init, train=False), jax.random.key(0),
                              jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
    return {collection: abstract[collection] for collection in ("params", "batch_stats")}


def _leaf_shape(leaf: Any) -> tuple[int, ...]:
    return tuple(leaf.shape) if hasattr(leaf, "shape") else tuple(np.shape(leaf))


def _check_encoder(encoder: str) -> None:
    if encoder not in SUPPORTED_ENCODERS:
        raise UserError(f"encoder {encoder!r} has no pretrained-weight conversion; expected one of "
                         f"{SUPPORTED_ENCODERS}.")


def _torch_shape(shape: tuple[int, ...], is_conv_kernel: bool) -> tuple[int, ...]:
    """The torch layout of a flax leaf shape (HWIO kernel -> OIHW)."""
    if is_conv_kernel:
        height, width, in_channels, out_channels = shape
        return (out_channels, in_channels, height, width)
    return shape


def detect_naming(state_dict: Mapping[str, Any], encoder: str) -> str:
    """``'torchvision'`` or ``'timm'``: the key-name layout that matches more of the state dict's keys."""
    _check_encoder(encoder)
    matches = {naming: sum(tensor.torch_key in state_dict for tensor in _tensors(encoder, naming))
               for naming in (TORCHVISION, TIMM)}
    return TIMM if matches[TIMM] > matches[TORCHVISION] else TORCHVISION


def convert_torch_encoder(state_dict: Mapping[str, Any], encoder: str) -> dict[str, dict]:
    """Convert a torchvision/timm MobileNetV2 (width 1.0) or ResNet-50 state dict to our encoder's variables.

    Returns ``{'params': ..., 'batch_stats': ...}`` nested like ``variables[...]['main']['encoder']``; raises one
    ValueError listing every unexpected, missing and shape-mismatched key.
    """
    naming = detect_naming(state_dict, encoder)
    shapes = {collection: traverse_util.flatten_dict(tree)
              for collection, tree in abstract_encoder_variables(encoder).items()}
    tensors = _tensors(encoder, naming)
    expected_keys = {tensor.torch_key for tensor in tensors}
    ignored_prefixes = _IGNORED_PREFIXES[(encoder, naming)]
    unexpected = sorted(name for name in state_dict
                        if name not in expected_keys and not name.startswith(ignored_prefixes)
                        and not name.endswith(_IGNORED_SUFFIXES))
    missing, mismatched = [], []
    flat: dict[str, dict[Path, np.ndarray]] = {"params": {}, "batch_stats": {}}
    for tensor in tensors:
        if tensor.torch_key not in state_dict:
            missing.append(tensor.torch_key)
            continue
        value = np.asarray(state_dict[tensor.torch_key])
        expected = _torch_shape(_leaf_shape(shapes[tensor.collection][tensor.path]), tensor.is_conv_kernel)
        if value.shape != expected:
            mismatched.append(f"{tensor.torch_key}: got {value.shape}, expected {expected}")
            continue
        if tensor.is_conv_kernel:
            value = value.transpose(2, 3, 1, 0)
        flat[tensor.collection][tensor.path] = np.ascontiguousarray(value, dtype=np.float32)
    matched = len(tensors) - len(missing) - len(mismatched)
    width_note = "; only width 1.0 is supported" if encoder == "mobilenet_v2" else ""
    _raise_if_any(f"cannot convert this state dict to {encoder} (read with {naming} key names, matched {matched} of "
                  f"{len(tensors)} expected tensors{width_note})",
                  unexpected=unexpected, missing=missing, shape_mismatch=mismatched)
    return {collection: traverse_util.unflatten_dict(leaves) for collection, leaves in flat.items()}


def _raise_if_any(what: str, **problems: list[str]) -> None:
    """Raise one ValueError naming every problem, grouped by kind (``missing (2): a, b``)."""
    lines = [f"  {kind.replace('_', ' ')} ({len(items)}): {', '.join(items)}"
             for kind, items in problems.items() if items]
    if lines:
        raise UserError(f"{what}:\n" + "\n".join(lines))


def load_pretrained_encoder(path: str | os.PathLike, encoder: str) -> dict[str, dict]:
    """Read a torchvision/timm weight file and convert it to our encoder's ``{'params', 'batch_stats'}``."""
    _check_encoder(encoder)
    state_dict = load_state_dict(path)
    try:
        return convert_torch_encoder(state_dict, encoder)
    except ValueError as error:
        raise UserError(f"{path}: {error}") from error


def _flatten(tree: Any, collection: str) -> dict[Path, Any]:
    if not isinstance(tree, Mapping):
        raise UserError(f"{collection}: expected a nested mapping, got {type(tree).__name__}.")
    return traverse_util.flatten_dict(tree)


def _compare_trees(target: Mapping, source: Mapping) -> Iterator[tuple[str, str]]:
    """Yield (kind, description) for every leaf missing from, extra in, or shaped differently in ``source``."""
    for collection in ("params", "batch_stats"):
        target_leaves = _flatten(target.get(collection, {}), collection)
        source_leaves = _flatten(source.get(collection, {}), collection)
        for path in sorted(target_leaves.keys() - source_leaves.keys()):
            yield "missing", "/".join((collection,) + path)
        for path in sorted(source_leaves.keys() - target_leaves.keys()):
            yield "unexpected", "/".join((collection,) + path)
        for path in sorted(target_leaves.keys() & source_leaves.keys()):
            target_shape, source_shape = _leaf_shape(target_leaves[path]), _leaf_shape(source_leaves[path])
            if target_shape != source_shape:
                yield "shape_mismatch", (f"{'/'.join((collection,) + path)}: got {source_shape}, "
                                         f"expected {target_shape}")


def _check_same_tree(target: Mapping, source: Mapping, what: str) -> None:
    problems: dict[str, list[str]] = {"missing": [], "unexpected": [], "shape_mismatch": []}
    for kind, description in _compare_trees(target, source):
        problems[kind].append(description)
    _raise_if_any(what, **problems)


def merge_encoder(variables: Mapping[str, Any], encoder_variables: Mapping[str, Any]) -> dict[str, Any]:
    """Return ``variables`` with ``[params|batch_stats]['main']['encoder']`` replaced by ``encoder_variables``.

    The trees must match exactly (same leaves, same shapes); every difference is listed in one ValueError.
    Leaves take the dtype of the leaves they replace. ``variables`` itself is not modified.
    """
    if not isinstance(encoder_variables, Mapping):
        raise UserError(f"encoder variables: expected {{'params': ..., 'batch_stats': ...}}, got "
                         f"{type(encoder_variables).__name__}.")
    targets = {}
    for collection in ("params", "batch_stats"):
        try:
            targets[collection] = variables[collection]["main"]["encoder"]
        except (KeyError, TypeError) as error:
            raise UserError(f"variables has no {collection}['main']['encoder'] to load the pretrained encoder "
                             "into.") from error
    _check_same_tree(targets, encoder_variables,
                     "pretrained encoder does not match the model's encoder (model.encoder / width_multiplier?)")
    merged = dict(variables)
    for collection, target in targets.items():
        new_encoder = jax.tree.map(lambda old, new: jnp.asarray(new, dtype=old.dtype), target,
                                   encoder_variables[collection])
        main = dict(merged[collection]["main"])
        main["encoder"] = new_encoder
        merged[collection] = {**merged[collection], "main": main}
    return merged


def encoder_to_torchvision(encoder_variables: Mapping[str, Any], encoder: str) -> StateDict:
    """Our encoder's ``{'params', 'batch_stats'}`` as a torchvision-named state dict (classifier excluded)."""
    _check_encoder(encoder)
    if not isinstance(encoder_variables, Mapping):
        raise UserError(f"encoder variables: expected {{'params': ..., 'batch_stats': ...}}, got "
                         f"{type(encoder_variables).__name__}.")
    _check_same_tree(abstract_encoder_variables(encoder), encoder_variables,
                     f"encoder variables do not match a width-1.0 {encoder}")
    flat = {collection: _flatten(encoder_variables[collection], collection)
            for collection in ("params", "batch_stats")}
    state_dict = {}
    for tensor in _tensors(encoder, TORCHVISION):
        value = np.asarray(jax.device_get(flat[tensor.collection][tensor.path]), dtype=np.float32)
        state_dict[tensor.torch_key] = np.ascontiguousarray(
            value.transpose(3, 2, 0, 1) if tensor.is_conv_kernel else value)
        if tensor.torch_key.endswith(".running_var"):
            counter = tensor.torch_key[: -len("running_var")] + "num_batches_tracked"
            state_dict[counter] = np.zeros((), np.int64)
    return state_dict


def export_torchvision_state_dict(encoder_variables: Mapping[str, Any], encoder: str,
                                  path: str | os.PathLike) -> pathlib.Path:
    """Write our encoder as a torchvision-named ``.safetensors`` state dict (atomically: no partial file).

    Load it with ``model.load_state_dict(safetensors.torch.load_file(path), strict=False)``; only the classifier
    (and MobileNetV2's ``features.18``) are then reported missing.
    """
    path = pathlib.Path(path)
    if path.suffix != ".safetensors":
        raise UserError(f"{path}: export writes .safetensors files; got extension {path.suffix!r}.")
    state_dict = encoder_to_torchvision(encoder_variables, encoder)
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        save_file(state_dict, temporary, metadata={"format": "pt", "encoder": encoder, "naming": TORCHVISION,
                                                   "exported_by": "auxmtl_jax"})
        os.replace(temporary, path)
    except BaseException:
        pathlib.Path(temporary).unlink(missing_ok=True)
        raise
    return path
