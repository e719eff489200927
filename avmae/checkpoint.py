"""Orbax checkpoints of a run: train state, data-iterator state and config, in one step dir.

    WORKDIR/checkpoints/<step>/{state, data, config}

Restoring is given the target shardings, so a checkpoint loads onto another mesh or number
of processes bit-identically.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp


def manager(workdir: str, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                         enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                               options=options, item_names=("state", "data", "config"))


def save(mngr: ocp.CheckpointManager, step: int, state: Any, data_state: bytes,
         config: ml_collections.ConfigDict) -> None:
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=ocp.args.JsonSave(json.loads(data_state)),
      config=ocp.args.JsonSave(json.loads(config.to_json()))), force=True)


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def restore(mngr: ocp.CheckpointManager, step: int, target: Any) -> tuple[Any, bytes]:
  """(state placed as `target`'s shardings, data-iterator state) of checkpoint `step`."""
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
  return restored["state"], json.dumps(restored["data"]).encode()


def load_params(path: str, target: Any) -> Any:
  """Parameters to start from: an avmae checkpoint step dir (its state's params) or an .npz
  of "a/b/c"-keyed arrays. Placed with `target`'s shardings; every key must match."""
  if path.endswith(".npz"):
    flat = dict(np.load(path))
    leaves = jax.tree_util.tree_leaves_with_path(target)
    names = ["/".join(str(getattr(k, "key", k)) for k in p) for p, _ in leaves]
    missing, extra = set(names) - set(flat), set(flat) - set(names)
    if missing or extra:
      raise ValueError(f"{path}: parameters missing {sorted(missing)[:5]}, unexpected "
                       f"{sorted(extra)[:5]}")
    for name, (_, t) in zip(names, leaves):
      if flat[name].shape != t.shape:
        raise ValueError(f"{path}: {name} has shape {flat[name].shape}, model needs {t.shape}")
    arrays = [jax.device_put(flat[n].astype(t.dtype), t.sharding) for n, (_, t) in
              zip(names, leaves)]
    return jax.tree.unflatten(jax.tree.structure(target), arrays)
  state_dir = os.path.join(os.path.abspath(path), "state")
  if not os.path.isdir(state_dir):
    raise ValueError(f"init_checkpoint {path}: neither an .npz nor a checkpoint step "
                     f"directory with a 'state' item")
  item = {"params": target}
  restored = ocp.PyTreeCheckpointer().restore(state_dir, args=ocp.args.PyTreeRestore(
      item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
      partial_restore=True))  # only the parameters, not the optimizer state
  return restored["params"]
