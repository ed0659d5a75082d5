"""Maps the top-level `datasets/` folder (TFDS builders) to the importable package `auxmtl_datasets`."""

import setuptools

builders = setuptools.find_packages(where=".", include=["datasets", "datasets.*"])
setuptools.setup(
    packages=setuptools.find_packages(include=["auxmtl_jax", "auxmtl_jax.*"])
    + ["auxmtl_datasets" + name[len("datasets"):] for name in builders],
    package_dir={"auxmtl_datasets": "datasets"},
)
