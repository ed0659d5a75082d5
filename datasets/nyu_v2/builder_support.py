"""Shared pieces of the manual-input dense builders (`nyu_v2`, `sunrgbd`): the record features, input
validation with one clear error per bad file, readers for PNG/NPY/MAT inputs, and clean-up on failure.

NumPy, PIL, h5py and scipy only: the builders run without TensorFlow (array_record + `tfds.data_source`).
"""

from __future__ import annotations

import argparse
import os
from typing import Iterable, Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from auxmtl_jax import errors
from auxmtl_jax.errors import UserError
from auxmtl_jax.tasks import TASK_NAMES

IGNORE_LABEL = 255
DEFAULT_FILE_FORMAT = "array_record"


class ManualInputError(UserError):
    """A manual input file of a dataset builder is missing or not in the expected format."""


def input_error(path, expected: str, found: str | None = None) -> ManualInputError:
    """Returns the one error raised for a bad input: the file, what was expected and what was found."""
    message = f"{os.fspath(path)}: expected {expected}"
    if found is not None:
        message += f", found {found}"
    return ManualInputError(message)


def require_file(path) -> epath.Path:
    """Returns `path` as a Path, or raises ManualInputError if it is not an existing file."""
    path = epath.Path(path)
    if not path.is_file():
        raise input_error(path, "an existing file", "nothing" if not path.exists() else "a directory")
    return path


def require_dir(path, expected: str = "an existing directory") -> epath.Path:
    """Returns `path` as a Path, or raises ManualInputError if it is not an existing directory."""
    path = epath.Path(path)
    if not path.is_dir():
        raise input_error(path, expected, "nothing" if not path.exists() else "a file")
    return path


def dense_features(height: int, width: int) -> tfds.features.FeaturesDict:
    """Returns the record contract: uint8 image, uint8 labels (255 = ignore), depth in metres (0 = invalid),
    camera-frame unit normals (all-zero = invalid) and a string id."""
    return tfds.features.FeaturesDict(
        {
            "image": tfds.features.Tensor(shape=(height, width, 3), dtype=np.uint8, encoding="zlib"),
            "segmentation": tfds.features.Tensor(shape=(height, width), dtype=np.uint8, encoding="zlib"),
            "depth": tfds.features.Tensor(shape=(height, width, 1), dtype=np.float32, encoding="zlib"),
            "normal": tfds.features.Tensor(shape=(height, width, 3), dtype=np.float32, encoding="zlib"),
            "id": tfds.features.Text(),
        }
    )


def dense_metadata(class_names: Sequence[str], **extra) -> tfds.core.MetadataDict:
    """Returns the `info.metadata` every dense builder carries: class count and names, and its tasks."""
    return tfds.core.MetadataDict(
        num_classes=len(class_names), class_names=list(class_names), tasks=list(TASK_NAMES), **extra
    )


def remap_labels(labels: np.ndarray, lookup: np.ndarray, path, what: str) -> np.ndarray:
    """Returns uint8 labels `lookup[labels]`, or raises ManualInputError naming `path` for out-of-range ids."""
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= len(lookup)):
        raise input_error(
            path, f"{what} ids in [0, {len(lookup) - 1}]", f"values in [{labels.min()}, {labels.max()}]"
        )
    return lookup[labels.astype(np.int64)].astype(np.uint8)


def read_image(path, *, channels: int | None, bits: tuple[int, ...] = (8,)) -> np.ndarray:
    """Reads a PNG/JPEG: `channels=3` gives uint8 RGB [H, W, 3]; `channels=None` a single-channel [H, W]
    array (uint8, or uint16 when 16 is in `bits`) whose stored bit depth must be one of `bits`. Raises
    ManualInputError naming the file if it cannot be decoded or has another pixel format."""
    path = require_file(path)
    try:
        with Image.open(os.fspath(path)) as image:
            image.load()
            mode = image.mode
            if channels == 3 and mode in ("RGB", "RGBA", "P", "L"):
                image = image.convert("RGB")
            array = np.asarray(image)
    except (OSError, SyntaxError, ValueError) as error:
        raise input_error(path, "a readable image file", f"an unreadable file ({error})") from None
    if channels == 3:
        if array.ndim == 3 and array.shape[-1] == 3 and array.dtype == np.uint8:
            return array
        raise input_error(
            path, "an 8-bit RGB image", f"mode {mode}, {array.dtype} array of shape {array.shape}"
        )
    stored_bits = 8 if array.dtype == np.uint8 else 16 if array.dtype == np.uint16 else None
    if (
        array.dtype == np.int32
        and mode.startswith("I")
        and array.size
        and array.min() >= 0
        and array.max() < 2**16
    ):
        stored_bits = 16  # older Pillow opens 16-bit greyscale PNGs as 32-bit mode 'I'
    if array.ndim != 2 or stored_bits not in bits:
        expected = " or ".join(f"{b}-bit" for b in bits)
        raise input_error(
            path,
            f"a {expected} single-channel image",
            f"mode {mode}, {array.dtype} array of shape {array.shape}",
        )
    return array.astype(np.uint16 if 16 in bits else np.uint8)


def npy_header(path) -> tuple[tuple[int, ...], np.dtype]:
    """Returns (shape, dtype) of a .npy file from its header, or raises ManualInputError naming it."""
    path = require_file(path)
    try:
        array = np.load(os.fspath(path), mmap_mode="r", allow_pickle=False)  # maps, reads only the header
    except (OSError, ValueError, EOFError) as error:
        raise input_error(path, "a NumPy .npy file", f"an unreadable file ({error})") from None
    if not isinstance(array, np.ndarray):
        raise input_error(path, "a NumPy .npy file", "another kind of file")
    return tuple(array.shape), array.dtype


def check_npy(path, allowed_shapes: Iterable[tuple[int, ...]], kind: str) -> None:
    """Raises ManualInputError naming `path` unless its header shows a real-valued array of an allowed shape."""
    shape, dtype = npy_header(path)
    allowed_shapes = list(allowed_shapes)
    if shape not in allowed_shapes or dtype.kind not in "fiu":
        expected = " or ".join(str(s) for s in allowed_shapes)
        raise input_error(path, f"{kind} as a numeric array of shape {expected}", f"{dtype} {shape}")


def load_mat(path, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """Loads `keys` from a MATLAB file (v5 via scipy, v7.3/HDF5 via h5py, transposed back to MATLAB order);
    raises ManualInputError naming the file and the missing key when one is absent."""
    import h5py
    import scipy.io

    path = require_file(path)
    try:
        contents = scipy.io.loadmat(os.fspath(path), variable_names=list(keys))
    except NotImplementedError:
        with h5py.File(os.fspath(path), "r") as handle:
            contents = {key: np.asarray(handle[key]).T for key in keys if key in handle}
    except (OSError, ValueError, TypeError) as error:
        raise input_error(path, "a MATLAB .mat file", f"an unreadable file ({error})") from None
    for key in keys:
        if key not in contents:
            raise input_error(
                path,
                f"a MATLAB variable '{key}'",
                f"only {sorted(k for k in contents if not k.startswith('__'))}",
            )
    return {key: contents[key] for key in keys}


def resize(array: np.ndarray, size: tuple[int, int], *, nearest: bool) -> np.ndarray:
    """Resizes [H, W] or [H, W, C] to `size` (height, width) with half-pixel centres; bilinear for images,
    nearest for labels, depth and normals (so no value is mixed across an edge)."""
    if array.shape[:2] == tuple(size):
        return array
    resample = Image.NEAREST if nearest else Image.BILINEAR
    channels = [array] if array.ndim == 2 else [array[..., c] for c in range(array.shape[-1])]
    resized = []
    for channel in channels:
        mode_array = channel.astype(np.float32) if channel.dtype != np.uint8 else channel
        image = Image.fromarray(mode_array)
        out = np.asarray(image.resize((size[1], size[0]), resample=resample))
        resized.append(
            np.round(out).astype(array.dtype) if array.dtype.kind in "iu" else out.astype(array.dtype)
        )
    return resized[0] if array.ndim == 2 else np.stack(resized, axis=-1)


class ManualDenseBuilder(tfds.core.GeneratorBasedBuilder):
    """Base of the manual-input builders: array_record by default, and a failed build leaves nothing behind
    (TFDS itself removes only its temporary directory, not the dataset/config folders it created)."""

    def __init__(self, *, file_format=None, **kwargs):
        super().__init__(file_format=file_format or DEFAULT_FILE_FORMAT, **kwargs)

    def download_and_prepare(self, *args, **kwargs):
        """Builds the dataset; on any error removes the folders this call created, then re-raises."""
        root = epath.Path(self.data_dir_root)
        candidates = [root / "downloads", root / self.name]
        if self.builder_config is not None:
            candidates.append(root / self.name / self.builder_config.name)
        existed = {path: path.exists() for path in candidates}
        try:
            return super().download_and_prepare(*args, **kwargs)
        except BaseException:
            for path in candidates:
                if not existed[path] and path.exists():
                    path.rmtree()
            raise

    def manual_files(self) -> str:
        """A one-line summary of what this config's manual_dir must hold (subclasses name the files)."""
        return "the raw files of its layout"

    def _what_to_pass(self) -> str:
        config = self.builder_config.name if self.builder_config is not None else ""
        return (f"the folder holding {self.manual_files()} (--manual_dir=DIR for python -m "
                f"auxmtl_datasets.{self.name} --config {config}, or --config.dataset.manual_dir=DIR for run.py; "
                f"full layout: python -m auxmtl_datasets.{self.name} --help)")

    def missing_manual_dir_message(self) -> str:
        return f"{self.name}: no manual_dir given; expected {self._what_to_pass()}"

    def manual_root(self, dl_manager) -> epath.Path:
        """Returns the manual directory, or raises a one-line ManualInputError naming the flag and the files."""
        path = getattr(dl_manager, "_manual_dir", None)
        if not path:
            raise ManualInputError(self.missing_manual_dir_message())
        path = epath.Path(path)
        if not path.is_dir():
            raise ManualInputError(
                f"{os.fspath(path)}: expected the manual_dir of {self.name}, found "
                f"{'nothing' if not path.exists() else 'a file'}; expected {self._what_to_pass()}"
            )
        return path


def build_main(builder_cls, argv=None) -> None:
    """Command line `python -m auxmtl_datasets.<name> --config C --manual_dir M [--data_dir D]`: builds one
    config as array_record without TensorFlow (the `tfds build` CLI itself imports TensorFlow)."""
    parser = errors.ArgumentParser(
        prog=f"python -m auxmtl_datasets.{builder_cls.name}",
        description=builder_cls.MANUAL_DOWNLOAD_INSTRUCTIONS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, choices=[c.name for c in builder_cls.BUILDER_CONFIGS])
    parser.add_argument(
        "--manual_dir",
        default=None,
        help="directory with the input files (layout: above)",
    )
    parser.add_argument(
        "--data_dir",
        default=os.path.expanduser("~/tensorflow_datasets"),
        help="TFDS data directory to write to",
    )
    args = parser.parse_args(argv)
    builder = builder_cls(config=args.config, data_dir=args.data_dir)
    if not args.manual_dir:
        errors.exit_with_error(builder.missing_manual_dir_message(), errors.USAGE_ERROR_STATUS)
    with errors.reported_as_one_line(args.verbose):
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=args.manual_dir))
    print(f"built {builder.name}/{args.config} in {builder.data_dir}")
