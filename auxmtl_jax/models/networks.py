"""The main multi-task network and its composition with the train-only auxiliary / deep-supervision modules.

``build_model(model_cfg, tasks, aux_cfg, deep_supervision_cfg)`` validates the configuration (one ValueError,
before anything is traced) and returns a ``MultiTaskModel``:

* ``model.main`` is a standalone linen module, the only thing inference runs:
  ``model.main.apply({'params': P['main'], 'batch_stats': S['main']}, images, train=False) -> {task: output}``.
* ``model.init(rng, images)`` gives ``{'params': {'main', 'aux'?, 'deep_supervision'?}, 'batch_stats': {...}}``
  (``aux`` / ``deep_supervision`` are present only when those tasks are configured; each holds ``{task: ...}``).
* ``model.apply(variables, images, train=...)`` runs ``main`` with the ``intermediates`` collection mutable and
  feeds the sown encoder stages to the aux modules and deep-supervision heads, which are separate modules with
  their own variables; it returns ``(ModelOutputs, new_batch_stats)``.

Aux modules are either the basic module of paper Eq. 2 (``aux.tasks``, ``aux.adaptor``, ``aux.aggregate``, ...) or,
when ``aux.genotype`` is set, Auxi-NAS cells (``cells.AuxiliaryCells``). ``aux.genotype`` may be a genotype JSON
path or a ``nas.Genotype`` (static build: trains that genotype), or a ``nas.CellSpace`` (searchable build: every
genotype of the space runs through the same compiled function, passed as ``model.apply(..., genotype=array)``
with the int array [T, n, 5] of ``Genotype.as_array``).

Because aux modules only read the encoder stages, main-task losses never reach aux parameters and aux losses
reach the encoder but never the decoders.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from auxmtl_jax import tasks as task_lib
from auxmtl_jax.errors import UserError
from auxmtl_jax.models.auxiliary import (ADAPTORS, AGGREGATES, RESOLUTIONS, AuxiliaryModule, DeepSupervisionHeads,
                                         check_min_head_size)
from auxmtl_jax.models.cells import AuxiliaryCells
from auxmtl_jax.models.decoders import (ASPP, ASPP_DECODERS, DECODERS, DEFAULT_HEAD_CHANNELS, DEFAULT_OUTPUT_STRIDE,
                                        DeepLabDecoder, ObjectContextDecoder, UShapeDecoder, aspp_rates,
                                        check_aspp_rates, resolve_aspp_rates)
from auxmtl_jax.models.encoders import ENCODERS, OUTPUT_STRIDES, encoder_features, encoder_module, encoder_stages
from auxmtl_jax.models.layers import PredictionHead, to_task_output
from auxmtl_jax.models.genotype import CellSpace, Genotype, GenotypeError, load_genotype

Dtype = Any

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_FIXED_TASK_CHANNELS = {"depth": 1, "normal": 3}
_MAX_DEEP_SUPERVISION_HIDDEN = 64
DECODER_SUFFIX = "_decoder"  # main's task-specific modules are `<task>_decoder`; the rest of `main` is shared


class MultiTaskNet(nn.Module):
    """Shared encoder (+ ASPP for ``context``) and one decoder per task (``baseline``, ``context``, ``ushape``,
    ``ocnet`` or ``deeplab``); outputs at input resolution.

    ``tasks`` is a tuple of ``(task, output_channels)``; ``aspp_rates`` the ASPP's rates (context, deeplab; None:
    ``aspp_rates(output_stride)``). Parameters: ``encoder``, ``aspp`` (context only) and ``{task}_decoder`` per task.
    """

    encoder: str
    width_multiplier: float
    output_stride: int
    decoder: str
    tasks: tuple[tuple[str, int], ...]
    head_channels: int
    dtype: Dtype = jnp.float32
    aspp_rates: tuple[int, ...] | None = None

    @nn.compact
    def __call__(self, images: jax.Array, train: bool, *, part: str = "all",
                 decoder_inputs: Mapping[str, Any] | None = None) -> Any:
        """``part='all'``: images -> ``{task: output}``. ``'shared'``: images -> what every decoder reads (the stages
        dict for U-shape, the deepest stage otherwise, after the ASPP for Context); the stages are sown as always.
        ``'decoders'``: ``decoder_inputs`` ``{task: what decoder task reads}`` -> ``{task: output}`` (``images``
        give the output size only). 'shared' then 'decoders' is 'all', split where the task-specific part begins.
        """
        height, width = images.shape[1], images.shape[2]
        rates = self.aspp_rates or aspp_rates(self.output_stride)
        if part not in ("all", "shared", "decoders"):
            raise ValueError(f"MultiTaskNet: part={part!r}; expected 'all', 'shared' or 'decoders'")
        if part != "decoders":
            stages = encoder_module(self.encoder, width_multiplier=self.width_multiplier,
                                    output_stride=self.output_stride, dtype=self.dtype)(images, train)
            if self.decoder == "ushape":
                shared = stages
            else:
                shared = stages[list(stages)[-1]]
                if self.decoder == "context":
                    shared = ASPP(self.head_channels, rates, dtype=self.dtype, name="aspp")(shared, train)
            if part == "shared":
                return shared
            decoder_inputs = {task: shared for task, _ in self.tasks}
        decoder = {"ushape": UShapeDecoder, "ocnet": ObjectContextDecoder}.get(self.decoder, PredictionHead)
        if self.decoder == "deeplab":  # LibMTL's DeepLab head per task, its ASPP rates scaled to the stride
            decoder = functools.partial(DeepLabDecoder, rates=rates)
        raw = {task: decoder(channels, self.head_channels, dtype=self.dtype, name=f"{task}_decoder")(
            decoder_inputs[task], train) for task, channels in self.tasks}
        return {task: to_task_output(task, raw[task], height, width) for task, _ in self.tasks}


class Representation(NamedTuple):
    """What the shared part of the network gives the task-specific modules: ``decoder_input`` (what every
    decoder reads, ``MultiTaskNet(part='shared')``) and ``stages`` (the sown encoder features the aux modules
    and deep-supervision heads read)."""

    decoder_input: Any
    stages: dict[str, jax.Array]


class ModelOutputs(NamedTuple):
    """Predictions of one forward pass, all float32 at input resolution."""

    main: dict[str, jax.Array]
    aux: dict[str, jax.Array]
    deep_supervision: dict[str, list[jax.Array]]


@dataclasses.dataclass(frozen=True)
class MultiTaskModel:
    """``main`` plus the train-only modules, with pure ``init``/``apply``/``predict`` (hashable, jit-friendly)."""

    main: MultiTaskNet
    aux_modules: tuple[tuple[str, AuxiliaryModule | AuxiliaryCells], ...] = ()
    deep_supervision_modules: tuple[tuple[str, DeepSupervisionHeads], ...] = ()
    stage_names: tuple[str, ...] = ()

    @property
    def tasks(self) -> tuple[str, ...]:
        """Main task names in output order."""
        return tuple(task for task, _ in self.main.tasks)

    @property
    def task_channels(self) -> dict[str, int]:
        """Output channels per main task."""
        return dict(self.main.tasks)

    @property
    def aux_tasks(self) -> tuple[str, ...]:
        return tuple(task for task, _ in self.aux_modules)

    @property
    def aux_space(self) -> CellSpace | None:
        """The cell space of Auxi-NAS aux modules (None for the basic module or no aux)."""
        cells = [module for _, module in self.aux_modules if isinstance(module, AuxiliaryCells)]
        return cells[0].space if cells else None

    @property
    def aux_genotype(self) -> Genotype | None:
        """The genotype of static Auxi-NAS aux modules (None otherwise)."""
        space = self.aux_space
        if space is None or self.aux_searchable:
            return None
        return Genotype(space.tasks, space.stages, tuple(module.cells for _, module in self.aux_modules),
                        space.cross_task_inputs)

    @property
    def aux_searchable(self) -> bool:
        """True when the aux cells take the genotype as data (``apply(..., genotype=...)``)."""
        return any(isinstance(module, AuxiliaryCells) and module.searchable for _, module in self.aux_modules)

    @property
    def deep_supervision_tasks(self) -> tuple[str, ...]:
        return tuple(task for task, _ in self.deep_supervision_modules)

    def _side_modules(self) -> dict[str, tuple[tuple[str, nn.Module], ...]]:
        modules = {"aux": self.aux_modules, "deep_supervision": self.deep_supervision_modules}
        return {group: members for group, members in modules.items() if members}

    def init(self, rng: jax.Array, images: jax.Array) -> dict[str, dict[str, Any]]:
        """Initialise all variables (float32 params); wrap in ``jax.jit`` for large inputs."""
        main_rng, side_rng = jax.random.split(rng)
        # flax leaves `intermediates` out of init by default; the side modules need the sown stages to initialise.
        main_variables = dict(self.main.init(main_rng, images, train=False, mutable=True))
        stages = main_variables.pop("intermediates")["encoder"]
        params, batch_stats = {"main": main_variables["params"]}, {"main": main_variables.get("batch_stats", {})}
        output_size = (images.shape[1], images.shape[2])
        side = self._side_modules()
        side_rngs = jax.random.split(side_rng, max(1, sum(len(members) for members in side.values())))
        position = 0
        cells_so_far: list[jax.Array] = []
        for group, members in side.items():
            params[group], batch_stats[group] = {}, {}
            for index, (task, module) in enumerate(members):
                arguments = self._cell_arguments(module, index, cells_so_far, None)
                outputs, variables = module.init_with_output(side_rngs[position], stages, output_size, train=False,
                                                             **arguments)
                position += 1
                if isinstance(module, AuxiliaryCells):
                    cells_so_far.extend(outputs[1])
                params[group][task] = variables["params"]
                if "batch_stats" in variables:
                    batch_stats[group][task] = variables["batch_stats"]
            if not batch_stats[group]:
                del batch_stats[group]
        return {"params": params, "batch_stats": batch_stats}

    def apply(self, variables: Mapping[str, Any], images: jax.Array, *, train: bool,
              genotype: jax.Array | None = None,
              dropout_rng: jax.Array | None = None) -> tuple[ModelOutputs, dict[str, Any]]:
        """Forward main + aux + deep supervision; returns outputs and batch_stats shaped like the input's.

        ``genotype``: the int array [T, n, 5] a searchable aux build needs (and any other build refuses).
        ``dropout_rng``: the key of the decoders' dropout in training (only ``deeplab`` has dropout); without it
        dropout is the identity. This is ``heads_forward(shared_forward(...))`` with every module reading the same
        representation.
        """
        representation, shared_stats = self.shared_forward(variables, images, train=train)
        outputs, heads_stats = self.heads_forward(variables, self.reads(representation), images, train=train,
                                                  genotype=genotype, dropout_rng=dropout_rng)
        return outputs, merge_batch_stats(shared_stats, heads_stats)

    def shared_forward(self, variables: Mapping[str, Any], images: jax.Array, *,
                       train: bool) -> tuple[Representation, dict[str, Any]]:
        """The shared part (encoder, and Context's ASPP): its ``Representation`` and new batch_stats (``main``'s
        shared modules only)."""
        params, batch_stats = variables["params"], variables.get("batch_stats", {})
        decoder_input, state = self.main.apply(_module_variables(params["main"], batch_stats.get("main")), images,
                                               train=train, part="shared",
                                               mutable=["batch_stats", "intermediates"])
        shared_stats = {name: value for name, value in state.get("batch_stats", {}).items()
                        if not name.endswith(DECODER_SUFFIX)}
        return (Representation(decoder_input, state["intermediates"]["encoder"]),
                {"main": shared_stats} if "main" in batch_stats else {})

    def reads(self, representation: Representation) -> dict[str, dict[str, Any]]:
        """What each task-specific module reads, ``{group: {task: ...}}`` (groups ``main`` (the decoders),
        ``aux``, ``deep_supervision``): the argument of ``heads_forward``. A caller may hand each module its own
        copy; the gradient of a copy is then that module's losses' gradient of the representation."""
        reads = {"main": {task: representation.decoder_input for task in self.tasks}}
        for group, members in self._side_modules().items():
            reads[group] = {task: representation.stages for task, _ in members}
        return reads

    def heads_forward(self, variables: Mapping[str, Any], reads: Mapping[str, Mapping[str, Any]],
                      images: jax.Array, *, train: bool, genotype: jax.Array | None = None,
                      dropout_rng: jax.Array | None = None) -> tuple[ModelOutputs, dict[str, Any]]:
        """The task-specific modules on ``reads`` (shaped like ``reads(...)``): outputs and their new batch_stats
        (``main``'s decoders, ``aux``, ``deep_supervision``). ``images`` give the output size only.
        ``dropout_rng``: as in ``apply`` (each decoder draws its own mask from it)."""
        if (genotype is not None) != self.aux_searchable:
            raise ValueError("model.apply: pass genotype=<int array [T, n, 5]> exactly when the aux cells are "
                             f"searchable (aux.genotype is a CellSpace); searchable={self.aux_searchable}")
        params, batch_stats = variables["params"], variables.get("batch_stats", {})
        main_outputs, main_state = self.main.apply(
            _module_variables(params["main"], batch_stats.get("main")), images, train=train, part="decoders",
            decoder_inputs=reads["main"], mutable=["batch_stats"],
            rngs=None if dropout_rng is None else {"dropout": dropout_rng})
        new_batch_stats = {}
        if "main" in batch_stats:
            new_batch_stats["main"] = {name: value for name, value in main_state.get("batch_stats", {}).items()
                                       if name.endswith(DECODER_SUFFIX)}
        output_size = (images.shape[1], images.shape[2])
        side_outputs = {"aux": {}, "deep_supervision": {}}
        cells_so_far: list[jax.Array] = []
        for group, members in self._side_modules().items():
            group_stats = batch_stats.get(group, {})
            for index, (task, module) in enumerate(members):
                prediction, state = module.apply(
                    _module_variables(params[group][task], group_stats.get(task)), reads[group][task], output_size,
                    train=train, mutable=["batch_stats"], **self._cell_arguments(module, index, cells_so_far, genotype))
                if isinstance(module, AuxiliaryCells):
                    prediction, cells = prediction
                    cells_so_far.extend(cells)
                side_outputs[group][task] = prediction
                if task in group_stats:
                    new_batch_stats.setdefault(group, {})[task] = state["batch_stats"]
        outputs = ModelOutputs(main=main_outputs, aux=side_outputs["aux"],
                               deep_supervision=side_outputs["deep_supervision"])
        return outputs, new_batch_stats

    @property
    def reads_own_copies(self) -> bool:
        """True when every task-specific module's output depends on its own read only (Auxi-NAS cells also read
        the cells of earlier tasks' aux modules)."""
        return not any(isinstance(module, AuxiliaryCells) for _, module in self.aux_modules)

    def _cell_arguments(self, module: nn.Module, index: int, cells_so_far: list[jax.Array],
                        genotype: jax.Array | None) -> dict[str, Any]:
        """Extra call arguments of an Auxi-NAS aux module: earlier tasks' cells and, if searchable, its tokens."""
        if not isinstance(module, AuxiliaryCells):
            return {}
        tokens = None
        if module.searchable:
            space = module.space
            shape = (len(space.tasks), space.cells_per_task, 5)
            # init runs every branch, so any valid genotype will do; location 0 is readable by every cell.
            tokens = jnp.zeros(shape, jnp.int32) if genotype is None else jnp.asarray(genotype, jnp.int32)
            if tokens.shape != shape:
                raise ValueError(f"model.apply: genotype array of shape {tokens.shape}; this space needs {shape}")
            tokens = tokens[index]
        return {"earlier_cells": tuple(cells_so_far), "tokens": tokens}

    def predict(self, main_variables: Mapping[str, Any], images: jax.Array) -> dict[str, jax.Array]:
        """Inference: ``main`` alone in eval mode, from ``{'params': P['main'], 'batch_stats': S['main']}``."""
        return self.main.apply(main_variables, images, train=False)


def merge_batch_stats(shared: Mapping[str, Any], heads: Mapping[str, Any]) -> dict[str, Any]:
    """The batch_stats of a whole forward from those of ``shared_forward`` and ``heads_forward``."""
    merged = {group: dict(value) for group, value in heads.items()}
    if "main" in shared:
        merged["main"] = {**shared["main"], **merged.get("main", {})}
    return merged


def _module_variables(params: Any, batch_stats: Any) -> dict[str, Any]:
    variables = {"params": params}
    if batch_stats is not None:
        variables["batch_stats"] = batch_stats
    return variables


def build_model(model_cfg: Any, tasks: Mapping[str, int], aux_cfg: Any = None,
                deep_supervision_cfg: Any = None, *, input_size: tuple[int, int] | None = None) -> MultiTaskModel:
    """Validate the config (one ValueError naming field, value and allowed values) and assemble the model.

    ``tasks`` maps task name -> output channels (segmentation: number of classes; depth 1; normal 3).
    ``aux_cfg`` / ``deep_supervision_cfg`` may be None (no aux modules / no deep supervision).
    ``input_size``: the training crop (H, W), which ``model.aspp_rates='feature'`` scales the rates to.
    """
    task_channels = _validated_tasks(tasks)
    encoder = _choice(model_cfg, "model.encoder", "encoder", ENCODERS)
    decoder = _choice(model_cfg, "model.decoder", "decoder", DECODERS)
    dtype_name = _choice(model_cfg, "model.dtype", "dtype", tuple(DTYPES), default="float32")
    width_multiplier = _field(model_cfg, "model.width_multiplier", "width_multiplier", 1.0)
    if isinstance(width_multiplier, bool) or not isinstance(width_multiplier, numbers.Real) or width_multiplier <= 0:
        raise UserError(f"model.width_multiplier: expected a positive number, got {width_multiplier!r}")
    output_stride = _field(model_cfg, "model.output_stride", "output_stride", None)
    if output_stride is None:
        output_stride = DEFAULT_OUTPUT_STRIDE[decoder]
    elif isinstance(output_stride, bool) or output_stride not in OUTPUT_STRIDES:
        raise UserError(f"model.output_stride: got {output_stride!r}; expected None (decoder default) or one of "
                         f"{OUTPUT_STRIDES}")
    head_channels = _field(model_cfg, "model.head_channels", "head_channels", None)
    if head_channels is None:
        head_channels = DEFAULT_HEAD_CHANNELS[decoder]
    _require_positive_int("model.head_channels", head_channels)
    rates = check_aspp_rates(_field(model_cfg, "model.aspp_rates", "aspp_rates", "paper"))
    rates = resolve_aspp_rates(rates, output_stride, input_size) if decoder in ASPP_DECODERS else None
    dtype = DTYPES[dtype_name]
    stages = encoder_stages(encoder, width_multiplier=float(width_multiplier), output_stride=output_stride)
    stage_names = tuple(stage.name for stage in stages)

    main = MultiTaskNet(encoder=encoder, width_multiplier=float(width_multiplier), output_stride=output_stride,
                        decoder=decoder, tasks=tuple(task_channels.items()), head_channels=head_channels,
                        dtype=dtype, aspp_rates=rates)
    selectable = encoder_features(encoder, width_multiplier=float(width_multiplier), output_stride=output_stride)
    aux_modules = _aux_modules(aux_cfg, task_channels, stage_names, selectable, dtype)
    deep_supervision_modules = _deep_supervision_modules(deep_supervision_cfg, task_channels, stage_names,
                                                         min(head_channels, _MAX_DEEP_SUPERVISION_HIDDEN), dtype)
    return MultiTaskModel(main=main, aux_modules=aux_modules, deep_supervision_modules=deep_supervision_modules,
                          stage_names=stage_names)


def _aux_modules(aux_cfg: Any, task_channels: dict[str, int], stage_names: tuple[str, ...],
                 selectable: tuple[str, ...], dtype: Dtype) -> tuple[tuple[str, AuxiliaryModule | AuxiliaryCells], ...]:
    """The aux modules; ``selectable`` = every feature ``aux.features`` may name (stages, ResNet blocks)."""
    genotype = _field(aux_cfg, "aux.genotype", "genotype", None) if aux_cfg is not None else None
    if genotype is not None:
        return _cell_modules(aux_cfg, genotype, task_channels, stage_names, dtype)
    aux_tasks = _selected_tasks(aux_cfg, "aux.tasks", task_channels)
    if not aux_tasks:
        return ()
    features = _field(aux_cfg, "aux.features", "features", ()) or ()
    if isinstance(features, str):
        raise UserError(f"aux.features: expected a sequence of stage names, got the string {features!r}; "
                         f"the encoder sows {stage_names}")
    features = tuple(features)
    unknown = [name for name in features if name not in selectable]
    if unknown:
        blocks = [name for name in selectable if name not in stage_names]
        also = f" and the residual blocks layer<l>_block<b> ({blocks[0]} .. {blocks[-1]})" if blocks else ""
        raise UserError(f"aux.features: {unknown} not sown by this encoder; it sows {stage_names}{also}")
    repeated = sorted({name for name in features if features.count(name) > 1})
    if repeated:
        raise UserError(f"aux.features: stage(s) {repeated} listed more than once")
    features = tuple(name for name in selectable if name in features) if features else stage_names
    adaptor = _choice(aux_cfg, "aux.adaptor", "adaptor", ADAPTORS, default="conv1x1")
    aggregate = _choice(aux_cfg, "aux.aggregate", "aggregate", tuple(AGGREGATES), default="concat")
    resolution = _choice(aux_cfg, "aux.resolution", "resolution", RESOLUTIONS, default="hierarchy")
    channels = _field(aux_cfg, "aux.channels", "channels", 64)
    _require_positive_int("aux.channels", channels)
    min_head_size = check_min_head_size(_field(aux_cfg, "aux.min_head_size", "min_head_size", 0))
    return tuple((task, AuxiliaryModule(task=task, out_channels=task_channels[task], features=features,
                                        adaptor=adaptor, aggregate=aggregate, channels=channels,
                                        resolution=resolution, min_head_size=min_head_size, dtype=dtype))
                 for task in aux_tasks)


def _cell_modules(aux_cfg: Any, genotype: Any, task_channels: dict[str, int], stage_names: tuple[str, ...],
                  dtype: Dtype) -> tuple[tuple[str, AuxiliaryCells], ...]:
    """Auxi-NAS aux modules from a genotype path / Genotype (static) or a CellSpace (searchable)."""
    if isinstance(genotype, (str, bytes)) or hasattr(genotype, "__fspath__"):
        source, genotype = f"aux.genotype {str(genotype)!r}", load_genotype(genotype)
    elif isinstance(genotype, (Genotype, CellSpace)):
        source = "aux.genotype"
    else:
        raise UserError(f"aux.genotype: expected a genotype JSON path, a nas.Genotype or a nas.CellSpace, got "
                         f"{type(genotype).__name__}")
    space = genotype.space if isinstance(genotype, Genotype) else genotype
    space.check_fits(tasks=tuple(task_channels), stages=stage_names, source=source)
    for field, value in (("tasks", space.tasks), ("features", space.stages)):
        configured = tuple(_field(aux_cfg, f"aux.{field}", field, ()) or ())
        if configured and configured != tuple(value):
            raise GenotypeError(f"aux.{field}={configured} contradicts {source}, which has {field} {tuple(value)}; "
                                f"leave aux.{field} empty (the genotype sets it) or make them equal")
    channels = _field(aux_cfg, "aux.channels", "channels", 64)
    _require_positive_int("aux.channels", channels)
    cells = genotype.cells if isinstance(genotype, Genotype) else (None,) * len(space.tasks)
    return tuple((task, AuxiliaryCells(task=task, out_channels=task_channels[task], space=space, task_index=index,
                                       cells=cells[index], channels=channels, dtype=dtype))
                 for index, task in enumerate(space.tasks))


def _deep_supervision_modules(ds_cfg: Any, task_channels: dict[str, int], stage_names: tuple[str, ...],
                              hidden_channels: int, dtype: Dtype) -> tuple[tuple[str, DeepSupervisionHeads], ...]:
    ds_tasks = _selected_tasks(ds_cfg, "deep_supervision.tasks", task_channels)
    return tuple((task, DeepSupervisionHeads(task=task, out_channels=task_channels[task], stages=stage_names,
                                             hidden_channels=hidden_channels, dtype=dtype))
                 for task in ds_tasks)


def _selected_tasks(cfg: Any, what: str, task_channels: dict[str, int]) -> tuple[str, ...]:
    """Validated ``cfg.tasks`` (a subset of the main tasks, in main-task order); () when cfg is None."""
    if cfg is None:
        return ()
    selected = _field(cfg, what, "tasks", ()) or ()
    task_lib.validate_tasks(selected, available=tuple(task_channels),
                            what=f"{what} (must be among the main tasks)")
    return tuple(task for task in task_channels if task in selected)


def _validated_tasks(tasks: Mapping[str, int]) -> dict[str, int]:
    if not isinstance(tasks, Mapping) or not tasks:
        raise UserError(f"tasks: expected a non-empty mapping task name -> output channels, got {tasks!r}")
    task_lib.validate_tasks(tuple(tasks), what="tasks")
    for task, channels in tasks.items():
        _require_positive_int(f"tasks[{task!r}] (output channels)", channels)
        if task in _FIXED_TASK_CHANNELS and channels != _FIXED_TASK_CHANNELS[task]:
            raise UserError(f"tasks[{task!r}]: a {task} head has {_FIXED_TASK_CHANNELS[task]} output channel(s), "
                             f"got {channels!r}")
    return dict(tasks)


_MISSING = object()


def _field(cfg: Any, what: str, attribute: str, default: Any = _MISSING) -> Any:
    value = getattr(cfg, attribute, _MISSING)
    if value is _MISSING:
        if default is _MISSING:
            raise UserError(f"{what}: missing from the config ({type(cfg).__name__})")
        return default
    return value


def _choice(cfg: Any, what: str, attribute: str, allowed: tuple[str, ...], default: Any = _MISSING) -> str:
    value = _field(cfg, what, attribute, default)
    if not isinstance(value, str) or value not in allowed:
        raise UserError(f"{what}: unknown value {value!r}; expected one of {allowed}")
    return value


def _require_positive_int(what: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise UserError(f"{what}: expected a positive integer, got {value!r}")
