"""`python -m avmae.inspect_model --config=configs/cav_mae.py:base [--num_devices=N]`

Prints every parameter (path, shape, count, sharding under the config's rules and mesh) and
`trainable parameters: N`. Needs no data and runs on the CPU: with --num_devices it simulates
that many devices, so a pod mesh's shardings can be inspected on a laptop.
"""

from __future__ import annotations

import math
import os

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_NUM_DEVICES = flags.DEFINE_integer(
    "num_devices", 0, "Simulated CPU devices; default: the product of the mesh's explicit "
    "axis sizes.")


def main(argv: list[str]) -> None:
  del argv
  config = _CONFIG.value
  explicit = [s for s in config.mesh.values() if s > 0]
  devices = _NUM_DEVICES.value or max(1, math.prod(explicit))
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax  # imported here so that the device count can still be set
  jax.config.update("jax_num_cpu_devices", devices)
  import numpy as np

  from avmae import optim, sharding, train
  from avmae.methods import METHODS

  mesh = sharding.make_mesh(config.mesh)
  method = METHODS[config.method](config)
  optimizer = optim.make_optimizer(config.optimizer, optim.learning_rate_schedule(
      config.optimizer, config.total_steps, steps_per_epoch=1))
  abstract, shardings = train.state_layout(config, method, optimizer, mesh)
  rows = [(jax.tree_util.keystr(path, simple=True, separator="/"), leaf.shape,
           int(np.prod(leaf.shape)), sharding.describe(s))
          for (path, leaf), s in zip(jax.tree_util.tree_leaves_with_path(abstract["params"]),
                                     jax.tree.leaves(shardings["params"]))]
  width = max(len(r[0]) for r in rows)
  print(f"mesh {dict(mesh.shape)} over {mesh.size} {jax.devices()[0].platform} device(s)")
  print(f"{'parameter':<{width}}  {'shape':<20} {'count':>11}  sharding")
  for name, shape, count, spec in rows:
    print(f"{name:<{width}}  {str(tuple(shape)):<20} {count:>11,}  {spec}")
  print(f"trainable parameters: {train.count_params(abstract['params'])}")


if __name__ == "__main__":
  app.run(main)
