"""Rows sharded over a mesh of Explicit axes (``jax.make_mesh``'s default in jax 0.10):
every public function that reduces, sorts or scatters over the rows equals its unsharded
call, and per-row outputs come back sharded as their rows."""

from tests.test_linear import on_eight_cpu_devices

EXPLICIT = """
import jax, jax.numpy as jnp, matplotlib, numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
import jsoftmax

mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
rng = np.random.default_rng(0)
n, d, k = 24, 6, 8
hidden = rng.standard_normal((n, d)).astype(np.float32)
weight = rng.standard_normal((d, k)).astype(np.float32)
logits = hidden @ weight
labels = rng.integers(0, k, n).astype(np.int32)
probs = np.asarray(jax.nn.softmax(logits))
key = jax.random.key(0)
histogram = jsoftmax.fit_histogram_binning(logits, labels)


def with_grads(head):
    # The summed loss and its gradients with respect to hidden and weight: rows only in hidden's.
    return lambda h, w, y: jax.value_and_grad(lambda h, w: head(h, w, y).sum(), (0, 1))(h, w)


def fitted_nll(fit, **options):
    def nll(z, y):
        log_probs = jsoftmax.calibrate(fit(z, y, **options), z)
        return jsoftmax.negative_log_likelihood(log_probs, y, log_input=True)

    return nll


def ppo(log_p, advantage):
    return -advantage * jnp.exp(log_p)


metric = (probs, labels)
# Fits on rows that no map separates (half the labels drawn at random), so that each optimum is
# finite and unique.
fit_logits = 2 * rng.standard_normal((96, 4)).astype(np.float32)
fit_labels = np.where(rng.random(96) < 0.5, fit_logits.argmax(1), rng.integers(0, 4, 96))
fit = (fit_logits, fit_labels.astype(np.int32))
fit_head = (logits, labels)
two_models = (np.stack([fit_logits, 2 * fit_logits], 1), fit[1])
head = (hidden, weight, labels)
GRADS = (False, True, False)  # the loss, hidden's gradient, weight's
# Each case: the function, its arguments, and whether its outputs (each, or one for all) have
# the rows' leading axis, sharded as the rows are.
cases = {
    "expected_calibration_error": (jsoftmax.expected_calibration_error, metric, False),
    "maximum_calibration_error": (jsoftmax.maximum_calibration_error, metric, False),
    "adaptive_calibration_error": (jsoftmax.adaptive_calibration_error, metric, False),
    "classwise_calibration_error": (jsoftmax.classwise_calibration_error, metric, False),
    "reliability_diagram": (jsoftmax.reliability_diagram, metric, False),
    "smooth_calibration_error": (jsoftmax.smooth_calibration_error, metric, False),
    "smooth_reliability_diagram": (jsoftmax.smooth_reliability_diagram, metric, False),
    "debiased_calibration_error": (jsoftmax.debiased_calibration_error, metric, False),
    "brier_score, two models under vmap": (
        jax.vmap(jsoftmax.brier_score, (1, None)), (np.stack([probs, probs**2], 1), labels), False
    ),
    "negative_log_likelihood": (jsoftmax.negative_log_likelihood, metric, False),
    "bootstrap": (
        lambda p, y: jsoftmax.bootstrap(
            jsoftmax.expected_calibration_error, p, y, key=key, num_resamples=20
        ),
        metric,
        False,
    ),
    "fit_temperature, two models under vmap": (
        jax.vmap(jsoftmax.fit_temperature, (1, None)), two_models, False
    ),
    # The iterative fits stop within a gradient tolerance, where the sums' order moves the
    # parameters by about 1e-3: their calibrated NLL (flat at the optimum) is compared.
    "fit_vector_scaling": (fitted_nll(jsoftmax.fit_vector_scaling), fit, False),
    "fit_matrix_scaling": (fitted_nll(jsoftmax.fit_matrix_scaling), fit, False),
    "fit_dirichlet_calibration": (
        fitted_nll(jsoftmax.fit_dirichlet_calibration, off_diagonal=1e-2), fit, False
    ),
    "fit_ensemble_temperature": (fitted_nll(jsoftmax.fit_ensemble_temperature), fit, False),
    "fit_histogram_binning": (jsoftmax.fit_histogram_binning, fit, False),
    "fit_isotonic": (jsoftmax.fit_isotonic, fit, False),
    "softmax_cross_entropy_with_integer_labels, class_weights": (
        lambda z, y: jsoftmax.softmax_cross_entropy_with_integer_labels(
            z, y, class_weights=jnp.arange(1.0, k + 1), label_smoothing=0.1
        ),
        fit_head,
        True,
    ),
    "softmax_cross_entropy, class_weights": (
        lambda z, q: jsoftmax.softmax_cross_entropy(
            z, q, class_weights=jnp.arange(1.0, k + 1), label_smoothing=0.1
        ),
        (logits, probs),
        True,
    ),
    "softmax_focal_loss, class_weights, axis 0": (
        lambda z, y: jsoftmax.softmax_focal_loss(z.T, y, axis=0, class_weights=jnp.ones(k)),
        fit_head,
        True,
    ),
    "calibrate": (lambda z: jsoftmax.calibrate(histogram, z), (logits,), True),
    "linear_softmax_cross_entropy": (jsoftmax.linear_softmax_cross_entropy, head, True),
    "linear_softmax_cross_entropy mean": (
        lambda h, w, y: jsoftmax.linear_softmax_cross_entropy(h, w, y, reduction="mean"),
        head,
        False,
    ),
    "linear_softmax_cross_entropy grads": (
        with_grads(jsoftmax.linear_softmax_cross_entropy), head, GRADS
    ),
    "linear_log_probs": (
        lambda h, w, y: jsoftmax.linear_log_probs(h, w, y, return_entropy=True), head, True
    ),
    "linear_log_probs grads": (with_grads(jsoftmax.linear_log_probs), head, GRADS),
    "linear_log_probs_loss grads": (
        with_grads(
            lambda h, w, y: jsoftmax.linear_log_probs_loss(h, w, y, ppo, (jnp.arange(n) - 12.0,))
        ),
        head,
        GRADS,
    ),
    "linear_distillation_loss grads": (
        with_grads(
            lambda h, w, y: jsoftmax.linear_distillation_loss(
                h, w, 2 * h, w, divergence="jsd", temperature=2.0
            )
        ),
        head,
        GRADS,
    ),
}


def rows(x):
    return jax.device_put(x, NamedSharding(mesh, P("data")))


for name, (function, args, per_row) in cases.items():
    want = function(*args)
    # The arguments with the first one's rows are sharded; a head's weight is replicated.
    sharded = [rows(a) if len(a) == len(args[0]) else a for a in args]
    with jax.set_mesh(mesh):
        got = jax.jit(function)(*sharded)
    outs = [got]
    if not name.endswith("grads"):  # jax differentiates Explicit arrays under set_mesh only
        outs.append(function(*sharded))  # no mesh in context: the arguments' own
    for out in outs:
        leaves = jax.tree.leaves(out)
        rowwise = per_row if isinstance(per_row, tuple) else (per_row,) * len(leaves)
        for a, b, row in zip(leaves, jax.tree.leaves(want), rowwise, strict=True):
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6, err_msg=name)
            spec = jax.typeof(a).sharding.spec
            assert (spec[:1] == ("data",)) == row, (name, spec)
# The plots (host-side drawing of the same statistics).
matplotlib.use("Agg")
with jax.set_mesh(mesh):
    jsoftmax.plot.reliability_diagram(rows(probs), rows(labels))
    jsoftmax.plot.smooth_reliability_diagram(rows(probs), rows(labels), key=key, num_resamples=10)

# Inside a shard_map manual over "model" alone, "data" stays Explicit: only it turns Auto.
with jax.set_mesh(mesh):
    brier = jax.shard_map(
        jsoftmax.brier_score, in_specs=(P(), P()), out_specs=P(), axis_names={"model"}
    )
    got = jax.jit(brier)(rows(probs), rows(labels))
np.testing.assert_allclose(got, jsoftmax.brier_score(probs, labels), rtol=2e-5)

# A head's weight sharded over the vocabulary as well, without shard_map: gradients come back
# sharded as their arguments.
smoothed = with_grads(
    lambda h, w, y: jsoftmax.linear_softmax_cross_entropy(h, w, y, label_smoothing=0.1)
)
vocab = jax.device_put(weight, NamedSharding(mesh, P(None, "model")))
with jax.set_mesh(mesh):
    got = jax.jit(smoothed)(rows(hidden), vocab, rows(labels))
for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(smoothed(*head)), strict=True):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
assert jax.typeof(got[1][1]).sharding.spec == P(None, "model")

# A shard_map manual over "model" alone, differentiated from outside, where "data" is Auto
# (jax 0.10's auto_axes raises where it is Explicit: docs/large_vocabularies.md); the axis
# named by a tuple.
auto_mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
with jax.set_mesh(auto_mesh):
    by_vocab = jax.shard_map(
        lambda h, w, y: jsoftmax.linear_softmax_cross_entropy(h, w, y, axis_name=("model",)),
        in_specs=(P(), P(None, "model"), P()),
        out_specs=P(),
        axis_names={"model"},
    )
    put = lambda x, spec: jax.device_put(x, NamedSharding(auto_mesh, spec))
    args = put(hidden, P("data")), put(weight, P(None, "model")), labels
    got = jax.jit(with_grads(by_vocab))(*args)
want = with_grads(jsoftmax.linear_softmax_cross_entropy)(*head)
for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)

# Bad input raises the error it raises without a mesh.
bad = {
    "axis 5 is out of range": lambda: jsoftmax.softmax_cross_entropy_with_integer_labels(
        rows(logits), rows(labels), axis=5, class_weights=np.ones(k, np.float32)
    ),
    "repeats an axis": lambda: jsoftmax.softmax_focal_loss(rows(logits), rows(labels), axis=(1, 1)),
    "hidden has shape ()": lambda: jsoftmax.linear_log_probs(
        jnp.float32(1.0), weight, jnp.int32(0)
    ),
}
for message, call in bad.items():
    with jax.set_mesh(mesh):
        try:
            call()
        except ValueError as error:
            assert message in str(error), error
        else:
            raise AssertionError(message)
print("sharded ok")
"""


def test_row_sharded_arguments_on_a_mesh_of_explicit_axes_equal_the_unsharded_call():
    on_eight_cpu_devices(EXPLICIT)
