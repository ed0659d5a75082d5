"""SUN RGB-D TFDS builder (`sunrgbd`); importing this package registers it with TFDS."""

from auxmtl_datasets.sunrgbd.sunrgbd_dataset_builder import Sunrgbd, SunrgbdConfig

__all__ = ["Sunrgbd", "SunrgbdConfig"]
