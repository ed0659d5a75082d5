"""The statistics of a report: t-intervals over seeds and paired tests between two arms of the same seeds."""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
ALPHA = 1.0 - CONFIDENCE


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """(mean, half-width) of the Student-t confidence interval of the mean; half-width NaN for one value."""
    values = np.asarray(values, np.float64)
    if values.size == 0:
        raise ValueError("t_interval: no values")
    mean = float(values.mean())
    if values.size == 1:
        return mean, math.nan
    standard_error = float(values.std(ddof=1)) / math.sqrt(values.size)
    return mean, float(stats.t.ppf(0.5 + confidence / 2.0, values.size - 1)) * standard_error


@dataclasses.dataclass(frozen=True)
class PairedTest:
    """A two-sided paired t-test of `a - b` over seeds (same seed = same init and data order in both arms)."""

    mean_difference: float
    half_width: float  # of the t-interval of the mean difference
    p_value: float  # NaN with fewer than two pairs, or when every difference is equal (no spread)
    pairs: int


def verdict(difference_in_claimed_direction: float, adjusted_p_value: float) -> str:
    """'holds' (significant in the claimed direction), 'does not hold' (significant against it) or 'not
    significant'; `adjusted_p_value` is the claim's Holm-adjusted p within its family, never the raw p."""
    if not adjusted_p_value < ALPHA:
        return "not significant"
    return "holds" if difference_in_claimed_direction > 0 else "does not hold"


def paired_test(a: Sequence[float], b: Sequence[float]) -> PairedTest:
    """Paired t-test of `a` against `b` (equal length, pair i from seed i)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"paired_test: expected two equal-length 1-D sequences, got shapes {a.shape} and {b.shape}")
    differences = a - b
    mean, half_width = t_interval(differences)
    if differences.size < 2 or np.all(differences == differences[0]):
        p_value = math.nan
    else:
        p_value = float(stats.ttest_rel(a, b).pvalue)
    return PairedTest(mean, half_width, p_value, int(differences.size))


def holm_adjusted(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values of a family of tests (NaN = not tested, left out of the family).

    The i-th smallest of m p-values becomes max over j <= i of min(1, (m - j + 1) p_(j)): rejecting where the
    adjusted value is below α keeps the chance of any false "holds" in the family at most α.
    """
    tested = sorted((p, index) for index, p in enumerate(p_values) if not math.isnan(p))
    adjusted = [math.nan] * len(p_values)
    running = 0.0
    for rank, (p, index) in enumerate(tested):
        running = max(running, min(1.0, (len(tested) - rank) * p))
        adjusted[index] = running
    return adjusted
