"""Import an official PyTorch checkpoint as an avmae training workdir.

    python -m avmae.import_torch --checkpoint=official.pth --config=configs/cav_mae.py:base \
        --workdir=DIR

The checkpoint is the official pretraining model of the config's method (`Method.
import_state_dict`): CAV-MAE's `CAVMAE` state_dict, with or without DataParallel's `module.`
prefix; Audio-MAE's `MaskedAutoencoderViT` (`{"model": state_dict, ...}` as its training
saves it). .pth or .safetensors. It becomes checkpoint step 0 of DIR, with a fresh optimizer state
and the config in DIR/config.json: `python -m avmae.train --workdir=DIR` continues pretraining
from it and `python -m avmae.probe` (checkpoint_dir=DIR) probes it.
"""

from __future__ import annotations

import json
from typing import Any

from absl import app, flags
import flax.linen as nn
import jax
import ml_collections
import numpy as np
from ml_collections import config_flags

from avmae import checkpoint, optim, sharding, storage, train
from avmae.export import files
from avmae.methods import METHODS


def import_checkpoint(checkpoint_path: str, config: ml_collections.ConfigDict,
                      workdir: str) -> Any:
  """Writes `workdir` (config.json, checkpoint step 0); returns the imported parameters."""
  mngr = checkpoint.manager(workdir, config.keep_checkpoints, async_save=False)
  if mngr.latest_step() is not None:
    raise ValueError(f"{workdir} already has checkpoints (step {mngr.latest_step()}); "
                     "import into a new workdir")
  method = METHODS[config.method](config)
  if method.import_state_dict is None:
    raise ValueError(f"config.method={config.method} has no official PyTorch checkpoint "
                     "layout to import")
  try:
    params = method.import_state_dict(files.load(checkpoint_path))
  except ValueError as e:
    raise ValueError(f"{checkpoint_path}: {e}") from None
  mesh = sharding.make_mesh(config.mesh)
  rules = tuple(tuple(r) for r in config.sharding_rules)
  # The optimizer state's structure does not depend on the schedule's epoch length.
  schedule = optim.learning_rate_schedule(config.optimizer, config.total_steps, 1)
  optimizer = optim.make_optimizer(config.optimizer, schedule)
  _, shardings = train.state_layout(config, method, optimizer, mesh)
  params = jax.tree.map(lambda x, s: jax.device_put(np.asarray(x, np.float32), s), params,
                        shardings["params"])
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state = jax.jit(lambda p: train.state_from_params(optimizer, p),
                    out_shardings=shardings)(params)
  storage.path(workdir).mkdir(parents=True, exist_ok=True)
  train.write_run_info(workdir, config)
  data_state = json.dumps({"next_batch": 0, "num_skipped": 0}).encode()
  checkpoint.save(mngr, 0, state, data_state, config)
  mngr.wait_until_finished()
  mngr.close()
  print(f"imported {checkpoint_path} ({train.count_params(params):,} parameters) as step 0 "
        f"of {workdir}", flush=True)
  return params


def define_flags() -> None:
  flags.DEFINE_string("checkpoint", None, "Official state_dict (.pth, .safetensors) of the "
                      "config's method (CAV-MAE, Audio-MAE).",
                      required=True)
  config_flags.DEFINE_config_file("config", None, "Training config of the same model size.",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "New training workdir to create.", required=True)


def main(argv: list[str]) -> None:
  del argv
  f = flags.FLAGS
  import_checkpoint(f.checkpoint, f.config, f.workdir)


if __name__ == "__main__":
  define_flags()
  app.run(main)
