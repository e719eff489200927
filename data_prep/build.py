"""Raw media -> an avmae dataset:

    python -m data_prep.build --manifest=FILE --media_root=DIR --out_dir=DIR [options]
    python -m data_prep.build --media_dir=DIR --out_dir=DIR          (labels = folder names)

Every clip is decoded with PyAV (audio resampled to 16 kHz mono, N frames uniformly over the
segment, resized and centre-cropped), turned into a Kaldi-compatible log-mel and written to
sharded TFRecords by the dataset writer. The unit of work is a shard: clip i of a split (in
clip-id order) goes to shard i % num_shards, so the output does not depend on the number of
workers or on the runner (local processes or Apache Beam, data_prep/beam_build.py).

Nothing is lost silently: a clip that cannot be converted goes to failures.jsonl with its
reason, and dataset_info.json counts them. A finished shard leaves `<shard>.done.json`;
re-running the same command keeps finished shards and redoes only the others.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import sys
import time
from typing import Any, Sequence

from absl import app, flags
import numpy as np

from avmae.data import dataset_info, features, writer
from data_prep import manifests, media

DONE_SUFFIX = ".done.json"


@dataclasses.dataclass(frozen=True)
class BuildOptions:
  """Everything that decides the bytes of the output (part of each shard task)."""
  sample_rate: int = 16000
  mel_bins: int = 128
  log_mel: str = "kaldi"
  num_frames: int = 10
  frames_per_second: float = 0.0  # 0: num_frames spread over the clip; else at this rate
  frame_size: int = 224
  frame_resize: str = "bilinear"  # media.RESIZE_FILTERS; official CAV-MAE's dataloader: bicubic
  jpeg_quality: int = 90
  video_encoding: str = "jpeg"
  mono: str = "mix"  # CAV-MAE/AST: ffmpeg -ac 1 averages the channels
  min_seconds: float = 1.0
  require_video: bool = True
  require_audio: bool = True

  def features(self) -> dict[str, Any]:
    return {"sample_rate": self.sample_rate, "mel_bins": self.mel_bins,
            "log_mel": self.log_mel, "frame_length_ms": 25.0, "frame_shift_ms": 10.0,
            "frames_per_clip": self.num_frames, "frames_per_second": self.frames_per_second,
            "frame_size": [self.frame_size] * 2, "frame_resize": self.frame_resize,
            "video_encoding": self.video_encoding, "mono": self.mono}

  def decode_options(self) -> media.DecodeOptions:
    return media.DecodeOptions(sample_rate=self.sample_rate, mono=self.mono,
                               num_frames=self.num_frames, frame_size=self.frame_size,
                               frame_resize=self.frame_resize,
                               frames_per_second=self.frames_per_second,
                               min_seconds=self.min_seconds,
                               require_video=self.require_video,
                               require_audio=self.require_audio)


@dataclasses.dataclass(frozen=True)
class ShardTask:
  out_dir: str
  name: str
  clips: tuple[manifests.ClipSpec, ...]
  options: BuildOptions


def plan(manifest: manifests.Manifest, out_dir: str, options: BuildOptions,
         shards: dict[str, int], default_split: str) -> dict[str, list[ShardTask]]:
  """Shard tasks per split: clip i of a split (sorted by clip id) goes to shard i % count."""
  by_split: dict[str, list[manifests.ClipSpec]] = {}
  for clip in sorted(manifest.clips, key=lambda c: c.clip_id):
    by_split.setdefault(clip.split or default_split, []).append(clip)
  tasks = {}
  for split, clips in by_split.items():
    count = shards.get(split, shards["default"])
    tasks[split] = [ShardTask(out_dir, dataset_info.shard_name(split, i, count),
                              tuple(clips[i::count]), options) for i in range(count)]
  return tasks


def convert_clip(clip: manifests.ClipSpec, options: BuildOptions) -> dict[str, Any]:
  """One clip -> the writer's fields. Raises media.MediaError."""
  decoded = media.decode_clip(clip.path, clip.start, clip.end, options.decode_options())
  log_mel = features.log_mel(decoded.waveform, options.sample_rate, options.mel_bins,
                             kind=options.log_mel)
  return {"clip_id": clip.clip_id, "source": _source(clip), "labels": list(clip.labels),
          "log_mel": log_mel, "frames": decoded.frames, "timestamps": decoded.timestamps}


def _source(clip: manifests.ClipSpec) -> str:
  """The media path, with the segment when one was cut: "path@12.000-22.000"."""
  if clip.start is None:
    return clip.path
  return f"{clip.path}@{clip.start:.3f}-" + ("" if clip.end is None else f"{clip.end:.3f}")


def failure(clip: manifests.ClipSpec, reason: str, message: str) -> dict[str, str]:
  return {"clip_id": clip.clip_id, "path": clip.path, "reason": reason, "message": message}


def _fingerprint(task: ShardTask) -> dict[str, Any]:
  """What decided a shard's bytes: a finished shard is reused only for the same task."""
  return json.loads(json.dumps({"options": dataclasses.asdict(task.options),  # as stored
                                "clips": [dataclasses.asdict(c) for c in task.clips]}))


def run_shard(task: ShardTask, progress=None) -> dict[str, Any]:
  """Writes one shard (or reads back its summary when a previous run finished it)."""
  done = os.path.join(task.out_dir, task.name + DONE_SUFFIX)
  if os.path.exists(done) and os.path.exists(os.path.join(task.out_dir, task.name)):
    with open(done) as f:
      summary = json.load(f)
    if summary["task"] != _fingerprint(task):
      raise ValueError(
          f"{done}: this shard was built from other clips or options than this run's; "
          "use a new --out_dir, or delete the old shards to rebuild them")
    if progress is not None:
      progress.put(len(task.clips))
    return summary
  shard = writer.ShardWriter(task.out_dir, task.name, task.options.video_encoding,
                             task.options.jpeg_quality)
  failures = []
  for clip in task.clips:
    try:
      shard.add(**convert_clip(clip, task.options))
    except media.MediaError as e:
      failures.append(failure(clip, e.reason, str(e)))
    except Exception as e:  # a bug or an unforeseen input: recorded, never silent
      failures.append(failure(clip, "error", f"{type(e).__name__}: {e}"))
    if progress is not None:
      progress.put(1)
  summary = {"shard": dataclasses.asdict(shard.close()), "failures": failures,
             "task": _fingerprint(task)}
  tmp = done + ".tmp"
  with open(tmp, "w") as f:
    json.dump(summary, f)
  os.replace(tmp, done)  # the marker appears only after the shard is in place
  return summary


def finish(out_dir: str, manifest: manifests.Manifest, options: BuildOptions,
           tasks: dict[str, list[ShardTask]], summaries: dict[str, dict[str, Any]],
           name: str) -> dict[str, Any]:
  """dataset_info.json and failures.jsonl from the shard summaries (in shard order)."""
  out = writer.DatasetWriter(out_dir, name=name, features=options.features(),
                             label_names=list(manifest.label_names),
                             jpeg_quality=options.jpeg_quality)
  failures = [dict(p, reason=p.get("reason", "manifest")) for p in manifest.problems]
  for split, split_tasks in tasks.items():
    split_summaries = [summaries[t.name] for t in split_tasks]
    out.add_split(split, [writer.ShardSummary(**s["shard"]) for s in split_summaries])
    failures += [f for s in split_summaries for f in s["failures"]]
  return out.finish(failures)


class Progress:
  """A one-line progress report: clips done, clips/s and ETA, at most once a second."""

  def __init__(self, total: int):
    self.total, self.done, self._start, self._last = total, 0, time.monotonic(), 0.0

  def update(self, count: int) -> None:
    self.done += count
    now = time.monotonic()
    if now - self._last >= 1.0 or self.done == self.total:
      rate = self.done / max(now - self._start, 1e-9)
      eta = (self.total - self.done) / rate if rate > 0 else float("inf")
      print(f"\r[build] {self.done}/{self.total} clips  {rate:.1f} clips/s  ETA {eta:.0f} s",
            end="\n" if self.done == self.total else "", file=sys.stderr, flush=True)
      self._last = now


def run_local(tasks: Sequence[ShardTask], num_workers: int) -> dict[str, dict[str, Any]]:
  """Runs shard tasks in `num_workers` processes (0: in this one), with a progress line."""
  progress = Progress(sum(len(t.clips) for t in tasks))
  if num_workers == 0:
    class _Inline:
      def put(self, n):
        progress.update(n)
    return {t.name: run_shard(t, _Inline()) for t in tasks}
  ctx = multiprocessing.get_context("spawn")  # PyAV and threads: no fork
  with ctx.Manager() as manager, ctx.Pool(num_workers) as pool:
    queue = manager.Queue()
    pending = {t.name: pool.apply_async(run_shard, (t, queue)) for t in tasks}
    while not all(r.ready() for r in pending.values()) or not queue.empty():
      while not queue.empty():
        progress.update(queue.get())
      time.sleep(0.05)
    return {name: r.get() for name, r in pending.items()}


def build(manifest: manifests.Manifest, out_dir: str, options: BuildOptions,
          shards: dict[str, int], num_workers: int = 0, default_split: str = "train",
          name: str = "avmae") -> dict[str, Any]:
  """Converts every clip of `manifest` into the dataset at `out_dir`; returns dataset_info."""
  os.makedirs(out_dir, exist_ok=True)
  tasks = plan(manifest, out_dir, options, shards, default_split)
  summaries = run_local([t for ts in tasks.values() for t in ts], num_workers)
  return finish(out_dir, manifest, options, tasks, summaries, name)


def parse_shards(text: str) -> dict[str, int]:
  """'64' or 'train=64,eval=4,default=8' -> {'default': ..., split: count}."""
  shards: dict[str, int] = {}
  for item in text.split(","):
    key, _, value = item.rpartition("=")
    shards[key or "default"] = int(value)
  shards.setdefault("default", max(shards.values()))
  if min(shards.values()) < 1:
    raise ValueError(f"--num_shards={text}: every count must be at least 1")
  return shards


def define_flags() -> None:
  """Command-line flags (only when run as a program)."""
  flags.DEFINE_string("manifest", None, "AudioSet/VGGSound CSV, CAV-MAE JSON or path,labels CSV.")
  flags.DEFINE_enum("manifest_format", "auto", sorted({"auto", *manifests.FORMATS}),
                    "Manifest format; auto detects it.")
  flags.DEFINE_string("label_csv", None, "AudioSet class_labels_indices.csv (MID -> name).")
  flags.DEFINE_string("media_root", None, "Where the manifest's media files are found.")
  flags.DEFINE_string("media_dir", None, "Instead of a manifest: every media file below, "
                      "labelled by its folder.")
  flags.DEFINE_string("out_dir", None, "Dataset directory to write.", required=True)
  flags.DEFINE_string("split", "train", "Split of clips whose manifest names none.")
  flags.DEFINE_string("num_shards", "16", "Shards per split: N or train=N,eval=M,default=K.")
  flags.DEFINE_integer("num_workers", 0, "Local worker processes (0: this process).")
  flags.DEFINE_string("runner", "local", "local, or an Apache Beam runner: DirectRunner, "
                      "DataflowRunner, FlinkRunner, SparkRunner (needs the 'beam' extra).")
  flags.DEFINE_string("name", "avmae", "Dataset name in dataset_info.json.")
  flags.DEFINE_bool("tfds", True, "Also write DIR/tfds/ for tfds.builder_from_directory.")
  defaults = BuildOptions()
  for field in dataclasses.fields(BuildOptions):
    define = {int: flags.DEFINE_integer, float: flags.DEFINE_float, str: flags.DEFINE_string,
              bool: flags.DEFINE_bool}[type(getattr(defaults, field.name))]
    define(field.name, getattr(defaults, field.name), f"BuildOptions.{field.name}")


def main(argv: list[str]) -> None:
  f = flags.FLAGS
  if bool(f.manifest) == bool(f.media_dir):
    raise app.UsageError("give exactly one of --manifest (with --media_root) or --media_dir")
  if f.log_mel not in features.LOG_MEL_FUNCTIONS:
    raise app.UsageError(f"--log_mel={f.log_mel}: one of {sorted(features.LOG_MEL_FUNCTIONS)}")
  if f.frame_resize not in media.RESIZE_FILTERS:
    raise app.UsageError(f"--frame_resize={f.frame_resize}: one of {sorted(media.RESIZE_FILTERS)}")
  # Fail now, not on the first clip, when the chosen front end's library is missing.
  features.log_mel(np.zeros(16000, np.float32), 16000, 8, kind=f.log_mel)
  options = BuildOptions(**{fl.name: f[fl.name].value for fl in dataclasses.fields(BuildOptions)})
  if f.manifest:
    media_root = f.media_root or os.path.dirname(f.manifest) or "."
    manifest = manifests.load_manifest(f.manifest, media_root, f.manifest_format, f.label_csv)
  else:
    manifest = manifests.load_media_dir(f.media_dir)
  print(f"[build] {len(manifest.clips)} clips, {len(manifest.label_names)} labels, "
        f"{len(manifest.problems)} manifest problems", file=sys.stderr)
  start = time.monotonic()
  shards = parse_shards(f.num_shards)
  if f.runner == "local":
    info = build(manifest, f.out_dir, options, shards, f.num_workers, f.split, f.name)
  else:
    from data_prep import beam_build  # apache-beam is an optional dependency
    info = beam_build.build(manifest, f.out_dir, options, shards, f.runner, argv[1:], f.split,
                            f.name)
  if f.tfds:
    from data_prep import tfds_view  # imports TensorFlow
    tfds_view.write(f.out_dir)
  counts = {s: v["num_examples"] for s, v in info["splits"].items()}
  print(f"[build] wrote {counts} to {f.out_dir} in {time.monotonic() - start:.1f} s; "
        f"failures: {info['failures']['by_reason'] or 'none'}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
