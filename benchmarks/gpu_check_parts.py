"""The measuring parts of benchmarks/gpu_check.py: numerics (GPU vs CPU, the two depthwise implementations), our
train step, the PyTorch twin and the input pipeline. Each takes a ``Part`` (gpu_check.py) that times rows, applies
the part's time cap and records rows, skips and failures; nothing here writes files or prints the report."""

from __future__ import annotations

import contextlib
import functools
import importlib
import time

from gpu_check_env import INPUT_PACKAGES, REPO, importable

CONFIG_MODULE = "auxmtl_configs.sunrgbd_three_task"  # the paper's setting: MobileNetV2 x1.0 U-shape, 3 tasks, 385², 12
GENOTYPE = REPO / "configs" / "genotypes" / "example_three_task.json"
NUM_CLASSES = 13
# Max |a - b| / max |b| (b: the reference) per output / parameter group; a row passes when every group is within.
TOLERANCE = {"highest": 1e-3, "default": 5e-2}


def make_config(tiny: bool, strategy: str, dtype: str = "float32", weighting: str = "equal",
                size: tuple[int, int] | None = None, batch: int | None = None):
    """The paper config (sunrgbd_three_task) with a strategy, dtype and weighting; ``tiny``: its runlocal size."""
    variant = ",".join((["runlocal"] if tiny else []) + [f"strategy={strategy}", f"dtype={dtype}",
                                                          f"weighting={weighting}"])
    config = importlib.import_module(CONFIG_MODULE).get_config(variant)
    config.num_devices = 1
    if tiny:
        config.batch_size = 2
    if size is not None:
        config.input.crop_size = size
    if batch is not None:
        config.batch_size = batch
    return config


@contextlib.contextmanager
def depthwise(implementation: str | None):
    """Pins ``layers.DepthwiseConv``'s switch ('shifted' multiply-adds or 'grouped' conv; None: its own choice,
    shifted on CPU and grouped elsewhere by ``jax.default_backend()``) for the models traced inside."""
    from auxmtl_jax.models import layers

    original = layers.DepthwiseConv
    if implementation is not None:
        layers.DepthwiseConv = type("DepthwiseConv", (original,), {
            "__annotations__": {"implementation": "str | None"}, "implementation": implementation,
            "__module__": original.__module__})
    try:
        yield
    finally:
        layers.DepthwiseConv = original


# ---------------------------------------------------------------------------------------------------------------
# Numerics


def _forward_and_grad(model, config):
    from auxmtl_jax import tasks as tasks_lib
    import jax

    def loss(params, batch_stats, batch):
        outputs, _ = model.apply({"params": params, "batch_stats": batch_stats}, batch["image"], train=False)
        total = sum(tasks_lib.task_loss(task, prediction, batch) for task, prediction in outputs.main.items())
        total += config.aux.weight * sum(tasks_lib.task_loss(task, prediction, batch)
                                         for task, prediction in outputs.aux.items())
        return total, {"main": outputs.main, "aux": outputs.aux}

    def forward_and_grad(params, batch_stats, batch):  # a fresh function per call: a fresh jit cache entry
        (_, outputs), grads = jax.value_and_grad(loss, has_aux=True)(params, batch_stats, batch)
        return outputs, grads

    return forward_and_grad


def _groups(tree) -> dict[str, list]:
    """Leaves grouped by their first two path keys (main/segmentation, main/encoder, aux/depth, ...)."""
    import jax
    import numpy as np

    groups = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = [str(getattr(entry, "key", entry)) for entry in path[:2]]
        groups.setdefault("/".join(keys), []).append(np.asarray(leaf, np.float64))
    return groups


def compare(tree, reference) -> dict:
    """Worst group of max |a - b| / max |b|; non-finite values anywhere make it inf."""
    import numpy as np

    worst = {"group": None, "max_abs": 0.0, "ref_max": 0.0, "rel": -1.0}
    for (name, leaves), reference_leaves in zip(_groups(tree).items(), _groups(reference).values()):
        diffs = [np.abs(a - b) for a, b in zip(leaves, reference_leaves)]
        max_abs = max(float(diff.max()) for diff in diffs)
        ref_max = max(float(np.abs(b).max()) for b in reference_leaves)
        finite = all(np.isfinite(a).all() for a in leaves) and np.isfinite(max_abs)
        rel = max_abs / ref_max if finite and ref_max > 0 else (0.0 if finite and max_abs == 0 else float("inf"))
        if rel > worst["rel"]:
            worst = {"group": name, "max_abs": max_abs, "ref_max": ref_max, "rel": rel}
    return worst


def numerics(part, tiny: bool, gpu) -> None:
    """Forward outputs and gradients (of the summed main and aux losses) of Joint and Auxi-all: the two depthwise
    implementations against each other on CPU, and (with a GPU) each on GPU against the same on CPU, at 'highest'
    matmul precision, then at the default one (TF32 on GPU). Same parameters and batch everywhere (made once,
    moved with device_put).

    BatchNorm uses its running statistics (train=False): with batch statistics, a random-init network at a small
    batch has near-constant channels whose variance is ~0, and BN multiplies their rounding noise by up to
    1/sqrt(eps) ~ 316 per layer: the two depthwise forms, equal up to rounding, then differ by 5e-3 (outputs) and
    5e-2 (gradients) at 2x32x40, against 5e-7 with running statistics. The convolutions, forward and backward,
    are the same computation either way."""
    import jax
    from auxmtl_jax import training as train
    import compare_torch

    cpu = jax.devices("cpu")[0]
    size, batch_size = ((32, 40), 2) if tiny else ((96, 96), 2)
    setups, results = {}, {}

    def setup(strategy):
        if strategy not in setups:
            config = make_config(tiny, strategy, size=size, batch=batch_size)
            model = train.create_model(config, NUM_CLASSES)
            variables = jax.device_get(train.init_variables(model, jax.random.key(0)))
            setups[strategy] = (config, model, variables, compare_torch.random_batch(config, NUM_CLASSES))
        return setups[strategy]

    def result(strategy, implementation, device, precision):
        key = (strategy, implementation, device.platform, device.id, precision)
        if key not in results:
            config, model, variables, batch = setup(strategy)
            options = {"xla_backend_optimization_level": 0} if device.platform == "cpu" else None  # reference
            arguments = jax.device_put((variables["params"], variables["batch_stats"], batch), device)
            with depthwise(implementation), jax.default_matmul_precision(precision):
                function = jax.jit(_forward_and_grad(model, config), compiler_options=options)
                results[key] = jax.device_get(function(*arguments))
        return results[key]

    # Most telling first (a row that does not fit the time cap is skipped): the GPU's own depthwise form.
    plan = [(("shifted", cpu), ("grouped", cpu), "highest")]
    if gpu is not None:
        plan = [(("grouped", gpu), ("grouped", cpu), "highest"), *plan, (("shifted", gpu), ("shifted", cpu), "highest"),
                (("grouped", gpu), ("grouped", cpu), "default")]
    strategies = ("auxi_all",) if tiny else ("joint", "auxi_all")  # CI time: Auxi-all holds Joint's network
    pairs = [(strategy, *entry) for entry in plan for strategy in strategies]
    for strategy, (impl_a, device_a), (impl_b, device_b), precision in pairs:
        what = f"{strategy} {impl_a}@{device_a.platform} vs {impl_b}@{device_b.platform} precision={precision}"

        def row(strategy=strategy, impl_a=impl_a, device_a=device_a, impl_b=impl_b, device_b=device_b,
                precision=precision):
            outputs_a, grads_a = result(strategy, impl_a, device_a, precision)
            outputs_b, grads_b = result(strategy, impl_b, device_b, "highest")
            rows = []
            for quantity, a, b in (("forward", outputs_a, outputs_b), ("gradient", grads_a, grads_b)):
                worst = compare(a, b)
                rows.append({"strategy": strategy, "quantity": quantity, "compared": f"{impl_a}@{device_a.platform}",
                             "reference": f"{impl_b}@{device_b.platform}", "precision": precision,
                             "size": f"{batch_size}x{size[0]}x{size[1]}", **worst,
                             "tolerance": TOLERANCE[precision], "passed": worst["rel"] <= TOLERANCE[precision]})
            return rows

        part.rows(what, row)


# ---------------------------------------------------------------------------------------------------------------
# Train step: ours, the PyTorch twin


NAS = f"auxi_nas:{GENOTYPE}"
# (strategy, weighting, dtype), most telling first: rows that do not fit the time cap are skipped.
TRAIN_ROWS = [("joint", "equal", "float32"), ("auxi_all", "equal", "float32"), ("joint", "equal", "bfloat16"),
              ("auxi_all", "equal", "bfloat16"), (NAS, "equal", "float32"), ("joint", "pcgrad", "float32"),
              (NAS, "equal", "bfloat16"), ("joint", "pcgrad", "bfloat16")]
# CI size: plain, aux modules (NAS cells), the treatment and bfloat16 once each.
TINY_TRAIN_ROWS = [("joint", "equal", "float32"), (NAS, "equal", "float32"), ("joint", "pcgrad", "bfloat16")]


def _name(strategy: str, weighting: str) -> str:
    name = "auxi_nas (example genotype)" if strategy.startswith("auxi_nas") else strategy
    return name if weighting == "equal" else f"{name} / {weighting}"


def ours_row(tiny: bool, strategy: str, weighting: str, dtype: str, steps: int, precision: str,
             implementation: str | None = None) -> dict:
    """Train-state creation, compile, XLA's memory estimate and FLOPs, images/s of ``training.train_step``."""
    import jax
    from auxmtl_jax import parallel
    from auxmtl_jax import training as train
    from auxmtl_jax import weighting as weighting_lib
    import compare_torch

    config = make_config(tiny, strategy, dtype, weighting)
    model = train.create_model(config, NUM_CLASSES)
    mesh = parallel.create_mesh(1)
    start = time.perf_counter()
    state, state_sharding, tx, learning_rate_fn = train.create_sharded_train_state(config, model, mesh)
    jax.block_until_ready(state)
    init_seconds = time.perf_counter() - start
    step = jax.jit(functools.partial(train.train_step, model=model, config=config, tx=tx,
                                     learning_rate_fn=learning_rate_fn,
                                     weighting=weighting_lib.from_config(config, steps_per_epoch=100)),
                   in_shardings=(state_sharding, parallel.batch_sharding(mesh)),
                   out_shardings=(state_sharding, parallel.replicated_sharding(mesh)), donate_argnums=0)
    batch = parallel.global_batch(compare_torch.random_batch(config, NUM_CLASSES), mesh)
    start = time.perf_counter()
    with depthwise(implementation), jax.default_matmul_precision(precision):
        compiled = step.lower(state, batch).compile()
    compile_seconds = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
    try:
        memory = compiled.memory_analysis()
        xla_bytes = int(memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
                        - memory.alias_size_in_bytes)
    except Exception:  # noqa: BLE001  (not every backend reports it)
        xla_bytes = None
    for _ in range(1 if tiny else 2):  # warm-up
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    seconds = (time.perf_counter() - start) / steps
    stats = mesh.devices.flat[0].memory_stats() or {}
    height, width = config.input.crop_size
    default_form = "shifted" if jax.default_backend() == "cpu" else "grouped"  # layers.DepthwiseConv's choice
    return {"implementation": "ours (JAX)", "strategy": _name(strategy, weighting), "dtype": dtype,
            "depthwise": implementation or f"{default_form} (default)",
            "batch": f"{config.batch_size}x{height}x{width}",
            "width": config.model.width_multiplier, "images_per_s": config.batch_size / seconds,
            "step_ms": 1000 * seconds, "compile_s": compile_seconds, "init_s": init_seconds,
            "gflop_per_step": float(cost.get("flops", float("nan"))) / 1e9, "xla_bytes": xla_bytes,
            "peak_bytes_in_use": stats.get("peak_bytes_in_use"), "timed_steps": steps,
            "loss_finite": bool(jax.numpy.isfinite(metrics["loss/total"]))}


def train_rows(part, tiny: bool, steps: int, precision: str, gpu) -> None:
    """Joint, Auxi-all, Auxi-NAS (example genotype) and Joint / PCGrad in float32 and bfloat16 (TRAIN_ROWS'
    order); last, on a GPU, Joint float32 with the shifted depthwise form (the CPU one) for comparison."""
    import jax

    rows = [(*row, None) for row in (TINY_TRAIN_ROWS if tiny else TRAIN_ROWS)]
    if gpu is not None:
        rows.append(("joint", "equal", "float32", "shifted"))
    for strategy, weighting, dtype, implementation in rows:
        what = f"ours {_name(strategy, weighting)} {dtype}" + (f" depthwise={implementation}" if implementation else "")
        part.rows(what, lambda s=strategy, w=weighting, d=dtype, i=implementation: [
            ours_row(tiny, s, w, d, steps, precision, i)])
        jax.clear_caches()


def torch_rows(part, tiny: bool, steps: int, gpu) -> None:
    """The twin of benchmarks/torch_twin.py (via compare_torch's runners): eager, then ``torch.compile``; Joint and
    Auxi-all in float32 and bfloat16 autocast. Tiny: eager float32 on CPU."""
    try:
        import torch
    except ImportError as error:
        return part.skip(f"torch is not importable ({error}); the twin needs torch (pip install -e '.[torch]')")
    if gpu is not None and not torch.cuda.is_available():
        return part.skip(f"torch {torch.__version__} has no CUDA device (torch.cuda.is_available() is False)")
    import compare_torch

    compare_torch.configure_torch(None, highest_precision=False)
    device = torch.device("cuda" if gpu is not None else "cpu")
    plan = [(mode, dtype, strategy) for mode in ("eager", "compile") for dtype in ("float32", "bfloat16")
            for strategy in ("joint", "auxi_all")]
    if tiny:
        plan = [("eager", "float32", "joint")]
    for mode, dtype, strategy in plan:
        def row(mode=mode, dtype=dtype, strategy=strategy):
            config = make_config(tiny, strategy, dtype)
            batch = compare_torch.random_batch(config, NUM_CLASSES)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            block = compare_torch.torch_train_block(config, NUM_CLASSES, batch, device,
                                                    compile=mode == "compile", channels_last=False)
            setup_seconds = time.perf_counter() - start
            seconds = block(steps)
            height, width = config.input.crop_size
            return [{"implementation": f"torch {mode}", "strategy": strategy, "dtype": dtype,
                     "batch": f"{config.batch_size}x{height}x{width}", "width": config.model.width_multiplier,
                     "images_per_s": config.batch_size / seconds, "step_ms": 1000 * seconds,
                     "compile_s": setup_seconds, "peak_bytes_in_use":
                     torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
                     "timed_steps": steps}]

        part.rows(f"torch {mode} {strategy} {dtype}", row)
    return None


# ---------------------------------------------------------------------------------------------------------------
# Input pipeline


def input_rows(part, tiny: bool, data_dir: str, batches: int, step_rate: float | None) -> None:
    """benchmarks/input_pipeline.py at the paper setting (tiny: the demo one) per worker count, next to the
    images/s that Joint's float32 step consumes."""
    missing = [name for name in INPUT_PACKAGES if not importable(name)]
    if missing:
        return part.skip(f"{', '.join(missing)} not installed: the input pipeline needs them "
                         "(pip install grain tensorflow-datasets)")
    bench = importlib.import_module("input_pipeline")  # benchmarks/input_pipeline.py
    setting_name = "demo" if tiny else "paper"
    counts = (0,) if tiny else (0, 4, 8, 16, *((None,) if hasattr(bench, "measure") else ()))
    for workers in counts:
        def row(workers=workers):
            measured = _measure_input(bench, bench.SETTINGS[setting_name], data_dir, workers, batches)
            return [{"setting": setting_name, "workers": "auto" if workers is None else workers,
                     **{key: measured.get(key) for key in ("threads", "image_dtype", "batch_mb")},
                     "images_per_s": measured["rate"], "step_images_per_s": step_rate,
                     "feeds_step": None if step_rate is None else measured["rate"] >= step_rate}]

        part.rows(f"input {setting_name} workers={'auto' if workers is None else workers}", row)
    return None


def _measure_input(bench, setting, data_dir: str, workers: int | None, batches: int) -> dict:
    """Its ``measure`` (issue 27: images/s, threads, batch bytes) or, in older checkouts, ``images_per_second``."""
    if hasattr(bench, "measure"):
        return bench.measure(setting, data_dir, workers, None, batches)
    return {"rate": bench.images_per_second(setting, data_dir, workers, batches)}
