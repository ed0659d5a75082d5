"""Maps the top-level folders `datasets/` (TFDS builders) and `configs/` to the packages `auxmtl_datasets` and
`auxmtl_configs`, so builders and config helpers import the same way from anywhere."""

import setuptools

MAPPED = {"datasets": "auxmtl_datasets", "configs": "auxmtl_configs"}


def mapped_packages(folder: str, package: str) -> list[str]:
    found = setuptools.find_packages(where=".", include=[folder, f"{folder}.*"])
    return [package + name[len(folder):] for name in found]


setuptools.setup(
    packages=setuptools.find_packages(include=["auxmtl_jax", "auxmtl_jax.*"])
    + [name for folder, package in MAPPED.items() for name in mapped_packages(folder, package)],
    package_dir={package: folder for folder, package in MAPPED.items()},
)
