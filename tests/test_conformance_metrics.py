"""jsoftmax's calibration metrics against relplot, uncertainty-calibration, torchmetrics, netcal.

Each library is skipped when missing, except under CI (the environment
variable ``CI`` set), where a missing library fails: CI installs the
``conformance`` extra.
"""

import importlib
import os

import jax
import numpy as np
import pytest

import jsoftmax
from tests import reference
from tests.test_calibration import probabilities


def need(module):
    if os.environ.get("CI"):
        return importlib.import_module(module)
    return pytest.importorskip(module)


# Shared data: calibrated (scale 1) and overconfident (sharpened by temperature 1/3).
CASES = [
    pytest.param(510, 5, 1.0, id="calibrated-510x5"),
    pytest.param(3000, 10, 1.0, id="calibrated-3000x10"),
    pytest.param(1500, 4, 3.0, id="overconfident-1500x4"),
    pytest.param(240, 3, 0.5, id="underconfident-240x3"),
]


@pytest.mark.parametrize(("n", "k", "scale"), CASES)
def test_smooth_ece_equals_relplot(n, k, scale):
    relplot = need("relplot")
    probs, labels = probabilities(n, k, seed=n, scale=scale)
    f, y = relplot.multiclass_logits_to_confidences(probs.astype(np.float64), labels, probs=True)
    theirs, width = relplot.smECE(f, y, return_width=True)
    np.testing.assert_allclose(jsoftmax.smooth_calibration_error(probs, labels), theirs, atol=1e-4)
    diagram = jsoftmax.smooth_reliability_diagram(probs, labels)
    np.testing.assert_allclose(diagram.bandwidth, width)


@pytest.mark.parametrize("mode", ["top-label", "marginal"])
@pytest.mark.parametrize(("n", "k", "scale"), CASES)
def test_debiased_equals_uncertainty_calibration(n, k, scale, mode):
    calibration = need("calibration")
    probs, labels = probabilities(n, k, seed=n, scale=scale)
    theirs = calibration.get_calibration_error(probs, labels, p=2, debias=True, mode=mode)
    ours = jsoftmax.debiased_calibration_error(probs, labels, mode=mode)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-7)
    # One bin: no edge to select (it failed inside a gather).
    theirs = calibration.lower_bound_scaling_ce(
        probs.astype(np.float64), labels, p=2, debias=True, num_bins=1, mode=mode
    )
    ours = jsoftmax.debiased_calibration_error(probs, labels, num_bins=1, mode=mode)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(("n", "k", "scale"), CASES)
def test_plugin_l1_over_equal_mass_bins_is_the_adaptive_ece(n, k, scale):
    """uncertainty-calibration's plug-in l1 error is our adaptive ECE when M divides N.

    Its bins are np.array_split's (the extra rows in the first bins) with
    midpoint edges; ours start at ceil(m N / M). They agree when M divides N
    and no cut falls between tied confidences. It has no counterpart of its plug-in l2.
    """
    calibration = need("calibration")
    probs, labels = probabilities(n, k, seed=n, scale=scale)
    cuts = np.arange(1, 15) * (n // 15)
    confidence = np.sort(probs.max(1))
    assert n % 15 == 0 and (confidence[cuts - 1] < confidence[cuts]).all()
    theirs = calibration.get_calibration_error(probs, labels, p=1, debias=False, mode="top-label")
    ours = jsoftmax.adaptive_calibration_error(probs, labels, num_bins=15)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5)


@pytest.mark.parametrize(("n", "k", "scale"), CASES)
def test_ece_and_mce_equal_torchmetrics(n, k, scale):
    """torchmetrics' bins are [e_{m-1}, e_m) with 1.0 alone in an extra bin; ours (e_{m-1}, e_m].

    They differ only for confidences exactly on an edge (1.0 included, which
    the sharpened data has): those rows are left out of both, by ``where`` in
    ours and by slicing in theirs.
    """
    torch = need("torch")
    functional = need("torchmetrics.functional.classification")
    probs, labels = probabilities(n, k, seed=n, scale=scale)
    off_edge = ~np.isin(probs.max(1), reference.bin_edges(15))
    args = (torch.tensor(probs[off_edge]), torch.tensor(labels[off_edge].astype(np.int64)), k)
    ece = functional.multiclass_calibration_error(*args, n_bins=15, norm="l1")
    mce = functional.multiclass_calibration_error(*args, n_bins=15, norm="max")
    ours = jsoftmax.expected_calibration_error(probs, labels, where=off_edge)
    np.testing.assert_allclose(ours, ece, rtol=1e-5)
    ours = jsoftmax.maximum_calibration_error(probs, labels, where=off_edge)
    np.testing.assert_allclose(ours, mce, rtol=1e-5)


def test_torchmetrics_bin_edge_convention_differs_on_edges():
    torch = need("torch")
    functional = need("torchmetrics.functional.classification")
    # Confidence 0.6 (a miss) sits on the edge between bins 3 and 4 of 5; 0.7 is a hit.
    probs = np.array([[0.6, 0.4], [0.7, 0.3]], np.float32)
    labels = np.array([1, 0])
    args = (torch.tensor(probs), torch.tensor(labels), 2)
    theirs = float(functional.multiclass_calibration_error(*args, n_bins=5, norm="l1"))
    # Theirs: both in [0.6, 0.8): |(0 + 1) - 1.3| / 2. Ours: 0.6 in (0.4, 0.6], 0.7 in (0.6, 0.8].
    np.testing.assert_allclose(theirs, 0.15, rtol=1e-6)
    ours = jsoftmax.expected_calibration_error(probs, labels, num_bins=5)
    np.testing.assert_allclose(ours, (0.6 + 0.3) / 2, rtol=1e-6)


@pytest.mark.parametrize(("n", "k", "scale"), CASES)
def test_ece_and_mce_equal_netcal(n, k, scale):
    metrics = need("netcal.metrics")
    probs, labels = probabilities(n, k, seed=n, scale=scale)
    np.testing.assert_allclose(
        jsoftmax.expected_calibration_error(probs, labels),
        metrics.ECE(15).measure(probs, labels),
        rtol=1e-5,
    )
    np.testing.assert_allclose(
        jsoftmax.maximum_calibration_error(probs, labels),
        metrics.MCE(15).measure(probs, labels),
        rtol=1e-5,
    )


@pytest.mark.parametrize(("n", "k", "scale"), CASES)
def test_netcal_ace_is_the_unweighted_mean_of_our_bins(n, k, scale):
    """netcal's ACE is not our adaptive ECE.

    netcal's ACE (Neumann et al. 2018) is the unweighted mean of
    ``|acc_m - conf_m|`` over the non-empty equal-width bins; our adaptive ECE
    (Nixon et al. 2019) weights equal-mass bins by size. Theirs is checked
    against our reliability diagram, ours against the float64 reference.
    """
    metrics = need("netcal.metrics")
    probs, labels = probabilities(n, k, seed=n, scale=scale)
    diagram = jsoftmax.reliability_diagram(probs, labels)
    full = np.asarray(diagram.count) > 0
    gaps = np.abs(np.asarray(diagram.accuracy) - np.asarray(diagram.confidence))[full]
    np.testing.assert_allclose(gaps.mean(), metrics.ACE(15).measure(probs, labels), rtol=1e-5)
    np.testing.assert_allclose(
        jsoftmax.adaptive_calibration_error(probs, labels),
        reference.adaptive_calibration_error(probs, labels, 15),
        rtol=1e-5,
    )


def test_smooth_diagram_curve_equals_relplot():
    relplot = need("relplot")
    need("pandas")
    probs, labels = probabilities(900, 4, seed=5, scale=2.0)
    f, y = relplot.multiclass_logits_to_confidences(probs.astype(np.float64), labels, probs=True)
    diagram = jsoftmax.smooth_reliability_diagram(probs, labels)
    kernel = relplot.kernels.ReflectedGaussianKernel(float(diagram.bandwidth))
    mu, _ = kernel.smooth(f, y, np.linspace(0, 1, 200))
    np.testing.assert_allclose(diagram.accuracy, mu, atol=1e-5)
    np.testing.assert_allclose(diagram.density, kernel.kde(f, np.linspace(0, 1, 200)), rtol=1e-4)
    assert jax.numpy.all(diagram.grid == jax.numpy.linspace(0, 1, 200))
