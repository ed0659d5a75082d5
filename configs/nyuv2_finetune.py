r"""Stage 2 of the paper's NYUv2 recipe (Sec. 4.1): fine-tune a `configs/nyuv2_expansion_pretrain.py` run on
NYUD-v2 (labeled, 40 classes + depth) at a fixed lr of 1e-5 for 10k iterations.

The whole training state the fine-tune needs comes from the pre-trained run (`init_from.scope='all'`): `main`
and its aux modules (basic or Auxi-NAS cells) with their BN statistics, so an Auxi run fine-tunes with its aux
modules. Name the pre-trained workdir with `from=` and the same strategy it was trained with:

  python run.py --config=configs/nyuv2_finetune.py:from=workdirs/nyu_pretrain_auxi_all \
    --workdir=workdirs/nyu_finetune_auxi_all
  python run.py --config=configs/nyuv2_finetune.py:from=workdirs/nyu_pretrain_joint,strategy=joint \
    --workdir=workdirs/nyu_finetune_joint
  python run.py --workdir=workdirs/nyu_ft_nas \
    --config=configs/nyuv2_finetune.py:from=workdirs/pre_nas,strategy=auxi_nas:workdirs/pre_nas/aux_genotype.json
"""

from auxmtl_configs import common
from auxmtl_configs import nyuv2_two_task
from auxmtl_jax.errors import UserError

USAGE = "--config=configs/nyuv2_finetune.py:from=PRETRAINED_WORKDIR[,strategy=...]"


def get_config(arg=None):
    """Fine-tune setting; `arg` = 'from=<pre-trained workdir>' plus nyuv2_two_task's variant keys."""
    parts = [part for part in (arg or "").split(",") if part.strip()]
    sources = [part.partition("=")[2].strip() for part in parts if part.strip().startswith("from=")]
    if len(sources) != 1 or not sources[0]:
        raise UserError(f"configs/nyuv2_finetune.py needs exactly one pre-trained run: {USAGE} (got {arg!r})")
    rest = ",".join(part for part in parts if not part.strip().startswith("from=")) or None
    config = nyuv2_two_task.get_config(rest)
    config.name = f"finetune_{config.name}"
    config.init_from.path = sources[0]
    config.init_from.scope = "all"
    config.init_from.base_lr_scale = 1.0
    config.optimizer.schedule = "constant"
    config.optimizer.learning_rate = 1e-5
    config.optimizer.warmup_steps = 0
    if not common.split_runlocal(rest)[0]:
        config.num_train_steps = 10_000
        config.eval_every_steps = 5_000
    return config
