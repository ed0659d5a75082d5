"""`python -m auxmtl_datasets.sunrgbd --config classes13 --manual_dir DIR [--data_dir DIR]` builds SUN RGB-D."""

from auxmtl_datasets.nyu_v2.builder_support import build_main
from auxmtl_datasets.sunrgbd import Sunrgbd

if __name__ == "__main__":
    build_main(Sunrgbd)
