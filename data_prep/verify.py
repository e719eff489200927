"""`python -m data_prep.verify DIR`: re-reads every record and checks it.

Checks, per shard: the index matches a fresh scan of the record headers; every record's CRCs;
every record parses against the schema with all frames decoding; shapes agree with
dataset_info.json (mel bins, frames per clip, frame size); labels index the vocabulary; clip
ids are unique; record counts equal dataset_info.json's, and so do the counts of clips stored
without video (no frames: --require_video=false; every clip of an audio-only dataset). Prints
every problem and exits 1 if there was any.
"""

from __future__ import annotations

import sys
import time

from absl import app
import numpy as np

from avmae.data import dataset_info, errors, schema, tfrecord


def record_problems(ex: dict, info: dict, where: str) -> list[str]:
  """What is wrong with one decoded record against dataset_info.json."""
  feats, problems = info["features"], []
  size = tuple(feats["frame_size"])
  if ex["log_mel"].shape[1] != feats["mel_bins"]:
    problems.append(f"{where}: {ex['log_mel'].shape[1]} mel bins, dataset_info.json says "
                    f"{feats['mel_bins']}")
  # A clip without video has no frames; the split's count of those is checked by the caller.
  if ex["num_frames"] and (ex["num_frames"] != feats["frames_per_clip"]
                           or ex["frames"].shape[1:3] != size):
    problems.append(f"{where}: {ex['num_frames']} frames of {ex['frames'].shape[1:3]}, "
                    f"dataset_info.json says {feats['frames_per_clip']} of {size}")
  if np.any((ex["labels"] < 0) | (ex["labels"] >= len(info["label_names"]))):
    problems.append(f"{where}: labels {ex['labels'].tolist()} outside the vocabulary")
  return problems


def split_count_problems(split: str, info: dict, count: int, without_video: int
                         ) -> list[str]:
  meta, problems = info["splits"][split], []
  if count != meta["num_examples"]:
    problems.append(f"split {split}: {count} records, dataset_info.json says "
                    f"{meta['num_examples']}")
  expected = dataset_info.num_without_video(info, split)
  if without_video != expected:
    problems.append(f"split {split}: {without_video} records without video (no frames), "
                    f"dataset_info.json says {expected}")
  return problems


def verify(data_dir: str, log=print) -> list[str]:
  """Returns the problems found (empty: the dataset is sound)."""
  info = dataset_info.load(data_dir)
  problems: list[str] = []
  seen: dict[str, str] = {}
  start, records = time.monotonic(), 0
  for split in info["splits"]:
    count = without_video = 0
    for path in dataset_info.shard_paths(data_dir, info, split):
      try:
        offsets = tfrecord.read_index(path)
        scanned = tfrecord.scan_offsets(path)
        if not np.array_equal(offsets[:-1], scanned):
          problems.append(f"{path}: the index does not match the shard's records")
        for i, data in enumerate(tfrecord.iter_records(path)):
          where = f"{path} record {i}"
          ex = schema.decode_example(data, where)
          problems += record_problems(ex, info, where)
          without_video += ex["num_frames"] == 0
          if ex["clip_id"] in seen:
            problems.append(f"{where}: clip id {ex['clip_id']} also in {seen[ex['clip_id']]}")
          seen[ex["clip_id"]] = where
          count += 1
      except errors.DataError as e:
        problems.append(str(e))
      records = len(seen)
      log(f"  {path}: checked ({records} records, {records / (time.monotonic() - start):.0f}/s)")
    problems += split_count_problems(split, info, count, without_video)
  return problems


def main(argv: list[str]) -> None:
  if len(argv) != 2:
    raise app.UsageError("usage: python -m data_prep.verify DATASET_DIR")
  problems = verify(argv[1], log=lambda text: print(text, file=sys.stderr))
  for p in problems:
    print(f"PROBLEM {p}")
  print(f"{len(problems)} problems in {argv[1]}")
  sys.exit(1 if problems else 0)


if __name__ == "__main__":
  app.run(main)
