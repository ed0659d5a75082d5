"""`python -m auxmtl_datasets.cityscapes --config mtan --manual_dir DIR [--data_dir DIR]` builds Cityscapes."""

from auxmtl_datasets.cityscapes import Cityscapes
from auxmtl_datasets.nyu_v2.builder_support import build_main

if __name__ == "__main__":
    build_main(Cityscapes)
