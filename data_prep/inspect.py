"""`python -m data_prep.inspect DIR [--png=FILE] [--clips=4]`: what a dataset holds.

Prints counts per split, failures by reason (with a few examples), the feature parameters and
log-mel statistics, and saves a PNG of a few decoded records (spectrogram beside frames;
the spectrogram alone for an audio-only dataset).
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags

from avmae import plots
from avmae.data import dataset_info, schema, tfrecord, writer


def summarize(data_dir: str, info: dict) -> None:
  feats = info["features"]
  print(f"  dataset      {data_dir}  (schema v{info['schema_version']})")
  for split, s in info["splits"].items():
    print(f"  {split:<12} {s['num_examples']} clips in {len(s['shards'])} shards")
  print(f"  classes      {len(info['label_names'])}: " + ", ".join(info["label_names"][:4])
        + (" ..." if len(info["label_names"]) > 4 else ""))
  print(f"  audio        {feats['log_mel']} log-mel, {feats['mel_bins']} bins, "
        f"{feats['sample_rate']} Hz; mean {info['log_mel_stats']['mean']:.3f}, "
        f"std {info['log_mel_stats']['std']:.3f} ({info['log_mel_stats']['split']})")
  print(f"  video        {video_summary(info)}")


def video_summary(info: dict) -> str:
  """Frames per clip, or that there is no video (clips built with --require_video=false)."""
  if not dataset_info.has_video(info):
    return "none: audio only (0 frames per clip, built with --require_video=false)"
  feats = info["features"]
  text = (f"{feats['frames_per_clip']} {feats['video_encoding']} frames of "
          f"{feats['frame_size'][0]}x{feats['frame_size'][1]} per clip")
  missing = {s: dataset_info.num_without_video(info, s) for s in info["splits"]}
  missing = {s: n for s, n in missing.items() if n}
  if missing:
    text += "; clips without video: " + ", ".join(f"{s} {n}" for s, n in missing.items())
  return text


def summarize_failures(data_dir: str, info: dict, examples: int = 3) -> None:
  failures = info["failures"]
  print(f"  failures     {failures['total']}: "
        + (", ".join(f"{r} {n}" for r, n in failures["by_reason"].items()) or "none"))
  path = os.path.join(data_dir, failures.get("file", writer.FAILURES_FILE))
  if failures["total"] and os.path.exists(path):
    with open(path) as f:
      for line in list(f)[:examples]:
        row = json.loads(line)
        print(f"    {row.get('reason')}: {row.get('clip_id', '')} {row.get('message', '')}")


def read_clips(data_dir: str, info: dict, split: str, count: int) -> list[dict]:
  """Up to `count` records of `split`, one per label where possible, with every frame."""
  clips, seen = [], set()
  for path in dataset_info.shard_paths(data_dir, info, split):
    for i, data in enumerate(tfrecord.iter_records(path)):
      clip = schema.decode_example(data, f"{path} record {i}")
      label = int(clip["labels"][0]) if len(clip["labels"]) else -1
      if label in seen:
        continue
      seen.add(label)
      name = info["label_names"][label] if label >= 0 else "(no label)"
      clips.append({**clip, "title": f"{clip['clip_id']}: {name}"})
      if len(clips) == count:
        return clips
  return clips


def main(argv: list[str]) -> None:
  if len(argv) != 2:
    raise app.UsageError("usage: python -m data_prep.inspect DATASET_DIR")
  data_dir = argv[1]
  info = dataset_info.load(data_dir)
  summarize(data_dir, info)
  summarize_failures(data_dir, info)
  split = "train" if "train" in info["splits"] else next(iter(info["splits"]))
  clips = read_clips(data_dir, info, split, flags.FLAGS.clips)
  if not clips:
    print(f"  no records in the {split} split to draw", file=sys.stderr)
    return
  png = flags.FLAGS.png or os.path.join(data_dir, "inspect.png")
  plots.plot_clips(clips, png, frame_shift_s=info["features"].get("frame_shift_ms", 10) / 1000)
  print(f"  saved {png}")


if __name__ == "__main__":
  flags.DEFINE_string("png", None, "Where to save the picture (default DIR/inspect.png).")
  flags.DEFINE_integer("clips", 4, "Records to draw.")
  app.run(main)
