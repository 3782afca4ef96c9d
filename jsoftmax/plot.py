"""Plots of calibration (needs matplotlib, the ``notebook`` extra; imported on first use)."""

from __future__ import annotations

from typing import Any

import numpy as np
from jax.typing import ArrayLike

from jsoftmax import _calibration, _checks, _metrics

# Above the diagonal at low confidence, where a diagram is mostly empty (lower right,
# the bars of high confidence rise under it).
_LEGEND = "center left"


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
    fname = "plot.reliability_diagram"
    p, y, w = _calibration._rows(fname, probs, labels, where, "probs")
    stats = _calibration._diagram(p, y, w, _calibration._num_bins(fname, num_bins))
    confidence, accuracy, count, edges = (np.asarray(a, dtype=np.float64) for a in stats)
    if axes is None:
        _, (top, bottom) = _pyplot().subplots(
            2, 1, figsize=(4, 5), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
        )
    else:
        top, bottom = _axes(fname, axes, 2)
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
    if full.any():  # (a legend of no bars draws their default style)
        top.legend(loc=_LEGEND)
    bottom.bar(left, count, width, align="edge", color="gray", edgecolor="black")
    bottom.set(xlabel="confidence", ylabel="count")
    return top, bottom


def smooth_reliability_diagram(
    probs: ArrayLike,
    labels: ArrayLike,
    *,
    key: ArrayLike,
    num_bins: int = 15,
    where: ArrayLike | None = None,
    num_points: int = 200,
    num_resamples: int = 200,
    level: float = 0.95,
    axes: tuple[Any, Any, Any, Any] | None = None,
) -> tuple[Any, Any, Any, Any]:
    """Draws the smoothed reliability curve with its bootstrap band next to the binned diagram.

    Left: the kernel-smoothed accuracy of :func:`jsoftmax.smooth_reliability_diagram`
    with the ``level`` percentile band of the curve over ``num_resamples``
    bootstrap resamples of the rows (at the same bandwidth, as relplot draws
    it), the smooth ECE, and below it the density of the confidences. Right:
    :func:`reliability_diagram` with ``num_bins`` bins.

    Args:
      probs: floating ``[N, K]`` predicted probabilities.
      labels: integers ``[N]``.
      key: a ``jax.random`` key for the resamples.
      num_bins: number of equal-width bins of the binned diagram.
      where: boolean ``[N]``; False rows are padding.
      num_points: points of [0, 1] where the curve is evaluated.
      num_resamples: bootstrap resamples for the band.
      level: the band's coverage in (0, 1).
      axes: four matplotlib axes (smooth top, smooth bottom, binned top, binned
        bottom), or a 2 x 2 grid of them read by columns, as
        ``plt.subplots(2, 2)`` gives; by default a new figure with two columns.

    Returns:
      The four axes.
    """
    fname = "plot.smooth_reliability_diagram"
    # Every argument is checked before the bootstrap runs and a figure opens.
    _calibration._num_bins(fname, num_bins)
    num_points = _metrics._num_points(fname, num_points)
    num_resamples, level = _metrics._resamples(fname, num_resamples, level)
    p, y, w = _calibration._rows(fname, probs, labels, where, "probs")
    key = _checks.random_key(fname, key)
    given = None if axes is None else _axes(fname, axes, 4)
    diagram, low, high = _metrics._smooth_band(num_resamples, level, num_points, p, y, w, key)
    grid, accuracy, density, low, high = (
        np.asarray(a, dtype=np.float64)
        for a in (diagram.grid, diagram.accuracy, diagram.density, low, high)
    )
    if given is None:
        _, ((top, right_top), (bottom, right_bottom)) = _pyplot().subplots(
            2, 2, figsize=(8, 5), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
        )
    else:
        top, bottom, right_top, right_bottom = given
    band = f"{100 * level:g}% band"
    top.fill_between(grid, low, high, color="tab:red", alpha=0.25, label=band)
    top.plot(grid, accuracy, color="tab:red", label="smoothed accuracy")
    top.plot([0, 1], [0, 1], "--", color="gray")
    top.text(
        0.04, 0.9, f"smECE {100 * float(diagram.calibration_error):.2f}%", transform=top.transAxes
    )
    top.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy", title="smoothed")
    top.legend(loc=_LEGEND)
    bottom.fill_between(grid, density, color="gray")
    bottom.set(xlabel="confidence", ylabel="density")
    reliability_diagram(
        probs,
        labels,
        num_bins=num_bins,
        where=where,
        title="binned",
        axes=(right_top, right_bottom),
    )
    return top, bottom, right_top, right_bottom


def _pyplot():
    """``matplotlib.pyplot``, or an ImportError that says where it comes from."""
    try:
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError(
            "jsoftmax.plot needs matplotlib: pip install 'jsoftmax[notebook]' (or matplotlib)"
        ) from error
    return plt


def _axes(fname, axes, count):
    """``axes`` (a sequence or NumPy array) as a tuple of ``count`` matplotlib axes, or
    ``TypeError`` naming them (an int raised AttributeError at its first bar). A grid is
    read by columns: ``plt.subplots(2, 2)``'s is laid out as the default figure."""
    _pyplot()  # (matplotlib missing: the hint)
    from matplotlib.axes import Axes

    grid = isinstance(axes, np.ndarray | list | tuple)
    given = tuple(np.ravel(np.asarray(axes, object), order="F")) if grid else None
    if given is None or len(given) != count or not all(isinstance(a, Axes) for a in given):
        raise TypeError(f"{fname}: axes must be {count} matplotlib Axes, got {axes!r:.60}")
    return given
