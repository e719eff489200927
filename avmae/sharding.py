"""Device meshes and shardings: the only place that builds a Mesh or a NamedSharding."""

from __future__ import annotations

import logging
from typing import Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec


def num_slices(devices: Sequence[jax.Device]) -> int:
  """Slices (ICI domains joined by the data-centre network) the devices span; 1 on a CPU."""
  return 1 + max(getattr(d, "slice_index", 0) or 0 for d in devices)


def _axis_sizes(shape: Mapping[str, int], total: int, what: str) -> list[int]:
  """Sizes of `shape` with its one -1 ("the rest") resolved against `total` devices."""
  sizes = list(shape.values())
  if sizes.count(-1) > 1:
    raise ValueError(f"{what} {dict(shape)}: at most one axis may be -1")
  if -1 in sizes:
    known = int(np.prod([s for s in sizes if s != -1]))
    if total % known:
      raise ValueError(f"{what} {dict(shape)}: {total} devices are not divisible by {known}")
    sizes[sizes.index(-1)] = total // known
  return sizes


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None,
              dcn: Mapping[str, int] | None = None) -> Mesh:
  """Mesh with the named axis sizes over `devices` (default: this machine's; or compile-only
  TPU devices of `jax.experimental.topologies`). One size may be -1 ("all the remaining").

  On one slice a mesh smaller than the device list uses the first devices (e.g. a 1-device
  reference run). Over several slices `shape` is the mesh within each slice (ICI) and `dcn`
  the mesh across slices (same axis names; default: data parallelism across slices); an
  axis's size is the product of the two (`mesh_utils.create_hybrid_device_mesh`). Axis types
  are Auto: linen's logical constraints do nothing under Explicit axes, the default of
  `jax.make_mesh` on this stack.
  """
  devices = list(jax.devices() if devices is None else devices)
  names = tuple(shape)
  dcn = dict(dcn or {"data": -1})
  if set(dcn) - set(names):
    raise ValueError(f"dcn mesh {dcn}: axes {sorted(set(dcn) - set(names))} are not axes of "
                     f"the mesh {dict(shape)}")
  slices = num_slices(devices)
  across = _axis_sizes({n: dcn.get(n, 1) for n in names}, slices, "dcn mesh")
  if int(np.prod(across)) != slices:
    raise ValueError(f"dcn mesh {dcn} needs {int(np.prod(across))} slices, but the devices "
                     f"span {slices}")
  axis_types = (AxisType.Auto,) * len(names)
  if slices > 1:
    within = _axis_sizes(shape, len(devices) // slices, "mesh")
    if int(np.prod(within)) * slices != len(devices):
      raise ValueError(f"mesh {dict(shape)} needs {int(np.prod(within))} devices per slice, "
                       f"but each of the {slices} slices has {len(devices) // slices}")
    grid = mesh_utils.create_hybrid_device_mesh(within, across, devices,
                                                allow_split_physical_axes=True)
    return Mesh(grid, names, axis_types=axis_types)
  sizes = _axis_sizes(shape, len(devices), "mesh")
  needed = int(np.prod(sizes))
  if needed > len(devices) or len(devices) % needed:
    raise ValueError(f"mesh {dict(shape)} needs {needed} devices, but {len(devices)} are "
                     "present")
  if needed < len(devices):
    logging.warning("mesh %s uses %d of the %d devices", dict(shape), needed, len(devices))
  return jax.make_mesh(tuple(sizes), names, axis_types=axis_types, devices=devices[:needed])


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
