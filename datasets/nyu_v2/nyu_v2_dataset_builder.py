"""NYU Depth v2 as a TFDS builder (array_record, no TensorFlow): segmentation, depth and normals.

Configs (all need `--manual_dir`; records follow the contract in `builder_support.dense_features`):

* `labeled40`, `labeled13`: the 1449 densely labelled frames (795 train / 654 test), 480x640. The manual
  directory holds the official files::

      manual_dir/
        nyu_depth_v2_labeled.mat   MATLAB v7.3 (HDF5): images (1449,3,640,480) uint8, depths (1449,640,480)
                                   metres (the in-painted depths), labels (1449,640,480) 894-class ids, 0 = none
        splits.mat                 trainNdxs (795x1), testNdxs (654x1): 1-based frame indices
        classMapping40.mat         mapClass (1x894): 894-class id -> 40-class id
        nyu_normals.h5             optional: HDF5 dataset `normals`, float32 (1449,480,640,3), frame order of
                                   the labeled .mat, unit vectors in the OpenCV camera frame (x right, y down,
                                   z forward), all-zero = invalid

  Labels: 894 -> 40 by `mapClass`, 40 -> 13 by the standard fixed table (`NYU40_TO_13`), unlabelled -> 255.
  Normals come from `nyu_normals.h5` when it is present, else they are computed from the depth with the
  Kinect v1 intrinsics (`geometry.KINECT_V1_INTRINSICS`); `info.metadata['normals_source']` says which.

* `mtan`: the preprocessed 288x384 NYUv2 used by mtan / LibMTL / Nash-MTL (13 classes, 795 train / 654 test)::

      manual_dir/{train,val}/{image,label,depth,normal}/{i}.npy
        image (288,384,3) float in [0,1]; label (288,384) float, -1 = ignore; depth (288,384[,1]) metres,
        0 = invalid; normal (288,384,3), all-zero = invalid (copied as stored, re-normalised)

  `val` becomes the `test` split.

* `expansion40`, `expansion13`: extra Kinect v1 frames with coarse labels, all in the `train` split::

      manual_dir/
        image/NAME.png (or NAME.jpg)   8-bit RGB
        depth/NAME.png                 16-bit, millimetres, 0 = invalid
        label/NAME.png                 8-bit NYU-40 ids 1..40, 0 = unlabelled

  Frames of any size are resized to 480x640 (bilinear image, nearest labels and depth); normals are computed
  from the depth with the Kinect v1 intrinsics scaled to the frame size.

Build (TensorFlow-free; the `tfds build` CLI would also work but imports TensorFlow)::

    python -m auxmtl_datasets.nyu_v2 --config labeled13 --manual_dir ~/data/nyu_v2 --data_dir ~/tensorflow_datasets

and read it back with ``import auxmtl_datasets.nyu_v2`` then ``tfds.data_source('nyu_v2/labeled13', data_dir=...)``.
"""

from __future__ import annotations

import dataclasses
import os
import re

import numpy as np
import tensorflow_datasets as tfds

from auxmtl_datasets.nyu_v2 import builder_support as support
from auxmtl_jax import geometry

MANUAL_LAYOUT = __doc__
LABELED_FILE = "nyu_depth_v2_labeled.mat"
SPLITS_FILE = "splits.mat"
CLASS_MAP_FILE = "classMapping40.mat"
NORMALS_FILE = "nyu_normals.h5"
NUM_RAW_CLASSES = 894
LABELED_SPLIT_SIZES = {"train": 795, "test": 654}

NYU40_CLASS_NAMES = (
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf",
    "picture", "counter", "blinds", "desk", "shelves", "curtain", "dresser", "pillow", "mirror",
    "floor mat", "clothes", "ceiling", "books", "refridgerator", "television", "paper", "towel",
    "shower curtain", "box", "whiteboard", "person", "night stand", "toilet", "sink", "lamp", "bathtub",
    "bag", "otherstructure", "otherfurniture", "otherprop",
)  # fmt: skip
NYU13_CLASS_NAMES = (
    "bed", "books", "ceiling", "chair", "floor", "furniture", "objects", "picture", "sofa", "table", "tv",
    "wall", "window",
)  # fmt: skip
# The 13-class id (1-based) of each 40-class id (1-based), from class13Mapping.mat (SceneNet / Handa et al.).
NYU40_TO_13 = np.array(
    [12, 5, 6, 1, 4, 9, 10, 12, 13, 6, 8, 6, 13, 10, 6, 13, 6, 7, 7, 5,
     7, 3, 2, 6, 11, 7, 7, 7, 7, 7, 7, 6, 7, 7, 7, 7, 7, 7, 6, 7],
    dtype=np.uint8,
)  # fmt: skip

MTAN_SIZE = (288, 384)
MTAN_KINDS = ("image", "label", "depth", "normal")
MTAN_SPLIT_FOLDERS = {"train": "train", "test": "val"}
KINECT_SIZE = geometry.KINECT_V1_IMAGE_SIZE
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def class_names(num_classes: int) -> tuple[str, ...]:
    """Returns the NYU class names for 40 or 13 classes."""
    if num_classes == 40:
        return NYU40_CLASS_NAMES
    if num_classes == 13:
        return NYU13_CLASS_NAMES
    raise ValueError(f"NYUv2 has 40 or 13 classes, got num_classes={num_classes}")


def nyu40_lookup(num_classes: int) -> np.ndarray:
    """Returns a 41-entry uint8 table: 1-based NYU-40 id (0 = unlabelled) -> 0-based id in `num_classes`
    classes, unlabelled -> 255."""
    class_names(num_classes)
    to_classes = np.arange(1, 41, dtype=np.uint8) if num_classes == 40 else NYU40_TO_13
    return np.concatenate([[support.IGNORE_LABEL], to_classes - 1]).astype(np.uint8)


def raw_label_lookup(map_class: np.ndarray, num_classes: int, path) -> np.ndarray:
    """Returns the uint8 table from 894-class ids (0 = unlabelled) to 0-based training ids (255 = ignore),
    built from classMapping40.mat's `mapClass`; raises ManualInputError naming `path` if it is malformed."""
    map_class = np.asarray(map_class).ravel()
    if map_class.shape != (NUM_RAW_CLASSES,) or map_class.min() < 1 or map_class.max() > 40:
        raise support.input_error(
            path,
            f"'mapClass' with {NUM_RAW_CLASSES} entries in 1..40",
            f"{map_class.shape[0]} entries in [{map_class.min()}, {map_class.max()}]",
        )
    return nyu40_lookup(num_classes)[np.concatenate([[0], map_class.astype(np.int64)])]


def kinect_intrinsics(size: tuple[int, int]) -> np.ndarray:
    """Returns the Kinect v1 RGB intrinsics for a frame of `size` (height, width) resized from 480x640."""
    return geometry.scale_intrinsics(geometry.KINECT_V1_INTRINSICS, KINECT_SIZE, size)


def labeled_splits(path) -> dict[str, np.ndarray]:
    """Returns {'train', 'test'} 1-based frame indices from splits.mat; raises ManualInputError if malformed."""
    arrays = support.load_mat(path, ["trainNdxs", "testNdxs"])
    splits = {
        "train": arrays["trainNdxs"].ravel().astype(np.int64),
        "test": arrays["testNdxs"].ravel().astype(np.int64),
    }
    if np.intersect1d(splits["train"], splits["test"]).size:
        raise support.input_error(path, "disjoint trainNdxs and testNdxs", "indices in both")
    return splits


@dataclasses.dataclass(eq=False)
class NyuV2Config(tfds.core.BuilderConfig):
    """A NYUv2 variant: `source` is 'labeled', 'mtan' or 'expansion'; `image_size` is (height, width)."""

    source: str = "labeled"
    num_classes: int = 40
    image_size: tuple[int, int] = KINECT_SIZE


class NyuV2(support.ManualDenseBuilder):
    """NYU Depth v2: 40/13-class segmentation, depth and surface normals from user-supplied files."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Labeled .mat, mtan .npy and expansion PNG sources."}
    BUILDER_CONFIGS = [
        NyuV2Config(
            name="labeled40", source="labeled", num_classes=40, description="1449 labelled frames, 40 classes"
        ),
        NyuV2Config(
            name="labeled13", source="labeled", num_classes=13, description="1449 labelled frames, 13 classes"
        ),
        NyuV2Config(
            name="mtan",
            source="mtan",
            num_classes=13,
            image_size=MTAN_SIZE,
            description="mtan/LibMTL 288x384 .npy",
        ),
        NyuV2Config(
            name="expansion40", source="expansion", num_classes=40, description="extra frames, 40 classes"
        ),
        NyuV2Config(
            name="expansion13", source="expansion", num_classes=13, description="extra frames, 13 classes"
        ),
    ]
    DEFAULT_CONFIG_NAME = "labeled13"
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_LAYOUT

    def manual_files(self) -> str:
        return {
            "labeled": f"{LABELED_FILE}, {SPLITS_FILE} and {CLASS_MAP_FILE} (optionally {NORMALS_FILE})",
            "mtan": "{train,val}/{image,label,depth,normal}/<i>.npy",
            "expansion": "image/, depth/ and label/ folders of PNG frames",
        }[self.builder_config.source]

    def _info(self) -> tfds.core.DatasetInfo:
        config = self.builder_config
        return self.dataset_info_from_configs(
            description="NYU Depth v2 indoor scenes: semantic segmentation, depth (metres), surface normals.",
            features=support.dense_features(*config.image_size),
            metadata=support.dense_metadata(class_names(config.num_classes), normals_source="unknown"),
            homepage="https://cs.nyu.edu/~silberman/datasets/nyu_depth_v2.html",
        )

    def _split_generators(self, dl_manager):
        root = self.manual_root(dl_manager)
        source = self.builder_config.source
        if source == "labeled":
            return self._labeled_splits(root)
        if source == "mtan":
            return self._mtan_splits(root)
        if source == "expansion":
            return self._expansion_splits(root)
        raise ValueError(f"unknown NYUv2 source {source!r}; expected 'labeled', 'mtan' or 'expansion'")

    def _generate_examples(self, **kwargs):
        raise NotImplementedError("each split is generated by a source-specific generator")

    def _labeled_splits(self, root):
        import h5py

        height, width = self.builder_config.image_size
        labeled_path = support.require_file(root / LABELED_FILE)
        expected = {"images": (3, width, height), "depths": (width, height), "labels": (width, height)}
        try:
            with h5py.File(os.fspath(labeled_path), "r") as handle:
                for key, frame_shape in expected.items():
                    if (
                        key not in handle
                        or handle[key].ndim != len(frame_shape) + 1
                        or handle[key].shape[1:] != frame_shape
                    ):
                        found = f"shape {handle[key].shape}" if key in handle else "no such variable"
                        raise support.input_error(
                            labeled_path,
                            f"variable '{key}' of shape (N,{','.join(map(str, frame_shape))})",
                            found,
                        )
                num_frames = handle["images"].shape[0]
                if handle["depths"].shape[0] != num_frames or handle["labels"].shape[0] != num_frames:
                    raise support.input_error(
                        labeled_path, "as many depths and labels as images", "other counts"
                    )
        except OSError as error:
            raise support.input_error(
                labeled_path, "a MATLAB v7.3 (HDF5) .mat file", f"an unreadable file ({error})"
            ) from None
        splits_path = root / SPLITS_FILE
        splits = labeled_splits(splits_path)
        for indices in splits.values():
            if indices.size == 0 or indices.min() < 1 or indices.max() > num_frames:
                raise support.input_error(
                    splits_path,
                    f"1-based frame indices in [1, {num_frames}]",
                    f"[{indices.min()}, {indices.max()}]",
                )
        class_map_path = root / CLASS_MAP_FILE
        lookup = raw_label_lookup(
            support.load_mat(class_map_path, ["mapClass"])["mapClass"],
            self.builder_config.num_classes,
            class_map_path,
        )
        normals_path = root / NORMALS_FILE
        if normals_path.exists():
            self._check_normals_file(normals_path, num_frames)
            self.info.metadata["normals_source"] = f"file {NORMALS_FILE}"
        else:
            normals_path = None
            self.info.metadata["normals_source"] = "computed from depth with the Kinect v1 intrinsics"
        return {
            split: self._generate_labeled(labeled_path, indices, lookup, normals_path)
            for split, indices in splits.items()
        }

    def _check_normals_file(self, path, num_frames):
        import h5py

        expected = (num_frames, *self.builder_config.image_size, 3)
        try:
            with h5py.File(os.fspath(path), "r") as handle:
                found = handle["normals"].shape if "normals" in handle else "no dataset 'normals'"
        except OSError as error:
            raise support.input_error(path, "an HDF5 file", f"an unreadable file ({error})") from None
        if found != expected:
            raise support.input_error(path, f"HDF5 dataset 'normals' of shape {expected}", str(found))

    def _generate_labeled(self, labeled_path, indices, lookup, normals_path):
        import h5py

        intrinsics = kinect_intrinsics(self.builder_config.image_size)
        with h5py.File(os.fspath(labeled_path), "r") as handle:
            normals_handle = h5py.File(os.fspath(normals_path), "r") if normals_path else None
            try:
                for index in indices:
                    frame = int(index) - 1
                    depth = np.asarray(handle["depths"][frame], np.float32).T
                    depth = np.where(np.isfinite(depth) & (depth > 0), depth, 0.0).astype(np.float32)
                    if normals_handle is not None:
                        normal = _unit_or_zero(np.asarray(normals_handle["normals"][frame], np.float32))
                    else:
                        normal = geometry.normals_from_depth(depth, intrinsics)
                    labels = np.asarray(handle["labels"][frame]).T
                    yield f"{index:04d}", {
                        "image": np.ascontiguousarray(
                            np.asarray(handle["images"][frame], np.uint8).transpose(2, 1, 0)
                        ),
                        "segmentation": support.remap_labels(
                            labels, lookup, f"{labeled_path} labels[{frame}]", "894-class"
                        ),
                        "depth": depth[..., None],
                        "normal": normal,
                        "id": f"nyu_v2/{index:04d}",
                    }
            finally:
                if normals_handle is not None:
                    normals_handle.close()

    def _mtan_splits(self, root):
        height, width = self.builder_config.image_size
        allowed = {
            "image": [(height, width, 3)],
            "label": [(height, width)],
            "depth": [(height, width), (height, width, 1)],
            "normal": [(height, width, 3)],
        }
        splits = {}
        for split, folder in MTAN_SPLIT_FOLDERS.items():
            split_root = support.require_dir(
                root / folder, "a directory with image/, label/, depth/, normal/ of i.npy files"
            )
            image_dir = support.require_dir(split_root / "image")
            indices = sorted(int(p.stem) for p in image_dir.iterdir() if re.fullmatch(r"\d+\.npy", p.name))
            if not indices:
                raise support.input_error(image_dir, "files named {i}.npy", "none")
            for kind in MTAN_KINDS:
                support.require_dir(split_root / kind)
                for index in indices:
                    support.check_npy(split_root / kind / f"{index}.npy", allowed[kind], f"an mtan {kind}")
            splits[split] = self._generate_mtan(split_root, indices)
        self.info.metadata["normals_source"] = "mtan normal/*.npy files"
        return splits

    def _generate_mtan(self, split_root, indices):
        lookup = np.full(256, support.IGNORE_LABEL, np.uint8)
        lookup[:13] = np.arange(13)
        for index in indices:
            paths = {kind: split_root / kind / f"{index}.npy" for kind in MTAN_KINDS}
            arrays = {kind: np.load(os.fspath(path)) for kind, path in paths.items()}
            image = arrays["image"].astype(np.float32)
            if not np.all(np.isfinite(image)) or image.min() < -1e-3 or image.max() > 1.0 + 1e-3:
                raise support.input_error(
                    paths["image"], "image values in [0, 1]", f"[{image.min()}, {image.max()}]"
                )
            label = arrays["label"]
            valid_ids = (label == -1) | ((label >= 0) & (label < 13) & (label == np.round(label)))
            if not np.all(valid_ids):
                raise support.input_error(
                    paths["label"],
                    "class ids 0..12 or -1 (ignore)",
                    f"values {np.unique(label[~valid_ids])[:5]}",
                )
            depth = arrays["depth"].astype(np.float32).reshape(*image.shape[:2], 1)
            depth = np.where(np.isfinite(depth) & (depth > 0), depth, 0.0).astype(np.float32)
            yield f"{split_root.name}/{index}", {
                "image": np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8),
                "segmentation": lookup[np.where(label < 0, 255, label).astype(np.int64)],
                "depth": depth,
                "normal": _unit_or_zero(arrays["normal"].astype(np.float32)),
                "id": f"nyu_v2_mtan/{split_root.name}/{index}",
            }

    def _expansion_splits(self, root):
        image_dir = support.require_dir(root / "image", "a directory image/ of NAME.png RGB frames")
        depth_dir = support.require_dir(
            root / "depth", "a directory depth/ of NAME.png 16-bit millimetre depths"
        )
        label_dir = support.require_dir(root / "label", "a directory label/ of NAME.png 8-bit NYU-40 labels")
        images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise support.input_error(image_dir, "NAME.png or NAME.jpg frames", "none")
        names = [p.stem for p in images]
        if len(set(names)) != len(names):
            raise support.input_error(image_dir, "one image per NAME", "two files with the same NAME")
        for name in names:
            support.require_file(depth_dir / f"{name}.png")
            support.require_file(label_dir / f"{name}.png")
        self.info.metadata["normals_source"] = "computed from depth with the Kinect v1 intrinsics"
        return {"train": self._generate_expansion(images, depth_dir, label_dir)}

    def _generate_expansion(self, images, depth_dir, label_dir):
        size = self.builder_config.image_size
        lookup = nyu40_lookup(self.builder_config.num_classes)
        for image_path in images:
            name = image_path.stem
            depth_path, label_path = depth_dir / f"{name}.png", label_dir / f"{name}.png"
            image = support.read_image(image_path, channels=3)
            depth_mm = support.read_image(depth_path, channels=None, bits=(16,))
            labels = support.read_image(label_path, channels=None, bits=(8,))
            for path, array in ((depth_path, depth_mm), (label_path, labels)):
                if array.shape != image.shape[:2]:
                    raise support.input_error(
                        path, f"the size of {image_path.name} {image.shape[:2]}", str(array.shape)
                    )
            depth = support.resize(depth_mm.astype(np.float32) / 1000.0, size, nearest=True)
            yield name, {
                "image": support.resize(image, size, nearest=False),
                "segmentation": support.remap_labels(
                    support.resize(labels, size, nearest=True), lookup, label_path, "NYU-40"
                ),
                "depth": depth[..., None],
                "normal": geometry.normals_from_depth(depth, kinect_intrinsics(size)),
                "id": f"nyu_v2_expansion/{name}",
            }


def _unit_or_zero(normals: np.ndarray) -> np.ndarray:
    """Returns float32 normals scaled to unit length; zero or non-finite vectors become all-zero (invalid)."""
    length = np.linalg.norm(normals, axis=-1, keepdims=True)
    usable = np.isfinite(length) & (length > 1e-6)
    return np.where(usable, normals / np.where(usable, length, 1.0), 0.0).astype(np.float32)
