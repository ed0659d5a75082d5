"""benchmarks/gpu_check.py in its CI form (--platform=cpu --tiny), rehearsing the GPU host: grain,
tensorflow_datasets, ml_collections and the installed config package made unimportable, ml_collections taken from
a carried wheel. Checks the report's keys, that every numerics row passed and that every train row ran."""

import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import ml_collections
import pytest

REPO = Path(__file__).resolve().parent.parent


def make_wheel(folder: Path) -> Path:
    """A pure-Python 'wheel' of the installed ml_collections (a zip of the package: what zipimport needs)."""
    folder.mkdir()
    wheel = folder / "ml_collections-0+test-py3-none-any.whl"
    package = Path(ml_collections.__file__).parent
    with zipfile.ZipFile(wheel, "w") as archive:
        for path in package.rglob("*.py"):
            archive.write(path, Path("ml_collections") / path.relative_to(package))
    return wheel


def gpu_check(tmp_path, *flags, env=None, timeout=120):
    command = [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--platform=cpu", "--tiny",
               f"--out={tmp_path / 'out'}", *flags]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    report = tmp_path / "out" / "gpu_report.json"
    return result, json.loads(report.read_text()) if report.exists() else None


def test_without_ml_collections_it_stops_at_once_naming_the_wheel(tmp_path):
    (tmp_path / "no_wheels").mkdir()
    result, report = gpu_check(tmp_path, "--simulate-missing=ml_collections", f"--wheels={tmp_path / 'no_wheels'}")
    assert result.returncode == 2, result.stdout + result.stderr
    assert report["environment"]["wheels_to_carry"] == ["ml_collections"]
    assert "pip download --no-deps -d .whl ml_collections" in report["stopped"]
    assert "STOPPED: not importable: ml_collections" in result.stdout
    assert report["numerics"] == [] and not report["complete"]
    assert (tmp_path / "out" / "gpu_report.md").exists()


def test_at_the_time_limit_it_writes_the_partial_report_and_exits_124(tmp_path):
    """A part that hangs (numerics replaced by a sleep) meets the watchdog."""
    script = ("import sys, time; sys.path.insert(0, sys.argv[1]); import gpu_check; "
              "gpu_check.parts.numerics = lambda *args: time.sleep(120); "
              "sys.exit(gpu_check.main(sys.argv[2:]))")
    command = [sys.executable, "-c", script, str(REPO / "benchmarks"), "--platform=cpu", "--tiny",
               f"--out={tmp_path}", "--time-limit=8"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 124, result.stdout + result.stderr
    report = json.loads((tmp_path / "gpu_report.json").read_text())
    assert report["exit_status"] == 124 and "time limit 8 s reached during" in report["stopped"]
    assert not report["complete"] and (tmp_path / "gpu_report.md").exists()


@pytest.mark.slow
@pytest.mark.exhaustive  # two minutes of compiling; run it (-m exhaustive) before lending time on a GPU
def test_tiny_gpu_check_on_cpu(tmp_path):
    wheel = make_wheel(tmp_path / "wheels")
    out = tmp_path / "out"
    # Compilations dominate: share the test session's persistent cache (tests/conftest.py) across runs.
    cache = os.environ.get("AUXMTL_TEST_COMPILATION_CACHE",
                           os.path.join(tempfile.gettempdir(), "auxmtl_jax_test_compilation_cache"))
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": cache, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5"}
    result, report = gpu_check(tmp_path, f"--wheels={wheel.parent}", "--time-limit=1200",
                               "--simulate-missing=grain,tensorflow_datasets,ml_collections,auxmtl_configs",
                               env=env, timeout=1500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "] numerics: " in result.stdout  # progress lines with elapsed time
    assert {"command", "environment", "settings", "parts", "numerics", "train", "input", "torch", "complete",
            "wall_s"} <= set(report)
    assert report["complete"] and report["exit_status"] == 0
    env = report["environment"]
    assert env["ml_collections"].startswith(str(wheel))
    assert env["config_package"].startswith("loaded from configs/")
    assert env["wheels_to_carry"] == []
    probe = env["import_probe"]["without grain, tensorflow_datasets"]
    assert probe["auxmtl_jax.models"] == "ok"
    assert probe["auxmtl_jax.training"] == "ok" and probe["auxmtl_jax.training.steps"] == "ok"

    numerics = report["numerics"]
    assert [(row["strategy"], row["quantity"]) for row in numerics] == [("auxi_all", "forward"),
                                                                       ("auxi_all", "gradient")]
    assert all(row["passed"] and row["compared"] == "shifted@cpu" for row in numerics), numerics
    train = report["train"]
    assert [(row["strategy"], row["dtype"]) for row in train] == [
        ("joint", "float32"), ("auxi_nas (example genotype)", "float32"), ("joint / pcgrad", "bfloat16")]
    assert all("error" not in row and row["images_per_s"] > 0 and row["loss_finite"] for row in train), train
    assert report["parts"]["input"]["status"] == "skipped"  # grain 'missing'
    assert "grain" in report["parts"]["input"]["skipped"][0]
    assert report["parts"]["numerics"]["status"] == report["parts"]["train"]["status"] == "ok"
    markdown = (out / "gpu_report.md").read_text()
    assert "## Numerics" in markdown and "## Train step" in markdown and "| auxi_all | gradient |" in markdown
