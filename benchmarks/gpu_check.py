r"""A GPU check in one command: numerics GPU vs CPU, the train step at paper settings, the PyTorch twin beside it
and the input pipeline against the step; writes gpu_report.json and gpu_report.md into --out.

    python benchmarks/gpu_check.py --out=$OUT          # on the GPU host: at most 450 s (--time-limit)
    python benchmarks/gpu_check.py --platform=cpu --tiny --out=/tmp/gpu_check   # the same code path, CI-sized

--tiny: the runlocal network (width 0.25) at batch 2 x 32x40, 1 timed step; numerics Auxi-all only (CPU vs CPU
without a GPU); train rows Joint and Auxi-NAS in float32, Joint / PCGrad in bfloat16; torch eager Joint only.

Parts, in this order, each with a time cap (checked before every row: a row that would not fit is skipped, and
the report says so); a watchdog writes the report and exits with 124 at --time-limit whatever is running:

1. environment: package versions, devices, and two import probes in fresh interpreters: which of
   auxmtl_jax.models / weighting / variants / training import without grain and tensorflow_datasets, and also
   without ml_collections (auxmtl_jax.input_pipeline imports grain and TFDS only where it uses them, so the
   training package imports without them; the input part is skipped). ml_collections is needed (configs, variants, weighting): where it is not
   installed, the pure-Python wheels in --wheels (default .whl/ in the repository, git-ignored) go on sys.path;
   without it the script stops at once with one line naming the wheel (report written). See docs/benchmarks.md.
2. numerics: forward outputs and gradients of Joint and Auxi-all (paper network, batch 2 at 96x96; tiny: its
   runlocal network at 32x40) with the same parameters and batch on every device: the shifted and grouped
   depthwise implementations against each other on CPU, then each on GPU against itself on CPU at matmul
   precision 'highest', then at the default precision (TF32). BatchNorm on running statistics (batch statistics
   of a random-init network amplify rounding: see gpu_check_parts.numerics). Error: max |a - b| / max |b| in
   the worst output or parameter group; tolerance 1e-3 ('highest'), 5e-2 ('default').
3. train: training.train_step at paper settings (configs/sunrgbd_three_task.py: MobileNetV2 x1.0 U-shape,
   segmentation + depth + normal, 385x385, batch 12): Joint, Auxi-all, Auxi-NAS (configs/genotypes/
   example_three_task.json), Joint / PCGrad, in float32 then bfloat16: images/s, compile and init time, XLA's
   memory estimate and the device's peak bytes in use (the process's peak so far: rows run in order).
4. input: benchmarks/input_pipeline.py's images/s at 0/4/8/16 workers against Joint's float32 images/s
   (skipped with a line where grain / tensorflow_datasets are not installed).
5. torch: the twin (benchmarks/torch_twin.py) eager and under torch.compile, Joint and Auxi-all, float32 and
   bfloat16 (skipped with a line without torch, or without CUDA on a GPU run).

Exit status: 0 when every part ran and every numerics row passed, 1 otherwise, 2 when it could not start,
124 at the time limit.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import sys
import threading
import time
import traceback
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCHMARKS.parent), str(BENCHMARKS)]  # this checkout's auxmtl_jax; gpu_check_parts

import gpu_check_env as env_lib  # noqa: E402  (both: standard library only at import)
import gpu_check_parts as parts  # noqa: E402

# Each part's cap: this share of the time left when it starts, over the shares of the parts still to run (so the
# time a skipped part leaves goes to the later ones).
SHARES = {"numerics": 0.25, "train": 0.42, "input": 0.08, "torch": 0.25}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or ".", help="report folder (default: $OUT or .)")
    parser.add_argument("--platform", choices=("gpu", "cpu"), default="gpu", help="where the train step runs")
    parser.add_argument("--tiny", action="store_true", help="CI size: runlocal network, batch 2, 1-2 timed steps")
    parser.add_argument("--time-limit", type=float, default=None, help="seconds for everything (default 450; "
                        "tiny 300); each part gets a share of it (SHARES)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per train row (default 10; tiny 1)")
    parser.add_argument("--precision", default="default", help="matmul precision of the train rows")
    parser.add_argument("--parts", default="numerics,train,input,torch", help="comma-separated parts to run")
    parser.add_argument("--wheels", default=str(BENCHMARKS.parent / ".whl"),
                        help="folder of carried pure-Python wheels (ml_collections) used when not installed")
    parser.add_argument("--simulate-missing", default="", help="comma-separated packages to treat as not "
                        "installed (rehearse the GPU host: grain,tensorflow_datasets,ml_collections)")
    parser.add_argument("--data-dir", default=os.path.expanduser("~/tensorflow_datasets"), help="input part's TFDS")
    parser.add_argument("--input-batches", type=int, default=None, help="batches per input row (default 20; tiny 3)")
    args = parser.parse_args(argv)
    args.time_limit = args.time_limit or (300.0 if args.tiny else 450.0)
    args.steps = args.steps or (1 if args.tiny else 10)
    args.input_batches = args.input_batches or (3 if args.tiny else 20)
    args.parts = [name.strip() for name in args.parts.split(",") if name.strip()]
    return args


class Report:
    """The report, written (JSON and markdown, atomically) after every change, so a partial one always exists."""

    def __init__(self, out: Path, args, argv):
        self.out, self.lock, self.start = out, threading.RLock(), time.monotonic()
        self.current = "start"
        self.data = {"command": " ".join(["python", "benchmarks/gpu_check.py", *(sys.argv[1:] if argv is None
                                                                                  else argv)]),
                     "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                     "complete": False, "exit_status": None, "wall_s": 0.0,
                     "settings": {"platform": args.platform, "tiny": args.tiny, "time_limit_s": args.time_limit,
                                  "steps": args.steps, "train_precision": args.precision,
                                  "simulate_missing": args.simulate_missing or None},
                     "environment": {}, "parts": {}, "numerics": [], "train": [], "input": [], "torch": []}

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def log(self, message: str) -> None:
        print(f"[{self.elapsed():6.1f} s] {message}", flush=True)

    def update(self, function) -> None:
        with self.lock:
            function(self.data)
            self.write()

    def write(self) -> None:
        with self.lock:
            self.data["wall_s"] = round(self.elapsed(), 1)
            self.out.mkdir(parents=True, exist_ok=True)
            for name, text in (("gpu_report.json", json.dumps(self.data, indent=1, default=str)),
                               ("gpu_report.md", markdown(self.data))):
                temporary = self.out / f".{name}.tmp"
                temporary.write_text(text + "\n")
                os.replace(temporary, self.out / name)


class Part:
    """One part's rows under its time cap: ``rows(what, build)`` runs ``build() -> [row, ...]`` unless the part's
    time (or the global time) left is less than its slowest row so far; failures become rows' notes."""

    def __init__(self, report: Report, name: str, cap: float, global_end: float):
        self.report, self.name, self.cap = report, name, cap
        self.start, self.global_end, self.slowest, self.skipped = report.elapsed(), global_end, 0.0, []
        report.update(lambda data: data["parts"].__setitem__(name, {"status": "running", "cap_s": round(cap)}))

    def left(self) -> float:
        now = self.report.elapsed()
        return min(self.cap - (now - self.start), self.global_end - now)

    def skip(self, reason: str) -> None:
        self.skipped.append(reason)
        self.report.log(f"{self.name}: skipped {reason}")

    def rows(self, what: str, build) -> None:
        if self.left() <= self.slowest:
            return self.skip(f"{what}: time cap ({self.left():.0f} s left, slowest row so far "
                             f"{self.slowest:.0f} s)")
        self.report.current = f"{self.name}: {what}"
        self.report.log(f"{self.name}: {what} ...")
        start = time.monotonic()
        try:
            rows = build()
        except Exception as error:  # noqa: BLE001  (one failing row is reported; the next one runs)
            first = (str(error).strip().splitlines() or [""])[0][:300]
            rows = [{"what": what, "error": f"{type(error).__name__}: {first}"}]
            traceback.print_exc()
        seconds = time.monotonic() - start
        self.slowest = max(self.slowest, seconds)
        self.report.update(lambda data: data[self.name].extend({**row, "row_s": round(seconds, 1)} for row in rows))
        self.report.log(f"{self.name}: {what} done in {seconds:.1f} s"
                        + "".join(f"; {row['error']}" for row in rows if "error" in row))
        return None

    def finish(self, status: str | None = None) -> None:
        rows = self.report.data.get(self.name, [])
        failed = any("error" in row or row.get("passed") is False for row in rows)
        status = status or ("failed" if failed else "partial" if any("time cap" in s for s in self.skipped)
                            else "skipped" if self.skipped and not rows else "ok")
        record = {"status": status, "elapsed_s": round(self.report.elapsed() - self.start, 1),
                  "cap_s": round(self.cap), "skipped": self.skipped}
        self.report.update(lambda data: data["parts"].__setitem__(self.name, record))


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e-2 or abs(value) >= 1e4 else f"{value:.2f}"
    return "" if value is None else str(value)


def _table(rows, columns) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['what']} | FAILED: {row['error']} |" + " |" * (len(columns) - 2))
        else:
            lines.append("| " + " | ".join(_cell(row.get(column)) for column in columns) + " |")
    return lines


def markdown(data) -> str:
    env = data["environment"]
    lines = [f"# GPU check: {env.get('device', '?')}", "",
             f"`{data['command']}`, started {data['started']}, {data['wall_s']} s, complete: {data['complete']}, "
             f"exit status {data['exit_status']}", ""]
    if data.get("stopped"):
        lines += [f"**Stopped:** {data['stopped']}", ""]
    lines += ["## Environment", "", f"python {env.get('python')}; jax backend {env.get('backend')}; "
              f"devices {env.get('devices')}; config package: {env.get('config_package')}"]
    versions = env.get("packages", {})
    lines += ["", "installed: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v),
              "", "missing: " + (", ".join(k for k, v in versions.items() if not v) or "none")]
    for setting, results in env.get("import_probe", {}).items():
        lines += ["", f"imports {setting}:"] + [f"- `{target}`: {result}" for target, result in results.items()]
    for key in ("ml_collections", "wheels_added", "wheels_to_carry"):
        if env.get(key) is not None:
            lines += ["", f"{key.replace('_', ' ')}: {env[key] or 'none'}"]
    sections = [("numerics", "Numerics (forward and gradient of the summed losses, BatchNorm on running statistics; "
                 "error = max |a - b| / max |b| in the worst output or parameter group)",
                 ["strategy", "quantity", "compared", "reference", "precision", "size", "group", "max_abs",
                  "ref_max", "rel", "tolerance", "passed"]),
                ("train", f"Train step (matmul precision {data['settings']['train_precision']})",
                 ["strategy", "dtype", "depthwise", "batch", "width", "images_per_s", "step_ms", "compile_s",
                  "init_s", "gflop_per_step", "xla_bytes", "peak_bytes_in_use", "loss_finite"]),
                ("input", "Input pipeline vs Joint's float32 step",
                 ["setting", "workers", "threads", "image_dtype", "batch_mb", "images_per_s", "step_images_per_s",
                  "feeds_step"]),
                ("torch", "PyTorch twin (compile_s: build, compile and warm-up)",
                 ["implementation", "strategy", "dtype", "batch", "images_per_s", "step_ms", "compile_s",
                  "peak_bytes_in_use"])]
    for key, title, columns in sections:
        lines += ["", f"## {title}", ""]
        if data[key]:
            lines += _table(data[key], columns)
        part = data["parts"].get(key, {})
        lines += [f"- skipped: {reason}" for reason in part.get("skipped", [])]
        if not part:
            lines.append("- not run")
    lines += ["", "## Parts", "", "| part | status | elapsed s | cap s |", "|---|---|---|---|"]
    lines += [f"| {name} | {p['status']} | {p.get('elapsed_s', '')} | {p.get('cap_s', '')} |"
              for name, p in data["parts"].items()]
    return "\n".join(lines)


def environment(report: Report, args) -> bool:
    """Packages, probes, the wheels and stand-ins, then jax's devices; False when the check cannot go on."""
    env = report.data["environment"]
    env.update(python=platform.python_version(), packages=env_lib.package_versions(args.simulate_missing.split(",")))
    report.log("environment: import probes (fresh interpreters, grain / tensorflow_datasets blocked) ...")
    env["import_probe"] = env_lib.probe_imports(Path(args.wheels))
    env["wheels_added"] = [] if env_lib.importable("ml_collections") else env_lib.add_wheels(Path(args.wheels))
    env["wheels_to_carry"] = env_lib.wheels_to_carry()
    if not env["wheels_to_carry"]:
        import ml_collections

        env["ml_collections"] = ml_collections.__file__
    if env["wheels_to_carry"]:
        report.data["stopped"] = (f"not importable: {', '.join(env['wheels_to_carry'])}; carry the wheel(s): "
                                  f"pip download --no-deps -d .whl {' '.join(env['wheels_to_carry'])}, then run "
                                  "with .whl/ in the working tree (docs/benchmarks.md, GPU check)")
        return False
    if args.tiny and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0 "
                                   "--xla_llvm_disable_expensive_passes=true")  # CI: compile time dominates
    if args.platform == "cpu":
        os.environ["JAX_PLATFORMS"] = "cpu"
    else:
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave GPU memory for torch
    import jax

    importlib.import_module("auxmtl_jax.training")  # imports without grain and TFDS (the input pipeline's lazily)
    env["config_package"] = env_lib.config_package()
    env.update(jax=jax.__version__, backend=jax.default_backend(),
               devices=[f"{d.platform}:{d.device_kind}" for d in jax.devices()])
    if args.platform == "gpu":
        try:
            gpu = jax.devices("gpu")[0]
        except RuntimeError as error:
            report.data["stopped"] = f"--platform=gpu but JAX has no GPU: {error}"
            return False
        env["device"] = f"{gpu.device_kind} (jax {jax.__version__})"
    else:
        env["device"] = f"CPU only, {os.cpu_count()} cores (jax {jax.__version__})"
    return True


def run(args, report: Report) -> int:
    global_end = args.time_limit - 5
    env_lib.simulate_missing([n.strip() for n in args.simulate_missing.split(",") if n.strip()], Path(args.wheels))
    report.current = "environment"
    ready = environment(report, args)
    record = {"status": "ok" if ready else "stopped", "elapsed_s": round(report.elapsed(), 1)}
    report.update(lambda data: data["parts"].__setitem__("environment", record))
    if not ready:
        report.log(f"STOPPED: {report.data['stopped']}")
        return 2
    report.log(f"environment: {report.data['environment']['device']}")
    import jax

    gpu = jax.devices("gpu")[0] if args.platform == "gpu" else None
    joint_rate = None
    for index, name in enumerate(SHARES):
        to_run = [later for later in list(SHARES)[index:] if later in args.parts] if name in args.parts else []
        cap = (global_end - report.elapsed()) * SHARES[name] / sum(SHARES[later] for later in to_run) if to_run else 0
        part = Part(report, name, cap, global_end)
        if name not in args.parts:
            part.finish("not requested")
            continue
        try:
            if name == "numerics":
                parts.numerics(part, args.tiny, gpu)
            elif name == "train":
                parts.train_rows(part, args.tiny, args.steps, args.precision, gpu)
                joint_rate = next((row["images_per_s"] for row in report.data["train"]
                                   if row.get("strategy") == "joint" and row.get("dtype") == "float32"), None)
            elif name == "input":
                parts.input_rows(part, args.tiny, args.data_dir, args.input_batches, joint_rate)
            else:
                parts.torch_rows(part, args.tiny, args.steps, gpu)
            part.finish()
        except Exception as error:  # noqa: BLE001  (a part that fails outside its rows; the next part runs)
            traceback.print_exc()
            part.skip(f"part failed: {type(error).__name__}: {str(error)[:300]}")
            part.finish("failed")
        jax.clear_caches()
    statuses = [p["status"] for p in report.data["parts"].values()]
    return 0 if all(status in ("ok", "skipped", "not requested") for status in statuses) else 1


def main(argv=None) -> int:
    args = parse_args(argv)
    report = Report(Path(args.out), args, argv)

    def stop_at_time_limit():
        with report.lock:
            report.data.update(exit_status=124, stopped=f"time limit {args.time_limit:.0f} s reached during "
                               f"{report.current}")
            report.write()
        report.log(f"STOPPED: time limit reached during {report.current}; report in {args.out}")
        env_lib.kill_descendants()  # e.g. torch.compile's workers, which would keep stdout open
        os._exit(124)

    watchdog = threading.Timer(args.time_limit, stop_at_time_limit)
    watchdog.daemon = True
    watchdog.start()
    try:
        status = run(args, report)
    except Exception as error:  # noqa: BLE001  (the report says why, then the traceback)
        report.data["stopped"] = f"{type(error).__name__}: {error}"
        traceback.print_exc()
        status = 2
    watchdog.cancel()
    report.update(lambda data: data.update(complete=status == 0, exit_status=status))
    report.log(f"done: exit status {status}; {args.out}/gpu_report.json and gpu_report.md")
    return status


if __name__ == "__main__":
    sys.exit(main())
