"""Input-pipeline benchmark: how many host cores one accelerator needs for CAV-MAE pretraining.

    python experiments/benchmarks/input_pipeline.py [--quick] [--work_dir DIR] [--batches N]

Writes a "tiny" and a "base" (CAV-MAE shapes) synthetic dataset, times index building,
per-record work and `pipeline.Batches` end to end, and divides the pipeline's rate by the
analytic consumption of a ViT-B CAV-MAE training step. Shards are read from the page cache
(just written): disk and network reads are not in the numbers. Side by side in one run: the
audio finished on the host (data.audio_on_device=False, the path before) and on the device.
"""

from __future__ import annotations

import functools
import itertools
import os
import pickle
import shutil
import statistics
import tempfile
import time
from typing import Any, Callable, Iterable

import jax
import numpy as np
import simplejpeg
from absl import app, flags

from avmae import sharding
from avmae.data import dataset_info, finish, pipeline, schema, tfrecord
from avmae.data.source import TFRecordSource
from configs import data as data_config
from data_prep.make_synthetic import make_synthetic

FLAGS = flags.FLAGS
flags.DEFINE_string("work_dir", None, "Directory for the datasets (default: a temp dir, removed).")
flags.DEFINE_bool("quick", False, "Small datasets and counts: a smoke run of about a minute.")
flags.DEFINE_integer("batches", 0, "Timed batches per pipeline row (0: as in SIZES).")

# make_synthetic arguments, pipeline shapes, global batch; per (full run, --quick): train
# clips, and timed batches (without workers, with workers).
SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(synth={}, audio_frames=128, image_size=32, batch=32, clips=(512, 64),
                 batches=((320, 160), (64, 32))),
    "base": dict(synth=dict(clip_seconds=10.0, mel_bins=128, frame_size=224, frames_per_clip=10),
                 audio_frames=1024, image_size=224, batch=48, clips=(96, 12),
                 batches=((64, 16), (16, 8))),
}
ACCELERATORS = {"H100 (dense bf16)": 989e12, "TPU v5e": 197e12, "TPU v4": 275e12}
MFU = 0.4
# Batches reads with the data config's read threads (one per worker when there are workers)
# and batches prepared ahead per process.
_DATA = data_config.get_config()
THREADS, IN_FLIGHT = _DATA.read_threads, _DATA.prefetch_batches


def table(title: str, header: list[str], rows: list[list[Any]]) -> None:
  """Prints rows with the first column left-aligned, the others right-aligned."""
  def fmt(x: Any) -> str:
    if isinstance(x, (str, int)):
      return x if isinstance(x, str) else f"{x:,}"
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}"
  cells = [header] + [[fmt(c) for c in row] for row in rows]
  widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
  cells.insert(1, ["-" * w for w in widths])
  print(f"\n{title}")
  for row in cells:
    print("  " + "  ".join(c.rjust(w) if i else c.ljust(w)
                           for i, (c, w) in enumerate(zip(row, widths))))


def timed(fn: Callable[..., Any], *args: Any, clock: Callable[[], float] = time.perf_counter
          ) -> float:
  start = clock()
  fn(*args)
  return clock() - start


def median_us(fn: Callable[[Any], Any], items: Iterable[Any],
              clock: Callable[[], float] = time.perf_counter) -> float:
  """Median microseconds of fn(item) (`clock`: time.process_time for this process's CPU time,
  which other jobs on a loaded machine do not inflate by preempting it)."""
  return 1e6 * statistics.median(timed(fn, item, clock=clock) for item in items)


def usage() -> tuple[float, float, float]:
  """CPU s of this process tree, CPU s of the whole machine, GB resident in this process tree
  (Linux /proc; NaNs elsewhere)."""
  tick, page = os.sysconf("SC_CLK_TCK"), os.sysconf("SC_PAGE_SIZE")
  try:
    pids, ours, rss = [os.getpid()], 0.0, 0
    while pids:
      pid = pids.pop()
      with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
      ours, rss = ours + (int(fields[11]) + int(fields[12])) / tick, rss + int(fields[21]) * page
      for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
          pids += [int(p) for p in f.read().split()]
    with open("/proc/stat") as f:  # user nice system idle iowait irq softirq
      ticks = [int(t) for t in f.readline().split()[1:8]]
    return ours, (sum(ticks) - ticks[3] - ticks[4]) / tick, rss / 1e9
  except OSError:  # not Linux, or a process ended during the walk
    return (float("nan"),) * 3


def config(data_dir: str, size: str, num_workers: int = 0, audio_on_device: bool = True,
           **augment: Any):
  cfg = data_config.get_config(data_dir)
  cfg.audio_frames, cfg.image_size = SIZES[size]["audio_frames"], SIZES[size]["image_size"]
  cfg.num_workers, cfg.audio_on_device = num_workers, audio_on_device
  cfg.augment.update(augment)
  return cfg


def train_shards(data_dir: str) -> list[str]:
  return dataset_info.shard_paths(data_dir, dataset_info.load(data_dir), "train")


def generate(root: str) -> dict[str, str]:
  dirs, gen, index = {}, [], []
  for size, s in SIZES.items():
    dirs[size] = data_dir = os.path.join(root, size)
    train = s["clips"][FLAGS.quick]
    clips = train + max(4, train // 8)
    seconds = timed(lambda: make_synthetic(data_dir, num_train=train, num_eval=clips - train,
                                           **s["synth"]))
    shards = train_shards(data_dir)
    nbytes = sum(os.path.getsize(p) for p in shards)
    gen.append([size, clips, seconds, 1e3 * seconds / clips, nbytes / 1e6, nbytes / train / 1e3])
    # Best of 3 per shard: a scan takes well under a millisecond, so scheduling noise matters.
    best = [min(timed(tfrecord.build_index, p) for _ in range(3)) for p in shards]
    index.append([size, len(shards), train, 1e3 * np.mean(best), 1e6 * sum(best) / train,
                  nbytes / sum(best) / 1e6])
  table("1. Synthetic data (make_synthetic, train + eval clips, one process; MB and kB of the "
        "train shards)", ["dataset", "clips", "seconds", "ms/clip", "train MB", "kB/record"], gen)
  table("2. Index build (tfrecord.build_index on each train shard: walk the record headers, "
        "CRC each length, write the index)",
        ["dataset", "shards", "records", "ms/shard", "us/record", "shard MB/s"], index)
  return dirs


def per_record(dirs: dict[str, str]) -> float:
  """Median us per record of each stage in one process, the audio finished on the host
  (data.audio_on_device=False, the path before) and on the device (the default); returns
  base's BatchSource us per example with the audio on the device."""
  ops: dict[str, dict[str, float]] = {}
  for size, data_dir in dirs.items():
    source = TFRecordSource(train_shards(data_dir))
    indices = range(min(len(source), 64 if FLAGS.quick else 256))
    records = [source[i] for i in indices]
    feature = lambda r, key: schema.Example.FromString(r.data).features.feature[key]
    jpegs = [feature(r, "video/frames").bytes_list.value[0] for r in records]
    info, rng = dataset_info.load(data_dir), np.random.default_rng(0)
    batch_size = SIZES[size]["batch"]
    for where, on_device in (("host", False), ("device", True)):
      spec = pipeline.example_spec(config(data_dir, size, audio_on_device=on_device), info,
                                   train=True)
      parsed = [schema.decode_example(r.data, r.where,
                                      lambda n: pipeline.clip_frames(n, spec, rng, r.where))
                for r in records]
      # SpecAugment widths of the official fine-tuning (48 of 128 bins, 192 of 1024 frames),
      # scaled to the shapes: augment.spec_augment fails when a width exceeds its axis.
      heavy = pipeline.example_spec(config(
          data_dir, size, audio_on_device=on_device, random_resized_crop=True, flip=True,
          noise=0.1, freq_mask=spec.mel_bins * 48 // 128,
          time_mask=spec.audio_frames * 192 // 1024), info, train=True)
      examples = [pipeline.prepare_example(r, rng, spec) for r in records[:batch_size]]
      stack = lambda b: {k: np.stack([e[k] for e in b]) for k in b[0]}
      batch, share = stack(examples), 1 / len(examples)
      batch_source = pipeline.BatchSource(source, spec, 0, batch_size)
      col = {
          "read + CRC check (source[i])": median_us(source.__getitem__, indices),
          "  protobuf parse only": median_us(schema.Example.FromString,
                                             [r.data for r in records]),
          "  JPEG decode, one frame": median_us(
              lambda j: simplejpeg.decode_jpeg(j, colorspace="RGB"), jpegs),
          "decode_example (parse, chosen frames)": median_us(
              lambda r: schema.decode_example(
                  r.data, r.where, lambda n: pipeline.clip_frames(n, spec, rng, r.where)),
              records),
          "audio: example_audio": median_us(
              lambda e: pipeline.example_audio(e["log_mel"], spec, rng), parsed),
          "prepare_example, default train aug": median_us(
              lambda r: pipeline.prepare_example(r, rng, spec), records),
          "  ... + rrc, flip, noise, SpecAugment (host)": median_us(
              lambda r: pipeline.prepare_example(r, rng, heavy), records),
          "stack of prepared examples, share (before)": share * median_us(
              stack, [examples] * 5),
          "pickle round trip (worker -> main)": share * median_us(
              lambda b: pickle.loads(pickle.dumps(b, pickle.HIGHEST_PROTOCOL)), [batch] * 5),
          "device: finish the audio, share": share * device_finish_us(batch, spec),
      }
      col["sum: read + prepare_example + stack"] = sum(col[k] for k in (
          "read + CRC check (source[i])", "prepare_example, default train aug",
          "stack of prepared examples, share (before)"))
      total = "BatchSource[j] (rows written in place), CPU us, share"
      batch_source[0]  # the epoch's permutation, the shards opened
      col[total] = median_us(batch_source.__getitem__, range(1, 4 if FLAGS.quick else 9),
                             clock=time.process_time) / batch_size
      col["  examples/s per host core"] = 1e6 / col[total]
      col["  ... with the device finish on this CPU"] = 1e6 / (
          col[total] + col["device: finish the audio, share"])
      col["batch kB per example (not us)"] = share * sum(b.nbytes for b in batch.values()) / 1e3
      for name, value in col.items():
        ops.setdefault(name, {})[f"{size} {where}"] = value
  columns = [f"{size} {where}" for size in dirs for where in ("host", "device")]
  table("3. Per-record cost in one process, median us (tiny: 128 x 64 mel, 32 px; base: 1024 x "
        "128 mel, 224 px),\n   the audio finished on the host (data.audio_on_device=False, the "
        "path before) or on the device (float16 and\n   a roll shift shipped; finished in one "
        f"jitted call per batch on {jax.devices()[0].platform}, here sharing this machine's CPU)",
        ["stage", *columns], [[k, *(v[c] for c in columns)] for k, v in ops.items()])
  return ops["BatchSource[j] (rows written in place), CPU us, share"]["base device"]


def device_finish_us(batch: dict[str, np.ndarray], spec: pipeline.ExampleSpec) -> float:
  """Median us of the jitted audio finish on a batch already on the default device (0 when
  the host finished it)."""
  if finish.ROLL not in batch:
    return 0.0
  fn = jax.jit(functools.partial(finish.finish_audio, mean=spec.log_mel_mean,
                                 std=spec.log_mel_std, roll=spec.rolls))
  args = jax.device_put((batch["audio"], batch[finish.ROLL], batch["valid"]))
  jax.block_until_ready(fn(*args))  # compiled
  return median_us(lambda a: jax.block_until_ready(fn(*a)), [args] * 7)


def pipeline_throughput(dirs: dict[str, str]) -> tuple[float, float]:
  """End-to-end `Batches(train=True)`; returns base's best (examples/s, examples per CPU s)."""
  cores = os.cpu_count() or 1
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
  rows, best = [], (0.0, 0.0)
  # Without a mesh the audio is finished on the host either way: one numpy row. --quick:
  # grain workers (seconds to start) only at base with the audio on the device, 2 of them.
  runs = [(size, audio, workers, m) for size in dirs for audio in ("host", "device")
          for workers, m in [(None, mesh), (0, None), (0, mesh), (1, mesh), (2, mesh)]
          if not (audio == "device" and m is None or FLAGS.quick and workers and (
              workers == 1 or audio == "host" or size == "tiny"))]
  for size, audio, workers, m in runs:
    data_dir, batch_size = dirs[size], SIZES[size]["batch"]
    cfg = config(data_dir, size, workers or 0, audio_on_device=audio == "device")
    batches = pipeline.Batches(cfg, "train", train=True, seed=0, global_batch_size=batch_size,
                               mesh=m)
    count = FLAGS.batches or SIZES[size]["batches"][FLAGS.quick][bool(workers)]
    if workers is None:  # reference: BatchSource[j] in this thread, no grain
      positions = itertools.count()
      step = lambda: batches.source[next(positions)]
      startup, count = timed(step), min(count, 16)
      direct = timed(lambda: [step() for _ in range(2)]) / 2
    else:
      step = lambda: jax.block_until_ready(next(batches))  # with a mesh: the H2D copy too
      startup = timed(step)
      # grain's reader threads start together, so the first batches come in a burst; past
      # it, take what was prepared ahead until a batch must be waited for, so that the
      # timing is of the steady production rate.
      for _ in range(2 * THREADS - 1 if workers == 0 else 2 * workers):
        step()
      for _ in range(10_000):
        if timed(step) > direct / 4:
          break
    before = usage()
    seconds = timed(lambda: [step() for _ in range(count)])
    after = usage()
    ours, machine = [(b - a) / seconds for a, b in zip(before[:2], after[:2])]
    batches.close()
    rate = count * batch_size / seconds
    if size == "base" and audio == "device" and workers is not None and rate > best[0]:
      best = (rate, rate / ours)
    where = ("host batch" if workers is None else "numpy" if m is None else
             f"mesh {mesh.devices.size}x{jax.devices()[0].platform}")
    rows.append([size, audio, "direct" if workers is None else workers, where, count, startup,
                 1e3 * seconds / count, rate, rate / cores, ours, machine - ours, after[2]])
  table(f"4. End-to-end pipeline.Batches(train=True); batch {SIZES['tiny']['batch']} tiny, "
        f"{SIZES['base']['batch']} base; {cores} CPU cores\n   start-up: first batch (spawns "
        "grain workers); direct: BatchSource[j] in the main thread, no grain, no\n   device; "
        "busy: CPU s / wall s of this process tree (ours) and of everything else on the\n"
        "   machine (other); RSS: this process tree after the timed batches. The main process "
        "reads with "
        f"{THREADS} threads, each worker with one; {IN_FLIGHT} batches ahead per process",
        ["dataset", "audio", "workers", "output", "timed", "start-up s", "ms/batch", "examples/s",
         f"ex/s/core (/{cores})", "busy ours", "busy other", "RSS GB"], rows)
  return best


def block_flops(n: int, width: int, mlp: int) -> int:
  """One ViT block on n tokens: qkv and output projections, QK^T and AV, two MLP matmuls."""
  return 2 * n * width * 4 * width + 2 * 2 * n * n * width + 2 * 2 * n * width * mlp


def consumption(serial_us: float, e2e_rate: float, e2e_per_cpu_s: float) -> None:
  # CAV-MAE base: audio 1024 x 128 -> 64 x 8 = 512 patches of 16x16; one 224 px frame ->
  # 14 x 14 = 196 patches of 16x16x3; 75% of each modality masked.
  audio, video, keep = 512, 196, 0.25
  a, v = int(audio * keep), int(video * keep)
  parts = {  # the official code embeds every patch, then masks
      "patch embeds (256->768, 768->768)": 2 * audio * 256 * 768 + 2 * video * 768 * 768,
      f"11 audio blocks on {a} visible tokens (w 768)": 11 * block_flops(a, 768, 3072),
      f"11 video blocks on {v} visible tokens (w 768)": 11 * block_flops(v, 768, 3072),
      f"shared block: joint {a + v}, + audio {a}, + video {v}":
          sum(block_flops(n, 768, 3072) for n in (a + v, a, v)),
      f"decoder embed 768->512 on {a + v} tokens": 2 * (a + v) * 768 * 512,
      f"8 decoder blocks on all {audio + video} tokens (w 512)":
          8 * block_flops(audio + video, 512, 2048),
      "prediction heads (512->256, 512->768)": 2 * audio * 512 * 256 + 2 * video * 512 * 768,
  }
  fwd = sum(parts.values())
  rows = [[k, f / 1e9, 100 * f / fwd] for k, f in parts.items()]
  rows += [["forward", fwd / 1e9, 100.0], ["training step = 3 x forward", 3 * fwd / 1e9, 300.0]]
  table("5. CAV-MAE base pretraining FLOPs per example: matmuls at 2mnk, attention QK^T and AV "
        "included;\n   norms, softmax, GELU, losses and the B x B contrastive matmul left out",
        ["part", "GFLOP", "% of fwd"], rows)
  cores = os.cpu_count() or 1
  per_core = {"e2e /cores": e2e_rate / cores, "e2e /CPU s": e2e_per_cpu_s,
              "serial": 1e6 / serial_us}
  rates = {name: MFU * peak / (3 * fwd) for name, peak in ACCELERATORS.items()}
  rows = [[name, ACCELERATORS[name] / 1e12, rate, *[rate / r for r in per_core.values()]]
          for name, rate in rates.items()]
  table(f"   Examples/s one accelerator consumes at {MFU:.0%} MFU, and host cores it needs at "
        "base shapes", ["accelerator", "peak TFLOP/s", "examples/s",
                        *[f"cores ({k})" for k in per_core]], rows)
  print(f"\n   cores = examples/s consumed / examples/s one host core prepares; per core:\n"
        f"   e2e /cores: {per_core['e2e /cores']:.0f} (best base Batches row above, / {cores} "
        f"cores)\n   e2e /CPU s: {per_core['e2e /CPU s']:.0f} (that row, per CPU second our "
        f"processes used)\n   serial: {per_core['serial']:.0f} (1e6 / {serial_us:.0f} us per "
        "example of BatchSource[j], the audio on the device; no grain, no IPC)\n   Assumed: "
        "one 224 px frame and the "
        "default train augmentation (time roll) per example, records\n   in the page cache, and "
        "host cores as fast as this machine's.")


def main(argv: list[str]) -> None:
  del argv
  started = time.perf_counter()
  root = FLAGS.work_dir or tempfile.mkdtemp(prefix="avmae_bench_")
  print(f"input pipeline benchmark{' --quick' if FLAGS.quick else ''}: data in {root}, "
        f"{os.cpu_count()} CPU cores, jax devices {jax.devices()}")
  try:
    dirs = generate(root)
    serial_us = per_record(dirs)
    consumption(serial_us, *pipeline_throughput(dirs))
  finally:
    if not FLAGS.work_dir:
      shutil.rmtree(root, ignore_errors=True)
  print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":  # grain spawns workers, which import this module
  app.run(main)
