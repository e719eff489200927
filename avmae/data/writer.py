"""Writes a dataset directory: sharded TFRecords, their indices and dataset_info.json.

Both the synthetic generator and data_prep from videos go through this module, so every
dataset avmae reads was written by one piece of code. Shards can be written in one process
(`DatasetWriter.split`) or by many (each writes whole shards with `ShardWriter` and hands
its `ShardSummary` to `DatasetWriter.add_split`).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import os
import sys
import time
from typing import Any, Iterator, Sequence

import numpy as np

from avmae.data import dataset_info, schema, tfrecord

FAILURES_FILE = "failures.jsonl"


@dataclasses.dataclass(frozen=True)
class ShardSummary:
  """What one finished shard holds: its name, clip count and log-mel sums for the stats."""
  name: str
  num_examples: int
  log_mel_sum: float = 0.0
  log_mel_sum_sq: float = 0.0
  log_mel_count: int = 0
  num_without_video: int = 0  # clips stored with no frames (build --require_video=false)


class ShardWriter:
  """Writes one shard; it appears under its final name only once complete (see RecordWriter)."""

  def __init__(self, data_dir: str, name: str, encoding: str, jpeg_quality: int):
    self.name = name
    self._records = tfrecord.RecordWriter(os.path.join(data_dir, name))
    self._encoding, self._quality = encoding, jpeg_quality
    self._sum = self._sum_sq = 0.0
    self._count = 0
    self._without_video = 0

  def add(self, *, clip_id: str, source: str, labels: Sequence[int], log_mel: np.ndarray,
          frames: np.ndarray, timestamps: np.ndarray) -> None:
    # Statistics are taken on the float16 values that are stored, i.e. what readers see.
    stored = np.asarray(log_mel).astype(np.float16)
    x = stored.astype(np.float64)
    self._sum += x.sum()
    self._sum_sq += np.square(x).sum()
    self._count += x.size
    self._without_video += len(frames) == 0
    self._records.write(schema.encode_example(
        clip_id=clip_id, source=source, labels=labels, log_mel=stored, frames=frames,
        timestamps=timestamps, encoding=self._encoding, jpeg_quality=self._quality))

  def __len__(self) -> int:
    return len(self._records)

  def close(self) -> ShardSummary:
    self._records.close()
    return ShardSummary(self.name, len(self._records), float(self._sum), float(self._sum_sq),
                        self._count, self._without_video)


class SplitWriter:
  """Spreads the clips of one split round-robin over its shards, in this process."""

  def __init__(self, data_dir: str, split: str, num_shards: int, encoding: str,
               jpeg_quality: int, expected: int | None):
    self.split = split
    self._shards = [ShardWriter(data_dir, dataset_info.shard_name(split, i, num_shards),
                                encoding, jpeg_quality) for i in range(num_shards)]
    self._expected = expected
    self.num_examples = 0
    self._last_report = time.monotonic()

  def add(self, **clip: Any) -> None:
    self._shards[self.num_examples % len(self._shards)].add(**clip)
    self.num_examples += 1
    self._report()

  def _report(self, force: bool = False) -> None:
    now = time.monotonic()
    if force or now - self._last_report > 5:
      total = f"/{self._expected}" if self._expected else ""
      print(f"  {self.split}: {self.num_examples}{total} clips written", file=sys.stderr)
      self._last_report = now

  def close(self) -> list[ShardSummary]:
    summaries = [s.close() for s in self._shards]
    self._report(force=True)
    return summaries


def log_mel_stats(summaries: Sequence[ShardSummary], split: str) -> dict[str, Any]:
  """Mean and std of every stored log-mel value of a split, from its shards' sums."""
  count = sum(s.log_mel_count for s in summaries)
  mean = sum(s.log_mel_sum for s in summaries) / count
  mean_sq = sum(s.log_mel_sum_sq for s in summaries) / count
  return {"mean": float(mean), "std": float(np.sqrt(max(mean_sq - mean**2, 0.0))),
          "split": split, "num_values": count}


class DatasetWriter:
  """Collects splits, then writes dataset_info.json with counts, stats and failures.

    writer = DatasetWriter(out_dir, name=..., features={...}, label_names=[...])
    with writer.split("train", num_shards=4) as w:
      w.add(clip_id=..., source=..., labels=[3], log_mel=..., frames=..., timestamps=...)
    writer.finish(failures=[...])
  """

  def __init__(self, out_dir: str, *, name: str, features: dict[str, Any],
               label_names: list[str], stats_split: str = "train", jpeg_quality: int = 90):
    missing = [k for k in dataset_info.REQUIRED_FEATURES if k not in features]
    if missing:
      raise ValueError(f"features lacks the keys {missing}")
    os.makedirs(out_dir, exist_ok=True)
    self.out_dir = out_dir
    self._info: dict[str, Any] = {
        "schema_version": schema.SCHEMA_VERSION, "name": name, "features": dict(features),
        "label_names": list(label_names), "splits": {}, "log_mel_stats": None, "failures": []}
    self._stats_split = stats_split
    self.jpeg_quality = jpeg_quality

  @property
  def encoding(self) -> str:
    return self._info["features"]["video_encoding"]

  @contextlib.contextmanager
  def split(self, split: str, num_shards: int, expected: int | None = None
            ) -> Iterator[SplitWriter]:
    writer = SplitWriter(self.out_dir, split, num_shards, self.encoding, self.jpeg_quality,
                         expected)
    try:
      yield writer
    finally:
      summaries = writer.close()
    self.add_split(split, summaries)

  def add_split(self, split: str, summaries: Sequence[ShardSummary]) -> None:
    """Records a split whose shards (already on disk) these summaries describe."""
    self._info["splits"][split] = {
        "num_examples": sum(s.num_examples for s in summaries),
        "num_without_video": sum(s.num_without_video for s in summaries),
        "shards": [s.name for s in summaries]}
    if split == self._stats_split and any(s.log_mel_count for s in summaries):
      self._info["log_mel_stats"] = log_mel_stats(summaries, split)

  def finish(self, failures: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """Writes failures.jsonl (one input that could not be converted per line: clip_id, path,
    reason, message) and dataset_info.json, which counts them by reason."""
    if self._info["log_mel_stats"] is None:
      raise ValueError(f"no clips were written to the {self._stats_split!r} split, so the "
                       "log-mel statistics cannot be computed")
    with open(os.path.join(self.out_dir, FAILURES_FILE), "w") as f:
      for failure in failures:
        f.write(json.dumps(failure, sort_keys=True) + "\n")
    self._info["failures"] = {"total": len(failures), "file": FAILURES_FILE,
                              "by_reason": dict(sorted(collections.Counter(
                                  f["reason"] for f in failures).items()))}
    splits = self._info["splits"].values()
    if all(s["num_without_video"] == s["num_examples"] for s in splits):
      # An audio-only dataset (every input lacked video): say so, whatever frames the
      # build would have taken from a video.
      self._info["features"]["frames_per_clip"] = 0
    dataset_info.save(self.out_dir, self._info)
    return self._info
