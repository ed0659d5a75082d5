"""Re-scores a finished search's best genotypes under other seeds: is its ranking more than one seed's noise?

The search scores each candidate once, from one initialisation and one data order (``config.seed``), and keeps
the best, so the winner's reward is biased upward by the choice (the winner's curse) and its lead over close
candidates may be noise. After the search, the ``search.rescore.top`` best distinct genotypes are trained again,
side by side, under each seed of ``search.rescore.seeds`` (new decoder and aux-module initialisation, new data
order; the encoder start is the same), for the whole proxy schedule (both stages, no early termination), and
scored on the same meta-val split. WORKDIR/rescore.json holds every genotype's search reward and reward per seed,
and the ranks; re-running the search command skips the seeds already scored.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from etils import epath

from auxmtl_jax import disk, input_pipeline
from auxmtl_jax import workdir as workdir_lib
from auxmtl_jax.models.genotype import genotype_from_json_dict
from auxmtl_jax.nas import population as population_lib
from auxmtl_jax.nas import search as search_lib
from auxmtl_jax.training import preemption

log = logging.getLogger("auxmtl_jax")
RESCORE_FILE = "rescore.json"
SUMMARY_FILE = "search_summary.md"  # the search and its re-scoring in numbers, for a report


def read_search_log(workdir) -> list[dict]:
    """The candidates of WORKDIR/search.jsonl (without rewriting it; an unparsable line is skipped)."""
    return disk.read_json_lines(epath.Path(workdir) / search_lib.SEARCH_LOG)


def top_genotypes(records: Sequence[Mapping], top: int) -> list[dict]:
    """The ``top`` best distinct genotypes by search reward: [{genotype, reward, candidate}], best first (a genotype
    sampled twice counts once, with its best reward)."""
    best: dict[str, Mapping] = {}
    for record in records:
        key = json.dumps(record["genotype"], sort_keys=True)
        if key not in best or record["reward"] > best[key]["reward"]:
            best[key] = record
    ranked = sorted(best.values(), key=lambda record: -record["reward"])[:top]
    return [{"candidate": record["candidate"], "genotype": record["genotype"], "reward": record["reward"]}
            for record in ranked]


def score_under_seed(config, genotypes: Sequence[Mapping], seed: int) -> list[float]:
    """Trains ``genotypes`` (JSON dicts) for the whole proxy schedule from the start of ``seed`` and returns
    their meta-val rewards. Candidates train in groups of ``search.population`` (a short last group is padded with
    copies of its first genotype, whose scores are dropped), so the search's mesh applies unchanged."""
    seed_config = copy.deepcopy(config)
    seed_config.seed = seed
    if seed_config.search.get("rescore"):  # this config trains; it re-scores nothing itself
        seed_config.search.rescore.top, seed_config.search.rescore.seeds = 0, ()
    search = search_lib.prepare_search(seed_config)
    size, steps = config.search.population, sum(config.search.steps)
    arrays = [genotype_from_json_dict(genotype, source=search_lib.SEARCH_LOG).as_array() for genotype in genotypes]
    rewards = []
    for first in range(0, len(arrays), size):
        group = arrays[first:first + size]
        padded = group + [group[0]] * (size - len(group))
        population = search.place(population_lib.start_population(search.start, np.stack(padded)))
        batches = input_pipeline.create_train_iterator(search.meta_train, seed_config.input,
                                                       tasks=tuple(seed_config.tasks),
                                                       global_batch_size=seed_config.batch_size, seed=seed)
        try:
            population = search_lib.train_population(search, population, batches, steps, generation=0, first_step=0)
        except preemption.Preempted as stopped:
            raise preemption.Preempted(f"{preemption.signal_name()}: stopped re-scoring under seed {seed}; re-run the "
                                       "same command to re-score the seeds not yet in rescore.json", stopped.step)
        finally:
            batches.close()
        rewards += [reward for reward, _ in search_lib.score_population(search, population)[:len(group)]]
    return rewards


def ranks(values: Sequence[float]) -> list[int]:
    """1-based ranks, 1 = highest (ties keep the listed order)."""
    order = sorted(range(len(values)), key=lambda index: -values[index])
    result = [0] * len(values)
    for rank, index in enumerate(order, start=1):
        result[index] = rank
    return result


def summarise(entries: Sequence[Mapping], seeds: Sequence[int]) -> dict:
    """Per seed: the ranks of the search's top genotypes and whether the search's best is still ranked first."""
    by_seed = {}
    for seed in seeds:
        rewards = [entry["rewards"][str(seed)] for entry in entries]
        seed_ranks = ranks(rewards)
        by_seed[str(seed)] = {"ranks": seed_ranks, "search_best_still_first": seed_ranks[0] == 1,
                              "order_kept": seed_ranks == list(range(1, len(entries) + 1))}
    return by_seed


def run_rescore(config, workdir) -> dict | None:
    """Re-scores the finished search in ``workdir`` as ``search.rescore`` asks; None when it asks for nothing."""
    top, seeds = search_lib.rescore_settings(config)
    if not top:
        return None
    workdir = epath.Path(workdir)
    path = workdir / RESCORE_FILE
    chosen = top_genotypes(read_search_log(workdir), top)
    saved = json.loads(path.read_text()).get("genotypes", []) if path.exists() else []
    same = [entry["genotype"] for entry in saved] == [entry["genotype"] for entry in chosen]
    done = {seed: [entry["rewards"][str(seed)] for entry in saved]
            for seed in seeds if same and saved and all(str(seed) in entry["rewards"] for entry in saved)}
    for seed in seeds:
        if seed not in done:
            log.info("re-scoring the search's top %d genotypes under seed %d", len(chosen), seed)
            done[seed] = score_under_seed(config, [entry["genotype"] for entry in chosen], seed)
            _write_result(config, workdir, chosen, done)  # a later seed's preemption keeps this one
    result = _write_result(config, workdir, chosen, {seed: done[seed] for seed in seeds})
    log.info("re-scored the search's top %d genotypes (WORKDIR/%s):\n%s", len(chosen), RESCORE_FILE,
             format_rescore(result))
    return result


def _write_result(config, workdir: epath.Path, chosen: Sequence[Mapping], done: Mapping[int, list]) -> dict:
    """rescore.json and search_summary.md for the seeds scored so far ({seed: rewards}, in that order)."""
    seeds = list(done)
    entries = [{**entry, "search_rank": index + 1,
                "rewards": {str(seed): float(done[seed][index]) for seed in seeds}}
               for index, entry in enumerate(chosen)]
    result = {"search_seed": config.seed, "seeds": seeds, "steps": sum(config.search.steps),
              "genotypes": entries, "by_seed": summarise(entries, seeds)}
    if jax.process_index() == 0:
        workdir_lib.write_text_atomic(workdir / RESCORE_FILE, json.dumps(result, indent=1) + "\n")
        workdir_lib.write_text_atomic(workdir / SUMMARY_FILE, summary_markdown(read_search_log(workdir), result))
    return result


def format_rescore(result: Mapping) -> str:
    """A markdown table: each genotype's search rank and reward, then its reward and rank under each seed."""
    seeds = result["seeds"]
    header = (f"| search rank | candidate | reward, search (seed {result['search_seed']}) | "
              + " | ".join(f"reward (rank), seed {seed}" for seed in seeds) + " |")
    lines = [header, "|" + "---|" * (3 + len(seeds))]
    for index, entry in enumerate(result["genotypes"]):
        cells = [f"{entry['rewards'][str(seed)]:.4f} ({result['by_seed'][str(seed)]['ranks'][index]})"
                 for seed in seeds]
        lines.append(f"| {entry['search_rank']} | {entry['candidate']} | {entry['reward']:.4f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_markdown(records: Sequence[Mapping], result: Mapping) -> str:
    """The search in numbers (candidates, early stops, rewards, where the best came from, the mean reward per
    quarter of the search) and the re-scoring table, each line with its figures."""
    rewards = np.asarray([record["reward"] for record in records])
    best = max(records, key=lambda record: record["reward"])
    quarters = [float(part.mean()) for part in np.array_split(rewards, 4) if part.size]
    stopped = sum(record["early_terminated"] for record in records)
    lines = [
        f"- {len(records)} candidates, {stopped} stopped after the first stage; about "
        f"{sum(record['seconds'] for record in records) / 60:.0f} min of training and scoring.",
        f"- Rewards {rewards.min():.4f} to {rewards.max():.4f} (median {np.median(rewards):.4f}); the best is "
        f"candidate {best['candidate']} (generation {best['generation']}).",
        "- Mean reward per quarter of the search, in order: " + ", ".join(f"{value:.4f}" for value in quarters) + ".",
        "",
        format_rescore(result),
    ]
    for seed, summary in result["by_seed"].items():
        lines.append(f"\n- Seed {seed}: the search's best is {'still' if summary['search_best_still_first'] else 'not'}"
                     f" ranked first; ranks in the search's order: {summary['ranks']}.")
    return "\n".join(lines) + "\n"
