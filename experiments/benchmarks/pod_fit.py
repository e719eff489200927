"""Does CAV-MAE base / large fit a TPU pod, and what does a step cost? Compiled, not guessed.

    python experiments/benchmarks/pod_fit.py [--sizes=base,large,av_mae:large] \
        [--topologies=v4-32,v5e-256,v5p-128,v6e-256] [--slices=1,2] [--remat=none,full,dots] \
        [--max_batch] [--scan_layers] [--out=rows.jsonl]

Every row is one `avmae.aot.compile_step` of the trainer's own step for compile-only devices
of the topology (libtpu): HBM per chip, whether it fits, compile seconds, all-reduce and
all-gather bytes per step within and across slices, and XLA's FLOPs per chip. Rows at the
official global batch (the config's: 48 for CAV-MAE, 512 for AV-MAE; or the smallest
multiple of the chip count where it does not split over the chips) and, with --max_batch, at
the largest global batch that fits: the compiles home in on it between a batch that fits and
one that does not, along the line through their HBM (it is close to linear in the batch),
until the two are within 10 % (`largest_batch`). Each compile runs in its own process, so a
compiler crash is a row, not the end of the run. Rows are appended to --out as they finish
(a run can be stopped and resumed: rows already there are skipped).
"""

from __future__ import annotations

import ctypes
import importlib
import json
import multiprocessing
import os
import re
import signal
import sys
import time
from typing import Callable

from absl import app, flags

from avmae import aot
from configs import cav_mae

_SIZES = flags.DEFINE_list("sizes", ["base", "large"],
                           "configs/cav_mae.py sizes, or MODULE:SIZE of configs/MODULE.py.")
_TOPOLOGIES = flags.DEFINE_list("topologies", ["v4-32", "v5e-256", "v5p-128", "v6e-256"],
                                "Accelerator names (avmae.aot.known_topologies()).")
_SLICES = flags.DEFINE_list("slices", ["1", "2"], "Slice counts.")
_REMAT = flags.DEFINE_list("remat", ["none", "full", "dots"], "model.remat policies.")
_MAX_BATCH = flags.DEFINE_bool("max_batch", False, "Also find the largest global batch.")
_SCAN = flags.DEFINE_bool("scan_layers", True, "model.scan_layers (compiles 3-7x faster).")
_OUT = flags.DEFINE_string("out", "/tmp/pod_fit.jsonl", "Rows, one JSON object a line.")
# AudioSet-2M at the official batch: 36,900 steps an epoch (configs/cav_mae.py base).
TRAIN_EXAMPLES = 36_900 * 48
_PR_SET_PDEATHSIG = 1  # prctl(2)
GiB = 2**30


def _official(size: str):
  """The config of a size: "base" of configs/cav_mae.py, "av_mae:large" of configs/av_mae.py."""
  module, _, name = size.rpartition(":")
  return importlib.import_module(f"configs.{module or 'cav_mae'}").get_config(name)


def _config(size: str, remat: str, batch: int, scan_layers: bool):
  return cav_mae.override(_official(size), {
      "model.remat": remat, "model.scan_layers": scan_layers, "data.batch_size": batch})


def _row(size: str, topology: str, slices: int, remat: str, batch: int,
         scan_layers: bool) -> dict:
  """What a row is of: the keys a search and the table group rows by."""
  return {"size": size, "topology": topology, "slices": slices, "remat": remat, "batch": batch,
          "scan_layers": scan_layers}


def measure(size: str, topology: str, slices: int, remat: str, batch: int,
            scan_layers: bool) -> dict:
  row = _row(size, topology, slices, remat, batch, scan_layers)
  start = time.perf_counter()
  try:
    r = aot.compile_step(_config(size, remat, batch, scan_layers), topology, slices,
                         TRAIN_EXAMPLES)
  except aot.HbmOverflow as e:
    return {**row, "fits": False, "compile_s": time.perf_counter() - start, "error": str(e),
            "needed_gib": None if e.needed_bytes is None else e.needed_bytes / GiB}
  coll = lambda kind: sum(v["bytes"] for k, v in r.collectives.items() if kind in k)
  return {**row, "fits": True, "compile_s": r.compile_seconds, "chips": r.devices,
          "hbm_gib": r.total_bytes / GiB, "hbm_limit_gib": r.hbm_bytes / GiB,
          "argument_gib": r.memory["argument"] / GiB, "temporary_gib": r.memory["temporary"] / GiB,
          "all_reduce_mib": coll("all-reduce") / 2**20,
          "all_gather_mib": coll("all-gather") / 2**20,
          "across_all_reduce_mib": sum(v["bytes"] for k, v in r.collectives.items()
                                       if k == "across/all-reduce") / 2**20,
          "xla_tflop_per_chip": None if r.xla_flops is None else r.xla_flops / 1e12,
          "analytic_tflop_per_chip": r.analytic_flops / 1e12}


def call_in_child(fn: Callable, *args) -> tuple[object, str | None]:
  """`fn(*args)` in a fresh (spawned) process: (its result, None), or (None, the signal's
  name) where the process died, as libtpu 0.0.42.1 does (SIGSEGV) compiling some large v6e
  steps. A crash then costs one row, not the search, and each compile's memory goes back."""
  context = multiprocessing.get_context("spawn")
  receive, send = context.Pipe(duplex=False)
  child = context.Process(target=_send_result, args=(send, fn, args, os.getpid()))
  child.start()
  send.close()  # the child holds the only writer: recv() ends if it dies
  try:
    result = receive.recv()
  except EOFError:
    result = None
  child.join()
  if child.exitcode < 0:
    return None, signal.Signals(-child.exitcode).name
  if child.exitcode != 0:  # a Python exception: the child printed its traceback
    raise RuntimeError(f"{fn.__name__} in a child process exited with code {child.exitcode} "
                       "(its traceback is above)")
  return result, None


def _send_result(send, fn: Callable, args: tuple, parent: int) -> None:
  if sys.platform.startswith("linux"):  # a search killed by a signal ends its compile too
    ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died while this one started: no signal will come
      os._exit(1)
  send.send(fn(*args))


def measure_in_child(size: str, topology: str, slices: int, remat: str, batch: int,
                     scan_layers: bool) -> dict:
  """`measure` in its own process; a crashed compile is a row with "crashed" (the signal)."""
  start = time.perf_counter()
  args = (size, topology, slices, remat, batch, scan_layers)
  row, crashed = call_in_child(measure, *args)
  if crashed is None:
    return row
  return {**_row(*args), "fits": False, "crashed": crashed,
          "compile_s": time.perf_counter() - start,
          "error": f"the compiler crashed ({crashed}) compiling this step"}


def _needed_gib(row: dict) -> float | None:
  """HBM per chip the row's step needs: measured where it fits, XLA's figure where not."""
  if row["fits"]:
    return row["hbm_gib"]
  if row.get("needed_gib") is not None:
    return row["needed_gib"]
  found = re.search(r"needs ([\d.]+) GiB per chip", row.get("error", ""))  # older rows
  return float(found.group(1)) if found else None


def _extrapolate(fitting: list[dict], limit_gib: float) -> float:
  """The batch where HBM reaches `limit_gib`: on the line through the two largest fitting
  batches, or from one row's temporaries per example (arguments do not grow)."""
  by_batch = {r["batch"]: r for r in fitting}
  if len(by_batch) >= 2:
    (b1, r1), (b2, r2) = sorted(by_batch.items())[-2:]
    slope = (r2["hbm_gib"] - r1["hbm_gib"]) / (b2 - b1)
    if slope > 0:
      return b2 + (limit_gib - r2["hbm_gib"]) / slope
  r = by_batch[max(by_batch)]
  return (limit_gib - r["argument_gib"]) * r["batch"] / r["temporary_gib"]


def largest_batch(first: dict, compile_row: Callable[[int], dict], known: list[dict] = (),
                  start: int | None = None) -> dict:
  """The largest global batch that compiles within HBM, found by compiling.

  HBM per chip is close to linear in the batch (temporaries grow, arguments do not): each
  next candidate is where the line between the largest batch that fits and the smallest
  that does not meets the limit (regula falsi), kept within the middle half of that bracket
  so that it shrinks by a quarter at least (XLA's early overflow estimates are rough). It
  stops when the two are within 10 % or one example per data shard. With no failing batch
  yet, the next candidate is on the line through the two largest that fit (at least 10 %
  above the largest). `compile_row(batch)`: the row of one compile; `known`: rows already compiled
  for this configuration; `start`: the first candidate (`start_hint`), then 10 % above it
  if it came within 10 % of the limit. A batch whose compile crashed (`measure_in_child`)
  bounds the search from above like one that does not fit; the answer then says so
  ("below_crash")."""
  shards = first["chips"]  # data parallel over every chip (mesh data=-1)
  limit = first["hbm_limit_gib"]
  rows = [first, *known]
  # 10 % above the hint, not past it: if that fails, the bracket is already within 10 %.
  hints = [] if start is None else [start, max(int(1.1 * start) // shards * shards,
                                               start + shards)]
  # A resumed search (`known`) may have compiled the hint already, or a larger batch that
  # fits: the hint is then no candidate (a batch below one that fits would end the search).
  fitting = max(r["batch"] for r in rows if r["fits"])
  hints = [h for h in hints if h not in {r["batch"] for r in rows} and h > fitting]
  while True:
    fits = max((r for r in rows if r["fits"]), key=lambda r: r["batch"])
    fails = min((r for r in rows if not r["fits"] and r["batch"] > fits["batch"]),
                key=lambda r: r["batch"], default=None)
    if len(hints) == 1 and fits["hbm_gib"] < 0.9 * limit:
      hints.clear()  # the hint fitted far below the limit: extrapolating is closer than +10 %
    if fails is None and hints:  # the hinted batch, then 10 % above it
      candidate = hints.pop(0)
    elif fails is None:  # no upper bound yet: extrapolate the line of HBM against the batch
      estimate = _extrapolate([r for r in rows if r["fits"]], 0.99 * limit)
      candidate = max(estimate, 1.1 * fits["batch"], fits["batch"] + shards)
    else:
      lo, hi = fits["batch"], fails["batch"]
      if hi <= 1.1 * lo or hi - lo <= shards:
        return {**fits, "largest": True,
                **({"below_crash": hi} if fails.get("crashed") else {})}
      need = _needed_gib(fails)
      if need and need > fits["hbm_gib"]:
        estimate = lo + (0.99 * limit - fits["hbm_gib"]) * (hi - lo) / (need - fits["hbm_gib"])
      elif fails.get("crashed"):  # no HBM figure above: where the fitting batches' line ends
        estimate = _extrapolate([r for r in rows if r["fits"]], 0.99 * limit)
      else:
        estimate = (lo + hi) / 2
      candidate = min(max(estimate, lo + (hi - lo) / 4), hi - (hi - lo) / 4)
    candidate = int(candidate) // shards * shards
    if candidate <= fits["batch"] or (fails and candidate >= fails["batch"]):
      return {**fits, "largest": True}
    rows.append(compile_row(candidate))


def start_hint(done: dict, size: str, topology: str, slices: int, remat: str) -> int | None:
  """A first candidate from answers already found: n slices at n x the one-slice answer
  (data parallel across slices: the same per chip), else remat none's answer, which
  recomputing can only make smaller."""
  one_slice = done.get((size, topology, 1, remat, True))
  if one_slice and slices > 1:
    return one_slice["batch"] * slices
  no_remat = done.get((size, topology, slices, "none", True))
  return no_remat["batch"] if no_remat and remat != "none" else None


def official_batch(topology: str, slices: int, batch: int = 48) -> int:
  """`batch` (the official global batch) where it splits over the chips; else the smallest
  multiple of the chip count above it (data parallelism needs an example per chip)."""
  chips = aot.parse_topology(topology).chips * slices
  return -(-batch // chips) * chips


def main(argv) -> None:
  del argv
  done = {}  # (size, topology, slices, remat, largest) -> its first row in --out
  history = {}  # (size, topology, slices, remat) -> every row compiled for it
  if os.path.exists(_OUT.value):
    for line in open(_OUT.value):
      r = json.loads(line)
      key = (r["size"], r["topology"], r["slices"], r["remat"])
      done.setdefault(key + (r.get("largest", False),), r)
      history.setdefault(key, []).append(r)

  def emit(row: dict) -> dict:
    with open(_OUT.value, "a") as f:
      f.write(json.dumps(row) + "\n")
    hbm = (f"{row['hbm_gib']:.2f}" if row["fits"] else
           f"crashed ({row['crashed']})" if row.get("crashed") else "over")
    print(f"{row['size']:<6} {row['topology']:<8} x{row['slices']} remat={row['remat']:<5} "
          f"batch {row['batch']:>6}: HBM/chip {hbm:>6} GiB, compile {row['compile_s']:.0f} s",
          flush=True)
    return row

  for size in _SIZES.value:
    for topology in _TOPOLOGIES.value:
      for slices in map(int, _SLICES.value):
        for remat in _REMAT.value:
          key = (size, topology, slices, remat)
          first = done.get(key + (False,)) or emit(
              measure_in_child(size, topology, slices, remat, official_batch(
                  topology, slices, _official(size).data.batch_size), _SCAN.value))
          if _MAX_BATCH.value and first["fits"] and key + (True,) not in done:
            start = start_hint(done, size, topology, slices, remat)
            compile_row = lambda batch: emit(
                measure_in_child(size, topology, slices, remat, batch, _SCAN.value))
            done[key + (True,)] = emit(largest_batch(first, compile_row, history.get(key, []),
                                                     start))
  print_table(_OUT.value)


def print_table(path: str) -> None:
  rows, seen = [], set()
  for line in open(path):  # the first row of each configuration (resumed runs may repeat)
    r = json.loads(line)
    key = (r["size"], r["topology"], r["slices"], r["remat"], r["batch"], r.get("largest", False))
    if key not in seen:
      seen.add(key)
      rows.append(r)
  official = {(r["size"], r["topology"], r["slices"], r["remat"]): r["batch"] for r in rows[::-1]}
  rank = lambda order, x: order.index(x) if x in order else len(order)
  rows.sort(key=lambda r: (rank(["tiny", "base", "base_video", "large"], r["size"]), r["size"],
                           r["topology"], r["slices"], rank(["none", "dots", "full"], r["remat"]),
                           r.get("largest", False), r["batch"]))
  for line in largest_summary(rows):
    print(line)
  print()
  header = ("| size | topology | slices | remat | global batch | HBM / chip (GiB) | fits | "
            "compile (s) | all-reduce MiB (across slices) | all-gather MiB | TFLOP / chip "
            "(XLA / analytic; n/a: scanned, XLA counts a loop body once) |")
  print(header)
  print("|---" * (header.count("|") - 1) + "|")
  for r in rows:
    key = (r["size"], r["topology"], r["slices"], r["remat"])
    if not r["fits"] or not (r.get("largest") or r["batch"] == official[key]):
      continue
    batch = f"{r['batch']}{' (largest)' if r.get('largest') else ''}"
    if r.get("below_crash"):
      batch = f"{r['batch']} (largest below a compiler crash at {r['below_crash']})"
    xla = ("n/a" if r["xla_tflop_per_chip"] is None or r["scan_layers"]
           else f"{r['xla_tflop_per_chip']:.3f}")
    print(f"| {r['size']} | {r['topology']} | {r['slices']} | {r['remat']} | {batch} | "
          f"{r['hbm_gib']:.2f} / {r['hbm_limit_gib']:.0f} | yes | {r['compile_s']:.0f} | "
          f"{r['all_reduce_mib']:.0f} ({r['across_all_reduce_mib']:.0f}) | "
          f"{r['all_gather_mib']:.0f} | {xla} / {r['analytic_tflop_per_chip']:.3f} |")
  print()  # a list under the table, not more table rows
  for r in rows:
    if r["fits"] or r["batch"] != official[(r["size"], r["topology"], r["slices"], r["remat"])]:
      continue
    why = "compiler crashed" if r.get("crashed") else "does not fit"
    print(f"- {why}: {r['size']} {r['topology']} x{r['slices']} remat={r['remat']} "
          f"batch {r['batch']}")
  for line in open_searches(rows):
    print(f"- {line}")


def _by_configuration(rows: list[dict]) -> dict[tuple, list[dict]]:
  """(size, topology, slices, remat) -> its rows, in their order."""
  grouped = {}
  for r in rows:
    grouped.setdefault((r["size"], r["topology"], r["slices"], r["remat"]), []).append(r)
  return grouped


def largest_summary(rows: list[dict]) -> list[str]:
  """The largest global batch of each size, topology and slice count, a column a remat policy
  (in brackets: how many times remat none's); a search still open shows its bound so far."""
  cells = {}
  for (size, topology, slices, remat), compiled in _by_configuration(rows).items():
    cells.setdefault((size, topology, slices), {})[remat] = compiled
  policies = ["none", "dots", "full"]
  lines = ["| size | topology | slices | " + " | ".join(
               f"largest batch, remat {p}" for p in policies) + " |",
           "|---" * (3 + len(policies)) + "|"]
  for (size, topology, slices), by_remat in cells.items():
    answers = {remat: next((r for r in compiled if r.get("largest")), None)
               for remat, compiled in by_remat.items()}
    text = []
    for remat in policies:
      compiled, answer = by_remat.get(remat, []), answers.get(remat)
      fitting = [r["batch"] for r in compiled if r["fits"]]
      if answer:
        cell = str(answer["batch"])
        if answer.get("below_crash"):
          cell += f" (below a compiler crash at {answer['below_crash']})"
        if remat != "none" and answers.get("none"):
          cell += f" ({answer['batch'] / answers['none']['batch']:.1f}x)"
      elif fitting:
        cell = f">= {max(fitting)} (search open)"
      else:
        cell = "does not fit" if compiled else ""
      text.append(cell)
    if any(text):
      lines.append(f"| {size} | {topology} | {slices} | " + " | ".join(text) + " |")
  return lines


def open_searches(rows: list[dict]) -> list[str]:
  """One line for each configuration that fits its official batch but has no largest batch
  yet, with the bounds its compiles have found so far (a resumed search starts from them)."""
  lines = []
  for (size, topology, slices, remat), compiled in _by_configuration(rows).items():
    official = min(compiled, key=lambda r: r["batch"])
    if any(r.get("largest") for r in compiled) or not official["fits"]:
      continue  # answered, or the official batch does not fit (a line above says so)
    fitting = max((r for r in compiled if r["fits"]), key=lambda r: r["batch"])
    over = min((r for r in compiled if not r["fits"] and r["batch"] > fitting["batch"]),
               key=lambda r: r["batch"], default=None)
    over_text = ("" if over is None else f"; {over['batch']} " + (
        f"crashed ({over['crashed']})" if over.get("crashed") else "does not fit"))
    lines.append(f"largest batch not found yet: {size} {topology} x{slices} remat={remat} "
                 f"({fitting['batch']} fits with {fitting['hbm_gib']:.2f} of "
                 f"{fitting['hbm_limit_gib']:.0f} GiB{over_text})")
  return lines


if __name__ == "__main__":
  app.run(main)
