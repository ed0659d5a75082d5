"""Training input pipeline throughput (images/s) and bytes per batch at the paper's and the demo's settings, per
worker count.

    python benchmarks/input_pipeline.py --data_dir=/tmp/tfds --workers=0,1,2,auto

Paper settings: 385x385 crops, scale [0.5, 2.1], flip, batch 12, from `synthetic_scenes/default` (192x256 stored,
so crops are mostly upsampled like NYUv2's 480x640 at scale ~0.8-2). Demo settings: 64x80 crops, scale
[0.75, 1.5], batch 16, from `synthetic_scenes/demo`. Missing datasets are built first (not timed).

Workers: 0 = augment in the training process, N = N grain worker processes, `auto` = the sizing rule of
`auxmtl_jax.input_sizing` for this host (config.input.num_workers=None). `--threads` sets config.input.num_threads
(default: the sizing rule). The batch is what the trainer receives (uint8 images since issue 27); bytes are per
host batch, image and labels. Runs against an older checkout too (PYTHONPATH=<checkout>): it then reports that
checkout's float32 batches.
"""

import argparse
import os
import time
import types

import numpy as np

from auxmtl_jax import input_pipeline

SETTINGS = {
    "paper": dict(config="default", crop_size=(385, 385), scale_range=(0.5, 2.1), batch=12),
    "demo": dict(config="demo", crop_size=(64, 80), scale_range=(0.75, 1.5), batch=16),
}
MEAN, STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)  # config.input's defaults
TASKS = ("segmentation", "depth", "normal")


def measure(setting: dict, data_dir: str, num_workers: int | None, num_threads: int | None,
            num_batches: int) -> dict:
    """Pulls `num_batches` batches after a warm-up (worker start-up excluded): images/s, bytes, sizing used."""
    dataset_cfg = types.SimpleNamespace(name="synthetic_scenes", config=setting["config"], data_dir=data_dir,
                                        manual_dir=None, prepare=True, train_split="train", eval_split="test")
    input_cfg = types.SimpleNamespace(crop_size=setting["crop_size"], scale_range=setting["scale_range"], flip=True,
                                      eval_size=None, num_workers=num_workers, num_threads=num_threads, mean=MEAN,
                                      std=STD)
    input_pipeline.prepare_dataset(dataset_cfg)
    iterator = input_pipeline.create_train_iterator(dataset_cfg, input_cfg, tasks=TASKS,
                                                    global_batch_size=setting["batch"], seed=0)
    sizing = getattr(iterator, "sizing", None)  # absent before issue 27
    workers = sizing.num_workers if sizing else num_workers
    try:
        for _ in range(max(2, workers * 2)):
            batch = next(iterator)
        start, cpu_start = time.perf_counter(), time.process_time()
        for _ in range(num_batches):
            next(iterator)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    finally:
        iterator.close()
    images = num_batches * setting["batch"]
    return {"rate": images / seconds, "cpu_ms": 1000 * cpu_seconds / images, "workers": workers,
            "threads": sizing.num_threads if sizing else "-", "image_dtype": np.dtype(batch["image"].dtype).name,
            "image_mb": batch["image"].nbytes / 1e6, "batch_mb": sum(v.nbytes for v in batch.values()) / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default=os.path.expanduser("~/tensorflow_datasets"))
    parser.add_argument("--workers", default="0,1,2", help="comma-separated worker counts; 'auto' = sizing rule")
    parser.add_argument("--threads", type=int, default=None, help="config.input.num_threads (default: sizing rule)")
    parser.add_argument("--settings", default="paper,demo", help=f"comma-separated, from {list(SETTINGS)}")
    parser.add_argument("--batches", type=int, default=30)
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    print(f"{cores} CPU cores; {args.batches} batches per measurement; tasks {'+'.join(TASKS)}; "
          f"auxmtl_jax from {os.path.dirname(input_pipeline.__file__)}")
    print(f"{'setting':<8} {'crop':>9} {'batch':>5} {'workers':>7} {'threads':>7} {'images/s':>9} {'ms/batch':>9} "
          f"{'CPU ms/img':>10} {'image':>7} {'image MB':>8} {'batch MB':>8}")
    for name in args.settings.split(","):
        setting = SETTINGS[name]
        for text in args.workers.split(","):
            workers = None if text == "auto" else int(text)
            result = measure(setting, args.data_dir, workers, args.threads, args.batches)
            crop = "x".join(map(str, setting["crop_size"]))
            shown = f"{result['workers']}{'*' if workers is None else ''}"
            print(f"{name:<8} {crop:>9} {setting['batch']:>5} {shown:>7} {result['threads']!s:>7} "
                  f"{result['rate']:>9.1f} {1000 * setting['batch'] / result['rate']:>9.1f} {result['cpu_ms']:>10.2f} "
                  f"{result['image_dtype']:>7} {result['image_mb']:>8.2f} {result['batch_mb']:>8.2f}", flush=True)
    print("CPU ms/img: this process's CPU time (all its threads) per image: the whole cost in-process, the "
          "trainer's side of the hand-over (receiving each batch) with workers; less sensitive to a busy host "
          "than images/s")
    if "auto" in args.workers.split(","):
        print("* workers from the host's cores (config.input.num_workers=None)")


if __name__ == "__main__":
    main()
