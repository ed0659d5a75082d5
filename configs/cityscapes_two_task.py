r"""Cityscapes, two tasks (mtan's 128x256 release: 7-class segmentation + depth) with the paper's own recipe, as
configs/nyuv2_three_task.py does for mtan's NYUv2: MobileNetV2 U-shape, SGD lr 0.01 poly, batch 12, 40k steps.
Build `cityscapes/mtan` first (datasets/cityscapes/), then:

  python run.py --config=configs/cityscapes_two_task.py --workdir=workdirs/city_auxi_all \
    --config.model.encoder_init=/data/weights/mobilenet_v2-b0353104.pth
  python run.py --config=configs/cityscapes_two_task.py:strategy=joint --workdir=workdirs/city_joint \
    --config.model.encoder_init=/data/weights/mobilenet_v2-b0353104.pth

Strategies: single:<task>, joint, kendall, deep_supervision[:<task>], prior:<workdir>, auxi:<task>, auxi_all
(default), auxi_nas:<genotype.json>; any decoder/encoder variant (e.g. `encoder=resnet50,decoder=deeplab`).

The paper (Sec. 4.1) has no Cityscapes experiment; its recipe carries over from configs/common.py (SGD momentum 0.9,
lr 0.01, poly 0.9, weight decay 1e-4, batch 12, ImageNet normalisation, ImageNet-pretrained encoder) with the
length of configs/nyuv2_three_task.py (40,000 steps, about 161 epochs of the 2975 training images; evaluated every
5,000). Two changes to the augmentation: crops are the full 128x256 image (the release's size), and there is no
random rescale (scale_range (1, 1)): mtan's Cityscapes depth is disparity-like (larger = closer;
datasets/cityscapes/), and the rescale divides depth by the zoom factor, which is right for metric depth and wrong
for disparity. Horizontal flips stay.
"""

from auxmtl_configs import common
from auxmtl_jax import variants


def get_config(arg=None):
    """The paper's recipe on mtan's Cityscapes; `arg` is a variant string (default strategy auxi_all)."""
    runlocal, arg = common.split_runlocal(arg)
    config = common.base_config()
    config.model.pretrained_required = True  # paper Sec. 4.1 trains from ImageNet weights
    config.tasks = ("segmentation", "depth")
    config.dataset.name = "cityscapes"
    config.dataset.config = "mtan"
    config.input.crop_size = (128, 256)
    config.input.scale_range = (1.0, 1.0)  # depth is disparity-like: the rescale's depth / s would be wrong
    config.model.decoder = "ushape"
    config.num_train_steps = 40_000
    config.eval_every_steps = 5_000
    variants.apply_strategy(config, "auxi_all")
    if runlocal:
        common.make_runlocal(config)
    return variants.apply_variant(config, arg)
