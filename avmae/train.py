"""The trainer: `python -m avmae.train --config=configs/cav_mae.py:tiny --workdir=DIR`.

One jitted train step with donated state over a device mesh; orbax checkpoints holding the
train state, the data-iterator state and the config; auto-resume from the workdir.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from importlib import metadata
from typing import Any, NamedTuple

from absl import app, flags, logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from ml_collections import config_flags

from avmae import (checkpoint, distributed, executable, flops, host_memory, masking, optim,
                   sharding, storage)
from avmae.data import dataset_info, pipeline
from avmae.methods import METHODS
from avmae.methods.method import raise_failed
from avmae.monitoring import MetricWriter, Profile, StepTimes

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy")


class NonFiniteError(RuntimeError):
  """The loss, the gradient norm or the learning rate became NaN/Inf."""


# ----------------------------------------------------------------------------- validation

def validate(config: ml_collections.ConfigDict, info: dict[str, Any], mesh: jax.sharding.Mesh
             ) -> None:
  """Fails before compiling when the config does not fit the data or mesh, naming the key:
  the trainer's own checks, then the method's (its model against the data and the mesh)."""
  d = config.data
  shards = sharding.num_batch_shards(mesh, d.batch_axes)
  micro = config.optimizer.accumulation_steps
  profile = tuple(config.profile_steps)
  raise_failed([
      (profile == () or (len(profile) == 2 and 1 <= profile[0] <= profile[1]),
       "profile_steps", f"{profile}: () (off) or (first, last) with 1 <= first <= last"),
      (config.keep_period >= 0, "keep_period", f"{config.keep_period} must be >= 0 (0: off)"),
      (d.batch_size % shards == 0, "data.batch_size",
       f"{d.batch_size} is not divisible by the mesh's batch axes {tuple(d.batch_axes)} "
       f"({shards} devices)"),
      (config.total_steps > 0, "total_steps", f"{config.total_steps} must be positive"),
      (micro >= 1 and d.batch_size % (shards * micro) == 0, "optimizer.accumulation_steps",
       f"{micro}: the batch per data shard ({d.batch_size} / {shards}) must split into that "
       "many microbatches"),
  ])
  raise_failed(METHODS[config.method](config).config_checks(info, mesh))


# ----------------------------------------------------------------------------- run record

def write_run_info(workdir: str, config: ml_collections.ConfigDict) -> None:
  """The resolved config, package versions and git revision of this run, in the workdir."""
  try:
    rev = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                         cwd=os.path.dirname(__file__), timeout=10).stdout.strip()
  except OSError:
    rev = ""
  versions = {p: metadata.version(p) for p in PACKAGES}
  storage.write(storage.path(workdir) / "config.json", config.to_json_best_effort(indent=2))
  storage.write(storage.path(workdir) / "run_info.json", json.dumps(
      {"git_revision": rev or "unknown", "versions": versions,
       "python": sys.version.split()[0], "argv": sys.argv,
       "devices": [str(d) for d in jax.devices()],
       "process_count": jax.process_count()}, indent=2))


# ----------------------------------------------------------------------------- train step

def microbatches(tree: Any, num_micro: int, num_shards: int) -> Any:
  """[B, ...] leaves -> [num_micro, B / num_micro, ...]: microbatch i takes the i-th block of
  every data shard's rows, so each example stays on the device that holds it (no resharding).
  With one shard, microbatch i is rows i*B/N .. (i+1)*B/N - 1: `loss.group_size` = B/N."""
  def split(x):
    b = x.shape[0]
    x = x.reshape(num_shards, num_micro, b // (num_shards * num_micro), *x.shape[1:])
    return jnp.swapaxes(x, 0, 1).reshape(num_micro, b // num_micro, *x.shape[3:])
  return jax.tree.map(split, tree)


def loss_and_grads(loss_fn, params: Any, batch: dict[str, jax.Array], keys: jax.Array,
                   num_micro: int = 1, num_shards: int = 1):
  """((loss, metrics), grads) of `loss_fn(params, batch, keys)`; with num_micro > 1 the batch
  is split into microbatches inside a `lax.scan` (gradient accumulation), and the loss,
  metrics and gradients are the means over the microbatches."""
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if num_micro == 1:
    return grad_fn(params, batch, keys)

  def accumulate(total, micro):
    out = grad_fn(params, *micro)
    return jax.tree.map(lambda t, x: t + x.astype(t.dtype) / num_micro, total, out), None

  micro = microbatches((batch, keys), num_micro, num_shards)
  zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32),
                       jax.eval_shape(grad_fn, params, *jax.tree.map(lambda x: x[0], micro)))
  total, _ = jax.lax.scan(accumulate, zeros, micro)
  # Gradients back to the parameters' dtypes (float32 here: nothing changes).
  (loss, metrics), grads = total
  return (loss, metrics), jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)


def make_train_step(method, optimizer: optax.GradientTransformation, schedule, seed: int,
                    accumulation_steps: int = 1, batch_shards: int = 1):
  """The jittable (state, batch) -> (state, metrics). Nothing here runs eagerly: the step
  compiles for devices it cannot run on (avmae.aot)."""

  def train_step(state: dict[str, Any], batch: dict[str, jax.Array]):
    # Each example's randomness depends on the step and its position in the global batch only:
    # identical on any mesh, process count or microbatching.
    key = jax.random.fold_in(jax.random.key(seed), state["step"])
    keys = masking.example_keys(key, jax.tree.leaves(batch)[0].shape[0])
    (_, metrics), grads = loss_and_grads(method.loss_fn, state["params"], batch, keys,
                                         accumulation_steps, batch_shards)
    grad_norm, learning_rate = optax.tree.norm(grads), schedule(state["step"])
    # A non-finite step changes nothing and is recorded; the host stops at the next check.
    # Decided before the update (finite gradients, learning rate and parameters give a finite
    # Adam update), so that the optimizer keeps its own state: optim.scale_by_adam_gated.
    finite = (jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
              & jnp.isfinite(learning_rate))
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"],
                                          finite=finite)
    params = optim.keep_unless_finite(finite, optax.apply_updates(state["params"], updates),
                                      state["params"])
    nonfinite_step = jnp.where((state["nonfinite_step"] < 0) & ~finite, state["step"] + 1,
                               state["nonfinite_step"])
    new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state,
                 "nonfinite_step": nonfinite_step}
    metrics = {**metrics, "grad_norm": grad_norm, "learning_rate": learning_rate}
    return new_state, metrics

  return train_step


def state_from_params(optimizer, params: Any) -> dict[str, Any]:
  """A train state at step 0 with `params` and a fresh optimizer state."""
  return {"step": jnp.zeros((), jnp.int32), "params": params,
          "opt_state": optimizer.init(params), "nonfinite_step": -jnp.ones((), jnp.int32)}


def init_state(method, optimizer, batch, seed: int) -> dict[str, Any]:
  return state_from_params(optimizer, method.init(jax.random.key(seed), batch)["params"])


def state_layout(config: ml_collections.ConfigDict, method, optimizer, mesh):
  """(abstract state, its shardings): logical names from init, mapped by the config's rules."""
  rules = tuple(tuple(r) for r in config.sharding_rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(lambda: init_state(
        method, optimizer, method.example_batch(config.data.batch_size), config.seed))
  return sharding.strip_logical_names(boxed), sharding.logical_to_shardings(boxed, mesh, rules)


def count_params(params: Any) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


class Program(NamedTuple):
  """What the trainer compiles; built the same way for a run and for avmae.aot."""
  method: Any
  optimizer: optax.GradientTransformation
  schedule: optax.Schedule
  abstract_state: Any     # ShapeDtypeStructs carrying the state's shardings
  state_shardings: Any
  abstract_batch: dict[str, jax.ShapeDtypeStruct]  # the step's inputs, with shardings
  train_step: Any         # jitted, state donated: lower(abstract_state, abstract_batch)


def build_program(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                  steps_per_epoch: int) -> Program:
  """Method, optimizer, state layout and the jitted step over `mesh`, from shapes only."""
  method = METHODS[config.method](config)
  schedule = optim.learning_rate_schedule(config.optimizer, config.total_steps, steps_per_epoch)
  optimizer = optim.make_optimizer(config.optimizer, schedule)
  abstract, state_shardings = state_layout(config, method, optimizer, mesh)
  batch_sharding = sharding.batch_sharding(mesh, config.data.batch_axes)
  example = jax.eval_shape(lambda: method.example_batch(config.data.batch_size))
  abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding)
                    for k, v in example.items()}
  step = jax.jit(make_train_step(method, optimizer, schedule, config.seed,
                                 config.optimizer.accumulation_steps,
                                 sharding.num_batch_shards(mesh, config.data.batch_axes)),
                 in_shardings=(state_shardings, batch_sharding),
                 out_shardings=(state_shardings, None), donate_argnums=(0,))
  return Program(method, optimizer, schedule,
                 checkpoint.abstract_with_shardings(abstract, state_shardings),
                 state_shardings, abstract_batch, step)


# ----------------------------------------------------------------------------- main loop

class _Pending(NamedTuple):
  """A dispatched step whose results the host has not waited for yet."""
  step: int
  metrics: dict[str, jax.Array]
  nonfinite_step: jax.Array | None  # a copy (the state is donated to the next step); logged
  data: pipeline.Position           # the pipeline after this step's batch


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains to config.total_steps, resuming from the newest checkpoint; returns last metrics."""
  with contextlib.ExitStack() as cleanup:  # what was opened is closed, whatever happens
    return _train(config, workdir, cleanup)


def _train(config: ml_collections.ConfigDict, workdir: str, cleanup: contextlib.ExitStack
           ) -> dict[str, float]:
  if config.compilation_cache_dir:  # before anything compiles
    jax.config.update("jax_compilation_cache_dir", config.compilation_cache_dir)
  # --- mesh ----------------------------------------------------------------------------
  mesh = sharding.make_mesh(config.mesh, dcn=config.dcn_mesh)
  rules = tuple(tuple(r) for r in config.sharding_rules)
  info = dataset_info.load(config.data.dir)
  validate(config, info, mesh)
  storage.path(workdir).mkdir(parents=True, exist_ok=True)
  mngr = checkpoint.manager(workdir, config.keep_checkpoints, keep_period=config.keep_period)
  cleanup.callback(mngr.close)
  cleanup.callback(mngr.wait_until_finished)  # first: a save under way is finished
  latest = mngr.latest_step()
  if latest is not None:  # before compiling: a changed model or input shape fails here
    checkpoint.check_resume_config(str(mngr.directory / str(latest)), config)
  if jax.process_index() == 0:
    write_run_info(workdir, config)

  # --- data ----------------------------------------------------------------------------
  batches = cleanup.enter_context(pipeline.Batches(
      config.data, config.data.train_split, train=True, seed=config.seed,
      global_batch_size=config.data.batch_size, mesh=mesh))
  steps_per_epoch = -(-info["splits"][config.data.train_split]["num_examples"]
                      // config.data.batch_size)

  # --- model ---------------------------------------------------------------------------
  program = build_program(config, mesh, steps_per_epoch)
  method, optimizer = program.method, program.optimizer
  abstract, state_shardings = program.abstract_state, program.state_shardings
  print(f"trainable parameters: {count_params(abstract['params'])}", flush=True)
  p_train_step = program.train_step
  if config.aot_executable:  # compiled ahead of time by avmae.aot; checked before it runs
    p_train_step = executable.load(config.aot_executable, program, config, mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    p_init = jax.jit(lambda: nn.meta.unbox(init_state(
        method, optimizer, method.example_batch(config.data.batch_size), config.seed)),
                     out_shardings=state_shardings)
    # Every process holds the same picture batch; replicated in, replicated out.
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    picture_split = (config.data.eval_split if config.data.eval_split in info["splits"]
                     else config.data.train_split)  # datasets without an eval split
    picture_batch = jax.device_put(
        pipeline.first_examples(config.data, picture_split, 4), replicated)
    picture_key = jax.random.key(config.seed)
    # Compiled now, not at the first picture step (hours into a run, on a pod).
    p_reconstruct = jax.jit(method.reconstruct, out_shardings=replicated).lower(
        abstract["params"], picture_batch, picture_key).compile()

  # --- restore -------------------------------------------------------------------------
  if latest is not None:
    target = abstract  # carries the state's shardings
    # Restored in the layer layout the checkpoint's config records, converted to this run's.
    state, data_state = checkpoint.restore(mngr, latest, target, method.model.layer_stacks)
    batches.set_state(data_state)
    print(f"resumed from step {latest} of {workdir}", flush=True)
  else:
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      state = p_init()
    if config.init_checkpoint:
      target = abstract["params"]
      state["params"] = checkpoint.load_params(config.init_checkpoint, target,
                                               method.model.layer_stacks,
                                               method.import_state_dict)
      print(f"initialised parameters from {config.init_checkpoint}", flush=True)

  # --- loop ----------------------------------------------------------------------------
  # The host runs one step ahead of the devices: it dispatches step s, reads batch s + 1 onto
  # the devices, then waits for step s - 1 and logs it. Nothing in a step waits for the host.
  step = int(jax.device_get(state["step"]))
  writer = MetricWriter(workdir, step)  # metrics.jsonl cut back to the restored step
  cleanup.callback(writer.close)
  preemption = distributed.Preemption()
  cleanup.callback(preemption.close)
  times = StepTimes(step, peak_flops=flops.peak_flops(mesh.devices.flat),
                    step_flops=method.train_step_flops, batch_size=config.data.batch_size)
  profile = Profile(config.profile_steps, str(storage.path(workdir) / "profile"))
  cleanup.callback(profile.close)
  last_metrics: dict[str, float] = {}

  def nonfinite_error(bad: int) -> NonFiniteError:
    mngr.wait_until_finished()
    return NonFiniteError(
        f"non-finite loss, gradient norm or learning rate at step {bad}: stopping. The last "
        f"good checkpoint is step {mngr.latest_step()} in {workdir}; lower "
        "config.optimizer.learning_rate or enable config.optimizer.grad_clip_norm.")

  def save(step: int, state, data: pipeline.Position) -> None:
    with times.timing("checkpoint"):
      bad = int(jax.device_get(state["nonfinite_step"]))
      if bad >= 0:
        raise nonfinite_error(bad)
      checkpoint.save(mngr, step, state, batches.get_state(data), config)

  def finish(pending: _Pending) -> None:
    """Waits for a dispatched step; logs it if it is a logging step."""
    nonlocal last_metrics
    with times.timing("device"):
      metrics = jax.device_get(pending.metrics) if pending.nonfinite_step is not None else (
          jax.block_until_ready(pending.metrics))
    if pending.nonfinite_step is None:
      return
    bad = int(pending.nonfinite_step)
    if bad >= 0:
      raise nonfinite_error(bad)
    metrics = {k: float(v) for k, v in metrics.items()}
    metrics.update(times.window(pending.step))
    metrics["skipped_records"] = float(pending.data.num_skipped)
    writer.scalars(pending.step, metrics)
    if pending.step % config.checkpoint_every_steps == 0:
      writer.flush()  # on a bucket: the records up to a checkpoint are there with it
    last_metrics = metrics

  def read_batch() -> dict[str, jax.Array]:
    with times.timing("data"):
      batch = next(batches)  # placed on the devices (asynchronously)
      return {k: batch[k] for k in program.abstract_batch}

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    pending, batch = None, read_batch() if step < config.total_steps else None
    while step < config.total_steps:
      profile.before(step + 1)
      with jax.profiler.StepTraceAnnotation("train", step_num=step + 1):
        state, metrics = p_train_step(state, batch)
      step += 1
      logged = step % config.log_every_steps == 0 or step == config.total_steps
      current = _Pending(step, metrics,
                         jnp.copy(state["nonfinite_step"]) if logged else None,
                         batches.position())
      batch = read_batch() if step < config.total_steps else None  # one step ahead
      if pending is not None:
        finish(pending)
      pending = current
      profile.after(step, state)
      if step % config.image_every_steps == 0 or step == config.total_steps:
        images = jax.device_get(p_reconstruct(state["params"], picture_batch, picture_key))
        if jax.process_index() == 0:
          path = str(storage.path(workdir) / f"reconstruction_{step:07d}.png")
          method.plot_reconstructions(images, path, f"step {step}")
          writer.image(step, "reconstruction", path)
      preempted = preemption.reached(step)  # the same step on every process
      if (step % config.checkpoint_every_steps == 0 or step == config.total_steps
          or preempted):
        save(step, state, current.data)
      if preempted:
        finish(pending)
        pending = None
        print(f"preempted: saved step {step}, exiting", flush=True)
        break
    if pending is not None:
      finish(pending)
  return last_metrics


def define_flags() -> None:
  """Command-line flags, defined only when run as a program (importing defines none)."""
  config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Checkpoints, logs and pictures go here.",
                      required=True)
  flags.DEFINE_bool("distributed", False, "Join jax.distributed with the cluster detected "
                    "from the environment (TPU VMs, GKE, SLURM, Open MPI).")
  flags.DEFINE_string("coordinator", None, "host:port of process 0, for multi-process runs.")
  flags.DEFINE_integer("num_processes", 1, "Processes in a multi-process run.")
  flags.DEFINE_integer("process_id", 0, "This process's index.")
  flags.DEFINE_bool("keep_freed_host_memory", True, "Reuse freed host memory rather than "
                    "fault it in again every step (avmae.host_memory).")


def main(argv: list[str]) -> None:
  del argv
  f = flags.FLAGS
  if f.keep_freed_host_memory:
    host_memory.keep_freed_memory()
  distributed.initialize(f.config, auto=f.distributed, coordinator=f.coordinator,
                         num_processes=f.num_processes, process_id=f.process_id)
  try:
    train(f.config, f.workdir)
  except NonFiniteError as e:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(3)


if __name__ == "__main__":
  define_flags()
  app.run(main)
