"""SUN RGB-D as a TFDS builder (array_record, no TensorFlow): segmentation, depth and surface normals.

Configs `classes13` (default) and `classes37`; splits `train` (5285) and `test` (5050). The manual directory::

    manual_dir/
      sunrgbd_training_images.txt   one image per line, e.g.
      sunrgbd_testing_images.txt      SUNRGBD/kv2/kinect2data/000065_..._rgbf000121-resize/image/0000121.jpg
      SUNRGBD/...                   the SUNRGBD.zip tree; for every listed image, its sample folder
                                      (two levels up) holds
                                        image/NAME.jpg   the listed RGB image
                                        depth/*.png      exactly one 16-bit depth PNG, bit-rotated millimetres
                                        intrinsics.txt   the 3x3 camera matrix, 9 numbers, row-major
      labels37/img-XXXXXX.png       SUNRGBD-37 label PNGs (8- or 16-bit, 0 = unlabelled, 1..37 = seg37list),
                                      as extracted from `sunrgbd_train_test_labels.tar.gz` of the
                                      sunrgbd-meta-data repository: test line i (1-based) is img-{i:06d},
                                      training line j is img-{T+j:06d} with T the number of test lines (5050)

Depth: PNG value d -> ((d >> 3) | (d << 13)) & 0xFFFF millimetres, / 1000, clipped to 8 m; 0 stays invalid
(`geometry.decode_sunrgbd_depth`). The raw `depth/` folder is used (holes are invalid, not in-painted).
Every sensor's frames (kv1/xtion/realsense 640x480, kv2 730x530) are resized to 480x640 (bilinear image,
nearest labels and depth) and the intrinsics scaled to match; normals are computed from the resized depth with
those intrinsics. Labels: 37 -> 13 with the standard table (`SUN37_TO_13`), 0 -> 255 (ignore).

Build (TensorFlow-free; the `tfds build` CLI would also work but imports TensorFlow)::

    python -m auxmtl_datasets.sunrgbd --config classes13 --manual_dir ~/data/sunrgbd --data_dir ~/tensorflow_datasets

and read it back with ``import auxmtl_datasets.sunrgbd`` then ``tfds.data_source('sunrgbd/classes13', data_dir=...)``.
"""

from __future__ import annotations

import dataclasses
import os
import re

import numpy as np
import tensorflow_datasets as tfds

from auxmtl_datasets.nyu_v2 import builder_support as support
from auxmtl_datasets.nyu_v2.nyu_v2_dataset_builder import NYU13_CLASS_NAMES, NYU40_TO_13
from auxmtl_jax import geometry

MANUAL_LAYOUT = __doc__
SPLIT_LISTS = {"train": "sunrgbd_training_images.txt", "test": "sunrgbd_testing_images.txt"}
SPLIT_SIZES = {"train": 5285, "test": 5050}
LABELS_FOLDER = "labels37"
IMAGE_SIZE = (480, 640)

# seg37list.mat of the SUNRGBD toolbox; ids 1..37 coincide with NYU-40 ids 1..37.
SUN37_CLASS_NAMES = (
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf", "picture",
    "counter", "blinds", "desk", "shelves", "curtain", "dresser", "pillow", "mirror", "floor_mat", "clothes",
    "ceiling", "books", "fridge", "tv", "paper", "towel", "shower_curtain", "box", "whiteboard", "person",
    "night_stand", "toilet", "sink", "lamp", "bathtub", "bag",
)  # fmt: skip
SUN37_TO_13 = NYU40_TO_13[:37]  # 1-based 13-class id of each 1-based 37-class id
_LIST_LINE = re.compile(r"SUNRGBD/(?:[^/\s]*/)+image/[^/\s]+\.(?:jpg|png)")  # real lists contain "//"


def class_names(num_classes: int) -> tuple[str, ...]:
    """Returns the SUN RGB-D class names for 37 or 13 classes."""
    if num_classes == 37:
        return SUN37_CLASS_NAMES
    if num_classes == 13:
        return NYU13_CLASS_NAMES
    raise ValueError(f"SUN RGB-D has 37 or 13 classes, got num_classes={num_classes}")


def label_lookup(num_classes: int) -> np.ndarray:
    """Returns a 38-entry uint8 table: 37-class id (0 = unlabelled) -> 0-based id in `num_classes`, 0 -> 255."""
    class_names(num_classes)
    to_classes = np.arange(1, 38) if num_classes == 37 else SUN37_TO_13
    return np.concatenate([[support.IGNORE_LABEL], np.asarray(to_classes) - 1]).astype(np.uint8)


def read_split_list(path) -> list[str]:
    """Returns the image paths of a split list (one `SUNRGBD/.../image/NAME.jpg` per line); raises
    ManualInputError naming the file and line when a line is not such a path or repeats one."""
    path = support.require_file(path)
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        if not _LIST_LINE.fullmatch(line):
            raise support.input_error(
                f"{path}:{number}", "a path like SUNRGBD/<sensor>/.../image/NAME.jpg", repr(line[:120])
            )
        entries.append(line)
    if not entries:
        raise support.input_error(path, "one image path per line", "no lines")
    if len(set(entries)) != len(entries):
        raise support.input_error(path, "each image listed once", "repeated lines")
    return entries


def read_intrinsics(path) -> np.ndarray:
    """Returns the 3x3 camera matrix of a SUN RGB-D `intrinsics.txt`; raises ManualInputError if malformed."""
    path = support.require_file(path)
    try:
        values = np.array(path.read_text().split(), dtype=np.float64)
        return geometry.check_intrinsics(values.reshape(3, 3))
    except ValueError as error:
        raise support.input_error(
            path, "9 numbers: a row-major 3x3 camera matrix", f"an invalid matrix ({error})"
        ) from None


def label_file_names(num_test: int, num_train: int) -> dict[str, list[str]]:
    """Returns the label PNG names per split: test lines first (img-000001...), then the training lines."""
    return {
        "test": [f"img-{i:06d}.png" for i in range(1, num_test + 1)],
        "train": [f"img-{num_test + j:06d}.png" for j in range(1, num_train + 1)],
    }


@dataclasses.dataclass(eq=False)
class SunrgbdConfig(tfds.core.BuilderConfig):
    """A SUN RGB-D variant: number of classes, output size (height, width) and the depth folder used."""

    num_classes: int = 13
    image_size: tuple[int, int] = IMAGE_SIZE
    depth_folder: str = "depth"


@dataclasses.dataclass(frozen=True)
class _Sample:
    image: object
    depth: object
    label: object
    intrinsics: np.ndarray
    listed_as: str


class Sunrgbd(support.ManualDenseBuilder):
    """SUN RGB-D: 13/37-class segmentation, depth and surface normals from the SUNRGBD tree."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "SUNRGBD tree + split lists + SUNRGBD-37 label PNGs, resized to 480x640."}
    BUILDER_CONFIGS = [
        SunrgbdConfig(name="classes13", num_classes=13, description="13 classes (37 merged as for NYUv2-13)"),
        SunrgbdConfig(name="classes37", num_classes=37, description="the 37 SUNRGBD classes"),
    ]
    DEFAULT_CONFIG_NAME = "classes13"
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_LAYOUT

    def manual_files(self) -> str:
        return "sunrgbd_training_images.txt, sunrgbd_testing_images.txt, the SUNRGBD/ tree and labels37/"

    def _info(self) -> tfds.core.DatasetInfo:
        config = self.builder_config
        return self.dataset_info_from_configs(
            description="SUN RGB-D indoor scenes: semantic segmentation, depth (metres), surface normals.",
            features=support.dense_features(*config.image_size),
            metadata=support.dense_metadata(
                class_names(config.num_classes),
                normals_source="computed from depth with each image's intrinsics.txt",
            ),
            homepage="https://rgbd.cs.princeton.edu/",
        )

    def _split_generators(self, dl_manager):
        root = self.manual_root(dl_manager)
        entries = {split: read_split_list(root / name) for split, name in SPLIT_LISTS.items()}
        label_names = label_file_names(len(entries["test"]), len(entries["train"]))
        labels_dir = support.require_dir(
            root / LABELS_FOLDER, "a directory of SUNRGBD-37 label PNGs img-XXXXXX.png"
        )
        return {
            split: self._generate(
                [
                    self._sample(root, entry, labels_dir / label)
                    for entry, label in zip(entries[split], label_names[split])
                ]
            )
            for split in ("train", "test")
        }

    def _generate_examples(self, **kwargs):
        raise NotImplementedError("each split is generated by `_generate` from its list of samples")

    def _sample(self, root, entry: str, label_path) -> _Sample:
        image_path = support.require_file(root / os.path.normpath(entry))
        sample_dir = image_path.parent.parent
        depth_dir = support.require_dir(sample_dir / self.builder_config.depth_folder)
        depth_files = sorted(p for p in depth_dir.iterdir() if p.suffix.lower() == ".png")
        if len(depth_files) != 1:
            raise support.input_error(depth_dir, "exactly one 16-bit depth .png", f"{len(depth_files)}")
        return _Sample(
            image=image_path,
            depth=depth_files[0],
            label=support.require_file(label_path),
            intrinsics=read_intrinsics(sample_dir / "intrinsics.txt"),
            listed_as=entry,
        )

    def _generate(self, samples):
        size = self.builder_config.image_size
        lookup = label_lookup(self.builder_config.num_classes)
        for sample in samples:
            image = support.read_image(sample.image, channels=3)
            depth_png = support.read_image(sample.depth, channels=None, bits=(16,))
            labels = support.read_image(sample.label, channels=None, bits=(8, 16))
            for path, array in ((sample.depth, depth_png), (sample.label, labels)):
                if array.shape != image.shape[:2]:
                    raise support.input_error(
                        path, f"the size of {sample.image} {image.shape[:2]}", str(array.shape)
                    )
            intrinsics = geometry.scale_intrinsics(sample.intrinsics, image.shape[:2], size)
            depth = support.resize(geometry.decode_sunrgbd_depth(depth_png), size, nearest=True)
            yield sample.listed_as, {
                "image": support.resize(image, size, nearest=False),
                "segmentation": support.remap_labels(
                    support.resize(labels, size, nearest=True), lookup, sample.label, "SUNRGBD-37"
                ),
                "depth": depth[..., None],
                "normal": geometry.normals_from_depth(depth, intrinsics),
                "id": sample.listed_as,
            }
