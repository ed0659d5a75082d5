r"""Train and inference images/s of our JAX network against its PyTorch twin, eager and ``torch.compile``d.

One process builds, for every (mode, strategy, dtype) row, three runners: ours (``auxmtl_jax.training.train_step``
jitted, or ``model.predict`` jitted), the twin of benchmarks/torch_twin.py in eager mode, and the twin through
``torch.compile``. Timing blocks are interleaved over all runners (A, B, C, A, B, C, ...) and the median block
is reported, so the ratios hold on a noisy machine. Inference runs ``main`` alone, which is the same network for
every strategy, so it has one row per dtype. Data are random (no dataset needed); setup columns give the time
to build, compile and warm up each runner.

Needs torch: ``pip install -e '.[torch]'``. Run from the repository root:

  # CPU: batch 4 at 128x128, 2 threads for both frameworks (pinned to 2 cores)
  python benchmarks/compare_torch.py --device=cpu --threads=2 --size=128 --batch=4
  # GPU, the paper net (configs/sunrgbd_three_task.py: MobileNetV2 U-shape, 3 tasks, 385x385, batch 12);
  # ours needs a CUDA jaxlib (pip install -U 'jax[cuda12]' or 'jax[cuda13]')
  python benchmarks/compare_torch.py --device=cuda --size=385 --batch=12
  # a seconds-long smoke run
  python benchmarks/compare_torch.py --device=cpu --threads=2 --size=64 --batch=2 --steps=1 --blocks=1 \
      --config=configs/sunrgbd_three_task.py:width=0.25 --no-compile

What is compared with what:

* float32: both plain float32. On GPU both allow TF32 in float32 convolutions, which is JAX's default precision
  (torch: ``cudnn.allow_tf32``, default on, and ``set_float32_matmul_precision('high')``);
  ``--highest-precision`` turns TF32 off in both.
* bfloat16: ours sets ``model.dtype='bfloat16'`` (bf16 compute, float32 parameters and optimiser, float32
  outputs and losses); the twin runs forward under ``torch.autocast(dtype=torch.bfloat16)``, which likewise keeps
  float32 parameters and casts convolutions to bf16 (task outputs and losses are float32 in both).
* The optimiser is SGD (momentum 0.9, weight decay 1e-4) in both; the twin's learning rate is constant (ours
  decays it, which costs nothing measurable). ``torch.compile`` covers forward, losses and backward; the twin's
  optimiser step stays eager (``foreach`` on GPU).

Threads (``--threads N``, CPU): before JAX or torch is imported, the process is pinned to N of its CPUs
(``os.sched_setaffinity``, like ``taskset``; ``--no-pin`` skips it) and ``PJRT_NPROC=N`` is set. In jax 0.10 the
CPU client sizes its intra-op (``tf_XLAEigen``) thread pool from ``PJRT_NPROC`` (or ``NPROC``), else from the
CPUs in the affinity mask; XLA_FLAGS has no thread-count flag for it (``--intra_op_parallelism_threads`` is
rejected) and ``--xla_cpu_multi_thread_eigen=false`` leaves the pool's size as it is. torch gets
``torch.set_num_threads(N)`` (and ``OMP_NUM_THREADS=N``) and one inter-op thread. The equivalent by hand:
``PJRT_NPROC=2 taskset -c 0,1 python ...``. Give the run idle cores: torch's OpenMP threads slow down 10-100x
when other processes keep their cores busy (XLA's pool far less), which would make the ratios meaningless.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import importlib.util
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
IMPLEMENTATIONS = ("ours", "eager", "compile")
MODES = ("train", "infer")
DTYPES = ("float32", "bfloat16")
# Warm-up runs single steps until two in a row agree within WARMUP_TOLERANCE (torch's first CPU steps create
# oneDNN primitives and optimiser buffers, first GPU steps autotune), between these bounds.
MIN_WARMUP_STEPS = 2
MAX_WARMUP_STEPS = 10
WARMUP_TOLERANCE = 1.25


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/sunrgbd_three_task.py",
                        help="config file, optionally with ':variant' (e.g. ':width=0.5,decoder=context')")
    parser.add_argument("--size", type=int, default=385, help="square input size (pixels)")
    parser.add_argument("--batch", type=int, default=12, help="images per step")
    parser.add_argument("--num-classes", type=int, default=13, help="segmentation classes")
    parser.add_argument("--strategies", default="joint,auxi_all", help="comma-separated training strategies")
    parser.add_argument("--dtypes", default="float32,bfloat16", help=f"comma-separated, of {DTYPES}")
    parser.add_argument("--modes", default="train,infer", help=f"comma-separated, of {MODES}")
    parser.add_argument("--blocks", type=int, default=5, help="timed blocks per runner (interleaved)")
    parser.add_argument("--steps", type=int, default=5, help="steps per timed block")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for both frameworks")
    parser.add_argument("--no-pin", action="store_true", help="with --threads: do not pin the process to N CPUs")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where both frameworks run")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile runners")
    parser.add_argument("--compile-mode", default=None,
                        help="torch.compile mode (default, reduce-overhead, max-autotune, ...)")
    parser.add_argument("--channels-last", action="store_true", help="twin in torch.channels_last memory format")
    parser.add_argument("--highest-precision", action="store_true",
                        help="float32 convolutions without TF32 in both frameworks (GPU)")
    args = parser.parse_args(argv)
    args.strategies = _split(args.strategies)
    args.dtypes = _split(args.dtypes, allowed=DTYPES, what="--dtypes")
    args.modes = _split(args.modes, allowed=MODES, what="--modes")
    if min(args.size, args.batch, args.blocks, args.steps) < 1 or (args.threads is not None and args.threads < 1):
        parser.error("--size, --batch, --blocks, --steps and --threads must be positive")
    return args


def _split(text: str, allowed: Sequence[str] | None = None, what: str = "") -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [item for item in items if allowed is not None and item not in allowed]
    if unknown or not items:
        raise SystemExit(f"{what}: got {text!r}; expected a comma-separated subset of {allowed}")
    return items


# ---------------------------------------------------------------------------------------------------------------
# Process setup: must run before jax and torch are imported


def configure_process(threads: int | None, pin: bool, device: str) -> list[str]:
    """Thread counts, CPU pinning and JAX's platform; returns notes on what could not take effect."""
    notes = []
    if device == "cpu":
        os.environ["JAX_PLATFORMS"] = "cpu"
    else:
        os.environ["JAX_PLATFORMS"] = "cuda"
        # JAX would otherwise reserve 75% of the GPU's memory and starve torch.
        os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    if threads is not None:
        if pin:
            available = sorted(os.sched_getaffinity(0))
            if threads > len(available):
                notes.append(f"--threads={threads} but only {len(available)} CPUs are available to this process")
            os.sched_setaffinity(0, available[:threads])
        os.environ["PJRT_NPROC"] = str(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)
    if "jax" in sys.modules:
        notes.append("jax was imported before this script configured it: the JAX platform and thread settings "
                     "apply only if they were set before (e.g. PJRT_NPROC, JAX_PLATFORMS)")
    return notes


def configure_torch(threads: int | None, highest_precision: bool) -> None:
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
        with contextlib.suppress(RuntimeError):  # refused once torch has run parallel work (e.g. under pytest)
            torch.set_num_interop_threads(1)
    torch.backends.cudnn.benchmark = True  # XLA autotunes its convolutions too
    torch.backends.cudnn.allow_tf32 = not highest_precision
    torch.set_float32_matmul_precision("highest" if highest_precision else "high")
    # Every (strategy, dtype) row compiles the same step functions again; keep them all cached.
    for limit in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, limit):
            setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 64))


def configure_jax(highest_precision: bool) -> None:
    import jax

    if highest_precision:
        jax.config.update("jax_default_matmul_precision", "highest")


# ---------------------------------------------------------------------------------------------------------------
# Configs and data


def load_config(spec: str):
    """``path[:variant]`` -> the config module's ``get_config(variant)``; the path may be relative to the repo."""
    path_text, _, variant = spec.partition(":")
    path = Path(path_text)
    if not path.exists() and (REPO_ROOT / path).exists():
        path = REPO_ROOT / path
    module_spec = importlib.util.spec_from_file_location(f"_compare_torch_config_{path.stem}", path)
    if module_spec is None or not path.exists():
        raise SystemExit(f"--config: no config file at {path_text!r}")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(variant or None)


def row_config(base, strategy: str, dtype: str, size: int, batch: int):
    """The base config with a strategy, compute dtype, input size and batch; one device."""
    from auxmtl_jax import variants

    config = variants.apply_strategy(copy.deepcopy(base), strategy)
    config.model.dtype = dtype
    config.input.crop_size = (size, size)
    config.batch_size = batch
    config.num_devices = 1
    return config


def random_batch(config, num_classes: int, seed: int = 0) -> dict[str, Any]:
    """NHWC images and labels of the config's tasks (depth > 0 everywhere, unit normals)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    height, width = config.input.crop_size
    shape = (config.batch_size, height, width)
    batch = {"image": rng.standard_normal((*shape, 3), dtype=np.float32)}
    if "segmentation" in config.tasks:
        batch["segmentation"] = rng.integers(0, num_classes, shape, dtype=np.int32)
    if "depth" in config.tasks:
        batch["depth"] = rng.uniform(0.5, 8.0, (*shape, 1)).astype(np.float32)
    if "normal" in config.tasks:
        normal = rng.standard_normal((*shape, 3)).astype(np.float32)
        batch["normal"] = normal / np.linalg.norm(normal, axis=-1, keepdims=True)
    return batch


# ---------------------------------------------------------------------------------------------------------------
# Runners: each times blocks of steps of one implementation of one row


def warm_up(block: Callable[[int], float]) -> Callable[[int], float]:
    """Runs ``block`` one step at a time until two consecutive steps take about as long; returns it."""
    times = []
    while len(times) < MAX_WARMUP_STEPS:
        times.append(block(1))
        if len(times) >= MIN_WARMUP_STEPS and max(times[-2:]) <= WARMUP_TOLERANCE * min(times[-2:]):
            break
    return block


@dataclasses.dataclass
class Runner:
    """``block(steps) -> seconds per step`` of one implementation for one (mode, strategy, dtype) row."""

    row: tuple[str, str, str]
    implementation: str
    block: Callable[[int], float] | None
    setup_seconds: float
    error: str | None = None


def ours_train_block(config, num_classes: int, batch) -> Callable[[int], float]:
    """Our real training step (``training.train_step`` jitted with donation), compiled and warmed up."""
    import jax

    from auxmtl_jax import parallel
    from auxmtl_jax import training as train

    model = train.create_model(config, num_classes)
    mesh = parallel.create_mesh(1)
    state, state_sharding, tx, learning_rate_fn = train.create_sharded_train_state(config, model, mesh)
    step = jax.jit(functools.partial(train.train_step, model=model, config=config, tx=tx,
                                     learning_rate_fn=learning_rate_fn),
                   in_shardings=(state_sharding, parallel.batch_sharding(mesh)),
                   out_shardings=(state_sharding, parallel.replicated_sharding(mesh)), donate_argnums=0)
    device_batch = parallel.global_batch(batch, mesh)
    compiled = step.lower(state, device_batch).compile()
    holder = {"state": state}

    def block(steps: int) -> float:
        state = holder["state"]
        start = time.perf_counter()
        for _ in range(steps):
            state, metrics = compiled(state, device_batch)
        jax.block_until_ready((state, metrics))
        holder["state"] = state
        return (time.perf_counter() - start) / steps

    return warm_up(block)


def ours_infer_block(config, num_classes: int, batch) -> Callable[[int], float]:
    """Our inference (``model.predict``: ``main`` alone, eval mode) jitted, compiled and warmed up."""
    import jax

    from auxmtl_jax import training as train

    model = train.create_model(config, num_classes)
    variables = train.init_variables(model, jax.random.key(config.seed))
    main_variables = {"params": variables["params"]["main"], "batch_stats": variables["batch_stats"]["main"]}
    device = jax.devices()[0]
    main_variables = jax.device_put(main_variables, device)
    images = jax.device_put(batch["image"], device)
    compiled = jax.jit(model.predict).lower(main_variables, images).compile()

    def block(steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            outputs = compiled(main_variables, images)
        jax.block_until_ready(outputs)
        return (time.perf_counter() - start) / steps

    return warm_up(block)


def torch_batch(batch, device, channels_last: bool) -> tuple[Any, dict[str, Any]]:
    """NCHW images and labels on ``device`` (segmentation as int64 ids)."""
    import torch

    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    images = torch.from_numpy(batch["image"].transpose(0, 3, 1, 2).copy()).to(device)
    images = images.contiguous(memory_format=memory_format)
    labels = {}
    for task, label in batch.items():
        if task == "segmentation":
            labels[task] = torch.from_numpy(label).long().to(device)
        elif task != "image":
            labels[task] = torch.from_numpy(label.transpose(0, 3, 1, 2).copy()).to(device)
    return images, labels


def _synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _build_twin(config, num_classes: int, device, channels_last: bool):
    import torch

    import torch_twin
    from auxmtl_jax import training as train

    twin = torch_twin.build_twin_from_config(config, train.task_channels(config.tasks, num_classes)).to(device)
    return twin.to(memory_format=torch.channels_last) if channels_last else twin


def _compute_dtype(config):
    import torch

    return torch.bfloat16 if config.model.dtype == "bfloat16" else None


def torch_train_block(config, num_classes: int, batch, device, *, compile: bool | str,
                      channels_last: bool) -> Callable[[int], float]:
    """The twin's training step (forward, losses, backward, SGD), eager or compiled, warmed up."""
    import torch_twin

    twin = _build_twin(config, num_classes, device, channels_last)
    optimizer = torch_twin.make_optimizer(twin, config.optimizer.learning_rate, config.optimizer.momentum,
                                          config.optimizer.weight_decay)
    step = torch_twin.make_train_step(twin, optimizer, aux_weight=config.aux.weight,
                                      compute_dtype=_compute_dtype(config), compile=compile)
    images, labels = torch_batch(batch, device, channels_last)

    def block(steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            loss = step(images, labels)
        loss.item()
        _synchronize(device)
        return (time.perf_counter() - start) / steps

    return warm_up(block)


def torch_infer_block(config, num_classes: int, batch, device, *, compile: bool | str,
                      channels_last: bool) -> Callable[[int], float]:
    """The twin's ``main`` in eval mode without gradients, eager or compiled, warmed up."""
    import torch_twin

    twin = _build_twin(config, num_classes, device, channels_last)
    predict = torch_twin.make_inference(twin, compute_dtype=_compute_dtype(config), compile=compile)
    images, _ = torch_batch(batch, device, channels_last)

    def block(steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            predict(images)
        _synchronize(device)
        return (time.perf_counter() - start) / steps

    return warm_up(block)


def make_runner(row: tuple[str, str, str], implementation: str, build: Callable[[], Callable[[int], float]]) -> Runner:
    """Builds (and warms up) one runner; a failure becomes a table note instead of ending the run."""
    start = time.perf_counter()
    try:
        block = build()
    except Exception as error:  # noqa: BLE001  (one failing runner, e.g. no C++ compiler for inductor, is reported)
        first_line = (str(error).strip().splitlines() or [""])[0]
        return Runner(row, implementation, None, time.perf_counter() - start, f"{type(error).__name__}: {first_line}")
    return Runner(row, implementation, block, time.perf_counter() - start)


def build_runners(args: argparse.Namespace, base_config) -> list[Runner]:
    import torch

    device = torch.device(args.device)
    compile_setting = args.compile_mode or True
    implementations = [name for name in IMPLEMENTATIONS if not (args.no_compile and name == "compile")]
    runners = []
    for mode in args.modes:
        for dtype in args.dtypes:
            strategies = args.strategies if mode == "train" else ["main"]
            for strategy in strategies:
                config = row_config(base_config, "joint" if mode == "infer" else strategy, dtype, args.size,
                                    args.batch)
                batch = random_batch(config, args.num_classes)
                row = (mode, strategy, dtype)
                for implementation in implementations:
                    if implementation == "ours":
                        build_ours = ours_train_block if mode == "train" else ours_infer_block
                        build = functools.partial(build_ours, config, args.num_classes, batch)
                    else:
                        build_torch = torch_train_block if mode == "train" else torch_infer_block
                        build = functools.partial(
                            build_torch, config, args.num_classes, batch, device,
                            compile=compile_setting if implementation == "compile" else False,
                            channels_last=args.channels_last)
                    runner = make_runner(row, implementation, build)
                    print(f"  ready: {' '.join(row)} {implementation} ({runner.setup_seconds:.1f} s)"
                          + (f"  FAILED {runner.error}" if runner.error else ""), flush=True)
                    runners.append(runner)
    return runners


def time_interleaved(runners: Sequence[Runner], blocks: int, steps: int) -> dict[int, list[float]]:
    """Seconds per step of every block, runner by runner in turn (A, B, C, A, B, C, ...)."""
    seconds = {index: [] for index in range(len(runners))}
    for _ in range(blocks):
        for index, runner in enumerate(runners):
            if runner.block is not None:
                seconds[index].append(runner.block(steps))
    return seconds


# ---------------------------------------------------------------------------------------------------------------
# Report


def _ratio(numerator: float | None, denominator: float | None) -> str:
    return f"{numerator / denominator:.2f}x" if numerator and denominator else "n/a"


def _rate(images_per_second: float | None) -> str:
    return f"{images_per_second:.1f}" if images_per_second else "n/a"


def format_table(runners: Sequence[Runner], seconds: dict[int, list[float]], batch: int) -> str:
    """One line per row: images/s per implementation (median block), ours/eager, ours/compile, setup seconds."""
    rows: dict[tuple[str, str, str], dict[str, tuple[float | None, float]]] = {}
    for index, runner in enumerate(runners):
        rate = batch / statistics.median(seconds[index]) if seconds[index] else None
        rows.setdefault(runner.row, {})[runner.implementation] = (rate, runner.setup_seconds)
    lines = ["| mode | strategy | dtype | ours img/s | torch eager img/s | torch.compile img/s | ours/eager | "
             "ours/compile | setup s (ours/eager/compile) |", "|---|---|---|---|---|---|---|---|---|"]
    for (mode, strategy, dtype), results in rows.items():
        rate = {name: results.get(name, (None, 0.0))[0] for name in IMPLEMENTATIONS}
        setup = "/".join(f"{results[name][1]:.0f}" if name in results else "-" for name in IMPLEMENTATIONS)
        lines.append(f"| {mode} | {strategy} | {dtype} | {_rate(rate['ours'])} | {_rate(rate['eager'])} | "
                     f"{_rate(rate['compile'])} | {_ratio(rate['ours'], rate['eager'])} | "
                     f"{_ratio(rate['ours'], rate['compile'])} | {setup} |")
    return "\n".join(lines)


def describe_setup(args: argparse.Namespace, base_config) -> str:
    import jax
    import torch

    device = jax.devices()[0]
    torch_device = (torch.cuda.get_device_name(0) if args.device == "cuda"
                    else f"cpu, {torch.get_num_threads()} threads")
    cpus = len(os.sched_getaffinity(0))
    model = base_config.model
    return (f"jax {jax.__version__} on {device.platform} ({device.device_kind}, PJRT_NPROC="
            f"{os.environ.get('PJRT_NPROC', 'unset')})  torch {torch.__version__} on {torch_device}  "
            f"CPUs available: {cpus}\n"
            f"model: {model.encoder} {model.decoder} width {model.width_multiplier} aux.resolution "
            f"{base_config.aux.resolution}  tasks {tuple(base_config.tasks)}  batch {args.batch} x "
            f"{args.size}x{args.size}  {args.blocks} blocks of {args.steps} steps (median block)  torch bf16: "
            f"autocast  channels_last: {args.channels_last}")


def main(argv: Sequence[str] | None = None) -> str:
    """Runs the comparison and returns (and prints) the table."""
    args = parse_args(argv)
    notes = configure_process(args.threads, not args.no_pin, args.device)
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # torch_twin lives next to this file
    try:
        import torch  # noqa: F401
    except ImportError:
        raise SystemExit("compare_torch needs PyTorch: pip install -e '.[torch]'") from None
    configure_torch(args.threads, args.highest_precision)
    configure_jax(args.highest_precision)
    for note in notes:
        warnings.warn(note, stacklevel=2)
    base_config = load_config(args.config)
    print("building runners (compile + warm-up):", flush=True)
    runners = build_runners(args, base_config)
    seconds = time_interleaved(runners, args.blocks, args.steps)
    report = describe_setup(args, base_config) + "\n" + format_table(runners, seconds, args.batch)
    failures = [f"{' '.join(runner.row)} {runner.implementation}: {runner.error}" for runner in runners
                if runner.error]
    if failures:
        report += "\nfailed runners:\n" + "\n".join(f"  {failure}" for failure in failures)
    print(report, flush=True)
    return report


if __name__ == "__main__":
    main()
