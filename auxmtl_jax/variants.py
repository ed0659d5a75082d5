"""The paper's strategies and the variant-string language that selects them.

A config module's `get_config(arg)` applies the variant string given after the config path (`apply_variant`), e.g.
`--config=configs/nyuv2_two_task.py:strategy=auxi:depth,decoder=context`.

Strategies are settings of orthogonal fields, never separate code paths:

| strategy            | fields set                                                        |
|---------------------|-------------------------------------------------------------------|
| `single:<task>`     | `tasks=(task,)`                                                   |
| `joint`             | all tasks of the config, equal weighting, no aux                  |
| `kendall`           | `loss_weighting='kendall'` (uncertainty weighting, Kendall et al.) |
| `deep_supervision`  | `deep_supervision.tasks = tasks` (`:<task>`: that task only, DS_i) |
| `prior:<workdir>`   | `init_from.path/scope/base_lr_scale = workdir/'network'/0.1`: that   |
|                     | run's encoder and decoders initialise ours; base lr / 10          |
| `auxi:<task>`       | `aux.tasks = (task,)`                                             |
| `auxi_all`          | `aux.tasks = tasks`                                               |
| `auxi_nas:<file>`   | `aux.genotype = file` (a genotype JSON; it sets the aux tasks and stages) |

The variant key `weighting=<method>` sets `loss_weighting` after the strategy, so any strategy trains under any
weighting or gradient treatment of `auxmtl_jax.weighting` (`strategy=auxi_all,weighting=pcgrad`).

The variant key `prior=<workdir>` adds the Prior initialisation (and lr / 10) to any strategy: the paper's AT_2
is `strategy=auxi:depth,prior=<segmentation run>`.

The variant key `encoder_init=<start>` sets `model.encoder_init` (`scratch`, a weight file or a run of ours), so an
experiment's run can train from scratch whatever its base config starts from:
`encoder=plain_deep,encoder_init=scratch`.

The controls of the mechanism (issue 30) use three more keys: `ds_weight=<w>` sets `deep_supervision.weight` (the
weight of each stage's head: the DS loss is w times the sum over the encoder's stages); `prior_lr_scale=<f>` sets
`init_from.base_lr_scale`, the factor on the base lr of a run started from another run (the Prior sets 0.1, so
`strategy=prior:<run>,prior_lr_scale=1` is a Prior at full lr; `prior` is applied right after the strategy,
whatever the key order); `lr_factor=<f>` multiplies `optimizer.learning_rate` by f (`strategy=joint,lr_factor=2`
is Joint at twice the base config's lr; a later `--config.optimizer.learning_rate` / `--set` replaces the product).

Example: `--config=configs/synthetic_three_task.py:strategy=auxi_nas:configs/genotypes/example_three_task.json`.
"""

from __future__ import annotations

import ml_collections

from auxmtl_jax.errors import UserError

STRATEGIES = ("single", "joint", "kendall", "deep_supervision", "prior", "auxi", "auxi_all", "auxi_nas")

# Keys a variant string may set, mapped to the config field they write. `strategy` is handled separately.
VARIANT_KEYS = {
    "decoder": "model.decoder",
    "encoder": "model.encoder",
    "encoder_init": "model.encoder_init",
    "width": "model.width_multiplier",
    "output_stride": "model.output_stride",
    "dtype": "model.dtype",
    "adaptor": "aux.adaptor",
    "aggregate": "aux.aggregate",
    "aux_resolution": "aux.resolution",
    "aux_features": "aux.features",
    "steps": "num_train_steps",
    "batch": "batch_size",
    "seed": "seed",
    "weighting": "loss_weighting",
    "ds_weight": "deep_supervision.weight",
    "prior_lr_scale": "init_from.base_lr_scale",
}
# Keys that multiply a field instead of setting it.
SCALING_KEYS = {"lr_factor": "optimizer.learning_rate"}


def parse_variant(arg: str | None) -> dict[str, str]:
    """Parses 'strategy=auxi:depth,decoder=context' into an ordered dict, rejecting unknown keys."""
    if not arg:
        return {}
    items = {}
    for part in arg.split(","):
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise UserError(f"Config variant {part!r} in {arg!r} is not of the form key=value.")
        if key not in ("strategy", "prior") and key not in VARIANT_KEYS and key not in SCALING_KEYS:
            allowed = ", ".join(["strategy", "prior", *VARIANT_KEYS, *SCALING_KEYS])
            raise UserError(f"Unknown config variant key {key!r} in {arg!r}; expected one of: {allowed}.")
        items[key] = value
    return items


def apply_variant(config: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
    """Applies a variant string (see `parse_variant`) to `config` in place and returns it."""
    items = parse_variant(arg)
    if "strategy" in items:  # first: a strategy resets the fields the other keys may set
        apply_strategy(config, items.pop("strategy"))
    if "prior" in items:  # part of the strategy: before the keys that adjust it (prior_lr_scale)
        apply_prior(config, items.pop("prior"))
        config.name = f"{config.name}_from_prior"
    for key, value in items.items():
        if key in SCALING_KEYS:
            scale_field(config, SCALING_KEYS[key], value)
        else:
            set_field(config, VARIANT_KEYS[key], value)
    return config


def apply_strategy(config: ml_collections.ConfigDict, strategy: str) -> ml_collections.ConfigDict:
    """Sets the orthogonal fields that make up one of the paper's strategies (see module docstring).

    The strategy fields are reset to Joint first, so a strategy replaces the config's default one; combine
    strategies with overrides, e.g. `strategy=auxi_all --config.loss_weighting=kendall`.
    """
    name, _, argument = strategy.partition(":")
    if name not in STRATEGIES:
        raise UserError(f"Unknown strategy {strategy!r}; expected one of: {', '.join(STRATEGIES)} (single and auxi "
                         "take ':<task>', prior takes ':<workdir>', auxi_nas takes ':<genotype.json>').")
    arguments = {"single": "task", "auxi": "task", "prior": "workdir", "auxi_nas": "genotype.json"}
    optional = {"deep_supervision": "task"}
    if (name in arguments and not argument) or (argument and name not in arguments and name not in optional):
        form = f"{name}:<{arguments[name]}>" if name in arguments else name
        raise UserError(f"Strategy {strategy!r} must be written as {form!r}.")
    if name in ("single", "auxi", "deep_supervision") and argument and argument not in config.tasks:
        raise UserError(f"Strategy {strategy!r}: task {argument!r} is not among config.tasks {tuple(config.tasks)}.")
    config.name = strategy.replace(":", "_") if name not in ("prior", "auxi_nas") else name
    config.aux.tasks = ()
    config.aux.genotype = None
    config.deep_supervision.tasks = ()
    config.loss_weighting = "equal"
    config.init_from.path = None
    config.init_from.scope = "encoder"
    config.init_from.base_lr_scale = 1.0
    if name == "single":
        config.tasks = (argument,)
    elif name == "kendall":
        config.loss_weighting = "kendall"
    elif name == "deep_supervision":
        config.deep_supervision.tasks = (argument,) if argument else tuple(config.tasks)
    elif name == "prior":
        apply_prior(config, argument)
    elif name == "auxi":
        config.aux.tasks = (argument,)
    elif name == "auxi_all":
        config.aux.tasks = tuple(config.tasks)
    elif name == "auxi_nas":
        config.aux.genotype = argument
        config.aux.features = ()
    return config


def apply_prior(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
    """The paper's Prior initialisation (Sec. 4.2, footnote 1): the whole network of the run in `workdir` (encoder
    and its task decoders) initialises ours and the base learning rate is divided by 10."""
    config.init_from.path = workdir
    config.init_from.scope = "network"
    config.init_from.base_lr_scale = 0.1
    return config


def set_field(config: ml_collections.ConfigDict, path: str, text: str) -> None:
    """Sets a dotted field from text, converting to the field's current type (None-typed fields: int/float/str)."""
    *parents, leaf = path.split(".")
    node = config
    for parent in parents:
        node = node[parent]
    current = node[leaf]
    try:
        node[leaf] = _convert(text, current, path)
    except TypeError as error:  # a typed placeholder refuses the converted value
        raise UserError(f"config.{path}={text!r}: {error}") from None


def scale_field(config: ml_collections.ConfigDict, path: str, text: str) -> None:
    """Multiplies a numeric dotted field by the positive number in `text`."""
    *parents, leaf = path.split(".")
    node = config
    for parent in parents:
        node = node[parent]
    try:
        factor = float(text)
    except ValueError:
        factor = float("nan")
    if not factor > 0 or factor == float("inf"):
        raise UserError(f"Config variant factor on {path}: {text!r}; expected a positive number.")
    node[leaf] = float(node[leaf]) * factor


def config_keys(config: ml_collections.ConfigDict, prefix: str = "") -> set[str]:
    """Every dotted leaf key of `config` ('optimizer.learning_rate', ...)."""
    keys = set()
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            keys |= config_keys(value, f"{prefix}{key}.")
        else:
            keys.add(f"{prefix}{key}")
    return keys


def _convert(text: str, current, path: str):
    kind = type(current)
    try:
        if kind is bool:
            if text.lower() not in ("true", "false"):
                raise ValueError
            return text.lower() == "true"
        if kind in (int, float):
            return kind(text)
        if kind is tuple:  # stage lists: 'stage2+stage3'; 'all' for every stage
            return () if text == "all" else tuple(text.split("+"))
        if current is None:
            for candidate in (int, float):
                try:
                    return candidate(text)
                except ValueError:
                    pass
        return text
    except ValueError:
        raise UserError(f"Config variant {path}={text!r}: expected a value of type {kind.__name__}.") from None
