r"""Base configs of the paper's experiments (`python -m auxmtl_jax.experiments`), before each run's variant.

The experiment runner calls `get_config("size=cpu,dataset=synthetic_scenes,tasks=segmentation+depth")`:

- `synthetic_scenes`: the demo config (96x128 scenes, MobileNetV2 x0.5, 400 steps); `tiny` is its runlocal
  size, `gpu` grows it to 192x256 scenes, full width and 4000 steps.
- `nyu_v2` (two or three tasks) and `sunrgbd`: the paper config of that built dataset at the paper's size
  (`gpu`) or as a smoke test (`tiny`); `cpu` is not offered.
"""

from auxmtl_configs import nyuv2_three_task, nyuv2_two_task, sunrgbd_three_task, synthetic_three_task
from auxmtl_jax.errors import UserError


def get_config(arg: str):
    """`arg`: 'size=<tiny|cpu|gpu>,dataset=<name>,tasks=<task>+<task>...'."""
    options = dict(part.split("=", 1) for part in arg.split(","))
    size, dataset, tasks = options["size"], options["dataset"], options["tasks"].split("+")
    if dataset == "synthetic_scenes":
        return _synthetic_config(size)
    if size == "cpu":
        raise UserError(f"--size=cpu with --dataset={dataset}: the real datasets run at the paper's size "
                        "(--size=gpu) or as a smoke test (--size=tiny); expected one of those")
    module = {"nyu_v2": nyuv2_two_task if len(tasks) == 2 else nyuv2_three_task,
              "sunrgbd": sunrgbd_three_task}[dataset]
    config = module.get_config("runlocal" if size == "tiny" else None)
    config.analysis.grad_log_every_steps = config.log_every_steps
    return config


def _synthetic_config(size: str):
    config = synthetic_three_task.get_config("runlocal" if size == "tiny" else None)
    if size == "gpu":
        config.dataset.config = "default"  # 192x256, 2000 train / 500 test
        config.input.crop_size = (128, 160)
        config.model.width_multiplier = 1.0
        config.model.head_channels = 64
        config.aux.channels = 64
        config.batch_size = 16
        config.num_train_steps = 4000
        config.eval_every_steps = 4000
        config.checkpoint_every_steps = 500
        config.log_every_steps = 50
        config.analysis.grad_log_every_steps = 50
    return config
