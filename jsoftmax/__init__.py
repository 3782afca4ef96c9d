"""jsoftmax: softmax, cross-entropy and calibration for JAX, exact at the edges."""

from importlib.metadata import version as _version

from jsoftmax._softmax import log_softmax as log_softmax
from jsoftmax._softmax import logsumexp as logsumexp
from jsoftmax._softmax import softmax as softmax

__version__ = _version("jsoftmax")
