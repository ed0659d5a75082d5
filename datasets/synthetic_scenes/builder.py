"""TFDS builder `synthetic_scenes`: procedurally rendered indoor rooms with exact segmentation, depth and normals.

No download: every example is ray cast by `render.py` from (seed, split, index), so a build is deterministic
(same bytes on the same platform). Stored as array_record, read without TensorFlow through `tfds.data_source`.

Build (`demo` is what `configs/synthetic_three_task.py` uses, and what it builds itself when `prepare=True`;
the `tfds build` CLI imports TensorFlow, this command does not):

  python -m auxmtl_jax.input_pipeline --dataset=synthetic_scenes --config=demo --data_dir=~/tensorflow_datasets

Configs (`--config=`): `tiny` (tests, seconds), `demo` (about half a minute on 2 cores), `default` (a few minutes).

Record: `image` uint8 [H,W,3]; `segmentation` uint8 [H,W] with 255 = ignore (occlusion boundaries);
`depth` float32 [H,W,1] z-depth in metres, 0 = invalid (simulated sensor holes); `normal` float32 [H,W,3] unit
normals in the camera frame (x right, y down, z forward), all-zero = invalid; `id` = "<split>/<index>".
`info.metadata`: `num_classes`, `class_names`, `tasks`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import multiprocessing
import os

import numpy as np
import tensorflow_datasets as tfds

from auxmtl_datasets.synthetic_scenes import render
from auxmtl_jax.tasks import TASK_NAMES

_MIN_EXAMPLES_PER_PROCESS = 64


@dataclasses.dataclass
class SyntheticScenesConfig(tfds.core.BuilderConfig):
    """Resolution, split sizes and the seed everything is rendered from."""

    height: int = 96
    width: int = 128
    num_train: int = 1000
    num_test: int = 200
    seed: int = 0


def _num_processes(num_examples: int) -> int:
    """Rendering processes worth starting: one per available core, none for small splits."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, num_examples // _MIN_EXAMPLES_PER_PROCESS))


def _render_record(index: int, *, seed: int, split: str, height: int, width: int) -> tuple[int, dict]:
    """One stored example: the rendered arrays plus its id."""
    example = render.render_example(seed, split, index, height, width)
    example["id"] = f"{split}/{index:06d}"
    return index, example


class SyntheticScenes(tfds.core.GeneratorBasedBuilder):
    """Procedural indoor scenes (floor, walls, ceiling, 3-8 objects) with exact per-pixel ground truth."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        SyntheticScenesConfig(name="default", description="192x256, 2000 train / 500 test.",
                              height=192, width=256, num_train=2000, num_test=500),
        SyntheticScenesConfig(name="demo", description="96x128, 1000 train / 200 test (the built-in demo).",
                              height=96, width=128, num_train=1000, num_test=200),
        SyntheticScenesConfig(name="demo_large_test", description="96x128, `demo`'s 1000 train scenes and 1000 "
                              "test scenes (the first 200 are `demo`'s): a 5x test set for tighter comparisons.",
                              height=96, width=128, num_train=1000, num_test=1000),
        SyntheticScenesConfig(name="demo_pretrain", description="96x128, 2000 train / 200 test from another seed: "
                              "scenes disjoint from `demo`'s, to pretrain a shared encoder start on.",
                              height=96, width=128, num_train=2000, num_test=200, seed=1),
        SyntheticScenesConfig(name="tiny", description="48x64, 24 train / 8 test (tests, smoke runs).",
                              height=48, width=64, num_train=24, num_test=8),
    ]
    DEFAULT_CONFIG_NAME = "default"

    def _info(self) -> tfds.core.DatasetInfo:
        height, width = self.builder_config.height, self.builder_config.width
        zlib = tfds.features.Encoding.ZLIB
        features = tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(height, width, 3), dtype=np.uint8),
            "segmentation": tfds.features.Tensor(shape=(height, width), dtype=np.uint8, encoding=zlib),
            "depth": tfds.features.Tensor(shape=(height, width, 1), dtype=np.float32, encoding=zlib),
            "normal": tfds.features.Tensor(shape=(height, width, 3), dtype=np.float32, encoding=zlib),
            "id": tfds.features.Text(),
        })
        metadata = tfds.core.MetadataDict(num_classes=len(render.CLASS_NAMES), class_names=list(render.CLASS_NAMES),
                                          tasks=list(TASK_NAMES))
        return tfds.core.DatasetInfo(builder=self, description=__doc__.splitlines()[0], features=features,
                                     metadata=metadata, disable_shuffling=True, homepage=None)

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download.
        config = self.builder_config
        return {"train": self._generate_examples("train", config.num_train),
                "test": self._generate_examples("test", config.num_test)}

    def _generate_examples(self, split: str, num_examples: int):
        config = self.builder_config
        render_one = functools.partial(_render_record, seed=config.seed, split=split, height=config.height,
                                       width=config.width)
        processes = _num_processes(num_examples)
        if processes == 1:
            yield from map(render_one, range(num_examples))
            return
        # spawn: the caller may have started JAX or other threads, which fork does not survive.
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(processes, mp_context=context) as pool:
            yield from pool.map(render_one, range(num_examples), chunksize=16)
