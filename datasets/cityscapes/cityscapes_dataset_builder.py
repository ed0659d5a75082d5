"""Cityscapes in the preprocessed mtan / LibMTL layout as a TFDS builder (array_record, no TensorFlow):
semantic segmentation and depth (disparity-derived, as mtan ships it). There is no `normal` feature.

Configs (both need `--manual_dir`): `mtan` = 7 classes (the "Cityscapes, two tasks" benchmark of mtan and
LibMTL), `mtan19` = the 19 Cityscapes training classes of the same release. Images are 128x256. Splits:
`train` (the `train/` folder, 2975 samples in the release) and `test` (the `val/` folder, 500 samples: the split
the peers report on). The manual directory is the unpacked 128x256 download linked from mtan's README
(lorenmt/mtan README.md, "Update - Jun 2019")::

    manual_dir/{train,val}/
      image/{i}.npy      (128,256,3) float in [0,1], HWC, channels copied in their stored order
      label_7/{i}.npy    (128,256) class ids 0..6, -1 = ignore (config mtan); LibMTL's loader reads the
                         7-class labels from `label/` instead, which config mtan reads when label_7/ is absent
      label_19/{i}.npy   (128,256) class ids 0..18, -1 = ignore (config mtan19)
      depth/{i}.npy      (128,256,1) or (128,256) float >= 0, 0 = invalid
    with i = 0, 1, ..., N-1 in every folder (the peers' loaders read range(len(image/))).

  The release also has label_2/ (2 classes), which no peer benchmark uses and this builder ignores.

Records: `image` uint8 (128,256,3) = round(255 * value); `segmentation` uint8 (128,256), -1 -> 255 (ignore);
`depth` float32 (128,256,1) copied as stored (0 stays 0 = invalid); `id` = "cityscapes_<config>/<folder>/<i>".

Depth is NOT metres: mtan's `depth` is the official Cityscapes disparity map used directly as (inverse) depth
(the author in lorenmt/mtan issues #15 and #25). A user measured its values in [0, 0.4922] (issue #25) where the
official 16-bit disparity PNGs hold p in [0, 32257]: consistent with v = p / 65535 (32257 / 65535 = 0.4922), what
reading a 16-bit PNG as a float image in [0, 1] gives. Then disparity in pixels at the original 2048x1024
resolution is (65535 v - 1) / 256, and metric depth would be baseline * focal / disparity with the Cityscapes
camera files; larger v = closer. 0 = no measurement (LibMTL's DepthLoss/DepthMetric mask gt != 0). Negative or
non-finite values are rejected.

Classes: 7 = the Cityscapes categories in their `categoryId` order (cityscapesScripts helpers/labels.py), void
-> -1: flat, construction, object, nature, sky, human, vehicle. 19 = the standard `trainId` classes (the
19-class map of lorenmt/auto-lambda create_dataset.py, `map_seg_label`). The script that wrote these .npy
files is not public (for preprocessing the author points to lorenmt/auto-lambda dataset/cityscapes_preprocess.py,
mtan issues #57 and #63, which writes another, PNG layout), so both orders follow the Cityscapes definitions.

Every input is checked before any record is written: folders, file names, shapes and dtypes from the .npy
headers, then every value (image in [0,1], class ids, finite depth >= 0). A bad input is one ManualInputError
line naming the file, what was expected and what was found, and a failed build leaves nothing in data_dir.

Peer loaders this follows: median-research-group/LibMTL examples/cityscapes/create_dataset.py (folders,
HWC image moved to CHW, `label/`, depth) and examples/nyu/utils.py (SegLoss ignore_index=-1, depth mask
gt != 0); lorenmt/mtan im2im_pred/create_dataset.py (the NYUv2 loader of the same .npy convention).

Build (TensorFlow-free)::

    python -m auxmtl_datasets.cityscapes --config mtan --manual_dir ~/data/cityscapes --data_dir ~/tensorflow_datasets

and read it back with ``import auxmtl_datasets.cityscapes`` then
``tfds.data_source('cityscapes/mtan', data_dir=...)``.
"""

from __future__ import annotations

import dataclasses
import os
import re

import numpy as np
import tensorflow_datasets as tfds

from auxmtl_datasets.nyu_v2 import builder_support as support

MANUAL_LAYOUT = __doc__
IMAGE_SIZE = (128, 256)
SPLIT_FOLDERS = {"train": "train", "test": "val"}  # the peers report on val/
TASKS = ("segmentation", "depth")
LIBMTL_LABEL_FOLDER = "label"  # LibMTL's name for mtan's label_7/
IMAGE_TOLERANCE = 1e-3  # float rounding around [0, 1] that is clipped, not rejected
DEPTH_UNIT = (
    "not metres: mtan's Cityscapes depth as shipped, the official disparity PNG value p / 65535 (inverse depth; "
    "disparity in pixels at 2048x1024 = (65535 v - 1) / 256); 0 = invalid"
)

CITYSCAPES7_CLASS_NAMES = ("flat", "construction", "object", "nature", "sky", "human", "vehicle")
CITYSCAPES19_CLASS_NAMES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)  # fmt: skip
_INDEXED_NPY = re.compile(r"\d+\.npy")


@dataclasses.dataclass(eq=False)
class CityscapesConfig(tfds.core.BuilderConfig):
    """A Cityscapes variant: the label folder read, its class count and the (height, width) of the files."""

    label_folder: str = "label_7"
    num_classes: int = 7
    image_size: tuple[int, int] = IMAGE_SIZE


def class_names(num_classes: int) -> tuple[str, ...]:
    """Returns the Cityscapes class names for 7 (categories) or 19 (training classes) classes."""
    if num_classes == 7:
        return CITYSCAPES7_CLASS_NAMES
    if num_classes == 19:
        return CITYSCAPES19_CLASS_NAMES
    raise ValueError(f"Cityscapes has 7 or 19 classes, got num_classes={num_classes}")


def features(height: int, width: int) -> tfds.features.FeaturesDict:
    """The record contract: uint8 image, uint8 labels (255 = ignore), float32 depth (0 = invalid), string id."""
    return tfds.features.FeaturesDict(
        {
            "image": tfds.features.Tensor(shape=(height, width, 3), dtype=np.uint8, encoding="zlib"),
            "segmentation": tfds.features.Tensor(shape=(height, width), dtype=np.uint8, encoding="zlib"),
            "depth": tfds.features.Tensor(shape=(height, width, 1), dtype=np.float32, encoding="zlib"),
            "id": tfds.features.Text(),
        }
    )


def _indexed_files(folder) -> dict[str, object]:
    """{name: path} of the `{i}.npy` files in `folder`; other files are not part of the layout and are skipped."""
    return {path.name: path for path in folder.iterdir() if _INDEXED_NPY.fullmatch(path.name)}


def _check_header(path, shapes, kinds: str, what: str) -> None:
    shape, dtype = support.npy_header(path)
    if shape not in shapes or dtype.kind not in kinds:
        kind_names = {"f": "float", "i": "signed integer", "u": "unsigned integer"}
        dtypes = " or ".join(kind_names[kind] for kind in kinds)
        expected = " or ".join(str(s) for s in shapes)
        raise support.input_error(path, f"{what} as a {dtypes} array of shape {expected}", f"{dtype} {shape}")


def _shown(values: np.ndarray, limit: int = 5) -> str:
    values = np.unique(values)
    shown = ", ".join(f"{v:g}" for v in values[:limit])
    return f"[{shown}{', ...' if len(values) > limit else ''}]"


def check_image(path, image: np.ndarray) -> None:
    """Raises ManualInputError naming `path` unless every value is finite and in [0, 1] (up to rounding)."""
    finite = np.isfinite(image)
    if not np.all(finite):
        raise support.input_error(path, "finite image values in [0, 1]", f"{np.size(image) - finite.sum()} NaN/inf")
    low, high = float(image.min()), float(image.max())
    if low < -IMAGE_TOLERANCE or high > 1.0 + IMAGE_TOLERANCE:
        raise support.input_error(path, "image values in [0, 1] (mtan stores floats)", f"[{low:g}, {high:g}]")


def check_label(path, label: np.ndarray, num_classes: int) -> None:
    """Raises ManualInputError naming `path` unless every value is a whole class id in 0..num_classes-1 or -1."""
    valid = (label == -1) | ((label >= 0) & (label < num_classes) & (label == np.round(label)))
    if not np.all(valid):
        raise support.input_error(
            path, f"class ids 0..{num_classes - 1} or -1 (ignore)", f"values {_shown(label[~valid])}"
        )


def check_depth(path, depth: np.ndarray) -> None:
    """Raises ManualInputError naming `path` unless every value is finite and >= 0 (0 = invalid)."""
    finite = np.isfinite(depth)
    if not np.all(finite):
        raise support.input_error(
            path, "finite depth values >= 0 (0 = invalid)", f"{np.size(depth) - finite.sum()} NaN/inf values"
        )
    if depth.size and depth.min() < 0:
        raise support.input_error(
            path, "depth values >= 0 (0 = invalid)", f"values {_shown(depth[depth < 0])}"
        )


def to_record(image: np.ndarray, label: np.ndarray, depth: np.ndarray) -> dict[str, np.ndarray]:
    """The stored arrays of one checked sample: uint8 image = round(255 x) (in float64, whatever the stored
    float width), uint8 labels with -1 -> 255, float32 depth [H,W,1]."""
    height, width = image.shape[:2]
    return {
        "image": np.round(np.clip(image.astype(np.float64), 0.0, 1.0) * 255.0).astype(np.uint8),
        "segmentation": np.where(label < 0, support.IGNORE_LABEL, label).astype(np.uint8),
        "depth": np.ascontiguousarray(depth, dtype=np.float32).reshape(height, width, 1),
    }


class Cityscapes(support.ManualDenseBuilder):
    """Cityscapes (mtan / LibMTL preprocessed .npy): 7- or 19-class segmentation and disparity-derived depth."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "mtan / LibMTL 128x256 .npy layout: 7 or 19 classes, depth as shipped."}
    BUILDER_CONFIGS = [
        CityscapesConfig(
            name="mtan",
            label_folder="label_7",
            num_classes=7,
            description="mtan/LibMTL 128x256 .npy, 7 categories (label_7/, or LibMTL's label/)",
        ),
        CityscapesConfig(
            name="mtan19",
            label_folder="label_19",
            num_classes=19,
            description="mtan 128x256 .npy, 19 training classes (label_19/)",
        ),
    ]
    DEFAULT_CONFIG_NAME = "mtan"
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_LAYOUT

    def manual_files(self) -> str:
        return f"{{train,val}}/{{image,{self.builder_config.label_folder},depth}}/<i>.npy"

    def _info(self) -> tfds.core.DatasetInfo:
        config = self.builder_config
        names = class_names(config.num_classes)
        return self.dataset_info_from_configs(
            description=(
                "Cityscapes street scenes, preprocessed by mtan (128x256): semantic segmentation and depth "
                "(mtan's disparity-derived inverse depth, not metres)."
            ),
            features=features(*config.image_size),
            metadata=tfds.core.MetadataDict(
                num_classes=len(names),
                class_names=list(names),
                tasks=list(TASKS),
                depth_unit=DEPTH_UNIT,
                label_folder=config.label_folder,
            ),
            homepage="https://github.com/lorenmt/mtan",
        )

    def _label_folder(self, split_root) -> str:
        """label_7/ (label_19/ for mtan19); for `mtan` LibMTL's label/ when label_7/ is absent."""
        folder = self.builder_config.label_folder
        if (
            folder == "label_7"
            and not (split_root / folder).exists()
            and (split_root / LIBMTL_LABEL_FOLDER).is_dir()
        ):
            return LIBMTL_LABEL_FOLDER
        return folder

    def _split_generators(self, dl_manager):
        root = self.manual_root(dl_manager)
        samples, label_folders = {}, set()
        for split, folder in SPLIT_FOLDERS.items():
            split_root = support.require_dir(
                root / folder,
                f"a directory with image/, {self.builder_config.label_folder}/ and depth/ of {{i}}.npy files",
            )
            label_folder = self._label_folder(split_root)
            label_folders.add(label_folder)
            samples[split] = self._indexed_samples(split_root, label_folder)
        # Headers first (cheap: a missing or malformed file stops the build at once), then every value, so
        # that a bad input stops the build before any record is written.
        for split_samples in samples.values():
            for paths in split_samples:
                self._check_headers(paths)
        for split_samples in samples.values():
            for paths in split_samples:
                self._load_checked(paths)
        self.info.metadata["label_folder"] = "/".join(sorted(label_folders))
        return {split: self._generate(split_samples) for split, split_samples in samples.items()}

    def _generate_examples(self, **kwargs):
        raise NotImplementedError("each split is generated by `_generate` from its checked samples")

    def _indexed_samples(self, split_root, label_folder) -> list[dict[str, object]]:
        """[{kind: path}] for i = 0..N-1, N the number of image/{i}.npy files; raises ManualInputError naming
        the first missing or extra-indexed file of any folder."""
        kinds = {"image": "image", "label": label_folder, "depth": "depth"}
        fallback = " (or LibMTL's label/)" if label_folder == "label_7" else ""
        folders = {
            kind: support.require_dir(split_root / name, f"an existing directory{fallback if kind == 'label' else ''}")
            for kind, name in kinds.items()
        }
        image_files = _indexed_files(folders["image"])
        if not image_files:
            raise support.input_error(folders["image"], "files named 0.npy, 1.npy, ...", "none")
        count = len(image_files)
        expected = {f"{i}.npy" for i in range(count)}
        for kind, folder in folders.items():
            files = _indexed_files(folder)
            what = f"{count} samples 0.npy..{count - 1}.npy (as many as image/ holds)"
            missing = sorted(expected - set(files), key=lambda name: int(name[:-4]))
            if missing:
                raise support.input_error(folder / missing[0], f"an existing file: {what}", "nothing")
            extra = sorted(set(files) - expected, key=lambda name: int(name[:-4]))
            if extra:
                raise support.input_error(folder / extra[0], f"no such file: {what}", "an extra file")
        return [{kind: folder / f"{i}.npy" for kind, folder in folders.items()} for i in range(count)]

    def _check_headers(self, paths) -> None:
        height, width = self.builder_config.image_size
        _check_header(paths["image"], [(height, width, 3)], "f", "an mtan Cityscapes image")
        _check_header(paths["label"], [(height, width)], "fiu", "an mtan Cityscapes label map")
        _check_header(paths["depth"], [(height, width, 1), (height, width)], "f", "an mtan Cityscapes depth map")

    def _load_checked(self, paths) -> dict[str, np.ndarray]:
        arrays = {kind: np.load(os.fspath(path), allow_pickle=False) for kind, path in paths.items()}
        check_image(paths["image"], arrays["image"])
        check_label(paths["label"], arrays["label"], self.builder_config.num_classes)
        check_depth(paths["depth"], arrays["depth"])
        return arrays

    def _generate(self, samples):
        for paths in samples:
            arrays = self._load_checked(paths)  # the files were checked; checking again costs little
            folder, index = paths["image"].parent.parent.name, paths["image"].stem
            yield f"{folder}/{index}", {
                **to_record(arrays["image"], arrays["label"], arrays["depth"]),
                "id": f"cityscapes_{self.builder_config.name}/{folder}/{index}",
            }
