"""data_prep benchmark: clips/s per core of raw media -> records, by stage, and a projection.

    python experiments/benchmarks/data_prep_speed.py [--quick] [--clips N] [--work_dir DIR]

Writes N 10 s 640x360 25 fps h264 videos with AAC stereo 44.1 kHz audio (data_prep/media_factory,
with moving gradients and noise so that h264 has real work), then times each stage of a clip
at CAV-MAE settings (16 kHz mono, 128 mel bins, 10 frames at 224 px, JPEG quality 90),
`data_prep.build.build` with 0, 1 and 2 workers, and the log-mel front ends. Media and shards
are in the page cache (just written): disk, network and download are not counted.
"""

from __future__ import annotations

import contextlib
import io
import os
import resource
import shutil
import tempfile
import time
from typing import Any, Callable

# Single-threaded BLAS/OpenMP before NumPy loads: every number here is per core.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
  os.environ.setdefault(_var, "1")
import av  # noqa: E402
import numpy as np  # noqa: E402
import simplejpeg  # noqa: E402
from absl import app, flags  # noqa: E402

from avmae.data import features, schema, writer  # noqa: E402
from data_prep import build, manifests, media, media_factory  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("clips", 8, "Videos to generate and convert.")
flags.DEFINE_string("work_dir", None, "Directory for media and shards (default: a temp dir).")
flags.DEFINE_bool("quick", False, "3 clips of 4 s and fewer repeats: a smoke run.")

OPTIONS = build.BuildOptions()  # CAV-MAE: 16 kHz mix to mono, 128 mel, 10 x 224 px, JPEG 90
SIZE, FPS, CLIP_COUNT = (640, 360), 25, 2_000_000


def table(title: str, header: list[str], rows: list[list[Any]]) -> None:
  """Prints rows; text columns left-aligned, numbers right-aligned."""
  def fmt(x: Any) -> str:
    if isinstance(x, (str, int)):
      return x if isinstance(x, str) else f"{x:,}"
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}"
  text = {i for i in range(len(header)) if all(isinstance(r[i], str) for r in rows)}
  cells = [header] + [[fmt(c) for c in row] for row in rows]
  widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
  cells.insert(1, ["-" * w for w in widths])
  print(f"\n{title}")
  for row in cells:
    print("  " + "  ".join(c.ljust(w) if i in text else c.rjust(w)
                           for i, (c, w) in enumerate(zip(row, widths))).rstrip())


def timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
  """(wall s, CPU s of all this process's threads, result). CPU s leaves out time other
  processes took from us: the per-core cost, even on a shared machine."""
  wall, cpu = time.perf_counter(), time.process_time()
  out = fn()
  return time.perf_counter() - wall, time.process_time() - cpu, out


def machine_cpu() -> float:
  """Non-idle CPU s of the whole machine since boot (Linux; NaN elsewhere)."""
  try:
    with open("/proc/stat") as f:  # user nice system idle iowait irq softirq steal
      ticks = [int(t) for t in f.readline().split()[1:9]]
  except OSError:
    return float("nan")
  return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def busy_pattern(index: int, seconds: float, height: int, width: int) -> np.ndarray:
  """Scrolling colour gradients, a moving box and fresh noise each frame: the default solid
  colours encode and decode unrealistically cheaply."""
  y, x = np.mgrid[0:height, 0:width].astype(np.float32)
  phase = 2 * np.pi * np.array([0.0, 0.33, 0.67], np.float32)
  image = 128 + 50 * np.sin(2 * np.pi * (x / 160 + seconds * 0.4))[..., None] \
      * np.cos(2 * np.pi * (y / 90 - seconds * 0.3)[..., None] + phase)
  left, top = int(seconds * 37) % (width - 80), int(seconds * 23) % (height - 60)
  image[top:top + 60, left:left + 80] = 235
  image += np.random.default_rng(index).integers(-10, 11, image.shape)
  return np.clip(image, 0, 255).astype(np.uint8)


def generate(root: str, count: int, seconds: float) -> list[manifests.ClipSpec]:
  os.makedirs(root, exist_ok=True)
  paths = [os.path.join(root, f"clip{i:03d}.mp4") for i in range(count)]
  elapsed, _, _ = timed(lambda: [media_factory.write_video(
      p, seconds, FPS, SIZE, pattern=busy_pattern,
      audio=dict(rate=44100, channels=2, codec="aac")) for p in paths])
  mbit = 8 * sum(os.path.getsize(p) for p in paths) / count / seconds / 1e6
  print(f"generated {count} x {seconds:.0f} s {SIZE[0]}x{SIZE[1]} {FPS} fps h264 ({mbit:.2f} "
        f"Mbit/s) + AAC stereo 44.1 kHz in {elapsed:.1f} s (not part of the benchmark)")
  return [manifests.ClipSpec(f"clip{i:03d}", p, None, None, (i % 2,))
          for i, p in enumerate(paths)]


def full_frames(path: str, count: int) -> list[av.VideoFrame]:
  """Decodes every video frame (no conversion); keeps `count` spread over the file."""
  with av.open(path) as container:
    stream = container.streams.video[0]
    step = max(1, (stream.frames or count) // count)
    return [f for k, f in enumerate(container.decode(stream)) if k % step == step // 2][:count]


def stages(clips: list[manifests.ClipSpec], shard_dir: str) -> float:
  """Per-clip stage table; returns the median CPU ms of a clip's work in run_shard."""
  shard = writer.ShardWriter(shard_dir, "stages.tfrecord", "jpeg", OPTIONS.jpeg_quality)
  times: dict[str, list[tuple[float, float]]] = {}
  wall, cpu, machine = time.perf_counter(), time.process_time(), machine_cpu()
  for clip in clips:
    def run(name: str, fn: Callable[[], Any]) -> Any:
      *t, out = timed(fn)
      times.setdefault(name, []).append(t)
      return out
    decoded = run("decode", lambda: media.decode_clip(clip.path, None, None,
                                                      OPTIONS.decode_options()))
    full = run("h264", lambda: full_frames(clip.path, OPTIONS.num_frames))
    rgb = run("rgb", lambda: [f.to_ndarray(format="rgb24") for f in full])
    run("resize", lambda: [media.resize_and_crop(a, OPTIONS.frame_size) for a in rgb])
    log_mel = run("fbank", lambda: features.log_mel(decoded.waveform, OPTIONS.sample_rate,
                                                    OPTIONS.mel_bins, kind="kaldi"))
    fields = dict(clip_id=clip.clip_id, source=clip.path, labels=list(clip.labels),
                  log_mel=log_mel, frames=decoded.frames, timestamps=decoded.timestamps)
    run("jpeg", lambda: [simplejpeg.encode_jpeg(f, OPTIONS.jpeg_quality, "RGB")
                         for f in decoded.frames])
    run("encode", lambda: schema.encode_example(
        **(fields | {"log_mel": log_mel.astype(np.float16)}), jpeg_quality=OPTIONS.jpeg_quality))
    run("add", lambda: shard.add(**fields))
  shard.close()
  wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
  other = (machine_cpu() - machine - cpu) / wall
  ms = {k: np.median(1e3 * np.array(v), axis=0) for k, v in times.items()}  # [wall, CPU]
  total = ms["decode"] + ms["fbank"] + ms["add"]
  rows = [
      ["decode (media.decode_clip)", ms["decode"],
       "demux, h264 + AAC decode, resample to 16 kHz mono, 10 x (rgb24 + resize_and_crop)"],
      ["  of which h264 decode, all frames", ms["h264"], "own pass: container.decode(video)"],
      ["  of which rgb24 conversion, 10 fr", ms["rgb"], "VideoFrame.to_ndarray, 640x360"],
      ["  of which resize_and_crop, 10 fr", ms["resize"], "PIL bilinear, 360x360 box -> 224"],
      ["  rest: demux, AAC, resample", ms["decode"] - ms["h264"] - ms["rgb"] - ms["resize"],
       "decode minus the three above"],
      ["fbank (log_mel kind=kaldi, NumPy)", ms["fbank"], "[frames, 128] of the clip's audio"],
      ["write (ShardWriter.add)", ms["add"], "float16 + stats, encode_example, CRC + write"],
      ["  of which encode_example", ms["encode"], "10 JPEG encodes + protobuf serialisation"],
      ["  of which JPEG encode, 10 fr", ms["jpeg"], "simplejpeg, 224 px, quality 90"],
      ["  rest: protobuf, stats, record", ms["add"] - ms["jpeg"], "add minus JPEG"],
      ["total (decode + fbank + write)", total, "what run_shard does per clip"]]
  table(f"1. Per-clip stages, median ms over {len(clips)} clips, one process; CPU: all its "
        f"threads; other processes kept {other:.2f} cores busy meanwhile",
        ["stage", "wall ms", "CPU ms", "% of CPU", "includes"],
        [[name, *v, 100 * v[1] / total[1], note] for name, v, note in rows])
  print(f"   serial: {1e3 / total[0]:.2f} clips/s wall, {1e3 / total[1]:.2f} clips per CPU s")
  return total[1]


def end_to_end(clips: list[manifests.ClipSpec], root: str) -> tuple[float, float]:
  """build.build with 0, 1, 2 workers; returns the best wall clips/s per worker process and
  the best clips per CPU s."""
  manifest = manifests.Manifest(tuple(clips), ("even", "odd"), ())
  cores, shards, rows, best = os.cpu_count() or 1, min(2, len(clips)), [], (0.0, 0.0)
  tree_cpu = lambda: sum(sum(resource.getrusage(who)[:2]) for who in (  # noqa: E731
      resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))  # children: reaped build workers
  for workers in (0, 1, 2):
    out = os.path.join(root, f"build_w{workers}")
    shutil.rmtree(out, ignore_errors=True)  # finished shards would be reused, not rebuilt
    cpu, machine = tree_cpu(), machine_cpu()
    with contextlib.redirect_stderr(io.StringIO()):  # the progress line
      seconds, _, info = timed(lambda: build.build(manifest, out, OPTIONS, {"default": shards},
                                                   workers, name="bench"))
    cpu = tree_cpu() - cpu
    other = (machine_cpu() - machine - cpu) / seconds
    assert info["splits"]["train"]["num_examples"] == len(clips), info["failures"]
    rate = len(clips) / seconds
    best = max(best[0], rate / min(max(workers, 1), cores)), max(best[1], len(clips) / cpu)
    rows.append([workers, seconds, rate, rate / cores, cpu, cpu / seconds, len(clips) / cpu,
                 other])
  table(f"2. End to end: data_prep.build.build, {len(clips)} clips in {shards} shards; wall "
        "includes spawning workers; CPU: all our processes;\n   other: cores other processes "
        "kept busy meanwhile", ["workers", "wall s", "clips/s", f"clips/s/core (/{cores})",
                                "CPU s", "CPU/wall", "clips/CPU s", "other"], rows)
  return best


def fbank_speed(repeats: int) -> None:
  wave = (0.1 * np.random.default_rng(0).standard_normal(160_000)).astype(np.float32)
  rows, base = [], None
  for kind, name in (("kaldi", "kaldi_fbank (NumPy, float64)"),
                     ("kaldi_native", "kaldi_native_fbank (C++)"),
                     ("librosa", "librosa_log_mel")):
    fn = lambda: features.log_mel(wave, 16000, 128, kind=kind)  # noqa: E731
    try:
      fn()  # warm-up: lazy imports, caches
    except (ImportError, ValueError) as e:  # ValueError: a kind this checkout lacks
      print(f"   {kind}: skipped ({e})")
      continue
    wall, cpu = np.median([timed(fn)[:2] for _ in range(repeats)], axis=0) * 1e3
    base = base or cpu
    rows.append([name, wall, cpu, cpu / base])
  table(f"3. Log-mel front ends on a 10 s 16 kHz waveform (998 x 128), median of {repeats}, "
        "one thread", ["front end", "wall ms", "CPU ms", "CPU x NumPy"], rows)


def main(argv: list[str]) -> None:
  del argv
  started = time.perf_counter()
  root = FLAGS.work_dir or tempfile.mkdtemp(prefix="avmae_prep_bench_")
  count, seconds = (3, 4.0) if FLAGS.quick else (FLAGS.clips, 10.0)
  libavcodec = ".".join(map(str, av.library_versions["libavcodec"]))
  print(f"data_prep benchmark{' --quick' if FLAGS.quick else ''}: {os.cpu_count()} CPU cores "
        f"(load average {os.getloadavg()[0]:.1f}), PyAV {av.__version__}, FFmpeg "
        f"{av.ffmpeg_version_info} (libavcodec {libavcodec}), NumPy {np.__version__}; "
        f"work in {root}")
  try:
    clips = generate(os.path.join(root, "media"), count, seconds)
    serial_cpu_ms = stages(clips, root)
    per_worker, per_cpu_s = end_to_end(clips, root)
    fbank_speed(5 if FLAGS.quick else 20)
  finally:
    if not FLAGS.work_dir:
      shutil.rmtree(root, ignore_errors=True)
  print(f"\n4. Projection for {CLIP_COUNT:,} clips of {seconds:.0f} s, one worker per core on "
        "16-core machines with cores like these\n   (no download, disk or Beam overhead; wall "
        "rates suffer from other processes here, CPU-s rates do not):")
  for name, rate in (("serial stages, per CPU s", 1e3 / serial_cpu_ms),
                     ("end to end, per CPU s", per_cpu_s),
                     ("end to end, wall per worker", per_worker)):
    hours = CLIP_COUNT / (16 * rate) / 3600
    print(f"   {name:>27}: {rate:5.2f} clips/s/core -> {hours:5.1f} h on one machine, "
          f"{60 * hours / 100:4.1f} min on 100 (Beam)")
  print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":  # build's spawned workers import this file as __mp_main__
  app.run(main)
