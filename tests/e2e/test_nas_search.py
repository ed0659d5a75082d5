"""The search loop on the tiny dataset: it completes and writes its outputs, compiles its population step once,
re-scores its best genotypes, and (`-m exhaustive`) re-scoring under the search's seed reproduces its rewards and a
search stopped by SIGTERM after a generation resumes with the genotypes an uninterrupted search samples."""

import contextlib
import importlib
import json
import logging
import os
import signal
import threading

import numpy as np
import pytest

from auxmtl_jax import nas
from auxmtl_jax import programs
from auxmtl_jax.analysis import plot, search_plot
from auxmtl_jax.models.decoders import resolve_aspp_rates
from auxmtl_jax.nas import population as population_lib
from auxmtl_jax.nas import rescore as rescore_lib
from auxmtl_jax.nas import search as search_lib
from auxmtl_jax.training import preemption


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def search_config(data_dir, num_candidates=4):
    config = importlib.import_module("auxmtl_configs.nas_search").get_config("runlocal")
    config.dataset.data_dir = data_dir
    # a small space keeps the searchable network quick to compile
    config.search.tasks = ("segmentation", "depth")
    config.search.stages = ("stage4", "stage5")
    config.search.num_candidates = num_candidates
    config.search.population = 2
    config.search.steps = (2, 1)
    config.search.termination_fraction = 1.0  # about half of the later candidates stop after the first stage
    return config


def genotype_sequence(workdir):
    return [json.dumps(json.loads(line)["genotype"]) for line in (workdir / search_lib.SEARCH_LOG).read_text()
            .splitlines()]


def test_search_writes_outputs_compiles_once_and_rescores_its_best(data_dir, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="auxmtl_jax")
    traces = []
    step = population_lib.population_train_step

    def counted(*args, **kwargs):
        traces.append(1)
        return step(*args, **kwargs)

    monkeypatch.setattr(population_lib, "population_train_step", counted)
    straight = tmp_path / "straight"
    best = programs.run(search_config(data_dir), str(straight))
    assert len(traces) == 1  # two generations, one compiled population step
    assert "each generation's 2 candidates are split over 2 devices" in caplog.text  # 4 host devices in tests
    lines = [json.loads(line) for line in (straight / search_lib.SEARCH_LOG).read_text().splitlines()]
    assert [line["candidate"] for line in lines] == list(range(4))
    assert {"genotype", "reward", "metrics", "steps_trained", "early_terminated", "seconds"} <= set(lines[0])
    assert all(0 < line["reward"] <= 1 for line in lines)
    assert {line["steps_trained"] for line in lines} <= {2, 3}
    assert any(line["early_terminated"] for line in lines[2:]) or all(line["steps_trained"] == 3 for line in lines)
    best_genotype = nas.load_genotype(straight / search_lib.BEST_GENOTYPE)
    assert best["reward"] == max(line["reward"] for line in lines)
    assert best_genotype == nas.genotype_from_json_dict(best["genotype"])
    assert best_genotype.space == nas.CellSpace(("segmentation", "depth"), ("stage4", "stage5"), 2)
    for line in lines:  # the test split is never touched: metrics come from the meta-val slice
        assert set(line["metrics"]) == {"segmentation", "depth", "normal"}
    for figure in ("search_rewards.png", "search_operations.png", "best_genotype.png"):
        assert (straight / figure).stat().st_size > 10_000, figure
    generations, shares = search_plot.operation_shares(lines)
    assert list(generations) == [0, 1] and np.allclose(shares.sum(axis=1), 1.0)
    first = nas.genotype_from_json_dict(lines[0]["genotype"]).as_array()[..., 2:4].reshape(-1)
    second = nas.genotype_from_json_dict(lines[1]["genotype"]).as_array()[..., 2:4].reshape(-1)
    expected = np.bincount(np.concatenate([first, second]), minlength=len(nas.OPERATIONS)) / (first.size * 2)
    np.testing.assert_allclose(shares[0], expected)
    with pytest.raises(SystemExit, match="^1$"):
        plot.main(["search", str(tmp_path / "nowhere")])

    # the finished search re-run with `search.rescore` set: nothing is searched again, the top 2 distinct genotypes
    # are scored under seed 1 and ranked; a re-run with a second seed scores only that one
    config = search_config(data_dir)
    scored = []

    def fake_score(config, genotypes, seed):
        scored.append(seed)
        return [0.1 * seed * (index + 1) for index in range(len(genotypes))]  # the search's order reversed

    monkeypatch.setattr(rescore_lib, "score_under_seed", fake_score)
    config.search.rescore.top, config.search.rescore.seeds = 2, (1,)
    programs.run(config, str(straight))
    assert len((straight / search_lib.SEARCH_LOG).read_text().splitlines()) == 4 and scored == [1]
    result = json.loads((straight / rescore_lib.RESCORE_FILE).read_text())
    ranked = sorted(lines, key=lambda line: -line["reward"])
    assert [entry["reward"] for entry in result["genotypes"]] == [ranked[0]["reward"], ranked[1]["reward"]]
    assert result["genotypes"][0]["genotype"] == best["genotype"]
    assert [entry["rewards"]["1"] for entry in result["genotypes"]] == pytest.approx([0.1, 0.2])
    assert result["by_seed"]["1"] == {"ranks": [2, 1], "search_best_still_first": False, "order_kept": False}
    summary = (straight / rescore_lib.SUMMARY_FILE).read_text()
    assert "- 4 candidates," in summary and f"the best is candidate {best['candidate']}" in summary
    assert "| 1 | " in summary and "0.1000 (2)" in summary and "search's best is not ranked first" in summary
    config.search.rescore.seeds = (1, 2)
    rescore_lib.run_rescore(config, straight)  # what the program calls after the search
    assert scored == [1, 2]
    assert json.loads((straight / rescore_lib.RESCORE_FILE).read_text())["by_seed"]["2"]["ranks"] == [2, 1]
    monkeypatch.undo()


@pytest.mark.exhaustive  # about 40 s; CI checks the re-scoring's program hook, ranks and summary above
def test_rescoring_under_the_search_seed_reproduces_its_rewards(data_dir, tmp_path):
    """Re-scoring trains from the seed's start on the search's batches: under the search's own seed it reproduces
    the reward of every fully trained candidate."""
    config = search_config(data_dir)
    programs.run(config, str(tmp_path))
    lines = [json.loads(line) for line in (tmp_path / search_lib.SEARCH_LOG).read_text().splitlines()]
    full = [line for line in lines if line["steps_trained"] == 3][:2]
    assert full
    again = rescore_lib.score_under_seed(search_config(data_dir), [line["genotype"] for line in full], seed=config.seed)
    assert again == pytest.approx([line["reward"] for line in full], rel=1e-4)


@pytest.mark.exhaustive  # CI stops and resumes training runs by signal (test_preemption, test_multiprocess)
def test_a_search_stopped_by_sigterm_resumes_with_the_same_genotypes(data_dir, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    programs.run(search_config(data_dir), str(straight))
    lines = [json.loads(line) for line in (straight / search_lib.SEARCH_LOG).read_text().splitlines()]
    # sent SIGTERM during the second generation (after the first one's checkpoint): the search stops at its next
    # population step, that generation discarded, and the re-run samples the same genotypes
    assert threading.current_thread() is threading.main_thread()  # where signal handlers run
    killed = tmp_path / "killed"
    run_generation = search_lib.run_generation

    def signalled_in_second_generation(search, ppo_state, generation, reference):
        if generation == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return run_generation(search, ppo_state, generation, reference)

    monkeypatch.setattr(search_lib, "run_generation", signalled_in_second_generation)
    with pytest.raises(preemption.Preempted, match="stopped the search during generation 1, which is discarded; "
                                                   "re-run the same command to resume after generation 0"):
        programs.run(search_config(data_dir), str(killed))
    assert len(genotype_sequence(killed)) == 2
    monkeypatch.setattr(search_lib, "run_generation", run_generation)
    programs.run(search_config(data_dir), str(killed))
    assert genotype_sequence(killed) == genotype_sequence(straight)
    rewards = [json.loads(line)["reward"] for line in (killed / search_lib.SEARCH_LOG).read_text().splitlines()]
    assert rewards == pytest.approx([line["reward"] for line in lines], rel=1e-4)


@pytest.mark.parametrize("field, value, message", [
    ("population", 0, r"search\.population=0; expected a positive integer"),
    ("steps", (0, 1), r"search\.steps=\(0, 1\); expected"),
    ("polyak_decay", 1.0, r"search\.polyak_decay=1\.0"),
    ("meta_train_fraction", 1.0, r"search\.meta_train_fraction=1\.0"),
    ("ppo.buffer_size", 1, r"search\.population=2 exceeds search\.ppo\.buffer_size=1"),
    ("devices", 5, r"search\.devices=5; expected 0 \(every local device\) up to the 4 local device"),
    ("ppo.clip", 0.2, r"search\.ppo: unknown field\(s\) \['clip'\]"),
    ("ppo.epochs", 0, r"search\.ppo: PPOConfig: .*epochs must be >= 1"),
    ("rescore.top", -1, r"search\.rescore\.top=-1; expected a non-negative integer"),
    ("rescore.seeds", (1, 1), r"search\.rescore\.seeds=\(1, 1\); expected distinct"),
    ("rescore.seeds", (0,), r"search\.rescore\.seeds=\(0,\) holds the search's own seed 0"),
])
def test_bad_search_settings_fail_before_anything_is_written(field, value, message, data_dir, tmp_path):
    config = search_config(data_dir)
    *parents, leaf = field.split(".")
    node = config.search
    for parent in parents:
        node = node[parent]
    with node.ignore_type() if hasattr(node, "ignore_type") else contextlib.nullcontext():
        node[leaf] = value
    with pytest.raises(ValueError, match=message):
        programs.run(config, str(tmp_path / "search"))
    assert not (tmp_path / "search").exists()


def test_the_search_network_scales_its_aspp_rates_to_the_search_crop(data_dir):
    config = search_config(data_dir)
    config.model.decoder = "context"
    config.model.aspp_rates = "feature"
    model, _ = search_lib.build_search_model(config, num_classes=13)
    assert model.main.aspp_rates == resolve_aspp_rates("feature", model.main.output_stride,
                                                       tuple(config.input.crop_size))
