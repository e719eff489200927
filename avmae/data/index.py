"""`python -m avmae.data.index DIR`: (re)builds the sidecar index of every shard in DIR.

Needed after shards were written by another tool (e.g. TensorFlow) or copied without their
indices. Only record headers are read, so it is fast even for large shards.
"""

from __future__ import annotations

import glob
import os
import sys
import time

from avmae.data import dataset_info, tfrecord


def main(argv: list[str]) -> None:
  if len(argv) != 2:
    sys.exit("usage: python -m avmae.data.index DATASET_DIR")
  data_dir = argv[1]
  if os.path.exists(os.path.join(data_dir, dataset_info.FILENAME)):
    info = dataset_info.load(data_dir)
    shards = [p for split in info["splits"]
              for p in dataset_info.shard_paths(data_dir, info, split)]
  else:
    shards = sorted(glob.glob(os.path.join(data_dir, "*.tfrecord*[0-9]")))
  start, total = time.perf_counter(), 0
  for i, path in enumerate(shards):
    total += len(tfrecord.build_index(path))
    print(f"[{i + 1}/{len(shards)}] {path}", file=sys.stderr)
  print(f"indexed {len(shards)} shards, {total} records in {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
  main(sys.argv)
