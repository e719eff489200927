"""avmae's train step against the same step in PyTorch, side by side, interleaved in one run.

    python experiments/benchmarks/vs_torch.py [--sizes=tiny,base] [--batch=tiny:32,base:4] \
        [--scan_layers=False,True] [--dtype=float32|bfloat16] [--warmup=1] [--rounds=4] \
        [--steps=2] [--threads=0] [--profile]

The peer is avmae's PyTorch CAV-MAE (`avmae/export/torch_cav_mae.py`, whose forward equals the
official model's and whose `pretraining_loss` is the official objective; tests/test_export.py
checks its loss and every gradient against avmae's). Both start from the same weights (the
JAX init, exported), train on the same random batch with the same masks at every step (the
JAX step's own draws, made ahead for torch), and take an optimizer step of the config's kind:
torch.optim.Adam with L2 decay for "adam" (base: the official recipe), AdamW with global-norm
clipping for "adamw" (the CPU sizes). Rounds alternate (`--steps` JAX steps, then as many torch
steps) so that both see the same machine load; each prints the median seconds per step over
the rounds and the ratio torch / avmae (above 1: avmae is faster). The first step's losses
are printed side by side: equal weights, masks and objective give equal losses.

torch's step runs in a child process, so that each framework has a malloc heap of its own:
in one process, one's frees left the other's largest buffers to be faulted in again (at base,
batch 4: avmae's first step after torch's first took 770,000 minor page faults, 12.2 s
against 6.9 s a step after, and later rounds still faulted now and then). After step 0 (one
step each, whose losses are compared), `--warmup` untimed rounds of `--steps` steps run before
the timing: JAX dispatches steps asynchronously, so steps run back to back hold more host memory
than one step alone, and the first such round faults its pages in (411,000 minor page faults a
step at base, batch 4, after single-step warm-ups). The table gives each side's minor page
faults per timed step, so that a step still faulting shows.

`--profile`: after the timing, each step runs under its profiler (jax.profiler for avmae,
torch.profiler for torch) and the top ops by time are printed, avmae's with the HLO shape and
the ops they fuse.

`--dtype=bfloat16`: avmae computes in bfloat16 (`config.dtype`), torch under
`torch.autocast(bfloat16)`. `--threads`: torch's intra-op threads (0: this machine's cores,
which is what XLA:CPU uses).
"""

from __future__ import annotations

import collections
from collections.abc import Callable
import glob
import gzip
import json
import multiprocessing
import multiprocessing.connection
import os
import re
import resource
import statistics
import tempfile
import time

from absl import app, flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch

from avmae import host_memory, masking, sharding, train
from avmae.data.augment import normalize_image
from avmae.export import cav_mae_layout, torch_cav_mae
from configs import cav_mae

_SIZES = flags.DEFINE_list("sizes", ["tiny", "base"], "configs/cav_mae.py sizes.")
_BATCH = flags.DEFINE_list("batch", ["tiny:32", "base:4", "demo:32"], "size:global batch.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_ROUNDS = flags.DEFINE_integer("rounds", 4, "Interleaved timed rounds (after --warmup).")
_STEPS = flags.DEFINE_integer("steps", 2, "Steps per round and framework.")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed interleaved rounds of --steps steps "
                               "each, after step 0.", lower_bound=0)
_THREADS = flags.DEFINE_integer("threads", 0, "torch intra-op threads (0: os.cpu_count()).")
_MATMUL = flags.DEFINE_integer("matmul", 2048, "Side of the square matmul for the peak.")
_SCAN = flags.DEFINE_list("scan_layers", ["False", "True"],
                          "model.scan_layers values, a row each (the torch side is the same).")
_KEEP_MEMORY = flags.DEFINE_bool(
    "keep_freed_host_memory", True, "avmae.host_memory for this process (both frameworks), as "
    "avmae's trainer does.")
_PROFILE = flags.DEFINE_bool("profile", False, "Print the top ops of both steps by time.")
_TOP = 12


def matmul_peaks(n: int) -> tuple[float, float]:
  """(JAX, torch) float32 FLOP/s of an n^3 matmul, best of five."""
  a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
  f, x = jax.jit(lambda u: u @ u), jnp.asarray(a)
  t = torch.from_numpy(a)
  best = [float("inf")] * 2
  for _ in range(6):
    for i, run in enumerate((lambda: f(x).block_until_ready(), lambda: t @ t)):
      start = time.perf_counter()
      run()
      best[i] = min(best[i], time.perf_counter() - start)
  return 2 * n**3 / best[0], 2 * n**3 / best[1]


class JaxStep:
  """The trainer's own jitted step (build_program: shardings, donation) on the local devices."""

  def __init__(self, config, batch: dict[str, np.ndarray]):
    self.mesh = sharding.make_mesh(config.mesh)
    self.rules = tuple(tuple(r) for r in config.sharding_rules)
    self.program = train.build_program(config, self.mesh, steps_per_epoch=1000)
    method, optimizer = self.program.method, self.program.optimizer
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      self.state = jax.jit(lambda: nn.meta.unbox(train.init_state(
          method, optimizer, method.example_batch(config.data.batch_size), config.seed)),
          out_shardings=self.program.state_shardings)()
    self.batch = {k: jax.device_put(v, self.program.abstract_batch[k].sharding)
                  for k, v in batch.items()}
    self.step_fn = self.program.train_step.lower(self.state, self.batch).compile()

  def params(self):
    return sharding.strip_logical_names(jax.device_get(self.state["params"]))

  def __call__(self) -> float:
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      self.state, metrics = self.step_fn(self.state, self.batch)
    return metrics["loss"]


class TorchStep:
  """torch_cav_mae's pretraining loss, backward and a torch optimizer step, from the official
  state dict of avmae's parameters."""

  def __init__(self, config, state: dict[str, np.ndarray], batch: dict[str, np.ndarray], masks,
               dtype: str):
    self.model = torch_cav_mae.CAVMAE(**cav_mae_layout.torch_args(config.model)).train()
    self.model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})
    o, c = config.optimizer, config.loss
    trainable = [p for p in self.model.parameters() if p.requires_grad]
    if o.name == "adam":  # L2 decay on the gradient, as official
      self.optimizer = torch.optim.Adam(trainable, o.learning_rate, (o.b1, o.b2), o.eps,
                                        o.weight_decay)
    else:
      self.optimizer = torch.optim.AdamW(trainable, o.learning_rate, (o.b1, o.b2), o.eps,
                                         o.weight_decay)
    self.clip = o.grad_clip_norm
    self.loss_args = (c.mae_weight, c.contrastive_weight, c.temperature, c.bidirectional,
                      c.norm_pix)
    self.audio = torch.from_numpy(batch["audio"])
    self.frames = torch.from_numpy(np.asarray(normalize_image(batch["frames"]))).permute(0, 3, 1, 2)
    self.masks, self.step, self.dtype = masks, 0, dtype

  def __call__(self) -> float:
    masks = self.masks[self.step % len(self.masks)]
    with torch.autocast("cpu", torch.bfloat16, enabled=self.dtype == "bfloat16"):
      loss, _ = torch_cav_mae.pretraining_loss(self.model, self.audio, self.frames, masks,
                                               *self.loss_args)
    self.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if self.clip > 0:
      torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
    self.optimizer.step()
    self.step += 1
    return loss.item()


def _hlo_ops(hlo: str) -> dict[str, str]:
  """Instruction name -> "shape: the fused computation's root and dots" from HLO text."""
  bodies, current = {}, None
  for line in hlo.splitlines():
    header = re.match(r"%?([\w.\-]+) .*\{$", line) if not line.startswith(" ") else None
    if header:
      current = bodies.setdefault(header.group(1), [])
    elif current is not None and line.startswith("  "):
      op = re.search(r"= \S+ ([\w-]+)\(", line)
      if op:
        current.append(op.group(1))
  ops = {}
  for line in hlo.splitlines():
    m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) (\w[\w-]*)\(", line)
    if m:
      calls = re.search(r"calls=%?([\w.\-]+)", line)
      inner = collections.Counter(bodies.get(calls.group(1), [])) if calls else {}
      kinds = ",".join(k for k in inner if k not in ("parameter", "bitcast", "constant"))
      ops.setdefault(m.group(1), f"{m.group(2)} {m.group(3)}" + (f" [{kinds[:60]}]" if kinds else ""))
  return ops


def profile_jax(step: JaxStep, steps: int) -> list[tuple[float, str]]:
  """(ms per step, "op: HLO") of the avmae step's top ops, from a jax.profiler trace."""
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir)
    for _ in range(steps):
      loss = step()
    float(loss)
    jax.profiler.stop_trace()
    events = json.load(gzip.open(glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)[0]))
  ops = _hlo_ops(step.step_fn.as_text())
  total = collections.Counter()
  for e in events["traceEvents"]:
    if e.get("ph") == "X" and e["name"] in ops:
      total[e["name"]] += e["dur"]
  return [(us / steps / 1e3, f"{name}: {ops[name]}") for name, us in total.most_common(_TOP)]


def profile_torch(step: TorchStep, steps: int) -> list[tuple[float, str]]:
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    for _ in range(steps):
      step()
  rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:_TOP]
  return [(e.self_cpu_time_total / steps / 1e3, e.key) for e in rows]


def _serve_torch_step(conn: multiprocessing.connection.Connection, threads: int,
                      keep_memory: bool, *step_args) -> None:
  """A child process's loop: builds TorchStep(*step_args), then answers ("run", n) with (seconds
  for n steps, minor page faults in them, the last loss) and ("profile", n) with its top ops,
  until it receives None."""
  if keep_memory:
    host_memory.keep_freed_memory()
  torch.set_num_threads(threads)
  step = TorchStep(*step_args)
  while (request := conn.recv()) is not None:
    what, steps = request
    if what == "profile":
      conn.send(profile_torch(step, steps))
      continue
    conn.send(timed_steps(step, steps))


class TorchProcess:
  """TorchStep in a child process (a malloc heap of its own), driven over a pipe."""

  def __init__(self, *step_args):
    context = multiprocessing.get_context("spawn")
    self.conn, child = context.Pipe()
    self.process = context.Process(target=_serve_torch_step, daemon=True, args=(
        child, torch.get_num_threads(), _KEEP_MEMORY.value, *step_args))
    self.process.start()

  def run(self, steps: int) -> tuple[float, int, float]:
    self.conn.send(("run", steps))
    return self.conn.recv()

  def profile(self, steps: int) -> list[tuple[float, str]]:
    self.conn.send(("profile", steps))
    return self.conn.recv()

  def close(self) -> None:
    self.conn.send(None)
    self.process.join()


def timed_steps(step: Callable[[], float], steps: int) -> tuple[float, int, float]:
  """(seconds for `steps` calls of step, minor page faults in them, the last loss)."""
  faulted = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  start = time.perf_counter()
  for _ in range(steps):
    loss = step()
  loss = float(loss)  # waits for JAX's asynchronous dispatch (torch's step returns a float)
  return (time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_minflt
          - faulted, loss)


def step_masks(config, method, batch_size: int, steps: int) -> list[tuple[torch.Tensor, ...]]:
  """The masks the JAX step draws at steps 0..steps-1 (its key: fold_in(seed, step))."""
  out = []
  for step in range(steps):
    keys = masking.example_keys(jax.random.fold_in(jax.random.key(config.seed), step), batch_size)
    out.append(tuple(torch.from_numpy(np.array(x, np.int64 if x.dtype == np.int32 else np.float32))
                     for mask in method.masks(keys)
                     for x in (mask.ids_keep, mask.ids_restore, mask.mask)))
  return out


def compare(size: str, batch_size: int, scan_layers: bool) -> dict:
  config = cav_mae.get_config(size)
  config.data.batch_size, config.dtype = batch_size, _DTYPE.value
  config.model.scan_layers = scan_layers
  m = config.model
  rng = np.random.default_rng(0)
  batch = {"audio": rng.standard_normal((batch_size, m.audio_frames, m.mel_bins)).astype(np.float32),
           "frames": rng.integers(0, 256, (batch_size, m.image_size, m.image_size, 3), np.uint8),
           "valid": np.ones((batch_size,), bool)}
  start = time.perf_counter()
  jax_step = JaxStep(config, batch)
  compile_s = time.perf_counter() - start
  method = jax_step.program.method
  total = 1 + (_WARMUP.value + _ROUNDS.value) * _STEPS.value
  state = cav_mae_layout.to_official(jax.tree.map(np.asarray, jax_step.params()), method.model)
  torch_step = TorchProcess(config, state, batch,
                            step_masks(config, method, batch_size, total), _DTYPE.value)
  del state
  first = (timed_steps(jax_step, 1)[2], torch_step.run(1)[2])  # the same step 0 on both
  for _ in range(_WARMUP.value):  # rounds as timed: back-to-back steps hold more memory
    timed_steps(jax_step, _STEPS.value), torch_step.run(_STEPS.value)
  times, faults = {"avmae": [], "torch": []}, {"avmae": 0, "torch": 0}
  for _ in range(_ROUNDS.value):
    for name, run in (("avmae", lambda n: timed_steps(jax_step, n)), ("torch", torch_step.run)):
      seconds, faulted, _ = run(_STEPS.value)
      times[name].append(seconds / _STEPS.value)
      faults[name] += faulted
  if _PROFILE.value:
    for name, top in (("avmae", profile_jax(jax_step, _STEPS.value)),
                      ("torch", torch_step.profile(_STEPS.value))):
      print(f"\n{size} (scan_layers={scan_layers}): top {name} ops, ms per step (self time)")
      for ms, what in top:
        print(f"  {ms:9.1f}  {what[:150]}")
  torch_step.close()
  return {"size": size, "batch": batch_size, "scan": scan_layers, "compile_s": compile_s,
          "first_loss": first,
          "faults": {k: v / (_ROUNDS.value * _STEPS.value) for k, v in faults.items()},
          "flops": method.train_step_flops, **{k: statistics.median(v) for k, v in times.items()},
          "spread": {k: (min(v), max(v)) for k, v in times.items()}}


def main(argv) -> None:
  del argv
  if _KEEP_MEMORY.value:  # before JAX's and torch's threads start: both reuse freed memory
    host_memory.keep_freed_memory()
  threads = _THREADS.value or os.cpu_count()
  torch.set_num_threads(threads)
  peak_jax, peak_torch = matmul_peaks(_MATMUL.value)
  print(f"{jax.device_count()} x {jax.devices()[0].device_kind}, torch {torch.__version__} "
        f"({threads} threads), jax {jax.__version__}; float32 matmul {_MATMUL.value}^3: "
        f"JAX {peak_jax / 1e9:.0f}, torch {peak_torch / 1e9:.0f} GFLOP/s\n")
  batches = dict(item.split(":") for item in _BATCH.value)
  rows = [compare(size, int(batches[size]), scan == "True")
          for size in _SIZES.value for scan in _SCAN.value]
  print(f"| size | batch | dtype | avmae scan_layers | step 0 loss avmae / torch | torch s/step "
        f"| avmae s/step | torch / avmae | analytic GFLOP | avmae GFLOP/s (% of peak) | "
        f"torch GFLOP/s (%) | minor page faults / step avmae / torch |")
  print("|---" * 12 + "|")
  for r in rows:
    rate = {k: r["flops"] / r[k] for k in ("avmae", "torch")}
    print(f"| {r['size']} | {r['batch']} | {_DTYPE.value} | {r['scan']} | "
          f"{r['first_loss'][0]:.5f} / "
          f"{r['first_loss'][1]:.5f} | {r['torch']:.3f} | {r['avmae']:.3f} | "
          f"{r['torch'] / r['avmae']:.2f} | {r['flops'] / 1e9:.1f} | "
          f"{rate['avmae'] / 1e9:.0f} ({rate['avmae'] / peak_jax:.0%}) | "
          f"{rate['torch'] / 1e9:.0f} ({rate['torch'] / peak_torch:.0%}) | "
          f"{r['faults']['avmae']:.0f} / {r['faults']['torch']:.0f} |")
  print(f"\nmedian of {_ROUNDS.value} interleaved rounds of {_STEPS.value} steps after "
        f"step 0 and {_WARMUP.value} untimed rounds; range per "
        "step (s): " + "; ".join(
            f"{r['size']} scan={r['scan']} avmae {r['spread']['avmae'][0]:.3f}-{r['spread']['avmae'][1]:.3f}, "
            f"torch {r['spread']['torch'][0]:.3f}-{r['spread']['torch'][1]:.3f}" for r in rows))


if __name__ == "__main__":
  app.run(main)
