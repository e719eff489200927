"""Frozen features of a checkpoint over a dataset split, extracted once and cached on disk.

The cache key changes when the parameters, the dataset or the feature spec change, so a
cached file is never reused for something else.
"""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from avmae import checkpoint, sharding, storage
from avmae.data import dataset_info, pipeline
from avmae.methods import METHODS
from avmae.methods.method import Method


def training_config(checkpoint_dir: str) -> ml_collections.ConfigDict:
  """The config a training workdir was run with (its config.json)."""
  path = storage.path(checkpoint_dir) / "config.json"
  if not path.exists():
    raise ValueError(f"{path} does not exist: {checkpoint_dir!r} is not an avmae training "
                     "workdir (python -m avmae.train writes config.json there)")
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def saved_steps(checkpoint_dir: str) -> list[int]:
  root = storage.path(checkpoint_dir) / "checkpoints"
  steps = sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.is_dir() else []
  if not steps:
    raise ValueError(f"no checkpoints under {root}")
  return steps


def load_params(train_config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                checkpoint_dir: str, step: int | None, seed: int) -> tuple[Method, Any]:
  """(method, parameters of checkpoint `step`; None: a random initialisation of the same
  model), placed with the training rules on `mesh` (any mesh: restore reshards)."""
  method = METHODS[train_config.method](train_config)
  rules = tuple(tuple(r) for r in train_config.sharding_rules)
  example = lambda: method.example_batch(
      sharding.num_batch_shards(mesh, train_config.data.batch_axes))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(lambda: method.init(jax.random.key(seed), example()))
    shardings = sharding.logical_to_shardings(boxed, mesh, rules)["params"]
    abstract = sharding.strip_logical_names(boxed)["params"]
    if step is None:
      init = jax.jit(lambda: nn.meta.unbox(method.init(jax.random.key(seed), example()))["params"],
                     out_shardings=shardings)
      return method, init()
  target = checkpoint.abstract_with_shardings(abstract, shardings)
  path = str(storage.path(checkpoint_dir) / "checkpoints" / str(step))
  try:
    # In the model's layer layout (model.scan_layers), whichever the checkpoint holds.
    return method, checkpoint.load_params(path, target, method.model.layer_stacks)
  except (ValueError, KeyError) as e:
    raise ValueError(f"{path}: the checkpoint does not fit the model of {checkpoint_dir}/"
                     f"config.json ({e})") from e


def fingerprint(params: Any) -> str:
  """A cheap content hash of parameters (shapes, sums and sums of squares)."""
  parts = [(jax.tree_util.keystr(p), x.shape, float(jnp.sum(x, dtype=jnp.float32)),
            float(jnp.sum(jnp.square(x), dtype=jnp.float32)))
           for p, x in jax.tree_util.tree_leaves_with_path(params)]
  return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def dataset_hash(data_dir: str) -> str:
  info = (storage.path(data_dir) / dataset_info.FILENAME).read_bytes()
  return hashlib.sha256(info).hexdigest()[:16]


def extract(method: Method, params: Any, data_cfg: ml_collections.ConfigDict, split: str,
            mesh: jax.sharding.Mesh, cache_dir: str | None, spec_key: str) -> dict[str, np.ndarray]:
  """Features of every record of `split` ({mode: [N, D]}, "<mode>_layers": [N, L, D],
  "labels": [N, C], "record_index": [N]), from the cache when the key matches."""
  key = hashlib.sha256(json.dumps([fingerprint(params), dataset_hash(data_cfg.dir), split,
                                   spec_key]).encode()).hexdigest()[:20]
  path = None if cache_dir is None else storage.path(cache_dir) / f"{split}-{key}.npz"
  if path and path.exists():
    with path.open("rb") as f:
      return dict(np.load(f))

  def features(params, batch):
    return {**method.features(params, batch), "labels": batch["labels"],
            "record_index": batch["record_index"], "valid": batch["valid"]}

  # Replicated outputs: every process gets the whole batch's features.
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  p_features = jax.jit(features, out_shardings=replicated)
  chunks: dict[str, list[np.ndarray]] = {}
  with pipeline.Batches(data_cfg, split, train=False, seed=0,
                        global_batch_size=data_cfg.batch_size, mesh=mesh) as batches, \
      jax.set_mesh(mesh):
    for batch in batches:
      out = jax.device_get(p_features(params, batch))
      keep = np.asarray(out.pop("valid"))
      for k, v in out.items():
        chunks.setdefault(k, []).append(np.asarray(v)[keep])
  result = {k: np.concatenate(v) for k, v in chunks.items()}
  if path:
    buffer = io.BytesIO()
    np.savez(buffer, **result)
    storage.write(path, buffer.getvalue())
  return result
