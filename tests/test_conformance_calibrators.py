"""The calibrators against netcal 1.4, where it defines the same map (float64, shared data).

netcal's ``HistogramBinning`` and ``IsotonicRegression`` are one-vs-rest on the
softmax probabilities, renormalised, as ours are. Its scaling calibrators fit
by stochastic optimisation in PyTorch, not to an optimum: ours are checked
against SciPy's optimisers in ``test_calibrators.py`` instead.
"""

import importlib
import os

import numpy as np
import pytest
from scipy.special import softmax

import jsoftmax
from tests.test_calibrators import miscalibrated


def _library(name):
    """The reference library; CI installs the ``conformance`` extra, so there it must import."""
    if os.environ.get("CI"):
        return importlib.import_module(name)
    return pytest.importorskip(name)


netcal_binning = _library("netcal.binning")


@pytest.mark.parametrize("num_bins", [5, 15])
def test_histogram_binning_equals_netcal(num_bins, x64):
    logits, labels = miscalibrated(4000, 4, seed=20)
    fresh = miscalibrated(1000, 4, seed=21, scale=2.0)[0]
    reference = netcal_binning.HistogramBinning(bins=num_bins)
    reference.fit(softmax(logits, axis=1), labels)
    want = reference.transform(softmax(fresh, axis=1))
    fitted = jsoftmax.fit_histogram_binning(logits, labels, num_bins=num_bins)
    got = np.exp(np.asarray(jsoftmax.calibrate(fitted, fresh)))
    np.testing.assert_allclose(got, want, atol=1e-12)


def test_isotonic_equals_netcal(x64):
    logits, labels = miscalibrated(4000, 4, seed=22)
    fresh = miscalibrated(1000, 4, seed=23, scale=2.0)[0]
    reference = netcal_binning.IsotonicRegression()
    reference.fit(softmax(logits, axis=1), labels)
    want = reference.transform(softmax(fresh, axis=1))
    got = np.exp(np.asarray(jsoftmax.calibrate(jsoftmax.fit_isotonic(logits, labels), fresh)))
    defined = np.isfinite(want).all(axis=1)  # netcal divides by a zero sum: NaN rows
    assert defined.mean() > 0.9
    np.testing.assert_allclose(got[defined], want[defined], atol=1e-9)
    np.testing.assert_allclose(got[~defined], 0.25)
