"""Training input pipeline throughput (images/s) at the paper's and the demo's settings, per worker count.

    python benchmarks/input_pipeline.py --data_dir=/tmp/tfds --workers=0,1,2

Paper settings: 385x385 crops, scale [0.5, 2.1], flip, batch 12, from `synthetic_scenes/default` (192x256 stored,
so crops are mostly upsampled like NYUv2's 480x640 at scale ~0.8-2). Demo settings: 64x80 crops, scale
[0.75, 1.5], batch 16, from `synthetic_scenes/demo`. Missing datasets are built first (not timed).
"""

import argparse
import os
import time
import types

from auxmtl_jax import input_pipeline

SETTINGS = {
    "paper": dict(config="default", crop_size=(385, 385), scale_range=(0.5, 2.1), batch=12),
    "demo": dict(config="demo", crop_size=(64, 80), scale_range=(0.75, 1.5), batch=16),
}


def images_per_second(setting: dict, data_dir: str, num_workers: int, num_batches: int) -> float:
    """Pulls `num_batches` batches after a warm-up (worker start-up excluded) and returns images per second."""
    dataset_cfg = types.SimpleNamespace(name="synthetic_scenes", config=setting["config"], data_dir=data_dir,
                                        manual_dir=None, prepare=True, train_split="train", eval_split="test")
    input_cfg = types.SimpleNamespace(crop_size=setting["crop_size"], scale_range=setting["scale_range"], flip=True,
                                      eval_size=None, num_workers=num_workers, mean=(123.675, 116.28, 103.53),
                                      std=(58.395, 57.12, 57.375))
    input_pipeline.prepare_dataset(dataset_cfg)
    iterator = input_pipeline.create_train_iterator(dataset_cfg, input_cfg, tasks=("segmentation", "depth", "normal"),
                                                    global_batch_size=setting["batch"], seed=0)
    try:
        for _ in range(max(2, num_workers * 2)):
            next(iterator)
        start = time.perf_counter()
        for _ in range(num_batches):
            next(iterator)
        return num_batches * setting["batch"] / (time.perf_counter() - start)
    finally:
        iterator.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default=os.path.expanduser("~/tensorflow_datasets"))
    parser.add_argument("--workers", default="0,1,2", help="comma-separated worker counts")
    parser.add_argument("--settings", default="paper,demo", help=f"comma-separated, from {list(SETTINGS)}")
    parser.add_argument("--batches", type=int, default=30)
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    print(f"{cores} CPU cores; {args.batches} batches per measurement; tasks segmentation+depth+normal")
    print(f"{'setting':<8} {'crop':>9} {'batch':>5} {'workers':>7} {'images/s':>9} {'ms/batch':>9}")
    for name in args.settings.split(","):
        setting = SETTINGS[name]
        for workers in (int(w) for w in args.workers.split(",")):
            rate = images_per_second(setting, args.data_dir, workers, args.batches)
            crop = "x".join(map(str, setting["crop_size"]))
            print(f"{name:<8} {crop:>9} {setting['batch']:>5} {workers:>7} {rate:>9.1f} "
                  f"{1000 * setting['batch'] / rate:>9.1f}", flush=True)


if __name__ == "__main__":
    main()
