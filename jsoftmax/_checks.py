"""Argument validation shared by every jsoftmax function.

Checks run at trace time on shapes and dtypes, and on values only when those
are concrete (not tracers): under ``jax.jit`` a bad value cannot raise, and
each function documents what it returns instead.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer
from jax.typing import ArrayLike

Axis = int | tuple[int, ...] | None


def is_traced(value: object) -> bool:
    """Whether ``value`` is a tracer, whose contents are unknown at trace time."""
    return isinstance(value, Tracer)


def array(fname: str, name: str, x: ArrayLike) -> jax.Array:
    """``jnp.asarray(x)``, raising ``TypeError`` naming ``x`` where it is not one (None, a
    string, a ragged list)."""
    try:
        return jnp.asarray(x)
    except (TypeError, ValueError) as error:
        raise TypeError(f"{fname}: {name} must be an array, got {x!r:.40}: {error}") from None
    except OverflowError:  # a Python int past int64
        raise ValueError(f"{fname}: {name} holds an integer past int64, got {x!r:.40}") from None


def floating(fname: str, name: str, x: ArrayLike) -> jax.Array:
    """Returns ``x`` as an array, raising ``TypeError`` unless it is real floating."""
    x = array(fname, name, x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{fname}: {name} must be floating, got dtype {x.dtype}")
    return x


def real(fname: str, name: str, value: Any) -> jax.Array:
    """Returns ``value`` as an integer or (at least float32) floating array, raising
    ``TypeError`` naming it otherwise (a string, None, a boolean, a complex number)."""
    if isinstance(value, int | np.integer) and not isinstance(value, bool):
        try:  # an integer past int32 is still a number (JAX would wrap or refuse it)
            value = float(value)
        except OverflowError:
            raise ValueError(f"{fname}: {name} is past the float range, got {value}") from None
    elif (
        isinstance(value, np.ndarray)
        and np.issubdtype(value.dtype, np.integer)
        and jax.dtypes.canonicalize_dtype(np.int64) != np.int64
    ):
        value = value.astype(np.float32)  # (an array too, which x64 keeps as int64)
    try:  # (a string would read as a dtype's name)
        x = None if isinstance(value, str | bytes) else jnp.asarray(value)
    except (TypeError, ValueError):
        x = None
    if x is None or not (
        jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.integer)
    ):
        got = f"dtype {x.dtype}" if x is not None else repr(value)
        raise TypeError(f"{fname}: {name} must be a real number or array, got {got}")
    # A float16 or bfloat16 one in float32, as jsoftmax computes (and strict promotion
    # would not mix it with float32).
    return (
        x.astype(jnp.float32)
        if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype.itemsize < 4
        else x
    )


def probabilities(fname: str, name: str, x: ArrayLike, dtype=None) -> jax.Array:
    """Returns ``x`` as a floating array: integer or boolean (one-hot) labels become
    ``dtype`` (JAX's default float if None), as optax's arithmetic promotes them."""
    x = array(fname, name, x)
    if jnp.issubdtype(x.dtype, jnp.integer) or x.dtype == jnp.bool_:
        return x.astype(dtype or jnp.result_type(float))
    return floating(fname, name, x)


def random_key(fname: str, key: Any) -> Any:
    """Returns ``key`` if it is one ``jax.random`` key, typed or raw key data (also traced);
    else raises ``TypeError`` naming it (JAX's own error names neither)."""
    try:
        data = jax.random.key_data(key)
    except TypeError:
        data = None
    shape = getattr(key, "shape", None)
    raw = data is not None and data.shape == shape
    if data is None or (data.ndim != 1 if raw else jnp.ndim(key) != 0):
        got = f"shape {shape}, dtype {key.dtype}" if shape is not None else type(key).__name__
        raise TypeError(f"{fname}: key must be one jax.random key, got {got}")
    return key


def promoted(*dtypes: Any) -> jnp.dtype:
    """The floating dtype JAX's standard promotion gives ``dtypes``, spelled out: under
    ``jax.numpy_dtype_promotion("strict")`` they do not promote (bfloat16 and float32)."""
    unique = {jnp.dtype(d) for d in dtypes}
    widest = max(unique, key=lambda d: d.itemsize)
    return widest if len(unique) == 1 or widest.itemsize >= 4 else jnp.dtype(jnp.float32)


def compute_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """The dtype jsoftmax computes in: at least float32 (float16/bfloat16 upcast).

    Chosen, not promoted: under ``jax.numpy_dtype_promotion("strict")`` bfloat16
    and float32 do not promote.
    """
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize >= 4:
        return jax.dtypes.canonicalize_dtype(dtype)
    return jnp.dtype(jnp.float32)


def axes(fname: str, axis: Axis, shape: tuple[int, ...], *, sort: bool = True) -> tuple[int, ...]:
    """Normalises ``axis`` (int, tuple with negatives allowed, or None for every axis, as
    in ``jax.nn``) to non-negative ints, sorted unless ``sort`` is False (the given
    order, which a flattened class axis follows in optax)."""
    ndim = len(shape)
    if axis is None:
        return tuple(range(ndim))

    raw: Any = (axis,) if _is_scalar(axis, jnp.integer) else axis
    if not isinstance(raw, tuple | list) or not all(_is_scalar(a, jnp.integer) for a in raw):
        raise TypeError(f"{fname}: axis must be an int, a tuple of ints or None, got {axis!r}")
    out = []
    for a in map(int, raw):
        if not -ndim <= a < ndim:
            raise ValueError(f"{fname}: axis {a} is out of range for an array of shape {shape}")
        out.append(a % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"{fname}: axis {axis!r} repeats an axis")
    return tuple(sorted(out)) if sort else tuple(out)


def broadcasts_to(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    """Whether an array of ``shape`` broadcasts to ``target`` (NumPy's rules)."""
    try:
        return np.broadcast_shapes(shape, target) == tuple(target)
    except ValueError:
        return False


def mask(
    fname: str, where: ArrayLike | None, shape: tuple[int, ...], *, full: bool = True
) -> jax.Array | None:
    """Returns ``where`` as a boolean array broadcast to ``shape`` (or None).

    With ``full=False`` it keeps its own sizes, given ``shape``'s number of
    axes: a kernel broadcasts it in its own passes, and reverse mode keeps
    the mask as the caller gave it, not an ``[..., K]`` copy of a row mask.
    """
    if where is None:
        return None
    where = array(fname, "where", where)
    if where.dtype != jnp.bool_:
        raise TypeError(f"{fname}: where must be a boolean mask, got dtype {where.dtype}")
    if not broadcasts_to(where.shape, shape):
        raise ValueError(
            f"{fname}: where has shape {where.shape}, which does not broadcast to {tuple(shape)}"
        )
    if not full:
        return where.reshape((1,) * (len(shape) - where.ndim) + where.shape)
    return jnp.broadcast_to(where, shape)


def integer_labels(
    fname: str,
    labels: ArrayLike,
    shape: tuple[int, ...],
    num_classes: int,
    what: str,
    ignore_index: int | None = None,
    kept: jax.Array | None = None,
) -> jax.Array:
    """Checks integer labels' dtype, their ``shape`` (which ``what`` needs) and concrete range.

    Traced labels cannot be range-checked; each caller documents what an
    out-of-range traced label gives (NaN in its row, never a wrapped class).
    Only the labels of the rows in ``kept`` are checked (the others are
    padding); a traced ``kept`` leaves them all to that rule. ``ignore_index``
    is :func:`ignore_index`'s.
    """
    # The range is read from the labels as given: ``jnp.asarray`` wraps int64 ones to int32
    # without x64 (and refuses a Python int past int32: NumPy's array first).
    values = None
    if not is_traced(labels):
        try:
            values = np.asarray(labels)
        except (TypeError, ValueError):  # a ragged list: array() names the argument
            pass
        if values is not None and values.dtype.kind not in "biufc":  # None, a string: as given
            values = None
    labels = array(fname, "labels", labels if values is None else values)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        dtype = labels.dtype if values is None else values.dtype  # as given, not JAX's
        raise TypeError(f"{fname}: labels must be integers, got dtype {dtype}")
    if labels.shape != tuple(shape):
        raise ValueError(
            f"{fname}: labels has shape {labels.shape} but {what} needs {tuple(shape)}"
        )
    if values is not None and not (kept is not None and is_traced(kept)):
        bad = (values < 0) | (values >= num_classes)
        if ignore_index is not None:  # (comparing with None is an object comparison per label)
            bad &= values != ignore_index
        if kept is not None:
            bad &= np.asarray(kept)
        if bad.any():
            position = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(
                f"{fname}: label {int(values[position])} at position {position} is out of "
                f"range for {num_classes} classes"
                + ("" if ignore_index is None else f" (ignore_index={ignore_index})")
            )
    # Class indices and ignore_index in a signed type that holds them: an int8 label of 3
    # against 200 classes would compare with a wrapped class count, and a uint32 one
    # with ignore_index=-100 wrapped to 2**32 - 100. A label past int32 is out of range:
    # a negative one that is not ignore_index (int32's max may be).
    if jnp.issubdtype(labels.dtype, jnp.unsignedinteger) and labels.dtype.itemsize >= 4:
        past = -2 if ignore_index == -1 else -1
        labels = jnp.where(labels > np.iinfo(np.int32).max, past, labels.astype(jnp.int32))
    if jnp.issubdtype(labels.dtype, jnp.unsignedinteger) or labels.dtype.itemsize < 4:
        labels = labels.astype(jnp.int32)
    return labels


def _is_scalar(value, *kinds) -> bool:
    """Whether ``value`` is a concrete scalar of one of the dtype ``kinds``: a Python or
    NumPy number (not a bool, which Python counts as an int) or a 0-d array, as
    ``jax.nn``'s axes take."""
    if isinstance(value, bool | np.bool_) or is_traced(value):
        return False
    if isinstance(value, int):  # any size (NumPy gives one past int64 the object dtype)
        return jnp.integer in kinds
    return np.ndim(value) == 0 and any(jnp.issubdtype(np.asarray(value).dtype, k) for k in kinds)


def static_scalar(fname: str, name: str, value, what: str, *kinds):
    """``value`` if it is a concrete scalar of one of the dtype ``kinds`` (static options);
    ``TypeError`` naming it as ``what`` otherwise (a boolean, a string, a tracer)."""
    if is_traced(value):
        raise TypeError(f"{fname}: {name} must be concrete (it is static), got a traced value")
    if not _is_scalar(value, *kinds):
        raise TypeError(f"{fname}: {name} must be {what} (it is static), got {value!r}")
    return value


def flag(fname: str, name: str, value) -> bool:
    """A static boolean option as a Python ``bool``: True or False, NumPy's or a concrete
    0-d JAX boolean; ``TypeError`` naming it otherwise (a truthy string, a tracer)."""
    if isinstance(value, bool | np.bool_):  # (static_scalar refuses them as numbers)
        return bool(value)
    return bool(static_scalar(fname, name, value, "True or False", jnp.bool_))


def choice(fname: str, name: str, value, choices: tuple[str, ...]):
    """``value`` if it is one of the strings ``choices``, ``ValueError`` naming them otherwise
    (a NumPy string too: as a static argument JAX cannot hash it)."""
    if not (isinstance(value, str) and value in choices):
        raise ValueError(f"{fname}: {name} must be one of {choices}, got {value!r}")
    return value


def static_int(fname: str, name: str, value, low: int, high: int | None = None) -> int:
    """A static integer option as a Python ``int`` (:func:`static_scalar`), raising
    ``ValueError`` outside ``[low, high]``."""
    value = int(static_scalar(fname, name, value, "an integer", jnp.integer))
    if value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{fname}: {name} must be {bounds}, got {value}")
    return value


def ignore_index(fname: str, value) -> int | None:
    """``ignore_index`` as a Python ``int`` (or None): static, and in int32, as the labels
    are compared in int32 (past it, int64 would wrap onto a class)."""
    if value is None:
        return None
    info = np.iinfo(np.int32)
    return static_int(fname, "ignore_index", value, int(info.min), int(info.max))


def temperature(
    fname: str,
    value: ArrayLike,
    shape: tuple[int, ...],
    reduced: tuple[int, ...],
    dtype,
    *,
    name: str = "temperature",
) -> jax.Array:
    """Validates a temperature (the argument ``name``) for an array of ``shape`` reduced
    over ``reduced``, and returns it in the compute ``dtype``.

    It must broadcast to ``shape`` with size 1 along the reduced axes (one
    temperature per row). Concrete values must be positive and finite, also in
    ``dtype`` (1e-50 is 0 in float32, and so is a subnormal); traced ones that
    are not become NaN, so the affected rows and their gradients come out NaN.
    """
    t = real(fname, name, value)
    if t.ndim > len(shape):
        raise ValueError(f"{fname}: {name} has shape {t.shape}, more axes than x {shape}")
    padded = (1,) * (len(shape) - t.ndim) + t.shape
    bad_broadcast = any(p not in (1, s) for p, s in zip(padded, shape, strict=True))
    if bad_broadcast or any(padded[a] != 1 for a in reduced):
        raise ValueError(
            f"{fname}: {name} has shape {t.shape}; it must broadcast to x's shape "
            f"{shape} with size 1 along the reduced axes {reduced}"
        )
    # (The value as given: jnp.asarray of a constant is a tracer under jit; a list of
    # tracers is traced.)
    if not any(is_traced(leaf) for leaf in jax.tree.leaves(value)):
        concrete = np.asarray(value, dtype=np.float64)
        with np.errstate(over="ignore"):
            cast = concrete.astype(dtype)
        # (A subnormal is 0 to XLA, which flushes them.)
        if not np.all(np.isfinite(cast) & (cast >= np.finfo(dtype).tiny)):
            within = f" in {dtype}" if np.all(np.isfinite(concrete) & (concrete > 0)) else ""
            got = concrete.item() if concrete.ndim == 0 else concrete.ravel()[:8]
            raise ValueError(f"{fname}: {name} must be positive and finite{within}, got {got}")
    t = t.astype(dtype)
    return nan_unless((t >= jnp.finfo(dtype).tiny) & jnp.isfinite(t), t)


def nan_unless(valid: jax.Array, x: jax.Array) -> jax.Array:
    """``x`` where ``valid`` (-0.0 too), NaN elsewhere, and its derivative NaN there: a
    factor, not a select, whose derivative 0 would stall an optimiser of a learnt
    temperature (forward mode gives NaN)."""
    return x * jnp.where(valid, 1.0, jnp.nan).astype(x.dtype)
