r"""NYUD-v2, segmentation (40 classes) + depth (paper Sec. 4.2–4.5), 30k steps, lr 0.01.

Build the dataset first (see datasets/nyu_v2/), then:

  python run.py --config=configs/nyuv2_two_task.py --workdir=workdirs/nyu_auxi_all
  python run.py --config=configs/nyuv2_two_task.py:strategy=joint,decoder=baseline --workdir=workdirs/nyu_joint
  python run.py --config=configs/nyuv2_two_task.py:strategy=auxi:depth,decoder=context --workdir=workdirs/nyu_a2
  python run.py --config=configs/nyuv2_two_task.py:strategy=joint,encoder=resnet50 --workdir=workdirs/nyu_r50

Decoders: baseline | context | ushape (default) | ocnet. Encoders: mobilenet_v2 (default) | resnet50 (paper
Table 3; its decoder defaults to ocnet, OCNet's base object-context head at stride 8, as in the paper).
Every run needs --config.model.encoder_init=<ImageNet weight file> (or =scratch): the paper starts from ImageNet.
"""

from auxmtl_configs import common
from auxmtl_jax import variants


def get_config(arg=None):
    """Paper Sec. 4.2–4.5 setting; `arg` is a variant string (default strategy auxi_all)."""
    runlocal, arg = common.split_runlocal(arg)
    config = common.base_config()
    config.model.pretrained_required = True  # paper Sec. 4.1 trains from ImageNet weights
    config.tasks = ("segmentation", "depth")
    config.dataset.name = "nyu_v2"
    config.dataset.config = "labeled40"
    config.model.decoder = "ushape"
    config.num_train_steps = 30_000
    config.eval_every_steps = 5_000
    variants.apply_strategy(config, "auxi_all")
    if runlocal:
        common.make_runlocal(config)
    variants.apply_variant(config, arg)
    if variants.parse_variant(arg).get("encoder") == "resnet50" and "decoder" not in variants.parse_variant(arg):
        config.model.decoder = "ocnet"  # paper Sec. 4.5 / Table 3: ResNet-50 with OCNet task decoders
    return config
