"""The search's reward: the geometric mean of per-task scores in (0, 1], higher better (paper Sec. 3.2).

Each task contributes one metric of the main network on the meta-val split:

| task         | metric           | score               | why                                                  |
|--------------|------------------|---------------------|------------------------------------------------------|
| segmentation | mIoU             | mIoU                | already a fraction, higher better                    |
| depth        | RelErr           | 1 / (1 + RelErr)    | scale-free; 0.5 at RelErr 1 (an all-zero prediction) |
| normal       | mean angle (deg) | 1 / (1 + mean / 30) | 0.5 at 30 degrees; random directions (90) get 0.25   |

``1 / (1 + err / scale)`` is monotone, 1 at zero error and never exactly 0, so a weak task lowers the reward
without zeroing it; ``exp(-err / scale)`` would squash the poor early candidates of a short proxy schedule
together. Scores are floored at ``SCORE_FLOOR`` so the geometric mean stays defined.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

# task -> (metric, scale): a fraction when scale is None, else an error mapped by 1 / (1 + err / scale)
REWARD_METRICS: dict[str, tuple[str, float | None]] = {
    "segmentation": ("miou", None),
    "depth": ("rel_err", 1.0),
    "normal": ("mean", 30.0),
}
SCORE_FLOOR = 1e-4


def task_score(task: str, metrics: Mapping[str, float]) -> float:
    """One task's score in [SCORE_FLOOR, 1] from its metrics (see the module docstring)."""
    if task not in REWARD_METRICS:
        raise ValueError(f"reward: no score is defined for task {task!r}; expected one of {tuple(REWARD_METRICS)}")
    name, scale = REWARD_METRICS[task]
    if name not in metrics:
        raise ValueError(f"reward: metrics of {task} lack {name!r}; got {sorted(metrics)}")
    value = float(metrics[name])
    if not math.isfinite(value):
        return SCORE_FLOOR
    score = value if scale is None else 1.0 / (1.0 + max(value, 0.0) / scale)
    return min(max(score, SCORE_FLOOR), 1.0)


def reward(metrics: Mapping[str, Mapping[str, float]]) -> float:
    """Geometric mean of the task scores of ``{task: {metric: value}}`` (every task present is scored)."""
    if not metrics:
        raise ValueError("reward: no task metrics given")
    scores = [task_score(task, task_metrics) for task, task_metrics in metrics.items()]
    return math.exp(sum(math.log(score) for score in scores) / len(scores))
