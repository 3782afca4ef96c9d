"""Plots of calibration (needs matplotlib, the ``notebook`` extra; imported on first use)."""

from __future__ import annotations

from typing import Any

import numpy as np
from jax.typing import ArrayLike

from jsoftmax._calibration import reliability_diagram as _statistics


def reliability_diagram(
    probs: ArrayLike,
    labels: ArrayLike,
    *,
    num_bins: int = 15,
    where: ArrayLike | None = None,
    title: str | None = None,
    axes: tuple[Any, Any] | None = None,
) -> tuple[Any, Any]:
    """Draws a reliability diagram as Guo et al. (2017) do.

    The top panel shows each bin's accuracy as a bar, the gap to the bin's
    mean confidence as a hatched bar against the diagonal, and the ECE; the
    bottom panel is the histogram of the bins' counts.

    Args:
      probs: floating ``[N, K]`` predicted probabilities.
      labels: integers ``[N]``.
      num_bins: number of equal-width bins.
      where: boolean ``[N]``; False rows are padding.
      title: a title for the top panel.
      axes: two matplotlib axes (top, bottom) to draw on; by default a new
        figure with a 3:1 split.

    Returns:
      The (top, bottom) axes.
    """
    import matplotlib.pyplot as plt

    stats = _statistics(probs, labels, num_bins=num_bins, where=where)
    confidence, accuracy, count, edges = (np.asarray(a, dtype=np.float64) for a in stats)
    if axes is None:
        _, (top, bottom) = plt.subplots(
            2, 1, figsize=(4, 5), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
        )
    else:
        top, bottom = axes
    left, width = edges[:-1], np.diff(edges)
    full = count > 0
    top.bar(
        left[full],
        accuracy[full],
        width[full],
        align="edge",
        color="tab:blue",
        edgecolor="black",
        label="accuracy",
    )
    top.bar(
        left[full],
        (confidence - accuracy)[full],
        width[full],
        bottom=accuracy[full],
        align="edge",
        color="tab:red",
        alpha=0.3,
        edgecolor="tab:red",
        hatch="//",
        label="gap",
    )
    top.plot([0, 1], [0, 1], "--", color="gray")
    ece = np.sum(count[full] * np.abs(accuracy - confidence)[full]) / max(count.sum(), 1)
    top.text(0.04, 0.9, f"ECE {100 * ece:.2f}%", transform=top.transAxes)
    top.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy", title=title)
    top.legend(loc="lower right")
    bottom.bar(left, count, width, align="edge", color="gray", edgecolor="black")
    bottom.set(xlabel="confidence", ylabel="count")
    return top, bottom
