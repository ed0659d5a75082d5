r"""NYUv2 three tasks in the mtan layout (288x384, 13 classes + depth + normals), the benchmark other MTL libraries
(LibMTL, mtan, Nash-MTL) report on. Build `nyu_v2/mtan` from their preprocessed .npy folders first, then:

  python run.py --config=configs/nyuv2_three_task.py --workdir=workdirs/mtan_auxi_all \
    --config.model.encoder_init=/data/weights/mobilenet_v2-b0353104.pth
  python run.py --config=configs/nyuv2_three_task.py:strategy=joint --workdir=workdirs/mtan_joint \
    --config.model.encoder_init=scratch   # from scratch, on purpose
"""

from auxmtl_configs import common
from auxmtl_jax import variants


def get_config(arg=None):
    """mtan-layout NYUv2 setting; `arg` is a variant string (default strategy auxi_all)."""
    runlocal, arg = common.split_runlocal(arg)
    config = common.base_config()
    config.model.pretrained_required = True  # paper Sec. 4.1 trains from ImageNet weights
    config.dataset.name = "nyu_v2"
    config.dataset.config = "mtan"
    config.input.crop_size = (288, 384)
    config.model.decoder = "ushape"
    config.num_train_steps = 40_000
    config.eval_every_steps = 5_000
    variants.apply_strategy(config, "auxi_all")
    if runlocal:
        common.make_runlocal(config)
    return variants.apply_variant(config, arg)
