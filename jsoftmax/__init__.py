"""jsoftmax: softmax, cross-entropy and calibration for JAX, exact at the edges."""

from jsoftmax import plot as plot
from jsoftmax._calibration import ReliabilityDiagram as ReliabilityDiagram
from jsoftmax._calibration import adaptive_calibration_error as adaptive_calibration_error
from jsoftmax._calibration import brier_score as brier_score
from jsoftmax._calibration import classwise_calibration_error as classwise_calibration_error
from jsoftmax._calibration import expected_calibration_error as expected_calibration_error
from jsoftmax._calibration import fit_temperature as fit_temperature
from jsoftmax._calibration import maximum_calibration_error as maximum_calibration_error
from jsoftmax._calibration import reliability_diagram as reliability_diagram
from jsoftmax._calibration import temperature_scale as temperature_scale
from jsoftmax._calibrators import Calibrator as Calibrator
from jsoftmax._calibrators import DirichletCalibration as DirichletCalibration
from jsoftmax._calibrators import EnsembleTemperature as EnsembleTemperature
from jsoftmax._calibrators import HistogramBinning as HistogramBinning
from jsoftmax._calibrators import IsotonicCalibration as IsotonicCalibration
from jsoftmax._calibrators import MatrixScaling as MatrixScaling
from jsoftmax._calibrators import VectorScaling as VectorScaling
from jsoftmax._calibrators import calibrate as calibrate
from jsoftmax._calibrators import fit_dirichlet_calibration as fit_dirichlet_calibration
from jsoftmax._calibrators import fit_ensemble_temperature as fit_ensemble_temperature
from jsoftmax._calibrators import fit_histogram_binning as fit_histogram_binning
from jsoftmax._calibrators import fit_isotonic as fit_isotonic
from jsoftmax._calibrators import fit_matrix_scaling as fit_matrix_scaling
from jsoftmax._calibrators import fit_vector_scaling as fit_vector_scaling
from jsoftmax._focal import softmax_focal_loss as softmax_focal_loss
from jsoftmax._linear import linear_distillation_loss as linear_distillation_loss
from jsoftmax._linear import linear_log_probs as linear_log_probs
from jsoftmax._linear import linear_log_probs_loss as linear_log_probs_loss
from jsoftmax._linear import linear_softmax_cross_entropy as linear_softmax_cross_entropy
from jsoftmax._losses import smooth_labels as smooth_labels
from jsoftmax._losses import softmax_cross_entropy as softmax_cross_entropy
from jsoftmax._losses import (
    softmax_cross_entropy_with_integer_labels as softmax_cross_entropy_with_integer_labels,
)
from jsoftmax._metrics import SmoothReliabilityDiagram as SmoothReliabilityDiagram
from jsoftmax._metrics import bootstrap as bootstrap
from jsoftmax._metrics import debiased_calibration_error as debiased_calibration_error
from jsoftmax._metrics import negative_log_likelihood as negative_log_likelihood
from jsoftmax._metrics import smooth_calibration_error as smooth_calibration_error
from jsoftmax._metrics import smooth_reliability_diagram as smooth_reliability_diagram
from jsoftmax._softmax import log_softmax as log_softmax
from jsoftmax._softmax import logsumexp as logsumexp
from jsoftmax._softmax import softmax as softmax

__version__ = "0.1.0"  # the one place; pyproject.toml reads it
