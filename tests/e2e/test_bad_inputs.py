"""Bad inputs through every command line, as a user would type them (README "Reliability").

Each case runs the real command in a subprocess and asserts: a non-zero exit, exactly one line `error: ...` that
names the bad thing, no traceback, and every folder the command could touch (workdir, data dir, output folder)
byte-for-byte as before; a workdir that did not exist still does not.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
from typing import Callable

import numpy as np
import pytest
from PIL import Image

from auxmtl_configs import synthetic_three_task
from auxmtl_jax import errors
from auxmtl_jax import programs
from test_nyu_v2 import _write_mtan
from test_pretrained import torchvision_mobilenet_v2_state_dict

REPO = pathlib.Path(__file__).resolve().parents[2]
RUNLOCAL = "configs/synthetic_three_task.py:runlocal,strategy=joint"


@dataclasses.dataclass
class Inputs:
    """The folders and files the cases point at, made once per module."""

    root: pathlib.Path
    data_dir: pathlib.Path
    trained: pathlib.Path  # a finished tiny run: resume target, init_from source, inference export
    files: pathlib.Path  # bad files of every kind

    @property
    def workdir(self) -> pathlib.Path:
        return self.root / "fresh_workdir"  # never created by a failing run


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Inputs:
    root = tmp_path_factory.mktemp("bad_inputs")
    data_dir = root / "tfds"
    config = synthetic_three_task.get_config("runlocal,strategy=joint")
    config.dataset.data_dir = str(data_dir)  # otherwise the config `python run.py` gets, so resuming is allowed
    trained = root / "trained"
    programs.run(config, str(trained))
    files = root / "files"
    _write_bad_files(files)
    made = Inputs(root, data_dir, trained, files)
    assert not made.workdir.exists()
    return made


def _write_bad_files(files: pathlib.Path) -> None:
    files.mkdir()
    (files / "not_json.json").write_text("{'metrics': ")
    (files / "no_metrics.json").write_text(json.dumps({"name": "joint", "step": 2}))
    (files / "text_metrics.json").write_text(json.dumps({"metrics": {"depth": {"abs_err": "low"}}}))
    (files / "weights.txt").write_text("not weights")
    (files / "garbage.npz").write_bytes(os.urandom(256))
    np.savez(files / "unrelated.npz", **{"fc.weight": np.zeros((10, 4), np.float32)})
    np.savez(files / "mobilenet_v2_width1.npz", **torchvision_mobilenet_v2_state_dict(seed=0))
    (files / "empty_run" / "checkpoints").mkdir(parents=True)
    (files / "genotype.json").write_text("[1, 2")
    (files / "image.png").write_text("a text file named .png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(files / "ok.png")
    Image.fromarray(np.zeros((8, 8), np.float32), mode="F").save(files / "float.tiff")
    broken_export = files / "broken_export"
    broken_export.mkdir()
    (broken_export / "model.json").write_text(json.dumps({"model": {}, "tasks": {"depth": 1}}))
    (broken_export / "main_variables.msgpack").write_bytes(b"\x93\x01garbage")
    _write_mtan(files / "mtan_bad_label", counts={"train": 1, "val": 1})
    label = np.load(files / "mtan_bad_label" / "val" / "label" / "0.npy")
    label[0, 0] = 20.0
    np.save(files / "mtan_bad_label" / "val" / "label" / "0.npy", label)
    _write_mtan(files / "mtan_missing", counts={"train": 1, "val": 1})
    (files / "mtan_missing" / "train" / "depth" / "0.npy").unlink()


@dataclasses.dataclass(frozen=True)
class Case:
    """One bad input: the command (argv after `python`), the regex its error line must match, and the folders
    (relative to the module's root, or the workdir) that must not change."""

    id: str
    argv: Callable[[Inputs], list[str]]
    message: str
    watched: tuple[str, ...] = ("workdir", "data_dir")


def run_py(*extra: str, config: str = RUNLOCAL, workdir: str = "workdir") -> Callable[[Inputs], list[str]]:
    """`python run.py` on the tiny dataset; `{name}` in an argument is a path from Inputs (files/..)."""
    def argv(paths: Inputs) -> list[str]:
        target = paths.workdir if workdir == "workdir" else paths.root / workdir
        args = [f"--config={config.format(files=paths.files)}", f"--workdir={target}",
                f"--config.dataset.data_dir={paths.data_dir}"]
        return ["run.py", *args, *(arg.format(files=paths.files, trained=paths.trained) for arg in extra)]
    return argv


def module(name: str, *extra: str) -> Callable[[Inputs], list[str]]:
    def argv(paths: Inputs) -> list[str]:
        formatted = [arg.format(files=paths.files, trained=paths.trained, data_dir=paths.data_dir,
                                workdir=paths.workdir) for arg in extra]
        return ["-m", name, *formatted]
    return argv


CASES = [
    # config variants, keys, values and types
    Case("variant_key", run_py(config="configs/synthetic_three_task.py:runlocal,bogus=1"),
         r"--config=.*: Unknown config variant key 'bogus'"),
    Case("variant_strategy_task", run_py(config="configs/synthetic_three_task.py:strategy=auxi:height"),
         r"Strategy 'auxi:height': task 'height' is not among config\.tasks"),
    Case("variant_value_type", run_py(config="configs/synthetic_three_task.py:runlocal,steps=many"),
         r"steps='many'.*expected a value of type int"),
    Case("missing_config_file", run_py(config="configs/no_such_config.py"),
         r"--config=configs/no_such_config\.py: no such config file"),
    Case("unknown_flag", run_py("--num_steps=3"), r"Unknown command line flag 'num_steps'"),
    Case("unknown_config_key", run_py("--config.optimizer.lr=0.1"),
         r"--config\.optimizer\.lr=0\.1: config\.optimizer\.lr is not a key of this config"),
    Case("override_type", run_py("--config.num_train_steps=ten"),
         r"--config\.num_train_steps=ten: .*invalid literal for int"),
    Case("non_positive_steps", run_py("--config.num_train_steps=0"),
         r"config\.num_train_steps=0; expected a positive integer"),
    Case("negative_learning_rate", run_py("--config.optimizer.learning_rate=-0.1"),
         r"config\.optimizer\.learning_rate=-0\.1; expected > 0"),
    Case("unknown_schedule", run_py("--config.optimizer.schedule=cosine"),
         r"config\.optimizer\.schedule='cosine'; expected one of poly, constant"),
    Case("unknown_optimizer", run_py("--config.optimizer.name=rmsprop"),
         r"^error: config\.optimizer\.name='rmsprop'; expected one of sgd, adam\.$"),
    Case("optimizer_step_every_zero",
         run_py("--config.optimizer.schedule=step", "--config.optimizer.step_every_steps=0"),
         r"^error: config\.optimizer\.step_every_steps=0; expected a positive integer\.$"),
    Case("optimizer_step_factor_above_one", run_py("--config.optimizer.step_factor=2.0"),
         r"^error: config\.optimizer\.step_factor=2\.0; expected a number in \(0, 1\]\.$"),
    Case("unknown_encoder", run_py("--config.model.encoder=vgg16"),
         r"model\.encoder: unknown value 'vgg16'; expected one of"),
    Case("unknown_decoder", run_py("--config.model.decoder=fpn"), r"model\.decoder: unknown value 'fpn'"),
    Case("unknown_task", run_py("--config.tasks=('segmentation','height')"),
         r"config\.tasks: unknown task\(s\) 'height'"),
    Case("unknown_weighting", run_py("--config.loss_weighting=uncertainty"), r"config\.loss_weighting='uncertainty' is unknown"),
    Case("unknown_aux_stage", run_py("--config.aux.features=('stage9',)", config=RUNLOCAL.replace("joint", "auxi_all")),
         r"aux\.features: \['stage9'\] not sown by this encoder"),
    Case("batch_not_divisible", run_py("--config.batch_size=6"),
         r"config\.batch_size=6 must be divisible by the 4 device"),
    # several processes: a coordinator nobody listens at (port 1), a timeout that is not a positive number
    Case("distributed_coordinator_unreachable",
         run_py("--config.distributed.coordinator_address=127.0.0.1:1", "--config.distributed.num_processes=2",
                "--config.distributed.process_id=1", "--config.distributed.initialization_timeout_s=2"),
         r"process 1 of 2 could not reach the coordinator \(process 0\) at config\.distributed\.coordinator_address="
         r"127\.0\.0\.1:1 within config\.distributed\.initialization_timeout_s=2 \(.*refused\)"),
    Case("distributed_zero_heartbeat_timeout", run_py("--config.distributed.heartbeat_timeout_s=0"),
         r"config\.distributed\.heartbeat_timeout_s=0; expected a positive number of seconds"),
    Case("unknown_init_scope", run_py("--config.init_from.scope=decoder"),
         r"config\.init_from\.scope='decoder'; expected one of"),
    Case("accept_unknown_key", run_py("--config.accept_changed_keys=optimizer.lr"),
         r"accept_changed_keys names 'optimizer\.lr', which is no config key"),
    # every float of the config is finite (one generic check, issue 28)
    Case("nan_dwa_temperature", run_py("--config.loss_weighting=dwa", "--config.weighting.dwa.temperature=nan"),
         r"^error: config\.weighting\.dwa\.temperature=nan; expected a finite number\.$"),
    Case("nan_learning_rate", run_py("--config.optimizer.learning_rate=nan"),
         r"^error: config\.optimizer\.learning_rate=nan; expected a finite number\.$"),
    Case("inf_deep_supervision_weight", run_py("--config.deep_supervision.weight=-inf"),
         r"^error: config\.deep_supervision\.weight=-inf; expected a finite number\.$"),
    # every path is the kind of thing it must be (issue 28)
    Case("workdir_is_a_file", run_py(workdir="files/image.png"),
         r"--workdir=.*files/image\.png is a file; expected a directory \(created if missing\)",
         watched=("files", "data_dir")),
    Case("workdir_under_a_file", run_py(workdir="files/image.png/run"),
         r"--workdir=.*files/image\.png/run cannot be created: .*files/image\.png is a file",
         watched=("files", "data_dir")),
    Case("data_dir_is_a_file", run_py("--config.dataset.data_dir={files}/image.png"),
         r"config\.dataset\.data_dir=.*files/image\.png is a file; expected a directory",
         watched=("workdir", "files")),
    Case("manual_dir_is_a_file", run_py("--config.dataset.manual_dir={files}/image.png"),
         r"config\.dataset\.manual_dir=.*files/image\.png is a file; expected a directory"),
    Case("reference_is_a_directory", run_py("--config.reference_results={files}"),
         r"config\.reference_results='.*files' is a directory; expected a run's results\.json"),
    Case("inference_output_is_a_file", module("auxmtl_jax.inference", "--model", "{trained}/inference", "--output",
                                              "{files}/image.png", "{files}/ok.png"),
         r"--output=.*files/image\.png is a file; expected a directory", watched=("files", "trained")),
    Case("inference_model_is_a_file", module("auxmtl_jax.inference", "--model", "{files}/ok.png", "--output",
                                             "{workdir}", "{files}/ok.png"),
         r"ok\.png is a file; expected an exported model folder", watched=("workdir", "files")),
    Case("experiment_workdir_is_a_file", module("auxmtl_jax.experiments", "strategies", "--workdir",
                                                "{files}/image.png", "--size", "tiny"),
         r"--workdir=.*files/image\.png is a file; expected a directory", watched=("files",)),
    # files the config names
    Case("reference_missing", run_py("--config.reference_results={files}/none.json"),
         r"config\.reference_results='.*none\.json' does not exist; expected a run's results\.json"),
    Case("reference_not_json", run_py("--config.reference_results={files}/not_json.json"),
         r"config\.reference_results='.*not_json\.json' is unreadable \(JSONDecodeError"),
    Case("reference_no_metrics", run_py("--config.reference_results={files}/no_metrics.json"),
         r"no_metrics\.json' is unreadable \(no 'metrics' key\)"),
    Case("reference_text_values", run_py("--config.reference_results={files}/text_metrics.json"),
         r"text_metrics\.json' holds .* not \{task: \{metric: number\}\}"),
    Case("encoder_init_missing", run_py("--config.model.encoder_init={files}/none.pth"),
         r"config\.model\.encoder_init: .*none\.pth: weight file not found"),
    Case("encoder_init_extension", run_py("--config.model.encoder_init={files}/weights.txt"),
         r"weights\.txt: unsupported weight file extension '\.txt'"),
    Case("encoder_init_garbage", run_py("--config.model.encoder_init={files}/garbage.npz"),
         r"garbage\.npz: could not read \.npz weight file"),
    Case("encoder_init_unrelated", run_py("--config.model.encoder_init={files}/unrelated.npz"),
         r"unrelated\.npz: cannot convert this state dict to mobilenet_v2 .* missing \(\d+\)"),
    Case("encoder_init_other_width", run_py("--config.model.encoder_init={files}/mobilenet_v2_width1.npz"),
         r"config\.model\.encoder_init: pretrained encoder does not match the model's encoder .*shape mismatch"),
    Case("encoder_init_not_a_run", run_py("--config.model.encoder_init={files}/empty_run"),
         r"config\.model\.encoder_init='.*empty_run': .*holds no checkpoint"),
    Case("encoder_init_run_of_other_width", run_py("--config.model.encoder_init={trained}",
                                                   "--config.model.width_multiplier=0.5"),
         r"Cannot load config\.model\.encoder_init=.*shape mismatch"),
    Case("init_from_not_a_run", run_py("--config.init_from.path={files}"),
         r"config\.init_from\.path='.*files' is neither a workdir with checkpoints/ nor an exported"),
    Case("init_from_no_checkpoint", run_py("--config.init_from.path={files}/empty_run"),
         r"config\.init_from\.path='.*empty_run': .*holds no checkpoint"),
    Case("init_from_export_scope_all", run_py("--config.init_from.path={trained}/inference",
                                              "--config.init_from.scope=all"),
         r"is an exported inference folder, which holds `main` only; config\.init_from\.scope='all'"),
    Case("init_from_other_model", run_py("--config.init_from.path={trained}", "--config.model.width_multiplier=0.5"),
         r"Cannot load config\.init_from\.path=.*shape mismatch"),
    Case("genotype_missing", run_py(config="configs/synthetic_three_task.py:runlocal,strategy=auxi_nas:nope.json"),
         r"config\.aux\.genotype: genotype file 'nope\.json': cannot read it"),
    Case("genotype_not_json", run_py(config="configs/synthetic_three_task.py:runlocal,strategy=auxi_nas:{files}/genotype.json"),
         r"genotype file '.*genotype\.json': not valid JSON"),
    # the dataset
    Case("unknown_dataset", run_py("--config.dataset.name=imagenet"), r"Unknown dataset\.name 'imagenet'"),
    Case("unknown_dataset_config", run_py("--config.dataset.config=huge"), r"dataset 'synthetic_scenes'.*'huge'"),
    Case("dataset_not_prepared", run_py("--config.dataset.config=demo", "--config.dataset.prepare=False"),
         r"Dataset 'synthetic_scenes' \(config 'demo'\) is not prepared under .* Build it with"),
    Case("unknown_split", run_py("--config.dataset.train_split=validation"),
         r"config\.dataset\.train_split='validation': dataset 'synthetic_scenes' has no such split"),
    Case("malformed_split_slice", run_py("--config.dataset.train_split=train[:abc]"),
         r"config\.dataset\.train_split='train\[:abc\]' is not a valid split of dataset 'synthetic_scenes'"),
    Case("empty_eval_split", run_py("--config.dataset.eval_split=test[5:2]"),
         r"config\.dataset\.eval_split='test\[5:2\]' selects no examples"),
    # resuming a workdir with another config
    Case("resume_changed_config", run_py("--config.optimizer.learning_rate=0.5", workdir="resume"),
         r"another config \(optimizer\.learning_rate: .* -> 0\.5\)", watched=("resume", "data_dir")),
    Case("resume_damaged_config_json", run_py(workdir="resume_bad_config"),
         r"config\.json is not valid JSON .*; expected the config of the run in this workdir",
         watched=("resume_bad_config", "data_dir")),
    # dataset command lines
    Case("nyu_cli_no_manual_dir", module("auxmtl_datasets.nyu_v2", "--config", "mtan", "--data_dir", "{data_dir}"),
         r"nyu_v2: no manual_dir given; expected the folder"),
    Case("nyu_cli_missing_file", module("auxmtl_datasets.nyu_v2", "--config", "mtan", "--manual_dir",
                                        "{files}/mtan_missing", "--data_dir", "{data_dir}"),
         r"mtan_missing/train/depth/0\.npy: expected"),
    Case("nyu_cli_label_range", module("auxmtl_datasets.nyu_v2", "--config", "mtan", "--manual_dir",
                                       "{files}/mtan_bad_label", "--data_dir", "{data_dir}"),
         r"mtan_bad_label/val/label/0\.npy: expected class ids 0\.\.12 or -1 \(ignore\), found values \[20\.\]"),
    Case("sunrgbd_cli_unknown_config", module("auxmtl_datasets.sunrgbd", "--config", "nyu", "--data_dir",
                                              "{data_dir}"),
         r"argument --config: invalid choice: 'nyu'"),
    Case("prepare_cli_unknown_dataset", module("auxmtl_jax.input_pipeline", "--dataset", "imagenet",
                                               "--data_dir", "{data_dir}"),
         r"argument --dataset: invalid choice: 'imagenet'"),
    # experiments
    Case("experiment_unknown", module("auxmtl_jax.experiments", "table9", "--workdir", "{workdir}"),
         r"argument name: invalid choice: 'table9'", watched=("workdir",)),
    Case("experiment_one_variant", module("auxmtl_jax.experiments", "variants", "--workdir", "{workdir}",
                                          "--variant", "joint=strategy=joint"),
         r"--variant: got 1; expected at least two NAME=VARIANT", watched=("workdir",)),
    Case("experiment_bad_run_variant", module("auxmtl_jax.experiments", "variants", "--workdir", "{workdir}",
                                              "--variant", "joint=strategy=joint", "--variant", "b=strategy=best"),
         r"experiment 'variants', run 'b' \(seed 0\): .*Unknown strategy 'best'", watched=("workdir",)),
    Case("experiment_runs_dir_is_a_file", module("auxmtl_jax.experiments", "strategies", "--workdir", "{workdir}",
                                                 "--size", "tiny", "--runs_dir", "{files}/image.png"),
         r"--runs_dir=.*image\.png: not a directory; expected a folder for the run workdirs", watched=("workdir",)),
    Case("experiment_unknown_set_key", module("auxmtl_jax.experiments", "strategies", "--workdir", "{workdir}",
                                              "--set", "optimizer.lr=0.1"),
         r"--set 'optimizer\.lr=0\.1': 'optimizer\.lr' is not a config key", watched=("workdir",)),
    # inference
    Case("inference_missing_image", module("auxmtl_jax.inference", "--model", "{trained}/inference", "--output",
                                           "{workdir}", "{files}/none.png"),
         r"none\.png: no such image file", watched=("workdir", "trained")),
    Case("inference_not_an_image", module("auxmtl_jax.inference", "--model", "{trained}/inference", "--output",
                                          "{workdir}", "{files}/image.png"),
         r"image\.png: not a readable image .*; expected a PNG/JPEG file", watched=("workdir", "trained")),
    Case("inference_float_image", module("auxmtl_jax.inference", "--model", "{trained}/inference", "--output",
                                         "{workdir}", "{files}/float.tiff"),
         r"float\.tiff: a floating-point image \(mode F\); expected an 8- or 16-bit", watched=("workdir",)),
    Case("inference_missing_model", module("auxmtl_jax.inference", "--model", "{files}/none", "--output",
                                           "{workdir}", "{files}/ok.png"),
         r"none/model\.json does not exist; expected an exported model folder", watched=("workdir",)),
    Case("inference_damaged_model", module("auxmtl_jax.inference", "--model", "{files}/broken_export", "--output",
                                           "{workdir}", "{files}/ok.png"),
         r"main_variables\.msgpack is damaged", watched=("workdir", "files")),
    # figures
    Case("plot_not_a_workdir", module("auxmtl_jax.analysis.plot", "fig5", "joint={files}", "--out",
                                      "{workdir}/fig5.png"),
         r"no metrics\.jsonl; expected a training workdir", watched=("workdir",)),
    Case("plot_bad_genotype", module("auxmtl_jax.analysis.plot", "genotype", "{files}/genotype.json", "--out",
                                     "{workdir}/cells.png"),
         r"genotype file '.*genotype\.json': not valid JSON", watched=("workdir",)),
]


def snapshot(path: pathlib.Path) -> dict[str, str] | None:
    """{relative path: content hash ('dir' for folders)} of a tree; None when it does not exist."""
    if not path.exists():
        return None
    tree = {}
    for item in sorted(path.rglob("*")):
        key = item.relative_to(path).as_posix()
        tree[key] = "dir" if item.is_dir() else hashlib.sha256(item.read_bytes()).hexdigest()
    return tree


def watched_path(paths: Inputs, name: str) -> pathlib.Path:
    return {"workdir": paths.workdir, "data_dir": paths.data_dir, "trained": paths.trained,
            "files": paths.files}.get(name, paths.root / name)


def prepare_resume_workdirs(paths: Inputs) -> None:
    for name in ("resume", "resume_bad_config"):
        if not (paths.root / name).exists():
            shutil.copytree(paths.trained, paths.root / name)
    (paths.root / "resume_bad_config" / "config.json").write_text('{"name": "joint", ')


def run_command(argv: list[str], prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """`python argv...` in the repository (after `prefix`, a command that execs the rest)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONWARNINGS="ignore")
    return subprocess.run([*prefix, sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)


def test_there_are_at_least_thirty_distinct_cases():
    assert len(CASES) >= 30 and len({case.id for case in CASES}) == len(CASES)


def in_ci(case: Case) -> bool:
    """CI runs the first case of each family (the id's first word: unknown_*, encoder_init_*, inference_*, ...) and
    every non-finite-value and path-kind case; `-m exhaustive` runs them all (each is a ~4 s subprocess)."""
    family = case.id.split("_")[0]
    first = next(other for other in CASES if other.id.split("_")[0] == family)
    return case is first or case.id.startswith(("nan_", "inf_")) or "_is_a_" in case.id or "_under_a_" in case.id


@pytest.mark.parametrize("case", [pytest.param(case, id=case.id, marks=() if in_ci(case) else pytest.mark.exhaustive)
                                  for case in CASES])
def test_bad_input_is_one_error_line_and_changes_nothing(inputs, case):
    prepare_resume_workdirs(inputs)
    argv = case.argv(inputs)
    before = {name: snapshot(watched_path(inputs, name)) for name in case.watched}

    result = run_command(argv)

    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    error_lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, output
    assert re.search(case.message, error_lines[0]), error_lines[0]
    assert "Traceback" not in output and not re.search(r"^\w+(Error|Exception)\b", output, re.M), output
    for name, tree in before.items():
        assert snapshot(watched_path(inputs, name)) == tree, f"{name} changed"


def read_only_runner(directory: pathlib.Path) -> Callable[[list[str]], subprocess.CompletedProcess]:
    """Runs a command with `directory` read-only: by its permission bits, or, as root (whom they do not stop), in a
    private mount namespace where it is bind-mounted read-only (gone with the command); skips where neither works."""
    if os.geteuid() != 0:
        def run(argv):
            folders = [directory, *(path for path in directory.rglob("*") if path.is_dir())]
            for folder in folders:
                folder.chmod(0o555)
            try:
                return run_command(argv)
            finally:
                for folder in folders:
                    folder.chmod(0o755)
        return run
    mount = 'mount --bind -o ro "$0" "$0" && exec "$@"'
    probe = subprocess.run(["unshare", "-m", "sh", "-c", mount, str(directory), "sh", "-c", 'test ! -w "$0"',
                            str(directory)], capture_output=True) if shutil.which("unshare") else None
    if probe is None or probe.returncode != 0:
        pytest.skip("running as root, whom permission bits do not stop, and a read-only bind mount in a private "
                    "mount namespace (unshare -m) is not permitted here")
    return lambda argv: run_command(argv, prefix=("unshare", "-m", "sh", "-c", mount, str(directory)))


def test_an_unwritable_workdir_or_output_is_one_error_line_and_changes_nothing(inputs, tmp_path):
    read_only = tmp_path / "read_only"
    (read_only / "existing_run").mkdir(parents=True)
    run = read_only_runner(read_only)
    cases = {
        "existing": (run_py(workdir=str(read_only / "existing_run"))(inputs),
                     r"--workdir=.*existing_run is not writable \(permission denied or a read-only file system\)"),
        "missing": (run_py(workdir=str(read_only / "new" / "run"))(inputs),
                    r"--workdir=.*new/run cannot be created: .*read_only is not writable"),
        "inference": (module("auxmtl_jax.inference", "--model", "{trained}/inference", "--output",
                             str(read_only / "preds"), "{files}/ok.png")(inputs),
                      r"--output=.*read_only/preds cannot be created: .*read_only is not writable"),
    }
    for name, (argv, message) in cases.items():
        before = snapshot(read_only)
        result = run(argv)
        output = result.stdout + result.stderr
        error_lines = [line for line in output.splitlines() if line.startswith("error:")]
        assert result.returncode == errors.INPUT_ERROR_STATUS and len(error_lines) == 1, (name, output)
        assert re.search(message, error_lines[0]), (name, error_lines[0])
        assert "Traceback" not in output, output
        assert snapshot(read_only) == before, name


def test_verbose_shows_the_traceback_of_a_user_error(inputs):
    result = run_command(run_py("--config.num_train_steps=0", "--verbose")(inputs))
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "UserError: config.num_train_steps=0" in result.stderr


def test_a_bug_keeps_its_traceback(inputs, tmp_path):
    """A non-user error (here: a config file that raises KeyError) is not dressed up as a one-line input error."""
    config = tmp_path / "buggy_config.py"
    config.write_text("def get_config(arg=None):\n    return {}['missing']\n")
    result = run_command(["run.py", f"--config={config}", f"--workdir={tmp_path / 'run'}"])
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "KeyError: 'missing'" in result.stderr
    assert not (tmp_path / "run").exists()


def test_one_line_keeps_every_part_of_a_multi_line_message():
    message = "cannot convert:\n  missing (2): a, b\n\n  shape mismatch (1): c: got (1,), expected (2,)"
    assert errors.one_line(message) == "cannot convert: missing (2): a, b; shape mismatch (1): c: got (1,), expected (2,)"
