"""Orbax checkpoints of a run: train state, data-iterator state and config, in one step dir.

    WORKDIR/checkpoints/<step>/{state, data, config}

Restoring is given the target shardings, so a checkpoint loads onto another mesh or number
of processes bit-identically, and either layer layout (model.scan_layers, which the config
item records) loads into either: it is restored as saved and converted (`convert_layers`).
"""

from __future__ import annotations

import json
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec

from avmae import storage


def manager(workdir: str, keep: int, async_save: bool = True, keep_period: int = 0
            ) -> ocp.CheckpointManager:
  """Keeps the newest `keep` checkpoints and, with `keep_period` k > 0, every step that is a
  multiple of k as well (e.g. for probe curves)."""
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                         enable_async_checkpointing=async_save,
                                         keep_period=keep_period or None)
  return ocp.CheckpointManager(storage.path(workdir) / "checkpoints",
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


# ----------------------------------------------------------------------------- layer layouts
# `stacks` (a model's `layer_stacks`) maps each stack of identical blocks to its depth:
# unrolled, its parameters are `<name>_0` .. `<name>_<depth - 1>`; scanned, one `<name>` whose
# leaves have a leading layer axis.

def _edit_spec(sharding: Any, edit: Callable[[tuple], tuple]) -> Any:
  if not isinstance(sharding, NamedSharding):  # None or one device: fits any shape
    return sharding
  return NamedSharding(sharding.mesh, PartitionSpec(*edit(tuple(sharding.spec))))


def _stack(leaves: list[Any]) -> Any:
  x = leaves[0]
  if isinstance(x, jax.ShapeDtypeStruct):  # an abstract target: the layer axis unsharded
    return jax.ShapeDtypeStruct((len(leaves), *x.shape), x.dtype,
                                sharding=_edit_spec(x.sharding, lambda s: (None, *s)))
  return (np if isinstance(x, np.ndarray) else jnp).stack(leaves)


def _layer(x: Any, i: int) -> Any:
  if isinstance(x, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(x.shape[1:], x.dtype,
                                sharding=_edit_spec(x.sharding, lambda s: s[1:]))
  return x[i]


def _convert_dict(params: dict, stacks: Mapping[str, int], scan_layers: bool) -> dict:
  out = dict(params)
  for name, depth in stacks.items():
    names = [f"{name}_{i}" for i in range(depth)]
    if scan_layers and name not in out:
      if any(n not in out for n in names) or f"{name}_{depth}" in out:
        found = sorted(k for k in out if k.removeprefix(f"{name}_").isdigit())
        raise ValueError(f"cannot stack {name}: {depth} layers needed, found {found}")
      out[name] = jax.tree.map(lambda *leaves: _stack(leaves), *[out.pop(n) for n in names])
    elif not scan_layers and name in out:
      depths = {x.shape[0] for x in jax.tree.leaves(out[name])}
      if depths != {depth}:
        raise ValueError(f"cannot unstack {name}: {depth} layers needed, found {depths}")
      stacked = out.pop(name)
      out.update({n: jax.tree.map(lambda x, i=i: _layer(x, i), stacked)
                  for i, n in enumerate(names)})
  return out


def convert_layers(tree: Any, stacks: Mapping[str, int], scan_layers: bool) -> Any:
  """`tree` with every parameter dict in it (the params, and Adam's mu and nu of an optimizer
  state) in the scanned (`scan_layers`) or the unrolled layout; a dict already in that layout
  is kept. Exact (stacking and indexing only); works on arrays, NumPy and abstract values."""
  def is_params(x):
    return isinstance(x, dict) and any(n in x or f"{n}_0" in x for n in stacks)
  return jax.tree.map(lambda x: _convert_dict(x, stacks, scan_layers) if is_params(x) else x,
                      tree, is_leaf=is_params)


def is_scanned(params: Mapping[str, Any], stacks: Mapping[str, int]) -> bool:
  """Whether a model's top-level parameter dict is in the scanned layout."""
  return any(name in params for name in stacks)


def saved_config(step_dir: str) -> dict[str, Any]:
  """The config (as JSON) that the checkpoint in `step_dir` was saved with."""
  return ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(
      storage.path(step_dir) / "config")


def saved_scan_layers(step_dir: str) -> bool:
  """The layer layout of the checkpoint in `step_dir`: its config item's model.scan_layers
  (checkpoints saved before that switch existed hold the unrolled layout)."""
  return bool(saved_config(step_dir)["model"].get("scan_layers", False))


# Keys a resumed run may change although they are under `model`: the same parameters.
RESUMABLE_MODEL_KEYS = ("remat", "scan_layers")
# The input shapes: a resumed run keeps them (and the model) as the checkpoint's.
SHAPE_DATA_KEYS = ("audio_frames", "image_size", "num_frames", "all_frames")


def check_resume_config(step_dir: str, config: ml_collections.ConfigDict) -> None:
  """Fails naming every key of the method, model or input shapes that differs from the
  checkpoint's config: a resumed run trains the model it saved."""
  def flat(tree, prefix=""):
    return {f"{prefix}{k}": v for k, v in tree.items()}
  now = json.loads(config.to_json())
  saved = saved_config(step_dir)
  keys = (["method"] + [f"model.{k}" for k in sorted(now["model"])
                        if k not in RESUMABLE_MODEL_KEYS]
          + [f"data.{k}" for k in SHAPE_DATA_KEYS])
  flat_now = {"method": now["method"], **flat(now["model"], "model."),
              **flat(now["data"], "data.")}
  flat_saved = {"method": saved.get("method"), **flat(saved.get("model", {}), "model."),
                **flat(saved.get("data", {}), "data.")}
  # A key the saved config lacks was added after it was written (an older workdir): skipped.
  changed = [f"config.{k}={flat_now[k]!r} (the checkpoint has {flat_saved[k]!r})"
             for k in keys if k in flat_saved and flat_saved[k] != flat_now[k]]
  if changed:
    raise ValueError(f"{step_dir}: resuming needs the checkpoint's model and input shapes; "
                     f"changed: {', '.join(changed)}. Use another workdir (with "
                     "config.init_checkpoint to start from these parameters)")


def _load_converted(path: str, load: Callable[[Any], Any], target: Any,
                    stacks: Mapping[str, int], saved: bool, wanted: bool) -> Any:
  """`load(abstract)` of a checkpoint in layout `saved`, as `target` (layout `wanted`)."""
  if saved == wanted:
    return load(target)
  try:
    loaded = load(convert_layers(target, stacks, saved))
  except (ValueError, KeyError) as e:
    raise ValueError(f"{path}: the checkpoint holds the model.scan_layers={saved} layer "
                     f"layout and the model uses scan_layers={wanted}; converted, it does not "
                     f"fit the model: {e}") from e
  shardings = jax.tree.map(lambda t: t.sharding, target)
  return jax.jit(lambda t: convert_layers(t, stacks, wanted), out_shardings=shardings)(loaded)


# ----------------------------------------------------------------------------- restore

def restore(mngr: ocp.CheckpointManager, step: int, target: Any, stacks: Mapping[str, int]
            ) -> tuple[Any, bytes]:
  """(state placed as `target`'s shardings and layer layout, data-iterator state) of
  checkpoint `step`, restored in the layout its config records and converted."""
  step_dir = str(mngr.directory / str(step))
  load = lambda t: mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(t)))["state"]
  state = _load_converted(step_dir, load, target, stacks, saved_scan_layers(step_dir),
                          is_scanned(target["params"], stacks))
  data = mngr.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]
  return state, json.dumps(data).encode()


def load_params(path: str, target: Any, stacks: Mapping[str, int],
                import_state_dict: Callable[[Mapping[str, np.ndarray]], Any] | None = None
                ) -> Any:
  """Parameters to start from: an avmae checkpoint step dir (its state's params), an .npz
  of "a/b/c"-keyed arrays, or an official PyTorch state_dict (.pth, .safetensors, e.g.
  CAV-MAE's IN-initial.pth) mapped by the method's `import_state_dict`. Placed with
  `target`'s shardings; every key must match. Either layer layout loads (a step dir's config
  says which it holds, an .npz's keys)."""
  from avmae.export import files  # torch is imported only for a state_dict
  if path.endswith((".npz", *files.SUFFIXES)):  # "a/b/c"-keyed arrays, either layout
    flat = _flat_arrays(path, import_state_dict)
    saved = any(k.split("/")[0] in stacks for k in flat)
    load = lambda t: _npz_params(path, flat, t)
  else:
    state_dir = storage.path(path) / "state"
    if not state_dir.is_dir():
      raise ValueError(f"init_checkpoint {path}: neither an .npz, a PyTorch state_dict "
                       f"({', '.join(files.SUFFIXES)}) nor a checkpoint step directory with a "
                       "'state' item")
    saved = saved_scan_layers(path)
    load = lambda t: _state_params(path, state_dir, t)
  return _load_converted(path, load, target, stacks, saved, is_scanned(target, stacks))


def _flat_arrays(path: str, import_state_dict: Callable[[Mapping[str, np.ndarray]], Any] | None
                 ) -> dict[str, np.ndarray]:
  """An .npz's arrays, or a PyTorch state_dict mapped by `import_state_dict`, "a/b/c"-keyed."""
  from avmae.export import files
  if path.endswith(".npz"):
    with storage.path(path).open("rb") as f:
      return dict(np.load(f))
  if import_state_dict is None:
    raise ValueError(f"init_checkpoint {path}: this method has no PyTorch layout to import")
  params = import_state_dict(files.load(path))
  return {"/".join(k): v for k, v in traverse_util.flatten_dict(params).items()}


def _npz_params(path: str, flat: dict[str, np.ndarray], target: Any) -> Any:
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


def _state_params(path: str, state_dir: storage.PathLike, target: Any) -> Any:
  item = {"params": target}
  restored = ocp.PyTreeCheckpointer().restore(state_dir, args=ocp.args.PyTreeRestore(
      item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
      partial_restore=True))  # only the parameters, not the optimizer state
  # A partial restore leaves what the checkpoint lacks as the abstract target: never loaded.
  missing = [jax.tree_util.keystr(p, simple=True, separator="/") for p, x in
             jax.tree_util.tree_leaves_with_path(restored["params"])
             if isinstance(x, jax.ShapeDtypeStruct)]
  if missing:
    raise ValueError(f"{path}: parameters missing {missing[:5]}")
  return restored["params"]
