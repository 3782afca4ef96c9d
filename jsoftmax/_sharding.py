"""Explicit sharding (``jax.make_mesh``'s default axis type in jax 0.10).

An array sharded over an Explicit mesh axis carries its sharding in its type,
and a scatter, a sort, a dynamic slice or a contraction over such an axis must
be told its output's sharding. The metrics, the fits, ``calibrate`` and the
fused heads take all of those over the rows, so each runs its body with the
mesh's Explicit axes made Auto (:func:`jax.sharding.auto_axes`): XLA's
partitioner places what it computes inside, as on any mesh of Auto axes, and
the outputs come back typed, replicated or sharded as the rows they belong to.
Elsewhere (no mesh, Auto axes, Manual ones inside ``shard_map``) nothing changes.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar, cast

import jax
from jax.sharding import PartitionSpec

from jsoftmax import _checks

_P = ParamSpec("_P")
_R = TypeVar("_R")


def replicated(fname: str, arguments: dict[str, Any]) -> PartitionSpec:
    """Outputs that sum over the rows (a metric, a fit): on every device."""
    del fname, arguments
    return PartitionSpec()


def sharded_like(
    name: str, drop: int | str | None = None
) -> Callable[[str, dict[str, Any]], PartitionSpec]:
    """Outputs with the axes of argument ``name`` but ``drop`` (an axis, or the name of the
    argument that holds the axes, checked as the function checks it), sharded as those.

    With a ``reduction`` other than "none" the outputs sum over the rows: replicated.
    """

    def spec(fname: str, arguments: dict[str, Any]) -> PartitionSpec:
        x = arguments[name]
        if arguments.get("reduction", "none") != "none" or not isinstance(x, jax.Array):
            return PartitionSpec()
        axes = jax.typeof(x).sharding.spec
        if isinstance(drop, str):
            gone = _checks.axes(fname, arguments[drop], x.shape)
        elif drop is not None and axes:  # (no axes: the function raises its own error)
            gone = (drop % len(axes),)
        else:
            gone = ()
        return PartitionSpec(*(a for i, a in enumerate(axes) if i not in gone))

    return spec


def _explicit_mesh(values) -> jax.sharding.AbstractMesh | None:
    """The mesh whose Explicit axes type some array among ``values``, if any."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:  # under jit without ``jax.set_mesh``: the arguments' own mesh
        leaves = (v for v in jax.tree.leaves(values) if isinstance(v, jax.Array))
        meshes = (jax.typeof(leaf).sharding.mesh for leaf in leaves)
        mesh = next((m for m in meshes if not m.empty), mesh)
    return mesh if getattr(mesh, "explicit_axes", ()) else None


def auto_axes(
    out_spec: Callable[[str, dict[str, Any]], Any] = replicated,
) -> Callable[[Callable[_P, _R]], Callable[_P, _R]]:
    """Runs the decorated function with Explicit mesh axes made Auto.

    ``out_spec`` maps the function's name and its bound arguments (defaults applied) to
    the outputs' ``PartitionSpec`` (or a pytree prefix of them).
    """

    def decorate(fun: Callable[_P, _R]) -> Callable[_P, _R]:
        signature = inspect.signature(fun)
        untyped: Callable[..., Any] = fun  # called on a pytree's leaves, rebuilt

        @functools.wraps(fun)
        def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            mesh = _explicit_mesh((args, kwargs))
            if mesh is None:
                return fun(*args, **kwargs)
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            # Only the arrays cross into the Auto axes; the rest (a metric, options) stays as given.
            leaves, tree = jax.tree.flatten((args, kwargs))
            arrays = [i for i, leaf in enumerate(leaves) if isinstance(leaf, jax.Array)]

            def body(*values):
                given = list(leaves)
                for i, value in zip(arrays, values, strict=True):
                    given[i] = value
                inner_args, inner_kwargs = jax.tree.unflatten(tree, given)
                return untyped(*inner_args, **inner_kwargs)

            # Only the Explicit axes: inside a shard_map, Manual ones stay Manual.
            explicit = tuple(mesh.explicit_axes)
            auto = jax.sharding.auto_axes(
                body, axes=explicit, out_sharding=out_spec(fun.__name__, bound.arguments)
            )
            with jax.sharding.use_abstract_mesh(mesh):
                return cast(_R, auto(*(leaves[i] for i in arrays)))

        return wrapper

    return decorate
