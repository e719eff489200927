"""data_prep benchmark: clips/s per core of raw media -> records, by stage, and a projection.

    python experiments/benchmarks/data_prep_speed.py [--quick] [--clips N] [--work_dir DIR]

Writes N 10 s 640x360 25 fps h264 videos with AAC stereo 44.1 kHz audio (data_prep/media_factory,
with moving gradients and noise so that h264 has real work), then times each stage of a clip
at CAV-MAE settings (16 kHz mono, 128 mel bins, 10 frames at 224 px, JPEG quality 90) side by
side with an ffmpeg-style extraction of the same frames and audio written with PyAV
(`reference_clip`: what `ffmpeg -ss T -frames:v 1` and `ffmpeg -ac 1 -ar 16000` do), clips
interleaved, then `data_prep.build.build` with 0, 1 and 2 workers, and the log-mel front ends.
Media and shards are in the page cache (just written): disk, network and download are not
counted.
"""

from __future__ import annotations

import contextlib
import fractions
import io
import os
import resource
import shutil
import tempfile
import time
from typing import Any, Callable
from unittest import mock

# Single-threaded BLAS/OpenMP before NumPy loads: every number here is per core.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
  os.environ.setdefault(_var, "1")
import av  # noqa: E402
import numpy as np  # noqa: E402
import simplejpeg  # noqa: E402
from absl import app, flags  # noqa: E402

from avmae.data import features, writer  # noqa: E402
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


class Clock:
  """CPU seconds (all threads) spent in named stages, summed over calls."""

  def __init__(self):
    self.seconds: dict[str, float] = {}

  @contextlib.contextmanager
  def __call__(self, name: str):
    cpu = time.process_time()
    try:
      yield
    finally:
      self.seconds[name] = self.seconds.get(name, 0.0) + time.process_time() - cpu

  def patch(self, owner: Any, attr: str, name: str) -> Any:
    """A patch that times every call of owner.attr (a method or function) as `name`."""
    fn = getattr(owner, attr)

    def timed_fn(*args, **kwargs):
      with self(name):
        return fn(*args, **kwargs)
    return mock.patch.object(owner, attr, timed_fn)


def reference_clip(path: str, clock: Clock) -> tuple[list[bytes], np.ndarray]:
  """ffmpeg-style extraction of what data_prep takes, with PyAV: the frame on screen at each
  target time (`ffmpeg -ss T -i clip -frames:v 1 -vf scale=-2:224,crop=224:224 -q:v 2 f.jpg`,
  but in one sequential pass that stops after the last target, as `-vf select` with
  `-frames:v 10` does: a seek per frame would decode from the file's single keyframe each
  time), and the audio as `ffmpeg -i clip -ac 1 -ar 16000 -f f32le`. Returns the JPEGs
  and the 16 kHz mono waveform."""
  n, size = OPTIONS.num_frames, OPTIONS.frame_size
  with av.open(path) as container:
    video, audio = container.streams.video[0], container.streams.audio[0]
    targets = (np.arange(n) + 0.5) * container.duration / av.time_base / n
    resampler = av.AudioResampler(format="flt", layout="mono", rate=OPTIONS.sample_rate)
    chosen, prev, resampled = [], None, []
    for packet in container.demux(video, audio):
      if packet.stream.type == "audio":
        with clock("audio decode + resample"):
          resampled += [r for f in packet.decode() for r in resampler.resample(f)]
      elif len(chosen) < n:
        with clock("video decode"):
          frames = packet.decode()
        for f in frames:
          while len(chosen) < n and targets[len(chosen)] < f.time:
            chosen.append(prev or f)
          prev = f
    with clock("audio decode + resample"):
      resampled += resampler.resample(None)
      waveform = np.concatenate([f.to_ndarray()[0] for f in resampled])
    chosen += [prev] * (n - len(chosen))
    with clock("frame conversion + resize"):  # swscale, as ffmpeg's scale filter
      h, w = chosen[0].height, chosen[0].width
      width, height = (round(w * size / h), size) if w >= h else (size, round(h * size / w))
      left, top = (width - size) // 2, (height - size) // 2
      images = [f.reformat(width, height, "rgb24", interpolation="BILINEAR").to_ndarray()
                [top:top + size, left:left + size] for f in chosen]
    with clock("JPEG encode"):  # ffmpeg's mjpeg; from rgb24 it picks 4:4:4, as simplejpeg
      encoder = av.CodecContext.create("mjpeg", "w")
      encoder.width = encoder.height = size
      encoder.pix_fmt, encoder.time_base = "yuvj444p", fractions.Fraction(1, 25)
      encoder.qmin = encoder.qmax = 2  # -q:v 2: about simplejpeg's quality 90
      jpegs = [bytes(p) for image in images for p in encoder.encode(av.VideoFrame.from_ndarray(
          np.ascontiguousarray(image), "rgb24").reformat(format="yuvj444p"))]
  return jpegs, waveform


def instrumented(clock: Clock) -> contextlib.ExitStack:
  """Times data_prep's decode by stage, through the methods media.decode_clip calls."""
  stack = contextlib.ExitStack()
  for owner, attr, name in (
      (media._VideoSink, "take", "video decode"),
      (media._VideoSink, "images", "frame conversion + resize"),
      (media, "resize_and_crop", "resize"),
      (media._AudioSink, "take", "audio decode + resample"),
      (media._AudioSink, "finish", "audio decode + resample")):
    stack.enter_context(clock.patch(owner, attr, name))
  return stack


def stages(clips: list[manifests.ClipSpec], shard_dir: str) -> float:
  """Per-clip stages of data_prep and of the ffmpeg-style reference, clips interleaved;
  returns data_prep's CPU ms a clip (what run_shard does)."""
  shard = writer.ShardWriter(shard_dir, "stages.tfrecord", "jpeg", OPTIONS.jpeg_quality)
  ours, ref = Clock(), Clock()

  def data_prep(clip: manifests.ClipSpec) -> None:
    with instrumented(ours), ours("all"):
      decoded = media.decode_clip(clip.path, None, None, OPTIONS.decode_options())
      with ours("log-mel"):
        log_mel = features.log_mel(decoded.waveform, OPTIONS.sample_rate, OPTIONS.mel_bins,
                                   kind=OPTIONS.log_mel)
      with ours("record"):  # float16 + stats, encode_example (JPEG, protobuf), CRC + write
        shard.add(clip_id=clip.clip_id, source=clip.path, labels=list(clip.labels),
                  log_mel=log_mel, frames=decoded.frames, timestamps=decoded.timestamps)
    with ours("JPEG encode"):  # add's JPEG share, timed on its own
      for f in decoded.frames:
        simplejpeg.encode_jpeg(f, OPTIONS.jpeg_quality, "RGB")

  def reference(clip: manifests.ClipSpec) -> None:
    with ref("all"):
      _, waveform = reference_clip(clip.path, ref)
      with ref("log-mel"):  # the same front end: FFmpeg has none
        features.log_mel(waveform, OPTIONS.sample_rate, OPTIONS.mel_bins, kind=OPTIONS.log_mel)

  runs = [data_prep, reference]
  for fn in runs:  # warm-up: lazy imports, first-call setup
    fn(clips[0])
  ours.seconds.clear()
  ref.seconds.clear()
  wall, cpu, machine = time.perf_counter(), time.process_time(), machine_cpu()
  for k, clip in enumerate(clips):
    for fn in runs[::-1] if k % 2 else runs:  # interleaved: each goes first every other clip
      fn(clip)
  shard.close()
  wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
  other = (machine_cpu() - machine - cpu) / wall
  ms = {side: {k: 1e3 * v / len(clips) for k, v in clock.seconds.items()}
        for side, clock in (("ours", ours), ("ref", ref))}
  o, r = ms["ours"], ms["ref"]
  o["record"] -= o["JPEG encode"]  # the rest: float16 + stats, protobuf, CRC + write
  for side in (o, r):
    side["demux, rest"] = side.pop("all") - sum(side.get(k, 0.0) for k in STAGES[1:])
  r["record"] = o["record"]  # the same serialisation: FFmpeg has none
  o["all"], r["all"] = (sum(side[k] for k in STAGES) for side in (o, r))
  rows = [[name, o[name], r[name], o[name] / r[name] if r[name] else float("nan"),
           NOTES[name]] for name in STAGES]
  rows.insert(3, ["  of which resize", o["resize"], float("nan"), float("nan"),
                  "PIL, antialiased bilinear (bit for bit as before)"])
  rows.append(["total", o["all"], r["all"], o["all"] / r["all"], "CPU ms a clip"])
  table(f"1. Per-clip stages, CPU ms (all threads) a clip, mean of {len(clips)} clips, data_prep "
        "and the ffmpeg-style PyAV reference interleaved;\n   other processes kept "
        f"{other:.2f} cores busy meanwhile", ["stage", "data_prep", "reference",
                                               "data_prep / ref", "what"], rows)
  print(f"   clips/s per core: data_prep {1e3 / o['all']:.2f}, ffmpeg-style reference "
        f"{1e3 / r['all']:.2f}: data_prep at {r['all'] / o['all']:.2f}x the reference's rate")
  return o["all"]


STAGES = ("demux, rest", "video decode", "frame conversion + resize", "JPEG encode",
          "audio decode + resample", "log-mel", "record")
NOTES = {
    "demux, rest": "demux, Python per packet, selection",
    "video decode": "h264 up to the last target (data_prep: + chosen-frame bookkeeping)",
    "frame conversion + resize": "10 frames: rgb24 + PIL / swscale bilinear to 224x224",
    "JPEG encode": "10 x 224 px: simplejpeg q90 / FFmpeg mjpeg -q:v 2",
    "audio decode + resample": "AAC -> 16 kHz mono (fltp + mix / swresample -ac 1)",
    "log-mel": f"{OPTIONS.log_mel} fbank, 128 bins (same code)",
    "record": "float16 + stats, protobuf, CRC + write (same code)",
}


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
