"""TFDS builders shipped with auxmtl_jax (importable as `auxmtl_datasets`)."""
