"""NYU Depth v2 TFDS builder (`nyu_v2`); importing this package registers it with TFDS."""

from auxmtl_datasets.nyu_v2.nyu_v2_dataset_builder import NyuV2, NyuV2Config

__all__ = ["NyuV2", "NyuV2Config"]
