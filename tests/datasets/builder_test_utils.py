"""Helpers shared by the dataset-builder tests: build from a manual_dir, read records by id, check no leftovers."""

import os
import pathlib

import tensorflow_datasets as tfds


def build(builder_class, config, manual_dir, data_dir):
    """Builds `config` of `builder_class` from `manual_dir` into `data_dir` and returns the builder."""
    builder = builder_class(config=config, data_dir=os.fspath(data_dir))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir)))
    return builder


def records_by_id(source):
    """{id: record} for every record of a data source (ids come back as bytes)."""
    records = [source[i] for i in range(len(source))]
    return {record["id"].decode() if isinstance(record["id"], bytes) else record["id"]: record for record in records}


def assert_nothing_built(data_dir):
    leftovers = sorted(p.relative_to(data_dir).as_posix() for p in pathlib.Path(data_dir).rglob("*"))
    assert leftovers == [], f"a failed build left {leftovers}"
