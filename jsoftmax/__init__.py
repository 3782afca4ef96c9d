"""jsoftmax: softmax, cross-entropy and calibration for JAX, exact at the edges."""

from importlib.metadata import version as _version

from jsoftmax._losses import smooth_labels as smooth_labels
from jsoftmax._losses import softmax_cross_entropy as softmax_cross_entropy
from jsoftmax._losses import (
    softmax_cross_entropy_with_integer_labels as softmax_cross_entropy_with_integer_labels,
)
from jsoftmax._softmax import log_softmax as log_softmax
from jsoftmax._softmax import logsumexp as logsumexp
from jsoftmax._softmax import softmax as softmax

__version__ = _version("jsoftmax")
