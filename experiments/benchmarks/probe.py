"""Probe benchmark: feature-extraction examples/s and an N-point vmapped sweep vs N probes.

    python experiments/benchmarks/probe.py [--size=tiny] [--examples=512] [--grid=8]

Feature extraction runs the encoder of a randomly initialised model of `configs/cav_mae.py:SIZE`
on random inputs over the local devices (the cost does not depend on the weights). The sweep
part trains linear heads on random features of that model's width, all grid points at once
(probe_heads.train_sweep) and then one at a time (train_single).
"""

from __future__ import annotations

import time

from absl import app, flags
import jax
import numpy as np

from avmae import probe_heads, sharding
from avmae.methods import METHODS
from configs import cav_mae

_SIZE = flags.DEFINE_string("size", "tiny", "Model size of configs/cav_mae.py.")
_BATCH = flags.DEFINE_integer("batch", 32, "Extraction batch.")
_BATCHES = flags.DEFINE_integer("batches", 5, "Timed extraction batches.")
_EXAMPLES = flags.DEFINE_integer("examples", 4096, "Training features for the sweep.")
_CLASSES = flags.DEFINE_integer("classes", 10, "Classes of the sweep's task.")
_GRID = flags.DEFINE_integer("grid", 8, "Grid points (learning rates x 1 weight decay).")
_STEPS = flags.DEFINE_integer("steps", 200, "Probe training steps.")


def timed(fn, repeats: int = 1) -> float:
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - start)
  return best


def main(argv: list[str]) -> None:
  del argv
  config = cav_mae.get_config(_SIZE.value)
  config.data.batch_size = _BATCH.value
  mesh = sharding.make_mesh({"data": -1})
  method = METHODS[config.method](config)
  batch = method.example_batch(config.data.batch_size)
  params = jax.jit(lambda: method.init(jax.random.key(0), batch)["params"])()
  features = jax.jit(method.features)
  batch = {**batch, "audio": jax.random.normal(jax.random.key(1), batch["audio"].shape)}
  compile_s = timed(lambda: features(params, batch))
  per_batch = timed(lambda: [features(params, batch) for _ in range(_BATCHES.value)], 3)
  per_batch /= _BATCHES.value
  print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}; "
        f"mesh {dict(mesh.shape)}")
  print(f"feature extraction ({_SIZE.value}, batch {_BATCH.value}, all modes and layers): "
        f"first call {compile_s:.2f} s, {per_batch * 1e3:.1f} ms/batch, "
        f"{_BATCH.value / per_batch:,.0f} examples/s\n")

  rng = np.random.default_rng(0)
  dim = config.model.embed_dim
  x = rng.normal(size=(_EXAMPLES.value, dim)).astype(np.float32)
  y = np.eye(_CLASSES.value, dtype=np.float32)[rng.integers(_CLASSES.value, size=len(x))]
  lrs = list(np.logspace(-3, -0.5, _GRID.value))
  kw = dict(head="bn_linear", multilabel=False, steps=_STEPS.value, batch_size=128, seed=0)
  sweep = lambda: probe_heads.train_sweep(x, y, lrs=lrs, weight_decays=[0.0], **kw)
  single = lambda lr: probe_heads.train_single(x, y, lr=lr, weight_decay=0.0, **kw)
  sweep(), single(lrs[0])  # compile both
  sweep_s = timed(sweep, 3)
  singles_s = timed(lambda: [single(lr) for lr in lrs], 3)
  print(f"{'probe training':<34}{'seconds':>9}")
  print(f"{f'{_GRID.value}-point vmapped sweep':<34}{sweep_s:>9.3f}")
  print(f"{f'{_GRID.value} separate probes':<34}{singles_s:>9.3f}")
  cost = sweep_s / singles_s * _GRID.value
  print(f"speed-up {singles_s / sweep_s:.1f}x; the sweep costs {cost:.1f} single probes "
        f"({_EXAMPLES.value} x {dim} features, {_CLASSES.value} classes, "
        f"{_STEPS.value} steps of 128)")


if __name__ == "__main__":
  app.run(main)
