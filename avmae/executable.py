"""Serialised train-step executables (avmae.aot --save) and the checks before one runs.

The file holds the executable and what it was compiled for: the devices (platform, kind,
count, slices), the mesh, the package versions, the config and a hash of the lowered program.
The trainer (`--config.aot_executable=FILE`) lowers its own step with the same abstract inputs
and runs the file only if all of these match; otherwise it fails naming what differs.
"""

from __future__ import annotations

import hashlib
import pickle
from importlib import metadata
from typing import Any, Callable

from flax import traverse_util
import flax.linen as nn
import jax
import ml_collections
from jax.experimental import serialize_executable

from avmae import sharding, storage

FORMAT = "avmae-executable-1"
VERSIONED = ("jax", "jaxlib", "libtpu", "flax", "optax")


def _versions() -> dict[str, str | None]:
  def version(name):
    try:
      return metadata.version(name)
    except metadata.PackageNotFoundError:
      return None
  return {name: version(name) for name in VERSIONED}


def _devices(mesh: jax.sharding.Mesh) -> dict[str, Any]:
  devices = list(mesh.devices.flat)
  return {"platform": devices[0].platform, "device_kind": devices[0].device_kind,
          "count": len(devices), "num_slices": sharding.num_slices(devices)}


def lower(program, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
  """The trainer's step lowered for `mesh` from abstract inputs (nothing is materialised)."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(tuple(tuple(r) for r in config.sharding_rules)):
    return program.train_step.lower(program.abstract_state, program.abstract_batch)


def _fingerprint(lowered, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh
                 ) -> dict[str, Any]:
  return {"devices": _devices(mesh), "mesh": dict(mesh.shape), "versions": _versions(),
          "program_sha256": hashlib.sha256(lowered.as_text().encode()).hexdigest(),
          "config": traverse_util.flatten_dict(config.to_dict(), sep=".")}


def save(path: str, compiled, lowered, config: ml_collections.ConfigDict,
         mesh: jax.sharding.Mesh) -> int:
  """Writes the compiled step and its fingerprint to `path`; returns the file's bytes."""
  payload, in_tree, out_tree = serialize_executable.serialize(compiled)
  blob = pickle.dumps({"format": FORMAT, "fingerprint": _fingerprint(lowered, config, mesh),
                       "payload": payload, "in_tree": in_tree, "out_tree": out_tree})
  storage.write(path, blob)  # a local file or a bucket object every host reads
  return len(blob)


def mismatches(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
  """What differs between two fingerprints, in words ([] if they match)."""
  out = []
  for field in ("devices", "mesh", "versions"):
    if saved[field] != current[field]:
      out.append(f"{field}: compiled for {saved[field]}, this run has {current[field]}")
  if saved["program_sha256"] != current["program_sha256"]:
    a, b = saved["config"], current["config"]
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k != "aot_executable")
    changed = ", ".join(f"{k}={a.get(k)!r} -> {b.get(k)!r}" for k in keys[:8]) or "none"
    out.append(f"the lowered train step differs (config keys changed: {changed})")
  return out


def load(path: str, program, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh
         ) -> Callable:
  """The saved step, callable as (state, batch) -> (state, metrics), after checking that it
  was compiled for this program, mesh, devices and package versions."""
  try:
    saved = pickle.loads(storage.path(path).read_bytes())
  except (OSError, pickle.UnpicklingError, EOFError) as e:
    raise ValueError(f"config.aot_executable={path}: cannot read it ({e})") from e
  if not isinstance(saved, dict) or saved.get("format") != FORMAT:
    raise ValueError(f"config.aot_executable={path}: not an avmae.aot --save file")
  current = _fingerprint(lower(program, config, mesh), config, mesh)
  problems = mismatches(saved["fingerprint"], current)
  if problems:
    raise ValueError(f"config.aot_executable={path} was compiled for another setup; "
                     "recompile it with avmae.aot or drop the flag. " + "; ".join(problems))
  return serialize_executable.deserialize_and_load(saved["payload"], saved["in_tree"],
                                                   saved["out_tree"])
