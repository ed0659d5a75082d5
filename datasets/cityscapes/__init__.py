"""Cityscapes TFDS builder (`cityscapes`, mtan / LibMTL preprocessed layout); importing this package registers it
with TFDS."""

from auxmtl_datasets.cityscapes.cityscapes_dataset_builder import Cityscapes, CityscapesConfig

__all__ = ["Cityscapes", "CityscapesConfig"]
