"""Device meshes and shardings: the only place that builds a Mesh or a NamedSharding."""

from __future__ import annotations

import logging
from typing import Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec


def make_mesh(shape: Mapping[str, int]) -> Mesh:
  """Mesh with the named axis sizes; one size may be -1 ("all the remaining devices").

  A mesh smaller than the machine uses the first devices (e.g. a 1-device reference run).
  Axis types are Auto: linen's logical constraints do nothing under Explicit axes, the
  default of `jax.make_mesh` on this stack.
  """
  names, sizes = tuple(shape), list(shape.values())
  num_devices = jax.device_count()
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh {dict(shape)}: at most one axis may be -1")
  if -1 in sizes:
    known = int(np.prod([s for s in sizes if s != -1]))
    if num_devices % known:
      raise ValueError(f"mesh {dict(shape)}: {num_devices} devices are not divisible by {known}")
    sizes[sizes.index(-1)] = num_devices // known
  needed = int(np.prod(sizes))
  if needed > num_devices or num_devices % needed:
    raise ValueError(f"mesh {dict(shape)} needs {needed} devices, but {num_devices} are "
                     "present")
  if needed < num_devices:
    logging.warning("mesh %s uses %d of the %d devices", dict(shape), needed, num_devices)
  return jax.make_mesh(tuple(sizes), names, axis_types=(AxisType.Auto,) * len(names),
                       devices=jax.devices()[:needed])


def batch_sharding(mesh: Mesh, batch_axes: Sequence[str]) -> NamedSharding:
  """Leading (batch) dimension split over `batch_axes`, the rest replicated."""
  missing = [a for a in batch_axes if a not in mesh.axis_names]
  if missing:
    raise ValueError(f"batch axes {missing} are not axes of the mesh {mesh.axis_names}")
  return NamedSharding(mesh, PartitionSpec(tuple(batch_axes)))


def num_batch_shards(mesh: Mesh, batch_axes: Sequence[str]) -> int:
  return int(np.prod([mesh.shape[a] for a in batch_axes]))


def logical_to_shardings(boxed_tree, mesh: Mesh, rules: Sequence[tuple[str, object]]):
  """NamedShardings for a tree whose leaves carry logical names (flax `Partitioned` boxes,
  e.g. from `jax.eval_shape` of an init); unannotated leaves are replicated."""
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, [tuple(r) for r in rules])


def describe(sharding: NamedSharding) -> str:
  """'P(fsdp, tensor)'-style text of a sharding, for tables."""
  return "P(" + ", ".join("None" if s is None else str(s) for s in sharding.spec) + ")"


def strip_logical_names(tree):
  """The values of a tree of flax `Partitioned` boxes (works on abstract values too, where
  `nn.meta.unbox` would try to apply sharding constraints)."""
  is_box = lambda x: isinstance(x, nn.Partitioned)
  return jax.tree.map(lambda x: x.value if is_box(x) else x, tree, is_leaf=is_box)
