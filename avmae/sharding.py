"""Device meshes and shardings: the only place that builds a Mesh or a NamedSharding."""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec


def make_mesh(shape: Mapping[str, int]) -> Mesh:
  """Mesh over all devices with the named axis sizes; one size may be -1 ("the rest").

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
  if int(np.prod(sizes)) != num_devices:
    raise ValueError(f"mesh {dict(shape)} needs {int(np.prod(sizes))} devices, "
                     f"but {num_devices} are present")
  return jax.make_mesh(tuple(sizes), names, axis_types=(AxisType.Auto,) * len(names))


def batch_sharding(mesh: Mesh, batch_axes: Sequence[str]) -> NamedSharding:
  """Leading (batch) dimension split over `batch_axes`, the rest replicated."""
  missing = [a for a in batch_axes if a not in mesh.axis_names]
  if missing:
    raise ValueError(f"batch axes {missing} are not axes of the mesh {mesh.axis_names}")
  return NamedSharding(mesh, PartitionSpec(tuple(batch_axes)))


def num_batch_shards(mesh: Mesh, batch_axes: Sequence[str]) -> int:
  return int(np.prod([mesh.shape[a] for a in batch_axes]))
