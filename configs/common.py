"""The base config every config module starts from (the paper's recipe as defaults) and `runlocal`, the tiny size.

A config module's `get_config(arg)` starts from `base_config()`, sets its dataset and schedule, then applies the
variant string given after the config path (`auxmtl_jax.variants`: the paper's strategies and `key=value`
variants), e.g. `--config=configs/nyuv2_two_task.py:strategy=auxi:depth,decoder=context`.
"""

from __future__ import annotations

import ml_collections

from auxmtl_jax import weighting
from auxmtl_jax.tasks import TASK_NAMES


def base_config() -> ml_collections.ConfigDict:
    """All fields with the paper's training recipe (Sec. 4.1) as defaults."""
    config = ml_collections.ConfigDict()
    config.name = "run"
    config.seed = 0
    config.tasks = TASK_NAMES

    config.dataset = ml_collections.ConfigDict()
    config.dataset.name = "synthetic_scenes"
    config.dataset.config = ml_collections.config_dict.placeholder(str)
    config.dataset.data_dir = ml_collections.config_dict.placeholder(str)
    config.dataset.manual_dir = ml_collections.config_dict.placeholder(str)
    config.dataset.prepare = False
    config.dataset.train_split = "train"
    config.dataset.eval_split = "test"
    # Model selection without the test set (docs/comparing.md): a split disjoint from train_split and eval_split,
    # e.g. train_split='train[:90%]' with validation_split='train[90%:]'. The periodic evaluations then run on it,
    # and the test split is read only at the selected step, the last `evaluation.average_last` evaluations and the end.
    config.dataset.validation_split = ml_collections.config_dict.placeholder(str)

    config.input = ml_collections.ConfigDict()
    config.input.crop_size = (385, 385)
    config.input.scale_range = (0.5, 2.1)
    config.input.flip = True
    config.input.eval_size = ml_collections.config_dict.placeholder(tuple)
    # Worker processes and augmenting threads per process; None = sized from this host's cores
    # (docs/data.md "Input pipeline"; 0 workers = augment in the training process).
    config.input.num_workers = ml_collections.config_dict.placeholder(int)
    config.input.num_threads = ml_collections.config_dict.placeholder(int)
    config.input.mean = (123.675, 116.28, 103.53)
    config.input.std = (58.395, 57.12, 57.375)

    config.model = ml_collections.ConfigDict()
    config.model.encoder = "mobilenet_v2"
    config.model.width_multiplier = 1.0
    config.model.output_stride = ml_collections.config_dict.placeholder(int)
    config.model.decoder = "ushape"
    config.model.head_channels = ml_collections.config_dict.placeholder(int)
    config.model.dtype = "float32"
    # The encoder's start: an ImageNet weight file (README "Pretrained encoders"), a run of ours (its workdir or
    # inference export; its encoder is loaded), or 'scratch'. The paper configs set model.pretrained_required:
    # they stop without one instead of silently training from scratch.
    config.model.encoder_init = ml_collections.config_dict.placeholder(str)
    config.model.pretrained_required = False
    # Atrous rates of the context and deeplab decoders' ASPP (docs/models.md "Sizes at small crops"): 'paper'
    # (DeepLabv3's 6/12/18 at stride 16 scaled to the output stride: 12/24/36 at 8), 'feature' (the paper's rates
    # scaled from its 49x49 map to the training crop's feature map, so the atrous taps stay inside it) or a tuple
    # such as (2, 4, 6). An object field, so that a config or --config.model.aspp_rates='(2,4,6)' may set a tuple.
    config.model.aspp_rates = ml_collections.FieldReference("paper", field_type=object)

    config.aux = ml_collections.ConfigDict()
    config.aux.tasks = ()
    config.aux.features = ()
    config.aux.adaptor = "conv1x1"
    config.aux.aggregate = "concat"
    # 'hierarchy': aggregate at each stage's own resolution, head at the deepest stage (cheap, paper Fig. 1b);
    # 'finest': upsample every adapted stage to the finest selected one and aggregate and predict there.
    config.aux.resolution = "hierarchy"
    # 'hierarchy' only: 0 = the head at the deepest selected stage; N > 0 = at the deepest selected stage with at
    # least N cells on its map's shorter side, deeper stages upsampled to it (docs/models.md "Sizes at small crops").
    config.aux.min_head_size = 0
    config.aux.channels = 64
    config.aux.weight = 1.0
    # Auxi-NAS: a genotype JSON file (auxmtl_jax.models.genotype). Its cells replace the basic module; its tasks and
    # stages become the aux tasks and features (leave aux.tasks / aux.features empty or equal to them).
    config.aux.genotype = ml_collections.config_dict.placeholder(str)

    config.deep_supervision = ml_collections.ConfigDict()
    config.deep_supervision.tasks = ()
    config.deep_supervision.weight = 0.1

    # A method of auxmtl_jax.weighting (equal, kendall, dwa, rlw, famo, gradnorm, mgda, mgda_ub, pcgrad, cagrad,
    # imtl_g, aligned_mtl, nash_mtl) or a loss weighting chained with a treatment ('kendall+pcgrad');
    # config.weighting holds every method's hyper-parameters and aux_as_tasks.
    config.loss_weighting = "equal"
    config.weighting = weighting.default_options()

    config.init_from = ml_collections.ConfigDict()
    config.init_from.path = ml_collections.config_dict.placeholder(str)
    config.init_from.scope = "encoder"  # encoder | network | main | all (see checkpoint.load_init_variables)
    config.init_from.lr_scale = 1.0  # extra factor on the loaded modules' updates
    config.init_from.base_lr_scale = 1.0  # factor on the base lr of a run started from another run

    config.optimizer = ml_collections.ConfigDict()
    # sgd: SGD with momentum (the paper); adam: torch.optim.Adam (betas 0.9/0.999, eps 1e-8; LibMTL's). Both add
    # weight_decay·w to the gradient (coupled L2, as torch does); momentum is SGD's only.
    config.optimizer.name = "sgd"
    config.optimizer.learning_rate = 0.01
    config.optimizer.momentum = 0.9
    config.optimizer.weight_decay = 1e-4
    # poly: lr·(1 − t/T)^poly_power; constant: lr throughout; step: lr·step_factor^⌊t/step_every_steps⌋ (StepLR)
    config.optimizer.schedule = "poly"
    config.optimizer.poly_power = 0.9
    config.optimizer.step_every_steps = 10_000
    config.optimizer.step_factor = 0.1
    config.optimizer.warmup_steps = 0

    # What results.json reports (docs/comparing.md "Reporting conventions"):
    # reduction: 'per_pixel' pools depth/normal metrics over every valid pixel of the split (ours, LibMTL);
    #   'per_batch' averages per-batch values over the evaluation batches of eval_batch_size (mtan, Nash-MTL, FAMO).
    # average_last: K > 1 also reports the mean of the test metrics of the last K evaluations (mtan-family papers: 10).
    # select_by: the validation criterion, 'delta_m' (Δm% against reference_results, or against the first validation
    #   evaluation when there are none) or one 'task/metric' such as 'segmentation/miou'.
    # report: which of these results.json's "metrics" holds: 'final', 'last_mean' or 'selected'; None picks
    #   'selected' when dataset.validation_split is set, else 'last_mean' when average_last > 1, else 'final'.
    config.evaluation = ml_collections.ConfigDict()
    config.evaluation.reduction = "per_pixel"
    config.evaluation.average_last = 1
    config.evaluation.select_by = "delta_m"
    config.evaluation.report = ml_collections.config_dict.placeholder(str)

    config.batch_size = 12
    config.eval_batch_size = 12
    config.num_train_steps = 30_000
    config.log_every_steps = 50
    config.eval_every_steps = 5_000
    config.checkpoint_every_steps = 1_000
    config.max_checkpoints_to_keep = 3
    config.progress_bar = True

    config.analysis = ml_collections.ConfigDict()
    config.analysis.grad_log_every_steps = 0
    config.analysis.grad_samples_per_layer = 64
    config.analysis.figures = False

    # Single-task reference results for Δm%: {task: {metric: value}}, or a path to a results.json.
    config.reference_results = ml_collections.config_dict.placeholder(object)

    # Devices of the data mesh (None: all). The device count changes results only by float rounding (see README,
    # "Data parallelism"), so a run may resume with another count.
    config.num_devices = ml_collections.config_dict.placeholder(int)

    # Resuming a workdir whose config differs in these keys (comma-separated, 'group.' for a whole group) continues
    # from its last checkpoint with the new values and records the change in WORKDIR/config.json.
    config.accept_changed_keys = ""

    config.distributed = ml_collections.ConfigDict()
    config.distributed.coordinator_address = ml_collections.config_dict.placeholder(str)
    config.distributed.num_processes = ml_collections.config_dict.placeholder(int)
    config.distributed.process_id = ml_collections.config_dict.placeholder(int)
    # Coordination timeouts, seconds (docs/reliability.md "Several processes"): every process must connect within
    # initialization_timeout_s; a process silent for heartbeat_timeout_s is declared lost (the bound on how long
    # survivors of a dead peer wait); processes meet at a barrier after each compilation (which can take minutes
    # on a busy host) and before a checkpoint, and one that has not arrived after barrier_timeout_s stops the run.
    config.distributed.initialization_timeout_s = 300
    config.distributed.heartbeat_timeout_s = 100
    config.distributed.barrier_timeout_s = 900
    config.distributed.shutdown_timeout_s = 60

    # A sweep: {run_name: variant string}; each run trains in WORKDIR/<run_name> and a comparison table follows.
    config.runs = ml_collections.config_dict.placeholder(dict)
    return config


def split_runlocal(arg: str | None) -> tuple[bool, str | None]:
    """Splits a leading `runlocal` flag off a variant string: 'runlocal,strategy=joint' -> (True, 'strategy=joint')."""
    if not arg:
        return False, arg
    parts = [part for part in arg.split(",") if part.strip() != "runlocal"]
    return len(parts) != len(arg.split(",")), ",".join(parts) or None


def make_runlocal(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrinks a real config to seconds on a CPU (tiny width, small crops, a few steps) for smoke tests."""
    config.input.crop_size = (32, 40)
    config.input.eval_size = (32, 40)
    config.input.num_workers = 0  # starting worker processes would take longer than the run
    config.model.width_multiplier = 0.25
    config.model.head_channels = 8
    config.aux.channels = 8
    config.batch_size = 4
    config.eval_batch_size = 4
    config.num_train_steps = 2
    config.log_every_steps = 1
    config.eval_every_steps = 2
    config.checkpoint_every_steps = 2
    config.progress_bar = False
    if config.model.pretrained_required and not config.model.encoder_init:
        config.model.encoder_init = "scratch"  # a smoke test, not a paper run
    return config
