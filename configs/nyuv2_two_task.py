r"""NYUD-v2, segmentation (40 classes) + depth (paper Sec. 4.2–4.5), 30k steps, lr 0.01.

Build the dataset first (see datasets/nyu_v2/), then:

  python run.py --config=configs/nyuv2_two_task.py --workdir=workdirs/nyu_auxi_all
  python run.py --config=configs/nyuv2_two_task.py:strategy=joint,decoder=baseline --workdir=workdirs/nyu_joint
  python run.py --config=configs/nyuv2_two_task.py:strategy=auxi:depth,decoder=context --workdir=workdirs/nyu_a2
  python run.py --config=configs/nyuv2_two_task.py:strategy=joint,encoder=resnet50 --workdir=workdirs/nyu_r50

Decoders: baseline | context | ushape (default). Encoders: mobilenet_v2 (default) | resnet50 (paper Table 3).
"""

from auxmtl_configs import common


def get_config(arg=None):
    """Paper Sec. 4.2–4.5 setting; `arg` is a variant string (default strategy auxi_all)."""
    runlocal, arg = common.split_runlocal(arg)
    config = common.base_config()
    config.tasks = ("segmentation", "depth")
    config.dataset.name = "nyu_v2"
    config.dataset.config = "labeled40"
    config.model.decoder = "ushape"
    config.num_train_steps = 30_000
    config.eval_every_steps = 5_000
    common.apply_strategy(config, "auxi_all")
    if runlocal:
        common.make_runlocal(config)
    return common.apply_variant(config, arg)
