"""Input pipeline: TFDS array_record datasets read with grain, the paper's augmentation, per-host batches.

Batch contract (see ARCHITECTURE.md): `image` uint8 [B,H,W,3] (0-255, normalised on the device by
`augment.model_input` inside the jitted steps; float32 normalised on the host when config.input.mean/std are not
`augment.IMAGE_MEAN`/`IMAGE_STD`), `segmentation` int32 [B,H,W] with 255 = ignore, `depth` float32 [B,H,W,1]
metres with 0 = invalid, `normal` float32 [B,H,W,3] with all-zero = invalid; only the requested tasks are present.
Threads and worker processes are sized from the host's cores unless the config says (`input_sizing`).

Training batches form an infinite grain `MapDataset` indexed by batch number: shuffled per epoch, each example
augmented with a generator seeded by (seed, global example index), host `p` of `P` taking every P-th example of
each global batch. The iterator state is therefore just the next batch number, which makes resuming exact and
independent of the worker count.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import logging
import math
import os
import pathlib
import shutil
import tempfile
from typing import TYPE_CHECKING, Any, Iterator, NamedTuple, Sequence

import jax
import numpy as np
from absl import flags

from auxmtl_jax import errors, input_sizing
from auxmtl_jax.augment import EvalTransform, TrainTransform
from auxmtl_jax.errors import MissingInputError, UserError
from auxmtl_jax.tasks import TASK_NAMES

if TYPE_CHECKING:  # imported where used, so that the models and the train step import without grain and TFDS
    import grain
    import tensorflow_datasets as tfds

log = logging.getLogger("auxmtl_jax")
KNOWN_DATASETS = ("synthetic_scenes", "nyu_v2", "sunrgbd", "cityscapes")
_STATE_VERSION = 1


class DatasetInfo(NamedTuple):
    """What the model and the metrics need to know about a prepared dataset."""

    name: str
    num_classes: int
    class_names: tuple[str, ...]
    tasks: tuple[str, ...]
    splits: dict[str, int]
    image_size: tuple[int, int]


def build_command(dataset_cfg) -> str:
    """The shell command that prepares the configured dataset (the `tfds` CLI needs TensorFlow; this does not)."""
    parts = ["python -m auxmtl_jax.input_pipeline", f"--dataset={dataset_cfg.name}"]
    for field in ("config", "data_dir", "manual_dir"):
        value = getattr(dataset_cfg, field, None)
        if value:
            parts.append(f"--{field}={value}")
    return " ".join(parts)


def get_builder(dataset_cfg) -> tfds.core.DatasetBuilder:
    """Imports `auxmtl_datasets.<name>` (which registers the builder) and returns the configured TFDS builder."""
    import tensorflow_datasets as tfds
    name = dataset_cfg.name
    if name not in KNOWN_DATASETS:
        raise UserError(f"Unknown dataset.name {name!r}; expected one of {', '.join(KNOWN_DATASETS)}.")
    try:
        importlib.import_module(f"auxmtl_datasets.{name}")
    except ModuleNotFoundError as error:
        raise UserError(f"dataset.name {name!r}: its builder module auxmtl_datasets.{name} cannot be imported "
                         f"({error}). Known datasets: {', '.join(KNOWN_DATASETS)}.") from error
    kwargs = {"data_dir": os.path.expanduser(dataset_cfg.data_dir) if dataset_cfg.data_dir else None}
    if dataset_cfg.config:
        kwargs["config"] = dataset_cfg.config
    try:
        return tfds.builder(name, **kwargs)
    except ValueError as error:
        raise UserError(f"dataset {name!r} with config {dataset_cfg.config!r}: {error}") from error


def _created_by_build(builder) -> list:
    """Directories a build of `builder` would create, deepest first (those that do not exist yet)."""
    missing, path = [], builder.data_path
    root = builder.data_dir_root
    while path != root and path != path.parent and not path.exists():
        missing.append(path)
        path = path.parent
    return missing


BUILD_LOCK = ".build.lock"
DOWNLOADS_PREFIX = ".downloads."
TFDS_INCOMPLETE_PREFIX = "incomplete."


@contextlib.contextmanager
def _exclusive_build(config_dir: pathlib.Path):
    """Holds an exclusive lock on a dataset config's folder and removes what killed builds left in it.

    Under the lock no other build of this config runs, so TFDS `incomplete.*` folders and our `.downloads.*`
    folders found there belong to builds that died (a SIGKILL skips every cleanup).
    """
    config_dir.mkdir(parents=True, exist_ok=True)
    with open(config_dir / BUILD_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            for leftover in config_dir.iterdir():
                if leftover.is_dir() and leftover.name.startswith((TFDS_INCOMPLETE_PREFIX, DOWNLOADS_PREFIX)):
                    log.info("removing %s, left by an interrupted build", leftover)
                    shutil.rmtree(leftover, ignore_errors=True)
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def prepare_dataset(dataset_cfg) -> None:
    """Builds the dataset if it is missing and `dataset_cfg.prepare`, else raises saying how to build it.

    A failed build removes everything it created; what a killed build left is removed by the next build.
    Concurrent builds of one config on a local disk (several hosts or processes) take turns.
    """
    import tensorflow_datasets as tfds
    builder = get_builder(dataset_cfg)
    if builder.is_prepared():
        return
    if not dataset_cfg.prepare:
        raise MissingInputError(
            f"Dataset {dataset_cfg.name!r} (config {builder.builder_config.name if builder.builder_config else None!r})"
            f" is not prepared under {builder.data_path}. Build it with\n  {build_command(dataset_cfg)}\n"
            f"or set dataset.prepare=True to build it on first use.")
    if not dataset_cfg.manual_dir and hasattr(builder, "missing_manual_dir_message"):
        raise UserError(builder.missing_manual_dir_message())
    created = _created_by_build(builder)
    config_dir = pathlib.Path(os.fspath(builder.data_path)).parent
    from auxmtl_jax import workdir as workdir_lib  # only a build needs it

    with errors.about("config.dataset.data_dir"):
        workdir_lib.check_output_dir(config_dir, "the folder the build writes")
    try:
        with _exclusive_build(config_dir):
            builder = get_builder(dataset_cfg)
            if builder.is_prepared():  # another process built it while we waited for the lock
                return
            download_dir = pathlib.Path(tempfile.mkdtemp(prefix=DOWNLOADS_PREFIX, dir=config_dir))
            try:
                builder.download_and_prepare(
                    file_format="array_record", download_dir=os.fspath(download_dir),
                    download_config=tfds.download.DownloadConfig(manual_dir=dataset_cfg.manual_dir))
            finally:
                shutil.rmtree(download_dir, ignore_errors=True)
    except BaseException:
        for path in created:
            shutil.rmtree(path, ignore_errors=True)
        raise


def dataset_info(dataset_cfg) -> DatasetInfo:
    """Classes, tasks, split sizes (empty until prepared) and stored image size of the configured dataset."""
    builder = get_builder(dataset_cfg)
    info = builder.info
    metadata = info.metadata or {}
    for key in ("num_classes", "class_names", "tasks"):
        if key not in metadata:
            raise UserError(f"Dataset {dataset_cfg.name!r}: info.metadata lacks {key!r} (has {sorted(metadata)}).")
    image_shape = info.features["image"].shape
    if len(image_shape) != 3 or image_shape[0] is None or image_shape[1] is None:
        raise UserError(f"Dataset {dataset_cfg.name!r}: feature 'image' has shape {image_shape}; "
                         f"expected a fixed (H, W, 3).")
    splits = {name: split.num_examples for name, split in info.splits.items()} if builder.is_prepared() else {}
    return DatasetInfo(name=dataset_cfg.name, num_classes=int(metadata["num_classes"]),
                       class_names=tuple(metadata["class_names"]), tasks=tuple(metadata["tasks"]),
                       splits=splits, image_size=(int(image_shape[0]), int(image_shape[1])))


def check_tasks(info: DatasetInfo, tasks: Sequence[str]) -> tuple[str, ...]:
    """Returns `tasks` as a tuple, raising ValueError for any task unknown or not provided by the dataset."""
    for task in tasks:
        if task not in TASK_NAMES:
            raise UserError(f"Unknown task {task!r}; expected one of {TASK_NAMES}.")
        if task not in info.tasks:
            raise UserError(f"Dataset {info.name!r} has no task {task!r}; it provides {list(info.tasks)}.")
    return tuple(tasks)


def check_splits(dataset_cfg) -> None:
    """The config's train and eval splits (slices such as 'train[:95%]' included) exist in the prepared dataset."""
    for key in ("train_split", "eval_split", "validation_split"):
        split = getattr(dataset_cfg, key, None)
        if split is None and key == "validation_split":
            continue
        source = _data_source(dataset_cfg, split, what=f"config.dataset.{key}")
        try:
            count = len(source)
        except ValueError:  # TFDS gives a reversed slice ('test[5:2]') a negative length
            count = 0
        if count == 0:
            raise UserError(f"config.dataset.{key}={split!r} selects no examples of dataset {dataset_cfg.name!r}; "
                            "expected a non-empty split.")


def split_size(dataset_cfg, split: str) -> int:
    """The number of examples `split` (a slice such as 'train[:95%]' included) selects of the prepared dataset."""
    return len(_data_source(dataset_cfg, split))


def _data_source(dataset_cfg, split: str, what: str = "split"):
    """Random-access source for `split` of a prepared dataset (split slicing such as 'train[:90%]' allowed)."""
    builder = get_builder(dataset_cfg)
    if not builder.is_prepared():
        prepare_dataset(dataset_cfg)
    expected = f"expected one of {', '.join(sorted(builder.info.splits))}, optionally sliced ('train[:90%]')"
    if split.split("[")[0] not in builder.info.splits:
        raise UserError(f"{what}={split!r}: dataset {dataset_cfg.name!r} has no such split; {expected}.")
    try:
        return builder.as_data_source(split=split)
    except (ValueError, AssertionError) as error:  # TFDS's split-slice parser
        raise UserError(f"{what}={split!r} is not a valid split of dataset {dataset_cfg.name!r} ({error}); "
                        f"{expected}.") from None




def _host_layout(global_batch_size: int, process_index: int | None, process_count: int | None):
    """(process_index, process_count, per-host batch size), checking that the batch splits evenly."""
    process_index = jax.process_index() if process_index is None else int(process_index)
    process_count = jax.process_count() if process_count is None else int(process_count)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, process_count={process_count}).")
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(f"Global batch size {global_batch_size} must be a positive multiple of the process "
                         f"count {process_count}.")
    return process_index, process_count, global_batch_size // process_count


def _read_options(sizing: input_sizing.Sizing) -> grain.ReadOptions:
    """Thread prefetch inside one process: a batch per thread in flight, never hundreds (batches are large)."""
    import grain
    return grain.ReadOptions(num_threads=sizing.num_threads, prefetch_buffer_size=sizing.prefetch)


class TrainIterator:
    """Infinite iterator over this host's training batches; `get_state`/`set_state` resume exactly."""

    def __init__(self, batches: grain.MapDataset, sizing: input_sizing.Sizing, fingerprint: dict[str, Any]):
        self._batches, self.sizing, self._fingerprint = batches, sizing, fingerprint
        self._next_batch, self._iterator = 0, None

    def _start(self) -> None:
        import grain
        dataset = self._batches[self._next_batch:].to_iter_dataset(_read_options(self.sizing))
        if self.sizing.num_workers > 0:
            if not flags.FLAGS.is_parsed():
                flags.FLAGS.mark_as_parsed()  # grain's worker start reads absl flags; outside an absl app use defaults.
            dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.sizing.num_workers,
                                                                       per_worker_buffer_size=2))
        self._iterator = iter(dataset)

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._iterator is None:
            self._start()
        batch = next(self._iterator)
        self._next_batch += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable position: the number of batches already yielded plus the pipeline's identity."""
        return {"version": _STATE_VERSION, "next_batch": self._next_batch, **self._fingerprint}

    def set_state(self, state: dict[str, Any]) -> None:
        """Continues from a `get_state()` result of an iterator built with the same dataset, seed and batch."""
        expected = {"version": _STATE_VERSION, **self._fingerprint}
        for key, value in expected.items():
            if key not in state:
                raise UserError(f"Input iterator state lacks {key!r}; got keys {sorted(state)}.")
            if state[key] != value and list(np.atleast_1d(state[key])) != list(np.atleast_1d(value)):
                raise UserError(f"Input iterator state has {key}={state[key]!r} but this pipeline has {value!r}; "
                                 f"it was saved by a run with different data settings.")
        next_batch = state.get("next_batch")
        if not isinstance(next_batch, (int, np.integer)) or next_batch < 0:
            raise UserError(f"Input iterator state has next_batch={next_batch!r}; expected an int >= 0.")
        self.close()
        self._next_batch = int(next_batch)

    def close(self) -> None:
        """Stops worker processes, if any; iteration restarts lazily at the current position."""
        if self._iterator is not None and hasattr(self._iterator, "close"):
            self._iterator.close()
        self._iterator = None


def _derived_seeds(seed: int) -> tuple[int, int]:
    shuffle_seed, augment_seed = np.random.SeedSequence(int(seed)).generate_state(2)
    return int(shuffle_seed), int(augment_seed)


def create_train_iterator(dataset_cfg, input_cfg, *, tasks, global_batch_size, seed,
                          process_index: int | None = None, process_count: int | None = None) -> TrainIterator:
    """Infinite, deterministic, resumable iterator over this host's share of each global training batch; threads
    and workers from `input_sizing.resolve(input_cfg)` (the batches do not depend on them)."""
    import grain
    sizing = input_sizing.resolve(input_cfg)
    info = dataset_info(dataset_cfg)
    tasks = check_tasks(info, tasks)
    process_index, process_count, local_batch = _host_layout(global_batch_size, process_index, process_count)
    source = _data_source(dataset_cfg, dataset_cfg.train_split)
    if len(source) == 0:
        raise UserError(f"Split {dataset_cfg.train_split!r} of dataset {dataset_cfg.name!r} is empty.")
    transform = TrainTransform(tasks, input_cfg.crop_size, input_cfg.scale_range, input_cfg.flip,
                               input_cfg.mean, input_cfg.std)
    shuffle_seed, augment_seed = _derived_seeds(seed)
    examples = grain.MapDataset.source(source).shuffle(seed=shuffle_seed).repeat(None)
    examples = examples.random_map(transform, seed=augment_seed)
    batches = examples[process_index::process_count].batch(local_batch, drop_remainder=True)
    fingerprint = {"dataset": dataset_cfg.name, "split": dataset_cfg.train_split, "seed": int(seed),
                   "global_batch_size": int(global_batch_size), "process_index": process_index,
                   "process_count": process_count, "num_examples": len(source)}
    log.info("input pipeline: %d worker processes, %d threads each, %s images on the wire", sizing.num_workers,
             sizing.num_threads, "uint8" if transform.uint8 else "float32 (host-normalised)")
    return TrainIterator(batches, sizing, fingerprint)


class EvalDataset:
    """Re-iterable evaluation batches for this host; the last global batch is padded with invalid examples."""

    def __init__(self, source, transform: EvalTransform, global_batch_size: int, process_index: int,
                 process_count: int, sizing: input_sizing.Sizing | None = None):
        self._source, self._transform = source, transform
        self._sizing = sizing or input_sizing.resolve(None, in_process=True)
        self._global_batch_size, self._process_index, self._process_count = (global_batch_size, process_index,
                                                                             process_count)
        self.num_examples = len(source)

    def __len__(self) -> int:
        return math.ceil(self.num_examples / self._global_batch_size)

    def _example(self, index: int) -> dict[str, np.ndarray]:
        if index < self.num_examples:
            return self._transform(self._source[index])
        return self._transform.invalid_example()

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        import grain
        padded = grain.MapDataset.range(len(self) * self._global_batch_size)
        host = padded[self._process_index::self._process_count].map(self._example)
        batches = host.batch(self._global_batch_size // self._process_count)
        return iter(batches.to_iter_dataset(_read_options(self._sizing)))


def create_eval_dataset(dataset_cfg, input_cfg, *, tasks, global_batch_size,
                        process_index: int | None = None, process_count: int | None = None,
                        split: str | None = None) -> EvalDataset:
    """Deterministic full-image evaluation batches (no augmentation) of `split` (default: the config's eval split)
    for this host, `len()` = number of batches."""
    sizing = input_sizing.resolve(input_cfg, in_process=True)
    info = dataset_info(dataset_cfg)
    tasks = check_tasks(info, tasks)
    process_index, process_count, _ = _host_layout(global_batch_size, process_index, process_count)
    source = _data_source(dataset_cfg, split or dataset_cfg.eval_split)
    size = tuple(input_cfg.eval_size) if input_cfg.eval_size else info.image_size
    if len(size) != 2 or min(size) <= 0:
        raise UserError(f"input.eval_size must be (height, width) with positive entries, got {size!r}.")
    transform = EvalTransform(tasks, size, input_cfg.mean, input_cfg.std)
    return EvalDataset(source, transform, global_batch_size, process_index, process_count, sizing)


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: builds one dataset as array_record (atomically), then prints its split sizes. A bad input
    exits with status 1 and one `error: ...` line, leaving the data dir as it was."""
    import types

    parser = errors.ArgumentParser(prog="python -m auxmtl_jax.input_pipeline",
                                   description="Prepare an auxmtl_jax TFDS dataset (no TensorFlow needed).")
    parser.add_argument("--dataset", required=True, choices=KNOWN_DATASETS)
    parser.add_argument("--config", default=None, help="builder config name, e.g. demo / tiny / default")
    parser.add_argument("--data_dir", default=None, help="TFDS data dir (default ~/tensorflow_datasets)")
    parser.add_argument("--manual_dir", default=None, help="folder with the raw files the builder reads")
    args = parser.parse_args(argv)
    dataset_cfg = types.SimpleNamespace(name=args.dataset, config=args.config, data_dir=args.data_dir,
                                        manual_dir=args.manual_dir, prepare=True, train_split="train",
                                        eval_split="test")
    with errors.reported_as_one_line(args.verbose):
        prepare_dataset(dataset_cfg)
        info = dataset_info(dataset_cfg)
    print(f"{info.name} ({args.config or 'default config'}) ready in {get_builder(dataset_cfg).data_path}: "
          f"splits {info.splits}, image size {info.image_size}, tasks {list(info.tasks)}")


if __name__ == "__main__":
    main()
