r"""An off-task encoder start for the synthetic benchmark: pre-trained on normals alone (issue 30, item 2).

Why: the paper's premise is that the shared encoder starts from *off-task* ImageNet features, which competing
tasks then under-optimise and aux modules help. `configs/synthetic_pretrain.py` pre-trains on the same three
tasks the experiments fine-tune on, which leaves little of that premise. This start is the same network, data
and length (`demo_pretrain`'s 2000 scenes, none in `demo`; MobileNetV2 x0.5, Baseline decoder, 1500 steps), but
trained on surface normals only (`strategy=single:normal`), so the targets of the two-task experiment
`off_task_start` (segmentation and depth) are not what the encoder learnt. About 4 minutes on 2 cores:

  python run.py --config=configs/synthetic_pretrain_off_task.py --workdir=workdirs/encoder_start_normals
  python -m auxmtl_jax.experiments off_task_start --workdir=workdirs/exp_off_task --seeds=5 \
    --set model.encoder_init=workdirs/encoder_start_normals --set dataset.config=demo_large_test

What it is not: an unrelated, ImageNet-like start. Normals carry the scenes' geometry: they are the depth
map's local orientation (depth determines them; they constrain depth up to its scale and the jumps at object
edges), and the floor/wall/ceiling labels follow from their direction. So the start is off-task, not
off-domain, and nearer to depth than to segmentation; if the gate of `off_task_start` (Joint worse than Single)
fails, a start further from the targets (a scene-level task, other scenes) is the next step.

`runlocal` is the smoke size (the `tiny` scenes, a few steps).
"""

from auxmtl_configs import common, synthetic_pretrain
from auxmtl_jax import variants


def get_config(arg=None):
    """Pretraining config on normals only; `arg` may be `runlocal` and a variant string."""
    runlocal, arg = common.split_runlocal(arg)
    config = synthetic_pretrain.get_config("runlocal" if runlocal else None)
    variants.apply_variant(config, "strategy=single:normal")
    config.name = "encoder_start_normals"
    return variants.apply_variant(config, arg)
