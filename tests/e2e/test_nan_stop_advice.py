"""A tiny run made to diverge by a large learning rate stops on NaN/Inf, and its message can be followed as written
(issue 28): it names the last checkpoint from before the divergence and the flags that continue from it, and the
run then completes; or it says the run must start over, and starting over as it says completes."""

from __future__ import annotations

import re

import pytest

from auxmtl_jax import checkpoint as checkpoint_lib
from auxmtl_jax import input_pipeline
from auxmtl_jax import programs
from auxmtl_jax import training
from auxmtl_jax import workdir as workdir_lib
from test_train import KilledAfter, logged, tiny_config

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def diverging_config(data_dir, **overrides):
    """16 steps at a constant lr, a log every step and a checkpoint every 2 (all kept)."""
    settings = {"num_train_steps": 16, "log_every_steps": 1, "checkpoint_every_steps": 2, "eval_every_steps": 16,
                "max_checkpoints_to_keep": 10, "optimizer.schedule": "constant"}
    return tiny_config(data_dir, **{**settings, **overrides})


def follow(message: str, config):
    """`config` with every `--config.KEY=VALUE` the message asks for."""
    asked = re.findall(r"--config\.([\w.]+)=(\S+?)(?=[;.)]?(?:\s|$))", message)
    assert asked, message
    for key, value in asked:
        *groups, leaf = key.split(".")
        node = config
        for group in groups:
            node = node[group]
        node[leaf] = value if isinstance(node[leaf], str) else type(node[leaf])(value)
    return config, dict(asked)


def test_following_the_advice_continues_from_the_last_checkpoint_before_the_divergence(data_dir, tmp_path,
                                                                                       monkeypatch):
    """Steps 1-4 at lr 0.05, then lr 300 (accepted on resume): the loss explodes from step 6 and the state is
    NaN by step 10. The advice: continue from checkpoint 4 at lr 30; doing exactly that completes the run."""
    create = input_pipeline.create_train_iterator
    monkeypatch.setattr(input_pipeline, "create_train_iterator", lambda *a, **k: KilledAfter(create(*a, **k), 5))
    with pytest.raises(KeyboardInterrupt):
        programs.run(diverging_config(data_dir), str(tmp_path))
    monkeypatch.setattr(input_pipeline, "create_train_iterator", create)

    config = diverging_config(data_dir, **{"optimizer.learning_rate": 300.0,
                                           "accept_changed_keys": "optimizer.learning_rate"})
    with pytest.raises(training.NonFiniteError) as stopped:
        programs.run(config, str(tmp_path))
    message = str(stopped.value)
    assert "\n" not in message
    assert re.search(r"the loss began to diverge at step 6 \(main loss \S+ > 4 x its minimum \S+ before.*"
                     r"checkpoint\(s\) \[6, 8(, \d+)*\] were moved to .*checkpoints_diverged\. The last checkpoint "
                     r"from before it is step 4\.", message), message
    diverged = sorted(int(path.name.split("-")[0]) for path in (tmp_path / workdir_lib.DIVERGED_DIR).iterdir())
    assert diverged[:2] == [6, 8]
    assert checkpoint_lib.Checkpointer(tmp_path, read_only=True).latest_step() == 4

    config, asked = follow(message, config)
    assert asked == {"optimizer.learning_rate": "30", "accept_changed_keys": "optimizer.learning_rate"}
    programs.run(config, str(tmp_path))
    assert (tmp_path / workdir_lib.RESULTS_FILE).exists()
    assert logged(tmp_path, "train")[5]["lr"] == pytest.approx(30.0)  # resumed after step 4 at the new lr


def test_a_run_diverging_from_its_first_steps_must_start_over_and_can(data_dir, tmp_path):
    """lr 100 from the start: the loss rises 30x after the first update, so no checkpoint is from before the
    divergence. The message says the run must start over, and re-running as it says (lr 10) completes."""
    config = diverging_config(data_dir, **{"optimizer.learning_rate": 100.0})
    with pytest.raises(training.NonFiniteError) as stopped:
        programs.run(config, str(tmp_path))
    message = str(stopped.value)
    assert re.search(r"every kept checkpoint is from after the divergence began: the loss began to diverge at step 2"
                     r".*The run must start over: re-run the same command with --config\.optimizer\.learning_rate=10 "
                     r"\(divided by 10; it starts from step 0 in ", message), message
    assert checkpoint_lib.Checkpointer(tmp_path, read_only=True).latest_step() is None

    config, asked = follow(message, config)
    assert asked == {"optimizer.learning_rate": "10"}
    programs.run(config, str(tmp_path))
    assert sorted(logged(tmp_path, "train")) == list(range(1, 17))  # a fresh run, every step logged once
