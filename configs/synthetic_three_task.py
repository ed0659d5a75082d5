r"""Built-in demo: Joint vs Auxi-all on the procedurally rendered `synthetic_scenes` (seg + depth + normals).

Builds the dataset on first use (no download), trains both strategies, evaluates, prints the comparison table
and writes figures into the workdir. Under 10 minutes on a 2-core CPU.

  python run.py --config=configs/synthetic_three_task.py --workdir=workdirs/demo

One strategy only, or the small smoke-test size:

  python run.py --config=configs/synthetic_three_task.py:strategy=auxi_all --workdir=workdirs/demo_auxi
  python run.py --config=configs/synthetic_three_task.py:runlocal --workdir=/tmp/smoke

A searched (or hand-written) Auxi-NAS genotype instead of the basic aux module:

  python run.py --config=configs/synthetic_three_task.py:strategy=auxi_nas:configs/genotypes/example_three_task.json \
    --workdir=workdirs/demo_nas
"""

from auxmtl_configs import common
from auxmtl_jax import variants


def get_config(arg=None):
    """Demo config; `arg` is a variant string, optionally starting with `runlocal` (tiny, seconds)."""
    runlocal, arg = common.split_runlocal(arg)
    config = common.base_config()
    config.name = "demo"
    config.dataset.name = "synthetic_scenes"
    config.dataset.config = "demo"
    config.dataset.prepare = True
    config.input.crop_size = (64, 80)
    config.input.scale_range = (0.75, 1.5)
    config.model.encoder = "mobilenet_v2"
    config.model.width_multiplier = 0.5
    config.model.decoder = "ushape"
    config.model.head_channels = 32
    config.aux.channels = 32
    # Aux inputs from stride 4 down (not the stride-2 stage1); the README's 3-seed comparison of aux.resolution
    # was run with these features.
    config.aux.features = ("stage2", "stage3", "stage4", "stage5")
    config.batch_size = 8
    config.eval_batch_size = 32
    config.optimizer.learning_rate = 0.05
    config.num_train_steps = 400
    config.log_every_steps = 20
    config.eval_every_steps = 400
    config.checkpoint_every_steps = 100
    config.analysis.grad_log_every_steps = 20
    config.analysis.figures = True
    config.runs = {"joint": "strategy=joint", "auxi_all": "strategy=auxi_all"}
    if runlocal:
        common.make_runlocal(config)
        config.dataset.config = "tiny"
        config.num_train_steps = config.eval_every_steps = 4
        config.log_every_steps = config.analysis.grad_log_every_steps = 2
    if arg:
        config.runs = None
    return variants.apply_variant(config, arg)
