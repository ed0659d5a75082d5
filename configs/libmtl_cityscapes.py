r"""LibMTL's Cityscapes protocol (the "HPS + EW" row of its Cityscapes table is `strategy=joint`): mtan's Cityscapes
(128x256, 7 classes + depth), a dilated ResNet-50 (output stride 8) shared by a DeepLab (ASPP) head per task,
Adam lr 1e-4 with weight decay 1e-5, lr x0.5 every 100 epochs, 200 epochs at batch 64.

Build `cityscapes/mtan` from the preprocessed .npy folders (datasets/cityscapes/), then, with the ImageNet ResNet-50
that LibMTL loads (torchvision's resnet50-19c8e357.pth; docs/pretrained_and_inference.md):

  python run.py --config=configs/libmtl_cityscapes.py:strategy=joint --workdir=workdirs/libmtl_city_joint \
    --config.model.encoder_init=/data/weights/resnet50-19c8e357.pth
  python run.py --config=configs/libmtl_cityscapes.py --workdir=workdirs/libmtl_city_auxi_all \
    --config.model.encoder_init=/data/weights/resnet50-19c8e357.pth

Every strategy (single:<task>, joint, kendall, deep_supervision, prior:<workdir>, auxi:<task>, auxi_all (default),
auxi_nas:<genotype.json>), `weighting=<method>` and the aux-module keys compose with it; `runlocal` shrinks it to a
CPU smoke test (from scratch, width 0.25, 2 steps, the lr halved after step 1).

Sources (median-research-group/LibMTL at 4336804, 2025-05-14); the model, optimiser and schedule are those of
configs/libmtl_nyuv2.py (same files: examples/cityscapes/main.py imports examples/nyu/aspp.py's DeepLabHead and
LibMTL/config.py's defaults):
- data: examples/cityscapes/create_dataset.py reads mtan's Cityscapes release (`train/` 2975, `val/` 500 images,
  128x256, image floats in [0, 1] not normalised, 7-class labels, depth) -> dataset `cityscapes`/`mtan` (`train`,
  `test` = mtan's val), tasks segmentation + depth, input.mean = (0, 0, 0), input.std = (255, 255, 255).
- augmentation: none (create_dataset.py has no augmentation) -> full 128x256 images, scale_range (1, 1), no flip.
- model: examples/cityscapes/main.py `resnet_dilated('resnet50')` + `DeepLabHead(2048, C)` per task (7 and 1) ->
  encoder `resnet50` at output_stride 8, decoder `deeplab`; 55,760,968 parameters in `main` (ResNet-50 without fc
  23,508,032 + DeepLab heads 16,127,239 (7 classes) + 16,125,697 (depth)).
- optimiser and schedule: LibMTL/config.py defaults (Adam, lr 1e-4, weight decay 1e-5; `--scheduler step` from the
  README's command with `--step_size 100 --gamma 0.5`, stepped per epoch).
- length: examples/cityscapes/main.py `--epochs 200`, `--train_bs 64` (its default, and the README's), DataLoader
  (drop_last=True) -> 2975 // 64 = 46 steps per epoch, num_train_steps = 200 x 46 = 9,200, step_every_steps =
  100 x 46 = 4,600; `--test_bs 64` -> eval_batch_size 64.
- evaluation: after every epoch (LibMTL/trainer.py) -> eval_every_steps = 46 (500 images at 128x256: well under a
  second on one GPU).

What differs from LibMTL: as for configs/libmtl_nyuv2.py (prediction upsampling with half-pixel centres instead of
align_corners=True, softplus on depth, decoder conv initialisation, data order and dropout masks, reporting). The
depth values are mtan's disparity-like maps (datasets/cityscapes/), trained and evaluated as stored, as LibMTL does.
"""

from auxmtl_configs import common
from auxmtl_configs import libmtl_nyuv2
from auxmtl_jax import variants

CITYSCAPES_TRAIN_IMAGES = 2975  # mtan's train/ folder (LibMTL examples/cityscapes/README.md)
BATCH_SIZE = 64  # examples/cityscapes/main.py --train_bs
STEPS_PER_EPOCH = CITYSCAPES_TRAIN_IMAGES // BATCH_SIZE  # DataLoader(drop_last=True): 46


def get_config(arg=None):
    """LibMTL's Cityscapes protocol; `arg` is a variant string (default strategy auxi_all; `strategy=joint` = HPS +
    EW)."""
    runlocal, arg = common.split_runlocal(arg)
    config = common.base_config()
    config.tasks = ("segmentation", "depth")
    config.dataset.name = "cityscapes"
    config.dataset.config = "mtan"
    config.input.crop_size = (128, 256)
    libmtl_nyuv2.apply_libmtl_protocol(config, train_images=CITYSCAPES_TRAIN_IMAGES, batch_size=BATCH_SIZE,
                                       eval_batch_size=64)
    variants.apply_strategy(config, "auxi_all")
    if runlocal:
        libmtl_nyuv2.shrink(config)
    return variants.apply_variant(config, arg)
