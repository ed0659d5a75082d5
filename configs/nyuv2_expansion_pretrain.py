r"""Stage 1 of the paper's NYUv2 recipe (Sec. 4.1): pre-train on NYUD-v2-expansion (segmentation 40 classes +
depth), 40k iterations at lr 0.01 with poly decay. Stage 2 is `configs/nyuv2_finetune.py`.

Build `nyu_v2/expansion40` first (datasets/nyu_v2/), then, for one strategy (default auxi_all):

  python run.py --config=configs/nyuv2_expansion_pretrain.py --workdir=workdirs/nyu_pretrain_auxi_all \
    --config.model.encoder_init=mobilenet_v2_imagenet.npz
  python run.py --config=configs/nyuv2_finetune.py:from=workdirs/nyu_pretrain_auxi_all \
    --workdir=workdirs/nyu_finetune_auxi_all

The expansion frames have only a `train` split: the last 5% of it is held out for the evaluations of this stage
(coarse labels; the paper's numbers come from the fine-tuned model on the labeled test split).
"""

from auxmtl_configs import common
from auxmtl_configs import nyuv2_two_task


def get_config(arg=None):
    """NYUv2 two-task setting on the expansion frames; `arg` is a variant string as for nyuv2_two_task."""
    config = nyuv2_two_task.get_config(arg)
    config.name = f"pretrain_{config.name}"
    config.dataset.config = "expansion40"
    config.dataset.train_split = "train[:95%]"
    config.dataset.eval_split = "train[95%:]"
    if not common.split_runlocal(arg)[0]:
        config.num_train_steps = 40_000
        config.eval_every_steps = 10_000
    config.optimizer.learning_rate = 0.01
    config.optimizer.schedule = "poly"
    return config
