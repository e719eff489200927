"""Compile the train step for a TPU pod from any machine, and say whether it fits:

    python -m avmae.aot --config=configs/cav_mae.py:base --topology=v5e-256 [--num_slices=2]
        [--train_examples=N] [--save=FILE] [--config.key=value ...]

The step is the trainer's own (`train.build_program`: state layout, shardings, donation and
step function), lowered from abstract inputs over a mesh of compile-only TPU devices
(`jax.experimental.topologies`, libtpu: `pip install -e .[tpu]`); nothing is materialised and
nothing runs. It prints per-chip memory against the chip's HBM, XLA's FLOPs against the
analytic count, the collectives of the compiled HLO (within and across slices) and the
compile time. An HBM overflow exits with code 2. `--topology=local` compiles for this
machine's own devices (a saved executable then runs here: `--config.aot_executable=FILE`).
"""

from __future__ import annotations

import collections
import math
import os
import re
import sys
import time
from typing import Any, NamedTuple, Sequence

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile-only: no chip to guard

from absl import app, flags
import jax
import ml_collections
from ml_collections import config_flags

from avmae import executable, sharding, train
from avmae.data import dataset_info

GiB = 2**30


class Generation(NamedTuple):
  libtpu: str            # topology name prefix libtpu accepts ("v5e" in "v5e:16x16")
  chip_config: str       # "megacore": one device per chip over its two TensorCores
  cores_per_chip: int    # what the "-N" of a v4 / v5p name counts
  dims: int              # 2-D or 3-D torus
  hbm_bytes: int         # per chip
  peak_bf16_flops: float  # per chip, dense


GENERATIONS = {
    "v4": Generation("v4", "megacore", 2, 3, 32 * GiB, 275e12),
    "v5p": Generation("v5", "megacore", 2, 3, 95 * GiB, 459e12),
    "v5e": Generation("v5e", "default", 1, 2, 16 * GiB, 197e12),
    "v6e": Generation("v6e", "default", 1, 2, 32 * GiB, 918e12),
}
ALIASES = {"v5litepod": "v5e"}
# Chips -> slice shape: what Cloud TPU provisions for each size.
SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8),
             128: (8, 16), 256: (16, 16)}
SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4),
             128: (4, 4, 8), 256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16),
             2048: (8, 16, 16), 4096: (16, 16, 16), 6144: (16, 16, 24)}
MAX_CHIPS = {"v4": 2048, "v5p": 6144, "v5e": 256, "v6e": 256}


class Topology(NamedTuple):
  name: str          # as the user wrote it
  generation: str
  libtpu_name: str   # "v5e:16x16"
  chips: int
  shape: tuple[int, ...]


def known_topologies() -> list[str]:
  names = []
  for gen, g in GENERATIONS.items():
    shapes = SHAPES_3D if g.dims == 3 else SHAPES_2D
    names += [f"{gen}-{chips * g.cores_per_chip}" for chips in shapes if chips <= MAX_CHIPS[gen]]
  return names + [f"v5litepod-{c}" for c in SHAPES_2D]


def parse_topology(name: str) -> Topology:
  """'v5e-256' / 'v5litepod-256' / 'v4-32' / 'v5p-128' / 'v6e-256' -> libtpu topology."""
  match = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", name.strip().lower())
  gen = ALIASES.get(match.group(1), match.group(1)) if match else None
  if gen is not None:
    g = GENERATIONS[gen]
    count = int(match.group(2))
    chips = count // g.cores_per_chip
    shapes = SHAPES_3D if g.dims == 3 else SHAPES_2D
    if count % g.cores_per_chip == 0 and chips in shapes and chips <= MAX_CHIPS[gen]:
      shape = shapes[chips]
      return Topology(name, gen, f"{g.libtpu}:{'x'.join(map(str, shape))}", chips, shape)
  raise ValueError(f"unknown TPU topology {name!r}; known: {', '.join(known_topologies())} "
                   "(or 'local' for this machine's devices)")


def topology_devices(topology: Topology, num_slices: int) -> list[jax.Device]:
  """Compile-only devices of `num_slices` slices of `topology` (nothing can run on them)."""
  from jax.experimental import topologies
  g = GENERATIONS[topology.generation]
  shape = topology.shape + (1,) * (3 - len(topology.shape))
  hosts = tuple(min(2, s) for s in shape[:2]) + (1,)  # 4 chips a host (2x2x1)
  # Full pods are tori: 16x16 for v5e/v6e, every side >= 4 for v4/v5p.
  wrap = tuple(s >= (16 if g.dims == 2 else 4) and i < g.dims for i, s in enumerate(shape))
  desc = topologies.get_topology_desc(
      platform="tpu", topology_name=topology.libtpu_name, chip_config_name=g.chip_config,
      chips_per_host_bounds=hosts, num_slices=num_slices, wrap=wrap)
  return list(desc.devices)


# ----------------------------------------------------------------------------- HLO collectives

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
                "f8e4m3fn": 1, "f8e5m2": 1, "s4": 0.5, "u4": 0.5}
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.-]+) .*\{\s*$")
_OP = re.compile(r"^\s*(?:ROOT )?%?[\w.-]+ = (.+?) ([a-z][\w-]*)\(")
_CALLED = re.compile(r"(?:calls|body|to_apply|called_computations|branch_computations)="
                     r"\{?([%\w., -]+)\}?")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_MEGASCALE = re.compile(r'_xla_megascale_transfer_type="(\w+)"')


def _shape_bytes(shape_text: str) -> int:
  total = 0
  for dtype, dims in re.findall(r"\b([a-z]+\d*(?:e\dm\d(?:fn)?)?)\[([\d,]*)\]", shape_text):
    if dtype in _DTYPE_BYTES:
      total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
  return int(total)


def _trip_count(line: str, bodies: dict[str, list[str]]) -> int:
  """Iterations of a `while` op: XLA's known_trip_count, else the bound of a scan's
  condition (`counter < constant(N)`, the counter counting up from 0); 1 if neither."""
  known = _TRIP_COUNT.search(line)
  if known:
    return int(known.group(1))
  cond = re.search(r"condition=%([\w.-]+)", line)
  if " while(" not in line or not cond:
    return 1
  text = "\n".join(bodies.get(cond.group(1), []))
  bounds = re.findall(r"s32\[\]\S* constant\((\d+)\)", text)
  return int(bounds[0]) if len(bounds) == 1 and "direction=LT" in text else 1


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
  """{"within/all-gather": {"count": n, "bytes": b}, "across/all-reduce": ...} per step.

  `bytes` are each op's output per device. Ops inside loops (layers under `nn.scan`, gradient
  accumulation) count once per iteration, from the loop's known trip count. Collectives
  across slices are host transfers the megascale runtime carries over the data-centre
  network; XLA emits them as `send` ops tagged with the collective they implement.
  """
  bodies: dict[str, list[str]] = {}
  entry, current = None, None
  for line in hlo_text.splitlines():
    m = _COMPUTATION.match(line)
    if m and not line.startswith(" "):
      current = m.group(1)
      bodies[current] = []
      if line.startswith("ENTRY"):
        entry = current
    elif current is not None:
      bodies[current].append(line)
  counts: dict[str, float] = collections.defaultdict(float)

  def visit(name: str, times: float) -> None:
    for line in bodies.get(name, []):
      op = _OP.match(line)
      if op:
        kind = op.group(2)
        base = kind.removesuffix("-start")
        scale = _MEGASCALE.search(line)
        shape = op.group(1)
        if scale and kind == "send":
          key = f"across/{scale.group(1).lower().replace('_', '-')}"
          shape = re.search(r"\w+\[[\d,]*\]", shape).group(0)  # (data, context, token)
        elif base in COLLECTIVES and not kind.endswith("-done"):
          key = f"within/{base}"
        else:
          key = None
        if key:
          counts[key + "/count"] += times
          counts[key + "/bytes"] += times * _shape_bytes(shape)
      trips = _trip_count(line, bodies)
      for group in _CALLED.findall(line):
        for callee in re.findall(r"%?([\w.-]+)", group):
          if callee in bodies and callee != name:
            visit(callee, times * (trips if f"body=%{callee}" in line else 1))

  if entry is not None:
    visit(entry, 1.0)
  out: dict[str, dict[str, int]] = {}
  for key, value in sorted(counts.items()):
    name, field = key.rsplit("/", 1)
    out.setdefault(name, {})[field] = int(value)
  return out


# ----------------------------------------------------------------------------- compile

class HbmOverflow(RuntimeError):
  """The step needs more memory per chip than the chip has."""

  def __init__(self, message: str, needed_bytes: float | None = None):
    super().__init__(message)
    self.needed_bytes = needed_bytes  # per chip, where XLA said it


LEVERS = ("model.remat=full|dots (recompute activations), a larger mesh.fsdp (shard the "
          "parameters and optimizer state), a smaller data.batch_size per chip, or "
          "optimizer.accumulation_steps=N (microbatches)")


class Report(NamedTuple):
  topology: str
  num_slices: int
  devices: int
  mesh: dict[str, int]
  memory: dict[str, int]      # per chip
  hbm_bytes: int | None        # per chip; None: no known limit (local CPU)
  xla_flops: float | None      # per chip, per step; None: the program loops (see below)
  analytic_flops: float        # per chip, per step
  collectives: dict[str, dict[str, int]]
  compile_seconds: float
  compiled: Any = None
  lowered: Any = None
  device_mesh: Any = None

  @property
  def total_bytes(self) -> int:
    m = self.memory
    return m["argument"] + m["output"] - m["alias"] + m["temporary"]

  @property
  def fits(self) -> bool:
    return self.hbm_bytes is None or self.total_bytes <= self.hbm_bytes


def _memory(compiled) -> dict[str, int]:
  m = compiled.memory_analysis()
  return {"argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes,
          "alias": m.alias_size_in_bytes, "temporary": m.temp_size_in_bytes,
          "generated_code": m.generated_code_size_in_bytes}


def _overflow(error: Exception, hbm: int | None) -> HbmOverflow | None:
  text = str(error)
  if "RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text:
    return None
  needed = (re.search(r"\(([\d.]+)([KMG])?\) exceeds available HBM \(([\d.]+)([KMG])?\)", text)
            or re.search(r"[Uu]sed ([\d.]+)([KMG])? of ([\d.]+)([KMG])? hbm", text))
  scale = {"K": 2**10, "M": 2**20, "G": GiB, None: 1}
  need = avail = None
  if needed:
    need = float(needed.group(1)) * scale[needed.group(2)]
    avail = float(needed.group(3)) * scale[needed.group(4)]
  avail = avail or hbm
  what = (f"needs {need / GiB:.2f} GiB per chip, {avail / GiB:.2f} GiB available"
          if need else f"does not fit the chip's {avail / GiB:.2f} GiB of HBM")
  detail = text.strip().splitlines()[0][:400]
  return HbmOverflow(f"the train step {what}. Levers: {LEVERS}. XLA: {detail}", need)


def compile_step(config: ml_collections.ConfigDict, topology: str = "local",
                 num_slices: int = 1, train_examples: int = 0) -> Report:
  """Compiles the trainer's step for the topology from abstract inputs; raises HbmOverflow."""
  if topology == "local":
    devices, hbm, peak_name = jax.devices(), None, "local"
    if num_slices != 1:
      raise ValueError("--num_slices needs a TPU --topology, not 'local'")
  else:
    spec = parse_topology(topology)
    devices = topology_devices(spec, num_slices)
    hbm, peak_name = GENERATIONS[spec.generation].hbm_bytes, spec.libtpu_name
  mesh = sharding.make_mesh(config.mesh, devices, dcn=config.dcn_mesh)
  info = _dataset_info(config, train_examples)
  train.validate(config, info, mesh)
  examples = info["splits"][config.data.train_split]["num_examples"]
  steps_per_epoch = -(-examples // config.data.batch_size)
  program = train.build_program(config, mesh, steps_per_epoch)
  start = time.perf_counter()
  lowered = executable.lower(program, config, mesh)
  try:
    compiled = lowered.compile()
  except Exception as e:  # XLA raises its own runtime error type
    overflow = _overflow(e, hbm)
    if overflow is None:
      raise
    raise overflow from e
  seconds = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  hlo = compiled.as_text()
  # XLA's cost analysis counts a loop body once (layers under nn.scan, accumulation
  # microbatches): for a looping program its FLOPs are not the step's.
  xla_flops = None if " while(" in hlo else float(cost.get("flops", 0.0))
  report = Report(topology if topology == "local" else f"{topology} ({peak_name})", num_slices,
                  len(devices), dict(mesh.shape), _memory(compiled), hbm, xla_flops,
                  program.method.train_step_flops / len(devices), collectives(hlo), seconds,
                  compiled, lowered, mesh)
  if not report.fits:
    raise HbmOverflow(f"the train step needs {report.total_bytes / GiB:.2f} GiB per chip, "
                      f"{hbm / GiB:.2f} GiB available. Levers: {LEVERS}", report.total_bytes)
  return report


def _dataset_info(config: ml_collections.ConfigDict, train_examples: int) -> dict[str, Any]:
  """The dataset's info when config.data.dir has one; else what the step needs of it."""
  if config.data.dir and os.path.exists(os.path.join(config.data.dir, "dataset_info.json")):
    info = dataset_info.load(config.data.dir)
    if train_examples:
      info["splits"][config.data.train_split]["num_examples"] = train_examples
    return info
  if not train_examples:
    raise ValueError("the learning-rate schedule needs the epoch length: set "
                     "config.data.dir to a dataset or pass --train_examples")
  return {"features": {"mel_bins": config.model.mel_bins},
          "splits": {config.data.train_split: {"num_examples": train_examples}}}


def format_report(r: Report) -> str:
  m = r.memory
  lines = [f"topology {r.topology}, {r.num_slices} slice(s), {r.devices} devices, mesh {r.mesh}",
           f"compile: {r.compile_seconds:.1f} s", "memory per chip:"]
  for k in ("argument", "output", "alias", "temporary"):
    lines.append(f"  {k:<10} {m[k] / GiB:9.3f} GiB")
  if r.hbm_bytes is None:
    lines.append(f"  total      {r.total_bytes / GiB:9.3f} GiB (no HBM limit known for "
                 "these devices)")
  else:
    lines.append(f"  total      {r.total_bytes / GiB:9.3f} GiB of {r.hbm_bytes / GiB:.1f} GiB "
                 f"HBM, headroom {(r.hbm_bytes - r.total_bytes) / GiB:.3f} GiB "
                 f"({'fits' if r.fits else 'DOES NOT FIT'})")
  if r.xla_flops is None:
    lines.append(f"FLOPs per chip per step: analytic {r.analytic_flops / 1e9:.2f} G; XLA n/a "
                 "(the program loops, and XLA counts each loop body once: compare with "
                 "model.scan_layers=False and optimizer.accumulation_steps=1)")
  else:
    lines.append(f"FLOPs per chip per step: XLA {r.xla_flops / 1e9:.2f} G, analytic "
                 f"{r.analytic_flops / 1e9:.2f} G (XLA / analytic "
                 f"{r.xla_flops / r.analytic_flops:.3f})")
  lines.append("collectives per step (count, output bytes per device):")
  if not r.collectives:
    lines.append("  none")
  for name, v in r.collectives.items():
    lines.append(f"  {name:<28} {v['count']:6d}  {v['bytes'] / 2**20:10.2f} MiB")
  return "\n".join(lines)


def define_flags() -> None:
  config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
  flags.DEFINE_string("topology", "local", "TPU name (v5e-256, v4-32, v5p-128, v6e-256, ...) "
                      "or 'local' for this machine's devices.")
  flags.DEFINE_integer("num_slices", 1, "Slices joined over the data-centre network.")
  flags.DEFINE_integer("train_examples", 0, "Examples per epoch for the schedule (default: "
                       "config.data.dir's dataset).")
  flags.DEFINE_string("save", None, "Write the compiled step here (serialised executable).")


def main(argv: Sequence[str]) -> None:
  del argv
  f = flags.FLAGS
  if f.save:
    # An executable loaded from the persistent compilation cache serialises without its CPU
    # kernels ("Function ... not found" when run): compile it afresh.
    jax.config.update("jax_enable_compilation_cache", False)
  try:
    report = compile_step(f.config, f.topology, f.num_slices, f.train_examples)
  except HbmOverflow as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)
  print(format_report(report), flush=True)
  if f.save:
    size = executable.save(f.save, report.compiled, report.lowered, f.config,
                           report.device_mesh)
    print(f"saved the compiled step to {f.save} ({size / 2**20:.1f} MiB)", flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main)
