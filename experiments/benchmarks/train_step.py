"""Train-step benchmark: compile time, step time, analytic vs XLA FLOPs, MFU, peak memory.

    python experiments/benchmarks/train_step.py [--sizes=tiny,base] [--steps=5] \
        [--remat=none,full,dots]

A size `NAME@T` is configs/cav_mae.py:NAME on clips of T frames (e.g. base_video@8: the
base video model at 8 frames, 4 x 14 x 14 = 784 video tokens); `MODULE:NAME` is a size of
configs/MODULE.py (e.g. audio_mae:base). The analytic count is the method's own
(`Method.train_step_flops`).

For each model size it compiles the real train step (the trainer's `make_train_step`, same
shardings, donated state) on a mesh over the local devices, with random inputs (no data
needed). It prints:
  - compile time and the mean step time;
  - analytic FLOPs per step (avmae/flops.py, matmuls only) and XLA's cost-analysis FLOPs:
    their ratio should be near 1 (no compute on masked tokens, nothing done twice);
  - achieved FLOP/s against a large matmul's FLOP/s measured in the same run (the machine's
    practical peak), i.e. MFU;
  - peak memory per device from XLA's memory analysis at a few batch sizes (compile only).
Each for every `--remat` policy (config.model.remat): recomputation trades step time (the
analytic FLOPs do not count it, so MFU drops) for activation memory. The memory table also
gives the bytes the forward pass saves for the backward pass (jax.vjp residuals, per device),
which remat shrinks on any backend; XLA:CPU's peak estimate does not show that saving (its
schedule keeps the recomputed activations as long), so read the CPU peak with that in mind.
"""

from __future__ import annotations

import importlib
import time

from absl import app, flags
import flax.linen as nn
import jax
import jax.numpy as jnp

from avmae import masking, optim, sharding, train
from avmae.methods import METHODS

_SIZES = flags.DEFINE_list("sizes", ["tiny", "base"], "Model sizes of configs/cav_mae.py "
                           "(NAME@T: clips of T frames; MODULE:NAME of configs/MODULE.py).")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per size (after one warm-up step).")
_TIME_BATCH = flags.DEFINE_list("time_batch", ["tiny:32", "base:4"],
                                "Global batch for timing, per size (base at 48 takes minutes "
                                "per step on a CPU).")
_MEMORY_BATCHES = flags.DEFINE_list("memory_batches", ["tiny:32:128", "base:4:48"],
                                    "size:batch:batch... for the memory analysis.")
_REMAT = flags.DEFINE_list("remat", ["none", "full"], "Rematerialisation policies to compare.")
_MATMUL = flags.DEFINE_integer("matmul", 4096, "Side of the square matmul for the peak.")


def matmul_peak(n: int, dtype) -> float:
  """FLOP/s of an n x n x n matmul on the first device (best of several runs)."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  f = jax.jit(lambda x, y: x @ y)
  f(a, a).block_until_ready()
  best = float("inf")
  for _ in range(5):
    start = time.perf_counter()
    f(a, a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n**3 / best


def _size_and_batches(item: str) -> tuple[str, list[int]]:
  """"audio_mae:base:4:48" -> ("audio_mae:base", [4, 48]): the trailing numbers are batches."""
  parts = item.split(":")
  first = next(i for i, p in enumerate(parts) if p.isdigit())
  return ":".join(parts[:first]), [int(p) for p in parts[first:]]


def _per_size(items: list[str]) -> dict[str, int]:
  return {size: batches[0] for size, batches in map(_size_and_batches, items)}


def size_config(size: str):
  """configs/cav_mae.py:NAME, NAME@T at clips of T frames, or MODULE:NAME of
  configs/MODULE.py."""
  size, _, frames = size.partition("@")
  module, _, name = size.rpartition(":")
  config = importlib.import_module(f"configs.{module or 'cav_mae'}").get_config(name)
  if frames:
    config.model.num_frames = config.data.num_frames = int(frames)
  return config


def compile_step(size: str, batch_size: int, remat: str):
  """(config, compiled step, state, batch, compile seconds) for one size, batch and policy."""
  config = size_config(size)
  config.data.batch_size = batch_size
  config.model.remat = remat
  mesh = sharding.make_mesh(config.mesh)
  rules = tuple(tuple(r) for r in config.sharding_rules)
  method = METHODS[config.method](config)
  schedule = optim.learning_rate_schedule(config.optimizer, config.total_steps, 1000)
  optimizer = optim.make_optimizer(config.optimizer, schedule)
  _, state_shardings = train.state_layout(config, method, optimizer, mesh)
  batch_sharding = sharding.batch_sharding(mesh, config.data.batch_axes)
  key = jax.random.key(1)
  batch = {k: jax.device_put(jax.random.normal(key, v.shape).astype(v.dtype)
                             if v.dtype != jnp.bool_ else v, batch_sharding)
           for k, v in method.example_batch(config.data.batch_size).items()}
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state = jax.jit(lambda: nn.meta.unbox(train.init_state(
        method, optimizer, method.example_batch(config.data.batch_size), 0)),
                    out_shardings=state_shardings)()
    step = jax.jit(train.make_train_step(method, optimizer, schedule, config.seed),
                   in_shardings=(state_shardings, batch_sharding),
                   out_shardings=(state_shardings, None), donate_argnums=(0,))
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    seconds = time.perf_counter() - start
  return config, mesh, rules, compiled, state, batch, seconds


def saved_for_backward_bytes(config) -> int:
  """Bytes the forward pass keeps for the backward pass (the residuals of jax.vjp of the loss:
  activations plus the parameters the backward reads), from shapes only."""
  method = METHODS[config.method](config)
  batch = method.example_batch(config.data.batch_size)
  params = jax.eval_shape(lambda: nn.meta.unbox(method.init(jax.random.key(0), batch))["params"])
  residuals = jax.eval_shape(lambda p: jax.vjp(
      lambda q: method.loss_fn(q, batch, masking.example_keys(jax.random.key(1), config.data.batch_size))[0], p)[1], params)
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(residuals))


def peak_bytes(compiled) -> int:
  m = compiled.memory_analysis()
  return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
          + m.temp_size_in_bytes)


def main(argv: list[str]) -> None:
  del argv
  device = jax.devices()[0]
  print(f"devices: {jax.device_count()} x {device.device_kind} ({device.platform})")
  peak32 = matmul_peak(_MATMUL.value, jnp.float32)
  peak16 = matmul_peak(_MATMUL.value, jnp.bfloat16)
  print(f"matmul {_MATMUL.value}^3 on one device: float32 {peak32 / 1e9:.1f} GFLOP/s, "
        f"bfloat16 {peak16 / 1e9:.1f} GFLOP/s\n")
  time_batch = _per_size(_TIME_BATCH.value)
  rows = []
  for size, remat in ((size, remat) for size in _SIZES.value for remat in _REMAT.value):
    config, mesh, rules, compiled, state, batch, compile_s = compile_step(
        size, time_batch[size], remat)
    analytic = METHODS[config.method](config).train_step_flops
    xla = float(compiled.cost_analysis()["flops"]) * mesh.size
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      state, metrics = compiled(state, batch)
      jax.block_until_ready(metrics)
      start = time.perf_counter()
      for _ in range(_STEPS.value):
        state, metrics = compiled(state, batch)
      jax.block_until_ready(metrics)
    step_s = (time.perf_counter() - start) / _STEPS.value
    peak = peak16 if config.dtype == "bfloat16" else peak32
    achieved = analytic / step_s / mesh.size
    rows.append((size, remat, config.data.batch_size, config.dtype, compile_s, step_s, analytic, xla,
                 xla / analytic, achieved, achieved / peak))
    del state, batch, compiled

  header = (f"{'size':<14}{'remat':>6}{'batch':>6}{'dtype':>10}{'compile s':>11}{'step s':>10}"
            f"{'analytic GF':>13}{'XLA GF':>11}{'XLA/analytic':>14}{'GFLOP/s/dev':>13}"
            f"{'MFU':>8}")
  print(header)
  for r in rows:
    print(f"{r[0]:<14}{r[1]:>6}{r[2]:>6}{r[3]:>10}{r[4]:>11.1f}{r[5]:>10.3f}{r[6] / 1e9:>13.1f}"
          f"{r[7] / 1e9:>11.1f}{r[8]:>14.3f}{r[9] / 1e9:>13.1f}{r[10]:>8.1%}")
  print("\nMFU = analytic FLOPs / step time / devices, over the matmul peak of the step's "
        "compute dtype.\n")

  print(f"{'size':<14}{'remat':>6}{'batch':>6}{'peak memory / device':>24}"
        f"{'per added example':>20}{'saved for backward':>21}")
  for item, remat in ((i, r) for i in _MEMORY_BATCHES.value for r in _REMAT.value):
    size, batches = _size_and_batches(item)
    if size not in _SIZES.value:
      continue
    previous = None
    for b in sorted(batches):
      config, mesh, _, compiled, state, batch, _ = compile_step(size, b, remat)
      bytes_ = peak_bytes(compiled)
      # The state (parameters, Adam moments) is a fixed cost; activations grow per example.
      marginal = ("" if previous is None else
                  f"{(bytes_ - previous[1]) / (b - previous[0]) * mesh.size / 2**20:>15.1f} MiB")
      saved = saved_for_backward_bytes(config) / mesh.size
      print(f"{size:<14}{remat:>6}{b:>6}{bytes_ / 2**30:>21.2f} GiB{marginal:>20}"
            f"{saved / 2**30:>17.2f} GiB")
      previous = (b, bytes_)
      del state, batch, compiled


if __name__ == "__main__":
  app.run(main)
