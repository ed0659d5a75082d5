r"""SUN RGB-D, three tasks (paper Sec. 4.6): MobileNetV2 U-shape, 13-class seg + depth + normals, 80k steps.

Build the dataset first (see datasets/sunrgbd/), then (ImageNet weights as in the paper; `=scratch` to train
the encoder from scratch on purpose):

  python run.py --config=configs/sunrgbd_three_task.py --workdir=workdirs/sunrgbd_auxi_all \
    --config.model.encoder_init=/data/weights/mobilenet_v2-b0353104.pth
  python run.py --config=configs/sunrgbd_three_task.py:strategy=joint --workdir=workdirs/sunrgbd_joint \
    --config.model.encoder_init=/data/weights/mobilenet_v2-b0353104.pth

Strategies: single:<task>, joint, kendall, deep_supervision[:<task>], prior:<workdir>, auxi:<task>, auxi_all
(default), auxi_nas:<genotype.json>; `prior=<workdir>` adds the Prior start to any of them.
"""

from auxmtl_configs import common
from auxmtl_jax import variants


def get_config(arg=None):
    """Paper Sec. 4.6 setting; `arg` is a variant string (default strategy auxi_all)."""
    runlocal, arg = common.split_runlocal(arg)
    config = common.base_config()
    config.model.pretrained_required = True  # paper Sec. 4.1 trains from ImageNet weights
    config.dataset.name = "sunrgbd"
    config.dataset.config = "classes13"
    config.model.decoder = "ushape"
    config.num_train_steps = 80_000
    config.eval_every_steps = 10_000
    variants.apply_strategy(config, "auxi_all")
    if runlocal:
        common.make_runlocal(config)
    return variants.apply_variant(config, arg)
