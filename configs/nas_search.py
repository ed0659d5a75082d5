r"""Auxi-NAS search on the built-in `synthetic_scenes` demo data (paper Sec. 3.2; Nekrasov et al.'s procedure).

Samples aux-module genotypes with an LSTM controller, trains each briefly on a meta-train slice of the train
split (a population at once, one compilation), scores it on the meta-val slice, updates the controller by PPO.
Writes WORKDIR/search.jsonl and WORKDIR/best_genotype.json; re-running resumes. The defaults are sized for a
2-core CPU (200 candidates at a proxy of width 0.25 and 48x64 crops, about 45 minutes); on a GPU raise
`search.num_candidates`, `search.population` and `search.steps` (and the proxy sizes) with --config.search.*.

  python run.py --config=configs/nas_search.py --workdir=workdirs/nas_search
  python run.py --config=configs/synthetic_three_task.py:strategy=auxi_nas:workdirs/nas_search/best_genotype.json \
    --workdir=workdirs/demo_nas_best
  python run.py --config=configs/nas_search.py:runlocal --workdir=/tmp/nas_smoke   # seconds

`:evaluation` searches in the setting the `nas_evidence` experiment then trains the genotypes in (issue 30): the
experiments' cpu network unchanged (MobileNetV2 x0.5, the Baseline decoder at output stride 8, 64x80 crops, the
aux modules' four stages), two tasks, the encoder start given with --config.model.encoder_init; only the schedule
is shorter (80 of the 400 steps) and the candidates fewer (40, about 50 min on 2 cores):

  python run.py --config=configs/nas_search.py:evaluation --workdir=workdirs/nas_search_evaluation \
    --config.model.encoder_init=workdirs/encoder_start_normals --config.dataset.config=demo_large_test
"""

import ml_collections

from auxmtl_configs import common
from auxmtl_configs import synthetic_three_task


EVALUATION = "evaluation"
EVALUATION_TASKS = ("segmentation", "depth")


def get_config(arg=None):
    """The demo network and data with a `search` group; `arg` may start with `runlocal` (tiny, seconds), and may be
    `evaluation` (the nas_evidence experiment's setting) or a variant string of the demo config."""
    runlocal, arg = common.split_runlocal(arg)
    evaluation = arg == EVALUATION
    config = synthetic_three_task.get_config("decoder=baseline" if evaluation else arg)
    config.name = "nas_search"
    config.runs = None
    config.analysis.figures = False
    config.analysis.grad_log_every_steps = 0

    if evaluation:
        # The network, data and crops of the runs the genotype is evaluated in (configs/experiments.py, size cpu).
        config.tasks = EVALUATION_TASKS
    else:
        # The proxy network a candidate is trained in: narrower and smaller than the demo network the searched
        # genotype is then trained in (the genotype does not depend on widths or sizes).
        config.model.width_multiplier = 0.25
        config.model.head_channels = 16
        config.aux.channels = 16
        config.input.crop_size = (48, 64)
        config.input.eval_size = (48, 64)

    config.search = ml_collections.ConfigDict()
    config.search.tasks = ()  # () = config.tasks
    config.search.stages = tuple(config.aux.features)  # () = every sown stage
    config.search.cells_per_task = 0  # 0 = one cell per stage (the paper's P)
    # Which cells of earlier tasks a cell may read: "paper" (Sec. 3.2: cell i reads cells 0..i-1 of the tasks before
    # its own, counting from 0) or "all_cells" (ours, wider: every cell of them; the rule of configs/genotypes/*.json).
    config.search.cross_task_inputs = "paper"
    config.search.num_candidates = 200
    config.search.population = 4  # candidates trained at once (vmapped; split over devices)
    config.search.devices = 0  # local devices the population is split over: 0 = all (as many as divide it)
    config.search.meta_train_fraction = 0.9
    config.search.steps = (30, 30)  # proxy schedule: first stage, then survivors only
    config.search.termination_fraction = 0.9  # survive with >= 0.9 x running mean of first-stage rewards
    config.search.polyak_decay = 0.9
    config.search.controller = ml_collections.ConfigDict({"hidden_size": 100, "num_layers": 2})
    # After the search: its `top` best genotypes trained again under each of `seeds` (WORKDIR/rescore.json; rank
    # stability). Changing it on a finished search re-scores without searching again.
    config.search.rescore = ml_collections.ConfigDict({"top": 3, "seeds": (1,)})
    config.search.ppo = ml_collections.ConfigDict({
        "learning_rate": 1e-4, "clip_epsilon": 0.1, "entropy_weight": 1e-4, "baseline_decay": 0.95,
        "epochs": 1, "buffer_size": 100, "minibatch_size": 1, "max_grad_norm": 2.0})
    if evaluation:
        config.search.num_candidates = 40
        config.search.steps = (40, 40)
    if runlocal:
        common.make_runlocal(config)
        config.dataset.config = "tiny"
        config.search.num_candidates = 4
        config.search.population = 2
        config.search.steps = (2, 1)
        config.search.rescore.top = 0
    return config
