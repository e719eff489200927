"""The trainer: `python -m avmae.train --config=configs/cav_mae.py:tiny --workdir=DIR`.

One jitted train step with donated state over a device mesh; orbax checkpoints holding the
train state, the data-iterator state and the config; auto-resume from the workdir.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from importlib import metadata
from typing import Any

from absl import app, flags, logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from ml_collections import config_flags

from avmae import checkpoint, optim, plots, sharding
from avmae.data import dataset_info, pipeline
from avmae.methods import METHODS

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy")


class NonFiniteError(RuntimeError):
  """The loss, gradients or update became NaN/Inf."""


# ----------------------------------------------------------------------------- validation

def validate(config: ml_collections.ConfigDict, info: dict[str, Any], mesh: jax.sharding.Mesh
             ) -> None:
  """Fails before compiling when the config does not fit the data or mesh, naming the key."""
  m, d = config.model, config.data
  checks = [
      (m.audio_frames == d.audio_frames, "model.audio_frames",
       f"{m.audio_frames} differs from data.audio_frames={d.audio_frames}"),
      (m.image_size == d.image_size, "model.image_size",
       f"{m.image_size} differs from data.image_size={d.image_size}"),
      (m.mel_bins == info["features"]["mel_bins"], "model.mel_bins",
       f"{m.mel_bins}, but the dataset {d.dir} has {info['features']['mel_bins']} mel bins"),
      (m.audio_frames % m.patch_size == 0 and m.mel_bins % m.patch_size == 0,
       "model.patch_size", f"{m.patch_size} does not divide the audio input "
       f"{m.audio_frames}x{m.mel_bins}"),
      (m.image_size % m.patch_size == 0, "model.patch_size",
       f"{m.patch_size} does not divide model.image_size={m.image_size}"),
      (m.embed_dim % m.num_heads == 0, "model.num_heads",
       f"{m.num_heads} does not divide model.embed_dim={m.embed_dim}"),
      (m.decoder_embed_dim % m.decoder_num_heads == 0, "model.decoder_num_heads",
       f"{m.decoder_num_heads} does not divide model.decoder_embed_dim={m.decoder_embed_dim}"),
      (d.batch_size % sharding.num_batch_shards(mesh, d.batch_axes) == 0, "data.batch_size",
       f"{d.batch_size} is not divisible by the mesh's batch axes {tuple(d.batch_axes)} "
       f"({sharding.num_batch_shards(mesh, d.batch_axes)} devices)"),
      (m.num_heads % mesh.shape["tensor"] == 0 and m.decoder_num_heads % mesh.shape["tensor"] == 0,
       "mesh.tensor", f"{mesh.shape['tensor']} does not divide the attention heads"),
      (m.embed_dim % mesh.shape["fsdp"] == 0 and m.decoder_embed_dim % mesh.shape["fsdp"] == 0,
       "mesh.fsdp", f"{mesh.shape['fsdp']} does not divide the embedding widths"),
      (config.total_steps > 0, "total_steps", f"{config.total_steps} must be positive"),
  ]
  if config.loss.group_size:
    checks.append((d.batch_size % config.loss.group_size == 0, "loss.group_size",
                   f"{config.loss.group_size} does not divide data.batch_size={d.batch_size}"))
  for ok, key, why in checks:
    if not ok:
      raise ValueError(f"config.{key}={why}")


# ----------------------------------------------------------------------------- run record

def write_run_info(workdir: str, config: ml_collections.ConfigDict) -> None:
  """The resolved config, package versions and git revision of this run, in the workdir."""
  try:
    rev = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                         cwd=os.path.dirname(__file__), timeout=10).stdout.strip()
  except OSError:
    rev = ""
  versions = {p: metadata.version(p) for p in PACKAGES}
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  with open(os.path.join(workdir, "run_info.json"), "w") as f:
    json.dump({"git_revision": rev or "unknown", "versions": versions,
               "python": sys.version.split()[0], "argv": sys.argv,
               "devices": [str(d) for d in jax.devices()],
               "process_count": jax.process_count()}, f, indent=2)


class MetricWriter:
  """metrics.jsonl, TensorBoard events and stdout, written by process 0 only."""

  def __init__(self, workdir: str):
    self._enabled = jax.process_index() == 0
    if self._enabled:
      from tensorboardX import SummaryWriter
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def scalars(self, step: int, values: dict[str, float]) -> None:
    if not self._enabled:
      return
    self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
    self._jsonl.flush()
    for k, v in values.items():
      self._tb.add_scalar(k, v, step)
    text = " ".join(f"{k}={v:.4g}" for k, v in values.items())
    print(f"step {step}: {text}", flush=True)

  def image(self, step: int, name: str, path: str) -> None:
    if self._enabled:
      import matplotlib.image
      self._tb.add_image(name, matplotlib.image.imread(path)[..., :3], step, dataformats="HWC")

  def close(self) -> None:
    if self._enabled:
      self._jsonl.close()
      self._tb.close()


# ----------------------------------------------------------------------------- train step

def make_train_step(method, optimizer: optax.GradientTransformation, schedule, seed: int):
  base_key = jax.random.key(seed)

  def train_step(state: dict[str, Any], batch: dict[str, jax.Array]):
    # The step's randomness depends on the step only: identical on any mesh or process count.
    key = jax.random.fold_in(base_key, state["step"])
    (_, metrics), grads = jax.value_and_grad(method.loss_fn, has_aux=True)(
        state["params"], batch, key)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    grad_norm, update_norm = optax.tree.norm(grads), optax.tree.norm(updates)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm) & jnp.isfinite(update_norm)
    # A non-finite step changes nothing and is recorded; the host stops at the next check.
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    params = keep(optax.apply_updates(state["params"], updates), state["params"])
    nonfinite_step = jnp.where((state["nonfinite_step"] < 0) & ~finite, state["step"] + 1,
                               state["nonfinite_step"])
    new_state = {"step": state["step"] + 1, "params": params,
                 "opt_state": keep(opt_state, state["opt_state"]),
                 "nonfinite_step": nonfinite_step}
    metrics = {**metrics, "grad_norm": grad_norm, "learning_rate": schedule(state["step"])}
    return new_state, metrics

  return train_step


def state_from_params(optimizer, params: Any) -> dict[str, Any]:
  """A train state at step 0 with `params` and a fresh optimizer state."""
  return {"step": jnp.zeros((), jnp.int32), "params": params,
          "opt_state": optimizer.init(params), "nonfinite_step": -jnp.ones((), jnp.int32)}


def init_state(method, optimizer, batch, seed: int) -> dict[str, Any]:
  return state_from_params(optimizer, method.init(jax.random.key(seed), batch)["params"])


def zeros_batch(config: ml_collections.ConfigDict) -> dict[str, jax.Array]:
  """A batch of the config's shapes (what init traces with; no data needed)."""
  b, m = config.data.batch_size, config.model
  return {"audio": jnp.zeros((b, m.audio_frames, m.mel_bins)),
          "frames": jnp.zeros((b, m.image_size, m.image_size, 3), jnp.uint8),
          "valid": jnp.ones((b,), bool)}


def state_layout(config: ml_collections.ConfigDict, method, optimizer, mesh):
  """(abstract state, its shardings): logical names from init, mapped by the config's rules."""
  rules = tuple(tuple(r) for r in config.sharding_rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(lambda: init_state(method, optimizer, zeros_batch(config),
                                              config.seed))
  return sharding.strip_logical_names(boxed), sharding.logical_to_shardings(boxed, mesh, rules)


def count_params(params: Any) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


# ----------------------------------------------------------------------------- main loop

def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains to config.total_steps, resuming from the newest checkpoint; returns last metrics."""
  # --- mesh ----------------------------------------------------------------------------
  mesh = sharding.make_mesh(config.mesh)
  rules = tuple(tuple(r) for r in config.sharding_rules)
  info = dataset_info.load(config.data.dir)
  validate(config, info, mesh)
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    write_run_info(workdir, config)

  # --- data ----------------------------------------------------------------------------
  batches = pipeline.Batches(config.data, config.data.train_split, train=True, seed=config.seed,
                             global_batch_size=config.data.batch_size, mesh=mesh)
  steps_per_epoch = -(-info["splits"][config.data.train_split]["num_examples"]
                      // config.data.batch_size)

  # --- model ---------------------------------------------------------------------------
  method = METHODS[config.method](config)
  schedule = optim.learning_rate_schedule(config.optimizer, config.total_steps, steps_per_epoch)
  optimizer = optim.make_optimizer(config.optimizer, schedule)
  abstract, state_shardings = state_layout(config, method, optimizer, mesh)
  print(f"trainable parameters: {count_params(abstract['params'])}", flush=True)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    batch_sharding = sharding.batch_sharding(mesh, config.data.batch_axes)
    p_init = jax.jit(lambda: nn.meta.unbox(init_state(method, optimizer, zeros_batch(config),
                                                      config.seed)),
                     out_shardings=state_shardings)
    p_train_step = jax.jit(make_train_step(method, optimizer, schedule, config.seed),
                           in_shardings=(state_shardings, batch_sharding),
                           out_shardings=(state_shardings, None), donate_argnums=(0,))
    # Every process holds the same picture batch; replicated in, replicated out.
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    picture_split = (config.data.eval_split if config.data.eval_split in info["splits"]
                     else config.data.train_split)  # datasets without an eval split
    picture_batch = jax.device_put(
        pipeline.first_examples(config.data, picture_split, 4), replicated)
    p_reconstruct = jax.jit(method.reconstruct, out_shardings=replicated)

  # --- restore -------------------------------------------------------------------------
  mngr = checkpoint.manager(workdir, config.keep_checkpoints)
  latest = mngr.latest_step()
  if latest is not None:
    target = checkpoint.abstract_with_shardings(abstract, state_shardings)
    state, data_state = checkpoint.restore(mngr, latest, target)
    batches.set_state(data_state)
    print(f"resumed from step {latest} of {workdir}", flush=True)
  else:
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      state = p_init()
    if config.init_checkpoint:
      target = checkpoint.abstract_with_shardings(abstract["params"], state_shardings["params"])
      state["params"] = checkpoint.load_params(config.init_checkpoint, target)
      print(f"initialised parameters from {config.init_checkpoint}", flush=True)

  # --- loop ----------------------------------------------------------------------------
  preempted = []
  signal.signal(signal.SIGTERM, lambda *_: preempted.append(True))
  writer = MetricWriter(workdir)
  step = int(jax.device_get(state["step"]))
  last_metrics: dict[str, float] = {}
  window_start, window_steps = time.perf_counter(), 0

  def save(step: int, state) -> None:
    bad = int(jax.device_get(state["nonfinite_step"]))
    if bad >= 0:
      mngr.wait_until_finished()
      raise NonFiniteError(
          f"non-finite loss, gradients or update at step {bad}: stopping. The last good "
          f"checkpoint is step {mngr.latest_step()} in {workdir}; lower "
          "config.optimizer.learning_rate or enable config.optimizer.grad_clip_norm.")
    checkpoint.save(mngr, step, state, batches.get_state(), config)

  try:
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      while step < config.total_steps:
        state, metrics = p_train_step(state, next(batches))
        step += 1
        window_steps += 1
        if step % config.log_every_steps == 0 or step == config.total_steps:
          metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
          elapsed = time.perf_counter() - window_start
          metrics["examples_per_second"] = window_steps * config.data.batch_size / elapsed
          metrics["tflops_per_second"] = window_steps * method.train_step_flops / elapsed / 1e12
          metrics["skipped_records"] = float(batches.num_skipped)
          writer.scalars(step, metrics)
          last_metrics = metrics
          window_start, window_steps = time.perf_counter(), 0
          if int(jax.device_get(state["nonfinite_step"])) >= 0:
            save(step, state)  # raises NonFiniteError naming the step
        if step % config.image_every_steps == 0 or step == config.total_steps:
          images = jax.device_get(p_reconstruct(state["params"], picture_batch,
                                                jax.random.key(config.seed)))
          if jax.process_index() == 0:
            path = os.path.join(workdir, f"reconstruction_{step:07d}.png")
            plots.plot_reconstructions(images, path, title=f"step {step}")
            writer.image(step, "reconstruction", path)
        if (step % config.checkpoint_every_steps == 0 or step == config.total_steps
            or preempted or mngr.reached_preemption(step)):
          save(step, state)
          if preempted or mngr.reached_preemption(step):
            print(f"preempted: saved step {step}, exiting", flush=True)
            break
  finally:
    mngr.wait_until_finished()
    mngr.close()
    writer.close()
    batches.close()
  return last_metrics


def define_flags() -> None:
  """Command-line flags, defined only when run as a program (importing defines none)."""
  config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Checkpoints, logs and pictures go here.",
                      required=True)
  flags.DEFINE_string("coordinator", None, "host:port of process 0, for multi-process runs.")
  flags.DEFINE_integer("num_processes", 1, "Processes in a multi-process run.")
  flags.DEFINE_integer("process_id", 0, "This process's index.")


def main(argv: list[str]) -> None:
  del argv
  f = flags.FLAGS
  if f.num_processes > 1:
    jax.distributed.initialize(f.coordinator, f.num_processes, f.process_id)
  try:
    train(f.config, f.workdir)
  except NonFiniteError as e:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(3)


if __name__ == "__main__":
  define_flags()
  app.run(main)
