"""`python -m auxmtl_datasets.nyu_v2 --config labeled13 --manual_dir DIR [--data_dir DIR]` builds NYUv2."""

from auxmtl_datasets.nyu_v2 import NyuV2
from auxmtl_datasets.nyu_v2.builder_support import build_main

if __name__ == "__main__":
    build_main(NyuV2)
