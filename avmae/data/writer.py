"""Writes a dataset directory: sharded TFRecords, their indices and dataset_info.json.

Both the synthetic generator and data_prep from videos go through `DatasetWriter`, so every
dataset avmae reads was written by this one piece of code.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Any, Iterator

import numpy as np

from avmae.data import dataset_info, schema, tfrecord


class SplitWriter:
  """Spreads the clips of one split round-robin over its shards."""

  def __init__(self, data_dir: str, split: str, num_shards: int, encoding: str,
               jpeg_quality: int, expected: int | None, compute_stats: bool):
    self.split = split
    self.names = [dataset_info.shard_name(split, i, num_shards) for i in range(num_shards)]
    self._writers = [tfrecord.RecordWriter(os.path.join(data_dir, n)) for n in self.names]
    self._encoding, self._quality = encoding, jpeg_quality
    self._expected = expected
    self._compute_stats = compute_stats
    self._sum = self._sum_sq = 0.0
    self._count = 0
    self.num_examples = 0
    self._last_report = time.monotonic()

  def add(self, *, clip_id: str, source: str, labels, log_mel: np.ndarray, frames: np.ndarray,
          timestamps: np.ndarray) -> None:
    # Statistics are taken on the float16 values that are stored, i.e. what readers see.
    stored = np.asarray(log_mel).astype(np.float16)
    if self._compute_stats:
      x = stored.astype(np.float64)
      self._sum += x.sum()
      self._sum_sq += np.square(x).sum()
      self._count += x.size
    data = schema.encode_example(clip_id=clip_id, source=source, labels=labels, log_mel=stored,
                                 frames=frames, timestamps=timestamps, encoding=self._encoding,
                                 jpeg_quality=self._quality)
    self._writers[self.num_examples % len(self._writers)].write(data)
    self.num_examples += 1
    self._report()

  def _report(self, force: bool = False) -> None:
    now = time.monotonic()
    if force or now - self._last_report > 5:
      total = f"/{self._expected}" if self._expected else ""
      print(f"  {self.split}: {self.num_examples}{total} clips written", file=sys.stderr)
      self._last_report = now

  def close(self) -> None:
    for w in self._writers:
      w.close()
    self._report(force=True)

  def stats(self) -> dict[str, float]:
    mean = self._sum / self._count
    std = float(np.sqrt(max(self._sum_sq / self._count - mean**2, 0.0)))
    return {"mean": float(mean), "std": std, "split": self.split, "num_values": self._count}


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
    self._quality = jpeg_quality

  @contextlib.contextmanager
  def split(self, split: str, num_shards: int, expected: int | None = None
            ) -> Iterator[SplitWriter]:
    writer = SplitWriter(self.out_dir, split, num_shards, self._info["features"]["video_encoding"],
                         self._quality, expected, compute_stats=split == self._stats_split)
    try:
      yield writer
    finally:
      writer.close()
    self._info["splits"][split] = {"num_examples": writer.num_examples, "shards": writer.names}
    if split == self._stats_split and writer.num_examples:
      self._info["log_mel_stats"] = writer.stats()

  def finish(self, failures: list[dict[str, str]] = ()) -> dict[str, Any]:
    if self._info["log_mel_stats"] is None:
      raise ValueError(f"no clips were written to the {self._stats_split!r} split, so the "
                       "log-mel statistics cannot be computed")
    self._info["failures"] = list(failures)
    dataset_info.save(self.out_dir, self._info)
    return self._info
