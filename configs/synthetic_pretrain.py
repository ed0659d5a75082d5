r"""The synthetic benchmark's shared encoder start: its stand-in for the paper's ImageNet-pretrained encoder.

Joint training of segmentation, depth and normals on `synthetic_scenes/demo_pretrain` (2000 scenes rendered from
another seed, none of them in `demo`), Baseline decoder, 1500 steps, at the demo's network and crop size. Its
encoder then starts every run of an experiment (decoders and aux modules start fresh):

  python run.py --config=configs/synthetic_pretrain.py --workdir=workdirs/encoder_start
  python -m auxmtl_jax.experiments strategies --workdir=workdirs/exp_strategies_pretrained \
    --set model.encoder_init=workdirs/encoder_start

`runlocal` is the smoke size (the `tiny` scenes, a few steps).
"""

from auxmtl_configs import common, synthetic_three_task
from auxmtl_jax import variants


def get_config(arg=None):
    """Pretraining config; `arg` may be `runlocal`."""
    runlocal, arg = common.split_runlocal(arg)
    config = synthetic_three_task.get_config("runlocal" if runlocal else None)
    variants.apply_variant(config, "strategy=joint,decoder=baseline")
    config.runs = None
    config.name = "encoder_start"
    config.analysis.figures = False
    config.analysis.grad_log_every_steps = 0
    if not runlocal:
        config.dataset.config = "demo_pretrain"
        config.num_train_steps = config.eval_every_steps = 1500
        config.checkpoint_every_steps = 500
    return variants.apply_variant(config, arg)
