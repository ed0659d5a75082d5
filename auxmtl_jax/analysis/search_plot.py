"""Figures of an Auxi-NAS search workdir: rewards over candidates, operation frequencies, the best genotype.

``write_search_figures(workdir)`` reads WORKDIR/search.jsonl and writes ``search_rewards.png`` (every candidate's
reward, early-terminated ones hollow, and the running best), ``search_operations.png`` (the share of each
operation among the op tokens of each generation: the paper observes ``skip`` becoming rarer) and
``best_genotype.png`` (the best candidate's cells).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from auxmtl_jax import disk  # noqa: E402
from auxmtl_jax.analysis.figures import AnalysisInputError, save_figure  # noqa: E402
from auxmtl_jax.analysis.genotype_plot import plot_genotype  # noqa: E402
from auxmtl_jax.models.genotype import OPERATIONS, genotype_from_json_dict  # noqa: E402
from auxmtl_jax.workdir import SEARCH_LOG  # noqa: E402



def read_search_log(workdir: str | os.PathLike) -> list[dict]:
    """The candidate records of a search workdir, in order (one clear error if there are none)."""
    path = Path(workdir) / SEARCH_LOG
    if not path.exists():
        raise AnalysisInputError(f"{path} does not exist; expected a search workdir (configs/nas_search.py)")
    records = disk.read_json_lines(path)  # a last line cut short by a kill is skipped
    if not records:
        raise AnalysisInputError(f"{path} has no candidates yet")
    return records


def operation_shares(records: Sequence[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(generations, shares [G, len(OPERATIONS)]): each op's share of the op tokens sampled in each generation."""
    generations = sorted({record["generation"] for record in records})
    shares = np.zeros((len(generations), len(OPERATIONS)))
    for row, generation in enumerate(generations):
        counts = np.zeros(len(OPERATIONS))
        for record in records:
            if record["generation"] != generation:
                continue
            genotype = genotype_from_json_dict(record["genotype"])
            ops = genotype.as_array()[..., 2:4].reshape(-1)
            counts += np.bincount(ops, minlength=len(OPERATIONS))
        shares[row] = counts / max(counts.sum(), 1)
    return np.asarray(generations), shares


def rewards_figure(records: Sequence[dict]):
    candidates = np.asarray([record["candidate"] for record in records])
    rewards = np.asarray([record["reward"] for record in records])
    stopped = np.asarray([record["early_terminated"] for record in records])
    figure, axes = plt.subplots(figsize=(7, 4))
    axes.scatter(candidates[~stopped], rewards[~stopped], s=14, label="trained to the end")
    axes.scatter(candidates[stopped], rewards[stopped], s=14, facecolors="none", edgecolors="tab:gray",
                 label="early-terminated (first-stage reward)")
    axes.plot(candidates, np.maximum.accumulate(rewards), color="tab:red", drawstyle="steps-post", label="best so far")
    axes.set(xlabel="candidate", ylabel="reward (geometric mean of task scores)", title="Auxi-NAS search")
    axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    return figure


def operations_figure(records: Sequence[dict]):
    generations, shares = operation_shares(records)
    figure, axes = plt.subplots(figsize=(7, 4))
    for index, name in enumerate(OPERATIONS):
        axes.plot(generations, shares[:, index], marker="o", markersize=3, label=name)
    axes.axhline(1 / len(OPERATIONS), color="black", linewidth=0.8, linestyle=":", label="uniform")
    axes.set(xlabel="generation", ylabel="share of sampled op tokens", title="Operations over the search")
    axes.legend(fontsize=8, ncol=2)
    figure.tight_layout()
    return figure


def write_search_figures(workdir: str | os.PathLike) -> list[Path]:
    """Writes the three search figures into ``workdir``; returns their paths."""
    workdir = Path(workdir)
    records = read_search_log(workdir)
    written = save_figure(rewards_figure(records), workdir / "search_rewards.png", svg=False)
    written += save_figure(operations_figure(records), workdir / "search_operations.png", svg=False)
    best = max(records, key=lambda record: record["reward"])
    written.append(plot_genotype(genotype_from_json_dict(best["genotype"]), workdir / "best_genotype.png",
                                 title=f"best of {len(records)} candidates: #{best['candidate']}, "
                                       f"reward {best['reward']:.4f}"))
    plt.close("all")
    return written
