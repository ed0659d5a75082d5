"""Built-in procedural indoor-scene dataset; importing this package registers the TFDS builder `synthetic_scenes`."""

from auxmtl_datasets.synthetic_scenes.builder import SyntheticScenes, SyntheticScenesConfig

__all__ = ["SyntheticScenes", "SyntheticScenesConfig"]
