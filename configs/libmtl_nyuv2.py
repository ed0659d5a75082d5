r"""LibMTL's NYUv2 protocol (the "HPS + EW" row of its NYUv2 table is `strategy=joint`): mtan's NYUv2 (288x384,
13 classes + depth + normals), a dilated ResNet-50 (output stride 8) shared by a DeepLab (ASPP) head per task,
Adam lr 1e-4 with weight decay 1e-5, lr x0.5 every 100 epochs, 200 epochs at batch 8.

Build `nyu_v2/mtan` from the preprocessed .npy folders (datasets/nyu_v2/), then, with the ImageNet ResNet-50 that
LibMTL loads (torchvision's resnet50-19c8e357.pth; or any torchvision/timm ResNet-50 file,
docs/pretrained_and_inference.md):

  python run.py --config=configs/libmtl_nyuv2.py:strategy=joint --workdir=workdirs/libmtl_nyu_joint \
    --config.model.encoder_init=/data/weights/resnet50-19c8e357.pth
  python run.py --config=configs/libmtl_nyuv2.py --workdir=workdirs/libmtl_nyu_auxi_all \
    --config.model.encoder_init=/data/weights/resnet50-19c8e357.pth

Every strategy (single:<task>, joint, kendall, deep_supervision, prior:<workdir>, auxi:<task>, auxi_all (default),
auxi_nas:<genotype.json>), `weighting=<method>` and the aux-module keys compose with it; `runlocal` shrinks it to a
CPU smoke test (from scratch, width 0.25, 2 steps, the lr halved after step 1 so the step schedule shows).

Sources (median-research-group/LibMTL at 4336804, 2025-05-14) of every setting:
- data: examples/nyu/create_dataset.py reads the mtan .npy release (`train/` 795 and `val/` 654 images, 288x384,
  image floats in [0, 1] not normalised) -> dataset `nyu_v2`/`mtan` (`train`, `test` = mtan's val), and
  input.mean = (0, 0, 0), input.std = (255, 255, 255): our uint8 image / 255 is their float image (to 8 bits).
- augmentation: examples/nyu/main.py `--aug` defaults to False -> full 288x384 images, no flip, no rescale
  (input.crop_size = (288, 384), scale_range = (1, 1), flip = False: exactly no augmentation). Their `--aug`
  (create_dataset.py RandomScaleCrop: zoom by s in {1.0, 1.2, 1.5} with depth / s, then a flip) is approximated by
  `--config.input.scale_range='(1.0, 1.5)' --config.input.flip=True` (a continuous s, not the three values).
- model: examples/nyu/main.py `resnet_dilated('resnet50')` (LibMTL/model/resnet_dilated.py, dilate_scale=8: layer3
  dilation 2, layer4 dilation 4, each stage's first block at the previous dilation, strided convs at stride 1, as
  our `resnet50` at output_stride 8) and `DeepLabHead(2048, C)` per task (examples/nyu/aspp.py) -> decoder
  `deeplab` (ASPP 12/24/36 + pooling, 256 wide, Dropout(0.5); 3x3 conv+BN+ReLU; 1x1). HPS = one shared encoder
  (LibMTL/architecture/HPS.py). Pretrained: resnet_dilated(pretrained=True), LibMTL/model/resnet.py loads
  torchvision's resnet50-19c8e357.pth -> model.pretrained_required.
- size: 71,888,721 parameters in `main` (ResNet-50 without fc 23,508,032 + DeepLab heads 16,128,781 (13 classes)
  + 16,125,697 (depth) + 16,126,211 (normals)); the same count as LibMTL's model (its BN weight and bias are
  parameters, running statistics buffers; ours are params and batch_stats).
- optimiser: LibMTL/config.py defaults `--optim adam --lr 1e-4 --weight_decay 1e-5` (torch.optim.Adam, coupled
  L2; LibMTL/trainer.py `_prepare_optimizer`) -> optimizer.name = 'adam'. Weighting `--weighting EW`
  (LibMTL/weighting/EW.py: the plain sum of the task losses) = our `equal`.
- schedule: the README's command passes `--scheduler step`; config.py `--step_size 100 --gamma 0.5`, StepLR stepped
  once per epoch (trainer.py `train_singlelevel`) -> schedule 'step', step_factor 0.5, step_every_steps =
  100 epochs x 99 steps = 9,900.
- length: `--epochs 200`, `--train_bs 8`, DataLoader(drop_last=True, shuffle=True) -> 795 // 8 = 99 steps per
  epoch, num_train_steps = 200 x 99 = 19,800; `--test_bs 8` -> eval_batch_size 8.
- evaluation: LibMTL tests after every epoch (trainer.py) -> eval_every_steps = 99 (one epoch: 654 images, about a
  second on one GPU, small next to the epoch's training).
- seed: LibMTL/config.py `--seed 0` -> seed 0.

What differs from LibMTL (docs/configs.md "LibMTL protocol"): predictions are upsampled bilinearly with
half-pixel centres (their examples/nyu/main.py `process_preds`: align_corners=True); depth leaves the head through
softplus and normals are unit-normalised in the network (theirs: raw depth; normals normalised inside the loss and
metric, examples/nyu/utils.py, so the normal loss is the same); decoder convs start from Kaiming-normal (fan_out)
where torch's default is Kaiming-uniform(a=sqrt(5)); the data order and dropout masks are ours; LibMTL reports the
best test epoch (LibMTL/_record.py), ours what `config.evaluation` says.
"""

from auxmtl_configs import common
from auxmtl_jax import variants

NYUV2_TRAIN_IMAGES = 795  # mtan's train/ folder (LibMTL examples/nyu/README.md)
BATCH_SIZE = 8  # examples/nyu/main.py --train_bs
EPOCHS = 200  # examples/nyu/main.py --epochs
STEPS_PER_EPOCH = NYUV2_TRAIN_IMAGES // BATCH_SIZE  # DataLoader(drop_last=True): 99


def apply_libmtl_protocol(config, *, train_images: int, batch_size: int, eval_batch_size: int):
    """LibMTL's model, optimiser and schedule (shared with configs/libmtl_cityscapes.py); epochs -> steps."""
    steps_per_epoch = train_images // batch_size  # DataLoader(drop_last=True)
    config.model.pretrained_required = True  # resnet_dilated('resnet50') loads ImageNet weights
    config.model.encoder = "resnet50"
    config.model.decoder = "deeplab"
    config.model.output_stride = 8  # resnet_dilated(dilate_scale=8)
    config.input.scale_range = (1.0, 1.0)  # no augmentation (NYUv2: --aug defaults to False; Cityscapes: none)
    config.input.flip = False
    config.input.mean = (0.0, 0.0, 0.0)  # LibMTL feeds the [0, 1] images of the .npy files unnormalised
    config.input.std = (255.0, 255.0, 255.0)
    config.optimizer.name = "adam"
    config.optimizer.learning_rate = 1e-4
    config.optimizer.weight_decay = 1e-5
    config.optimizer.schedule = "step"
    config.optimizer.step_every_steps = 100 * steps_per_epoch  # StepLR(step_size=100 epochs, gamma=0.5)
    config.optimizer.step_factor = 0.5
    config.optimizer.warmup_steps = 0
    config.batch_size = batch_size
    config.eval_batch_size = eval_batch_size
    config.num_train_steps = EPOCHS * steps_per_epoch
    config.eval_every_steps = steps_per_epoch  # LibMTL tests after every epoch
    config.seed = 0
    return config


def shrink(config):
    """`runlocal`: the common tiny size, with the step schedule's boundary after the first step."""
    common.make_runlocal(config)
    config.optimizer.step_every_steps = 1
    return config


def get_config(arg=None):
    """LibMTL's NYUv2 protocol; `arg` is a variant string (default strategy auxi_all; `strategy=joint` = HPS + EW)."""
    runlocal, arg = common.split_runlocal(arg)
    config = common.base_config()
    config.dataset.name = "nyu_v2"
    config.dataset.config = "mtan"
    config.input.crop_size = (288, 384)
    apply_libmtl_protocol(config, train_images=NYUV2_TRAIN_IMAGES, batch_size=BATCH_SIZE, eval_batch_size=8)
    variants.apply_strategy(config, "auxi_all")
    if runlocal:
        shrink(config)
    return variants.apply_variant(config, arg)
